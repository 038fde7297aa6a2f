"""Foundation latent codec (Relic et al. 2024) on tiny random SD-layout backbones.

Proofs of issue 8: end to end through a file and a fresh process (bit-identical), UNet
calls == predicted step count, gradients through t and gamma, sharded == single-device
decode; plus the partial-DDIM plan against the diffusion core's DDIM and bad input.
"""
import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax.codecs
from diffjax.codecs.foundation import Backbone, FoundationCodec, foundation_loss
from diffjax.diffusion import sample
from diffjax.entropy.bitstream import (CorruptError, TruncatedError, WrongCodecError,
                                       WrongModelError)
from diffjax.errors import InputError
from diffjax.train.sharding import make_mesh
from experiments.configs.foundation_sd21 import SD21_SCHEDULER, TINY_UNET, TINY_VAE

SCHED, VAE, UNET = SD21_SCHEDULER, TINY_VAE, TINY_UNET
CONFIG = dict(vae="sd", vae_config=VAE, unet_config=UNET, scheduler_config=SCHED,
              estimator_features=(16, 32), hyper_channels=16)


def _image(seed, h=24, w=20):
    """A smooth random image (random-weight codecs give ~uniform output anyway)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(3 * yy + rng.random()), np.cos(4 * xx), yy * xx], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


UNET_CALLS = []


@pytest.fixture(scope="module")
def codec():
    codec = diffjax.codecs.get("foundation", quality=10, **CONFIG)
    inner = codec.backbone.unet_apply

    def counted(p, x, t, ctx):  # counts UNet executions (inside jit / the DDIM loop)
        jax.debug.callback(lambda: UNET_CALLS.append(1))
        return inner(p, x, t, ctx)

    codec.backbone.unet_apply = counted
    return codec


@pytest.fixture(scope="module")
def params(codec):
    p = codec.init(jax.random.key(0))
    # a non-trivial context so the cross-attention path matters
    p["context"] = jax.random.normal(jax.random.key(5), (1, 3, 24))
    return p


@pytest.fixture(scope="module")
def stream(codec, params):
    return codec.encode(params, _image(0))  # 24x20: padded to 32x32 and cropped back


def test_registered_with_codec_id(codec):
    assert isinstance(codec, FoundationCodec) and codec.codec_id == 3
    assert diffjax.codecs.codec_name(3) == "foundation"
    assert codec.backbone.stride == 32  # VAE /8 times hyper /4 (UNet needs /2 of the latent)


def test_file_roundtrip(codec, params, stream, tmp_path):
    path = tmp_path / "image.djx"
    path.write_bytes(stream)
    out = codec.decode(params, path.read_bytes())
    assert out.shape == (24, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, codec.decode(params, stream))
    assert len(stream) < 24 * 20 * 3  # actually compressed


@pytest.mark.slow
def test_file_roundtrip_in_fresh_process_is_bit_identical(codec, params, stream, tmp_path):
    ours = codec.decode(params, stream)
    (tmp_path / "image.djx").write_bytes(stream)
    (tmp_path / "params.msgpack").write_bytes(flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, params)))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    script = textwrap.dedent("""
        import json, sys, pathlib
        import numpy as np, flax, diffjax.codecs
        d = pathlib.Path(sys.argv[1])
        codec = diffjax.codecs.get("foundation", quality=10, **json.loads((d / "config.json").read_text()))
        params = flax.serialization.msgpack_restore((d / "params.msgpack").read_bytes())
        np.save(d / "decoded.npy", codec.decode(params, (d / "image.djx").read_bytes()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a plain 1-device process
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "decoded.npy"), ours)


def test_unet_calls_equal_predicted_step_count(codec, params, stream):
    from diffjax.entropy import bitstream
    _, sections = bitstream.unpack(stream)
    t = float(np.frombuffer(sections[0][:2], "<f2")[0])  # the side information in the file
    assert 0.0 < t < 1.0
    expected = codec.predicted_steps(t)
    assert expected == max(1, int(np.ceil(t * codec.num_inference_steps)))
    for kwargs, n in (({}, expected), ({"num_steps": 2}, 2), ({"t": 0.1}, 5),
                      ({"t": 0.5, "num_steps": 1}, 1)):
        UNET_CALLS.clear()
        codec.decode(params, stream, **kwargs)
        assert len(UNET_CALLS) == n, kwargs
    assert codec.predicted_steps(0.31) == 16


def test_overrides_change_the_output(codec, params, stream):
    base = codec.decode(params, stream)
    assert not np.array_equal(base, codec.decode(params, stream, t=0.12))
    assert not np.array_equal(base, codec.decode(params, stream, num_steps=1))


@pytest.mark.slow
def test_gradients_reach_estimator_through_t_and_gamma(codec, params):
    x = jnp.asarray(_image(1, 32, 32)[None] / 255.0, jnp.float32)
    c = codec.backbone.latent_channels

    def loss(model_params):
        p = dict(params, model=model_params)
        return foundation_loss(codec.backbone, codec.model, p, x, 10.0, jax.random.key(3))[0]

    grads = jax.jit(jax.grad(loss))(params["model"])
    est = grads["estimator"]
    leaves = jax.tree.leaves(est)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    head_bias = est["head"]["bias"]
    assert float(jnp.abs(head_bias[2 * c])) > 0            # the t logit: only through alpha(t)
    assert float(jnp.min(jnp.abs(head_bias[:c]))) > 0      # every log-scale of gamma
    assert float(jnp.min(jnp.abs(head_bias[c:2 * c]))) > 0  # every shift of gamma


