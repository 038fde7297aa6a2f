"""Residual diffusion codec: gain folding, real bitstream round trips, errors, training.

Tiny widths (N=8, M=12, refiner (8, 16)) and random parameters; the shipped weights are
tested in ``test_residual_weights.py``.
"""
import pathlib

import numpy as np
import pytest

import flax.linen
import jax
import jax.numpy as jnp

import diffjax.codecs
from diffjax.codecs import pretrained
from diffjax.codecs.residual_train import add_rate_point
from diffjax.codecs.residual import ResidualCodec
from diffjax.entropy import bitstream
from diffjax.errors import BitstreamError, InputError

CFG = dict(N=8, M=12, num_qualities=2, refiner_channels=(8, 16), refiner_groups=4)


def _image(h, w, seed=0):
    """A smooth image with some texture (random images are unrealistically expensive)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / 7), np.cos(yy / 5), np.sin((xx + yy) / 11)], -1)
    x = 127 + 80 * base + rng.normal(0, 6, (h, w, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


TINY = pathlib.Path(__file__).parent / "data" / "residual_tiny"


@pytest.fixture(scope="module")
def setup():
    """Codecs for (quality, steps) sharing one set of jitted functions, and the tiny
    random-init parameters of ``data/residual_tiny`` (made by ``ResidualCodec.init`` with
    ``PRNGKey(3)``, refiner output layer x20 so that refinement is visible; stored so the
    tests do not pay the init compilation)."""
    model = pretrained.load_model(TINY)
    assert model.config == {**CFG, "refiner_channels": [8, 16], "refiner_layers": 1,
                            "patch": 4, "residual_scale": 5.0, "steps": 2}
    codecs = {(q, s): diffjax.codecs.get("residual", quality=q, steps=s, **CFG)
              for q in (1, 2) for s in (0, 2)}
    c0 = codecs[(1, 0)]
    for c in codecs.values():
        c._refine, c.base = c0._refine, c0.base
    return codecs, model.params


def test_init_matches_stored_tiny_model(setup):
    """``ResidualCodec.init`` builds exactly the parameter tree of the stored asset."""
    codecs, params = setup
    abstract = jax.eval_shape(codecs[(1, 0)].init, jax.random.PRNGKey(3))
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_registered():
    assert "residual" in diffjax.codecs.available()
    assert diffjax.codecs.codec_name(ResidualCodec.codec_id) == "residual"


def test_fold_quality_matches_gained_forward(setup):
    """The folded plain hyperprior computes the gained model's base reconstruction."""
    from diffjax.models.hyperprior import HyperpriorModel
    from diffjax.models.refiner import fold_quality

    codecs, params = setup
    model = codecs[(1, 0)].model
    params = dict(params)
    params["gain"] = params["gain"] * jnp.linspace(0.5, 2.0, CFG["M"])  # per-channel gains
    params["inv_gain"] = params["inv_gain"] * jnp.linspace(1.5, 0.7, CFG["M"])
    x = jnp.asarray(_image(64, 64), jnp.float32)[None] / 255.0
    hp = HyperpriorModel(N=CFG["N"], M=CFG["M"], mean_scale=True)
    for q in range(2):
        ref = model.apply({"params": params}, x, jnp.array([q]), train=False)
        got = hp.apply({"params": fold_quality(params, q)}, x, train=False)
        np.testing.assert_allclose(got["x_hat"], ref["x_base"], atol=2e-5)
        for k in ("y", "z"):
            np.testing.assert_allclose(got["likelihoods"][k], ref["likelihoods"][k], atol=1e-5)


def test_round_trip_base_and_refined(setup):
    codecs, params = setup
    img = _image(70, 90)  # not a multiple of 64: padded and cropped back
    data = codecs[(1, 2)].encode(params, img)
    header = bitstream.read_header(data)
    assert (header.codec_id, header.quality, header.height, header.width, header.channels) == (
        2, 1, 70, 90, 3)
    codec = codecs[(1, 2)]
    base = codec.decode(params, data, steps=0)
    refined = codec.decode(params, data)  # 2 steps, as written in the file
    assert base.shape == refined.shape == img.shape and base.dtype == np.uint8
    # (base-only decoding against an independent computation: the next two tests)
    # The refiner changes the image, and deterministically (noise seeded by the file).
    assert np.abs(refined.astype(int) - base.astype(int)).mean() > 0.5
    np.testing.assert_array_equal(codec.decode(params, data), refined)
    # A codec built with other defaults decodes the same file the same way.
    np.testing.assert_array_equal(codecs[(1, 0)].decode(params, data), refined)
    np.testing.assert_array_equal(codecs[(1, 0)].decode(params, data, steps=0), base)


