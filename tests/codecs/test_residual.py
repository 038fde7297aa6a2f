"""Residual diffusion codec: gain folding, real bitstream round trips, errors, training.

Tiny widths (N=8, M=12, refiner (8, 16)) and random parameters; the shipped weights are
tested in ``test_residual_weights.py``.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import diffjax.codecs
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


@pytest.fixture(scope="module")
def setup():
    codecs = {(q, s): diffjax.codecs.get("residual", quality=q, steps=s, **CFG)
              for q in (1, 2) for s in (0, 2)}
    params = codecs[(1, 0)].init(jax.random.PRNGKey(0))
    # Random init leaves the refiner's output tiny; scale the last conv so refinement shows.
    unet = dict(params["refiner"]["unet"])
    unet["conv_out"] = jax.tree.map(lambda a: a * 20.0, unet["conv_out"])
    params = {**params, "refiner": {"unet": unet}}
    # Share the jitted functions: every codec object below reuses these compiled ones.
    c0 = codecs[(1, 0)]
    for c in codecs.values():
        c._refine, c.base = c0._refine, c0.base
    return codecs, params


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
    # Base-only decode is exactly the plain hyperprior decode of the folded parameters.
    _, secs = bitstream.unpack(data)
    fp = codec.base.fingerprint(codec._prepared(params)[2][0])
    inner = bitstream.pack(1, fp, secs[:3], height=70, width=90)
    np.testing.assert_array_equal(codec.base.decode(codec._prepared(params)[2][0], inner), base)
    # The refiner changes the image, and deterministically (noise seeded by the file).
    assert np.abs(refined.astype(int) - base.astype(int)).mean() > 0.5
    np.testing.assert_array_equal(codec.decode(params, data), refined)
    # A codec built with other defaults decodes the same file the same way.
    np.testing.assert_array_equal(codecs[(1, 0)].decode(params, data), refined)
    np.testing.assert_array_equal(codecs[(1, 0)].decode(params, data, steps=0), base)


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
    hp = diffjax.codecs.get("hyperprior", N=8, M=12, mean_scale=True)
    with pytest.raises(bitstream.WrongCodecError):
        hp.decode(hp.init(jax.random.PRNGKey(1)), data)
    with pytest.raises(InputError, match="quality"):
        diffjax.codecs.get("residual", quality=3, **CFG)
    with pytest.raises(InputError, match="steps"):
        codec.decode(params, data, steps=-1)
    with pytest.raises(InputError, match="uint8"):
        codec.encode(params, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="RGB"):
        codec.encode(params, np.zeros((8, 8, 2), np.uint8))


def test_task_loss_and_gradients(setup):
    """The training loss is finite, every parameter group gets a gradient, and the
    refiner's x0-prediction loss on a fixed example goes down with a few Adam steps."""
    import optax

    from diffjax.codecs.residual_train import ResidualTask
    from diffjax.train.task import task_loss

    task = ResidualTask(lmbdas=(0.0018, 0.0483), rho=0.5, N=8, M=12,
                        refiner_channels=(8, 16), refiner_groups=4)
    spec = {"image": jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)}
    params = task.init_params(jax.random.PRNGKey(0), spec)
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