@pytest.mark.slow
def test_distortion_scale_weights_only_the_mse_term(codec, params):
    x = jnp.asarray(_image(2, 32, 32)[None] / 255.0, jnp.float32)
    args = (codec.backbone, codec.model, params, x, 5.0, jax.random.key(4))
    _, m1 = foundation_loss(*args)
    _, m100 = foundation_loss(*args, distortion_scale=100.0)
    assert float(m1["mse"]) == pytest.approx(float(m100["mse"]))
    assert float(m1["rd_loss"]) == pytest.approx(float(m1["bpp"]) + 5.0 * float(m1["mse"]), rel=1e-6)
    assert float(m100["rd_loss"]) == pytest.approx(
        float(m100["bpp"]) + 500.0 * float(m100["mse"]), rel=1e-6)


@pytest.mark.slow
def test_sharded_decode_equals_single_device(codec, params):
    assert jax.device_count() == 8
    datas = [codec.encode(params, _image(10 + i)) for i in range(8)]
    sharded = np.stack(codec.decode_batch(params, datas, mesh=make_mesh({"data": -1, "fsdp": 1})))
    single = np.stack([codec.decode(params, d) for d in datas])  # one device, one image
    np.testing.assert_array_equal(sharded, single)  # bit-identical (shard_map, per image)
    assert np.std(single) > 5  # a real image, not a constant that would match trivially


@pytest.fixture(scope="module")
def toy_backbone():
    """The tiny backbone with a cheap stand-in denoiser: tests the DDIM plan, not the UNet."""
    bb = Backbone("sd", VAE, UNET, SCHED)
    w = jax.random.normal(jax.random.key(9), (4, 4)) * 0.3
    bb.unet_apply = lambda p, x, t, ctx: jnp.tanh(x @ w) * (1 + t[:, None, None, None] / 1000)
    return bb


def test_partial_ddim_matches_diffusion_core_ddim(toy_backbone):
    """t = 1 with k steps is a full DDIM run on the "trailing" grid (timesteps 999, 979, ...)."""
    y = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    ours = jax.jit(lambda y: toy_backbone.denoise(None, y, jnp.ones(2), 50, None))(y)
    cfg = dict(SCHED, timestep_spacing="trailing", set_alpha_to_one=True)
    ref = jax.jit(lambda y: sample(
        lambda x, t: toy_backbone.unet_apply(None, x, jnp.full((2,), t), None),
        toy_backbone.schedule.alpha(1.0) * y, scheduler_config=cfg, sampler="ddim",
        num_inference_steps=50))(y)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)


def test_bucketed_loop_equals_exact_plan(toy_backbone):
    """k steps inside an 8-step compiled loop (traced k) == a plan of exactly k steps."""
    y = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
    t = jnp.array([0.05, 0.2])
    run = jax.jit(lambda k: toy_backbone.denoise(None, y, t, k, None, max_steps=8))
    exact = jax.jit(lambda k: toy_backbone.denoise(None, y, t, k, None), static_argnums=0)
    for k in (1, 3, 8):
        np.testing.assert_allclose(run(k), exact(k), atol=1e-6, rtol=1e-6)


def test_one_step_decode_is_the_training_x0_step(toy_backbone):
    y = jax.random.normal(jax.random.key(2), (3, 4, 4, 4))
    t = jnp.array([0.02, 0.05, 0.3])
    steps = jax.jit(lambda k: toy_backbone.denoise(None, y, t, k, None), static_argnums=0)
    one = steps(1)
    np.testing.assert_allclose(one, jax.jit(lambda: toy_backbone.x0_step(None, y, t, None))(),
                               atol=1e-5, rtol=1e-5)
    assert not np.allclose(one, steps(3))


def test_bad_streams_and_arguments(codec, params, stream):
    with pytest.raises(CorruptError):
        codec.decode(params, stream[:-3] + bytes([stream[-3] ^ 0x10]) + stream[-2:])
    with pytest.raises(TruncatedError):
        codec.decode(params, stream[:-5])
    other = dict(params, model=jax.tree.map(lambda a: a * 1.001, params["model"]))
    with pytest.raises(WrongModelError):
        codec.decode(other, stream)
    from diffjax.entropy import bitstream
    foreign = bitstream.pack(1, codec.fingerprint(params), [b"x"], height=8, width=8)
    with pytest.raises(WrongCodecError):
        codec.decode(params, foreign)
    with pytest.raises(InputError, match="t must be"):
        codec.decode(params, stream, t=1.5)
    with pytest.raises(InputError, match="num_steps"):
        codec.decode(params, stream, num_steps=0)
    with pytest.raises(InputError, match="quality"):
        FoundationCodec(0, **CONFIG)
    with pytest.raises(InputError):
        codec.encode(params, np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="channels"):
        Backbone("sd", VAE, dict(UNET, in_channels=8), SCHED)