def _forward_base(model_kwargs, params, img, quality):
    """The base reconstruction computed without the codec: edge-pad to a multiple of 64,
    one forward pass of a freshly built gained model (rounding quantiser, ``train=False``),
    clip, round to uint8, crop; and the model's estimated bits of y and z."""
    from diffjax.models.refiner import ResidualCodecModel

    h, w = img.shape[:2]
    x = np.pad(img, ((0, -h % 64), (0, -w % 64), (0, 0)), mode="edge")
    x = jnp.asarray(x, jnp.float32)[None] / 255.0
    out = ResidualCodecModel(**model_kwargs).apply({"params": params}, x,
                                                   jnp.array([quality - 1]), train=False)
    pixels = np.asarray(jnp.round(jnp.clip(out["x_base"][0], 0.0, 1.0) * 255.0))[:h, :w]
    bits = {k: float(-jnp.sum(jnp.log2(v))) for k, v in out["likelihoods"].items()}
    return pixels.astype(np.uint8), bits


@pytest.mark.parametrize("quality", [1, 2])
def test_base_only_decode_is_the_models_forward_pass(setup, quality):
    """Base-only decoding (entropy decoding of the file, then the synthesis) gives the
    image of the gained model's own forward pass on the original (``x_base``: analysis x
    gain, rounding around the hyperprior means, x inverse gain, synthesis); computed here
    without the codec, its gain folding or its entropy coder. Gains are made non-trivial
    and different per quality so folding them matters. The file's sizes follow the model's
    estimated bits."""
    codecs, params = setup
    params = dict(params)
    params["gain"] = jnp.stack([jnp.linspace(0.6, 1.8, CFG["M"]), jnp.linspace(1.5, 3.0, CFG["M"])])
    params["inv_gain"] = 1.0 / params["gain"] * jnp.linspace(0.9, 1.1, CFG["M"])
    img = _image(70, 90, seed=3)
    codec = codecs[(quality, 2)]
    data = codec.encode(params, img)
    base = codec.decode(params, data, steps=0)
    expected, bits = _forward_base(dict(CFG), params, img, quality)
    diff = np.abs(base.astype(int) - expected.astype(int))
    # float summation order differs (folded vs gained convolutions): at most a last-digit
    # rounding flip on a few pixels, never a different latent symbol
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    _, sections = bitstream.unpack(data)
    z_bytes, y_bytes = len(sections[0]), len(sections[1])
    assert z_bytes == pytest.approx(bits["z"] / 8, rel=0.25, abs=8)
    assert y_bytes == pytest.approx(bits["y"] / 8, rel=0.1, abs=8)


def test_base_only_decode_ignores_the_steps_in_the_file(setup):
    """Files that differ only in the refinement steps they ask for decode base-only to the
    same image, the model's forward pass; refined decoding differs from it."""
    codecs, params = setup
    img = _image(64, 64, seed=4)
    expected, _ = _forward_base(dict(CFG), params, img, 1)
    d0, d2 = codecs[(1, 0)].encode(params, img), codecs[(1, 2)].encode(params, img)
    assert d0 != d2
    base = codecs[(1, 0)].decode(params, d2, steps=0)
    np.testing.assert_array_equal(codecs[(1, 2)].decode(params, d0), base)
    assert np.abs(base.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(codecs[(1, 0)].decode(params, d2), base)


def test_quality_changes_rate(setup):
    codecs, params = setup
    params = dict(params)
    params["gain"] = jnp.asarray([[0.25], [4.0]]) * jnp.ones((2, CFG["M"]))
    params["inv_gain"] = 1.0 / params["gain"]
    img = _image(64, 64, seed=1)
    d1, d2 = (codecs[(q, 0)].encode(params, img) for q in (1, 2))
    assert len(d1) < len(d2)
    assert bitstream.read_header(d2).quality == 2
    assert codecs[(1, 0)].decode(params, d2).shape == img.shape  # quality comes from the file


def test_gray_and_rgba(setup):
    codecs, params = setup
    codec = codecs[(1, 0)]
    rgb = _image(64, 64, seed=2)
    gray = rgb[..., :1]
    out = codec.decode(params, codec.encode(params, gray[..., 0]))
    assert out.shape == (64, 64, 1) and bitstream.read_header(codec.encode(params, gray)).channels == 1
    alpha = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64, 1)
    rgba = np.concatenate([rgb, alpha], -1)
    data = codec.encode(params, rgba)
    out = codec.decode(params, data)
    assert out.shape == (64, 64, 4)
    np.testing.assert_array_equal(out[..., 3], alpha[..., 0])  # alpha is lossless
    np.testing.assert_array_equal(out[..., :3], codec.decode(params, codec.encode(params, rgb)))


def test_errors(setup):
    codecs, params = setup
    codec = codecs[(1, 0)]
    data = codec.encode(params, _image(64, 64))
    bad = bytearray(data)
    bad[-3] ^= 0x10
    with pytest.raises(BitstreamError):
        codec.decode(params, bytes(bad))
    with pytest.raises(BitstreamError):
        codec.decode(params, data[:-5])
    other = jax.tree.map(lambda a: a * 1.01, params)
    with pytest.raises(bitstream.WrongModelError):
        codec.decode(other, data)
    header, sections = bitstream.unpack(data)
    foreign = bitstream.pack(1, header.fingerprint, sections, height=64, width=64)
    with pytest.raises(bitstream.WrongCodecError):
        codec.decode(params, foreign)
    no_steps = bitstream.pack(2, header.fingerprint, sections[:-1], height=64, width=64,
                              quality=1)
    with pytest.raises(bitstream.CorruptError, match="layout"):
        codec.decode(params, no_steps)
    with pytest.raises(InputError, match="quality"):
        diffjax.codecs.get("residual", quality=3, **CFG)
    with pytest.raises(InputError, match="steps"):
        codec.decode(params, data, steps=-1)
    with pytest.raises(InputError, match="uint8"):
        codec.encode(params, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="RGB"):
        codec.encode(params, np.zeros((8, 8, 2), np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("sampler_steps", [0, 2])
def test_task_loss_and_gradients(setup, sampler_steps):
    """The training loss is finite, every parameter group gets a gradient, and the
    refiner's x0-prediction loss on a fixed example goes down with a few Adam steps
    (uniform-timestep loss and sampler in the loop)."""
    import optax

    from diffjax.codecs.residual_train import ResidualTask
    from diffjax.train.task import task_loss

    task = ResidualTask(lmbdas=(0.0018, 0.0483), rho=0.5, N=8, M=12,
                        refiner_channels=(8, 16), refiner_groups=4,
                        sampler_steps=sampler_steps)
    spec = {"image": jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)}
    params = flax.linen.meta.unbox(task.init_params(jax.random.PRNGKey(0), spec))
    x = jnp.asarray(np.stack([_image(64, 64, 3), _image(64, 64, 4)]), jnp.float32) / 255.0
    tx = optax.adam(2e-3)

    @jax.jit
    def step(p, o):
        (loss, m), g = jax.value_and_grad(
            lambda p: task_loss(task, p, {"image": x}, jax.random.PRNGKey(5), 0),
            has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss, m, g

    opt = tx.init(params)
    p1, opt, loss0, m0, g = step(params, opt)
    assert np.isfinite(float(loss0))
    assert set(m0) >= {"bpp", "psnr_base", "psnr_refined", "lpips_refined", "aux_loss"}
    for group in ("base", "gain", "inv_gain", "refiner"):
        norm = optax.global_norm(g[group])
        assert np.isfinite(float(norm)) and float(norm) > 0, group
    p = p1
    for _ in range(15):
        p, opt, loss, m, _ = step(p, opt)
    assert float(loss) < float(loss0)


def test_sampler_in_the_loop_follows_the_decoders_trajectory(setup):
    """``sampler_steps=K``: the refiner's training input at the drawn step k is exactly the
    state the decoder's K-step DDIM reaches from the same noise (every k is drawn), with
    that step's timestep; a negative K is an error."""
    from diffjax.codecs.residual_train import ResidualTask
    from diffjax.diffusion import sample
    from diffjax.models.refiner import SCHEDULER_CONFIG

    K, b = 3, 12
    task = ResidualTask(lmbdas=(0.0018, 0.0483), rho=0.0, sampler_steps=K, **{
        k: v for k, v in CFG.items() if k != "num_qualities"})
    _, params = setup
    rng = np.random.default_rng(0)
    x_base = jnp.asarray(rng.uniform(0, 1, (b, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(0, 2, (b, 2, 2, 12)), jnp.float32)
    q = jnp.asarray(np.arange(b) % 2, jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(1), x_base.shape)

    def denoise(r, t):
        return task.model.apply({"params": params}, r, t, x_base, y, q, method="denoise")

    r_k, t_k = task._sampler_state(params, denoise, noise, jax.random.PRNGKey(2), b)
    _, traj = sample(lambda r, t: denoise(r, jnp.broadcast_to(t, (b,))), noise,
                     scheduler_config=SCHEDULER_CONFIG, sampler="ddim",
                     num_inference_steps=K, return_trajectory=True)
    steps = np.asarray(traj["timesteps"])
    k = np.searchsorted(-steps, -np.asarray(t_k))
    assert np.array_equal(steps[k], np.asarray(t_k)) and set(k) == set(range(K))
    entering = np.concatenate([np.asarray(noise)[None], np.asarray(traj["x"])[:-1]])
    np.testing.assert_allclose(np.asarray(r_k), entering[k, np.arange(b)], rtol=1e-5, atol=1e-4)
    assert not np.allclose(entering[1], entering[0])
    with pytest.raises(InputError, match="sampler_steps"):
        ResidualTask(lmbdas=(0.0018,), rho=0.0, sampler_steps=-1, N=8, M=12)


def test_quality_weights_set_how_often_each_rate_point_trains():
    """Uniform qualities by default; ``quality_weights`` (normalised) skews the draw, a zero
    weight never draws that quality, and a wrong-length or negative list is an error."""
    from diffjax.codecs.residual_train import ResidualTask

    small = dict(N=8, M=12, rho=0.0)
    key, n = jax.random.PRNGKey(0), 6000
    uniform = np.bincount(np.asarray(ResidualTask(lmbdas=(1e-3, 1e-2, 1e-1), **small)
                                     .draw_quality(key, n)), minlength=3) / n
    np.testing.assert_allclose(uniform, [1 / 3] * 3, atol=0.03)
    skewed = ResidualTask(lmbdas=(1e-3, 1e-2, 1e-1), quality_weights=(0, 1, 3), **small)
    freq = np.bincount(np.asarray(skewed.draw_quality(key, n)), minlength=3) / n
    assert freq[0] == 0
    np.testing.assert_allclose(freq, [0, 0.25, 0.75], atol=0.03)
    for bad in [(1, 1), (1, -1, 1), (0, 0, 0)]:
        with pytest.raises(InputError, match="quality_weights"):
            ResidualTask(lmbdas=(1e-3, 1e-2, 1e-1), quality_weights=bad, **small)



@pytest.mark.slow
def test_smoke_config_trains_and_loads(tmp_path):
    """``experiments/configs/residual.py:smoke`` trains a few steps with the generic loop
    (Orbax checkpoints), and ``--model WORKDIR`` loading reads the result."""
    from diffjax.train.loop import train
    from experiments.configs import residual as residual_config

    config = residual_config.get_config("smoke")
    config.num_train_steps = 2
    logged = []
    train(config, tmp_path, hooks=[lambda step, state, m: m and logged.append(m)],
          progress=False)
    assert len(logged) == 2 and all(np.isfinite(m["loss"]) for m in logged)
    assert {"bpp", "psnr_base", "psnr_refined", "lpips_refined"} <= set(logged[0])
    model = pretrained.load_model(tmp_path)
    assert model.info["step"] == 2
    assert model.num_qualities == len(residual_config.LMBDAS) == 5
    codec = model.codec(quality=1, steps=1)
    img = _image(64, 64)
    assert codec.decode(model.params, codec.encode(model.params, img)).shape == img.shape


@pytest.mark.slow
def test_gpu_config_is_the_wider_design_and_trains(tmp_path):
    """``residual.py:gpu``: N=128/M=192 base and a two-block (64, 128) refiner; one step of
    it (on 64 px crops, batch 8) trains with the generic loop and exports a loadable model
    of those widths."""
    from diffjax.train.loop import train
    from experiments.configs import residual as residual_config

    config = residual_config.get_config("gpu")
    assert (config.task.kwargs.N, config.task.kwargs.M) == (128, 192)
    assert residual_config.get_config("gpu,enhance").num_train_steps < config.num_train_steps
    config.num_train_steps, config.batch_size, config.data.crop = 1, 8, 64
    config.log_every = config.checkpoint_every = 1
    train(config, tmp_path, progress=False)
    model = pretrained.load_model(tmp_path)
    assert (model.config["N"], model.config["M"], model.config["refiner_layers"]) == (128, 192, 2)
    assert model.config["refiner_channels"] == [64, 128]
    assert model.params["refiner"]["unet"]["conv_in"]["kernel"].shape[-1] == 64


def test_config_rejects_unknown_or_conflicting_arguments():
    from experiments.configs import residual as residual_config

    with pytest.raises(ValueError, match="unknown config argument"):
        residual_config.get_config("tpu")
    with pytest.raises(ValueError, match="one of cpu and gpu"):
        residual_config.get_config("cpu,gpu")


@pytest.mark.parametrize("end", ["low", "high"])
def test_add_rate_point_keeps_old_points_and_extrapolates_gains(setup, end):
    """``residual_train.add_rate_point``: the new gain rows continue the old ones geometrically,
    and every old rate point codes the same symbols and decodes the same image at its
    shifted index."""
    codecs, params = setup
    model = pretrained.load_model(TINY)
    lmbdas = model.info["lmbdas"]
    new_lmbda = lmbdas[0] / 2 if end == "low" else lmbdas[-1] * 2
    bigger = add_rate_point(model, new_lmbda, end=end)
    assert bigger.num_qualities == 3
    assert bigger.info["lmbdas"] == ([new_lmbda] + lmbdas if end == "low" else lmbdas + [new_lmbda])
    g_old, g_new = np.asarray(params["gain"]), np.asarray(bigger.params["gain"])
    shift = 1 if end == "low" else 0
    np.testing.assert_array_equal(g_new[shift:shift + 2], g_old)
    expect = g_old[0] ** 2 / g_old[1] if end == "low" else g_old[1] ** 2 / g_old[0]
    np.testing.assert_allclose(g_new[0 if end == "low" else 2], expect, rtol=1e-5)

    img = _image(64, 64)
    for steps in (0, 2):  # base-only bit for bit; refined up to float summation order
        old = codecs[(2, steps)]
        new = bigger.codec(quality=2 + shift, steps=steps)
        data_old, data_new = old.encode(params, img), new.encode(bigger.params, img)
        assert bitstream.unpack(data_old)[1] == bitstream.unpack(data_new)[1]
        a = old.decode(params, data_old).astype(int)
        b = new.decode(bigger.params, data_new).astype(int)
        assert np.abs(a - b).max() <= (0 if steps == 0 else 1)
    extra = bigger.codec(quality=1 if end == "low" else 3, steps=0)
    assert extra.decode(bigger.params, extra.encode(bigger.params, img)).shape == img.shape


def test_add_rate_point_rejects_lambda_inside_range():
    model = pretrained.load_model(TINY)
    with pytest.raises(ValueError, match="not below"):
        add_rate_point(model, model.info["lmbdas"][-1], end="low")
    with pytest.raises(ValueError, match="end must be"):
        add_rate_point(model, 1.0, end="middle")


def test_enhance_config_trains_on_the_decoders_default_steps():
    """The ``enhance`` stage trains the refiner on the trajectory the decoder runs by
    default, perceptually weighted; the joint default keeps the uniform-timestep loss."""
    from diffjax.codecs.residual import DEFAULT_STEPS
    from experiments.configs import residual as residual_config

    enhance = residual_config.get_config("cpu,enhance").task.kwargs
    assert enhance.sampler_steps == DEFAULT_STEPS and enhance.rho == 0.9
    assert residual_config.get_config("cpu").task.kwargs.sampler_steps == 0
