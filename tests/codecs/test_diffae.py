"""The diffusion-autoencoder codec (Rampas 2024): real bitstreams, deterministic decode."""
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
from diffjax.codecs.diffae import DiffAECodec, diffae_loss
from diffjax.entropy import bitstream
from diffjax.entropy.bitstream import CorruptError, TruncatedError, WrongCodecError, WrongModelError
from diffjax.errors import InputError
from experiments.configs.diffae import codec_kwargs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "entropy"))
from bitstream_fuzz import fuzz_cases, run_fuzz  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def codec():
    return diffjax.codecs.get("diffae", quality=2, **codec_kwargs("smoke"))


def scaled(params, scale):
    """``params`` with the projection to the latent scaled (BatchNorm at inference is
    linear, so the latent scales by exactly ``scale``)."""
    enc = params["encoder"]["params"]
    proj = dict(enc["proj"], kernel=np.asarray(enc["proj"]["kernel"]) * np.float32(scale))
    return dict(params, encoder=dict(params["encoder"], params=dict(enc, proj=proj)))


@pytest.fixture(scope="module")
def calibration(codec, image):
    """Random parameters whose latent has unit scale on ``image`` (a trained encoder's
    BatchNorm statistics standardise it; random ones leave it near 1e-4), and the scale."""
    params = codec.init(jax.random.key(0))
    scale = float(np.float32(1.0 / codec.latents(params, image[None]).std()))
    return scaled(params, scale), scale


@pytest.fixture(scope="module")
def params(calibration):
    return calibration[0]


@pytest.fixture(scope="module")
def image():
    yy, xx = np.mgrid[0:40, 0:72]  # not a multiple of the stride (32): padded and cropped
    rgb = np.stack([yy * 6, xx * 3, (xx + yy) * 2], -1) % 256
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def stream(codec, params, image):
    return codec.encode(params, image)


def test_roundtrip_fresh_process_bit_identical(codec, params, image, stream, tmp_path):
    ours = codec.decode(params, stream)
    assert ours.shape == image.shape and ours.dtype == np.uint8
    header = bitstream.read_header(stream)
    assert (header.codec_id, header.quality, header.height, header.width) == (4, 2, 40, 72)
    (tmp_path / "image.djx").write_bytes(stream)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    np.savez(tmp_path / "params.npz", **{k: np.asarray(v) for k, v in flat.items()})
    script = textwrap.dedent("""
        import pathlib, sys
        import flax, numpy as np
        import diffjax.codecs
        from experiments.configs.diffae import codec_kwargs
        d = pathlib.Path(sys.argv[1])
        codec = diffjax.codecs.get("diffae", quality=0, **codec_kwargs("smoke"))
        with np.load(d / "params.npz") as f:  # the same parameters, read from disk
            params = flax.traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")
        np.save(d / "decoded.npy", codec.decode(params, (d / "image.djx").read_bytes()))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "decoded.npy"), ours)
    # the seed in the header drives the noise: another seed, another (valid) decode
    other = codec.at_quality(2)
    other.seed = 7
    assert not np.array_equal(other.decode(params, other.encode(params, image)), ours)


def test_rates_share_one_model(codec, params, image, stream):
    """Each quality quantises with its own step: ``|ŷ - y| <= Δ_q / 2``, finer for higher
    qualities (the untrained prior is flat, so file sizes say nothing yet)."""
    y = codec.latents(params, image[None])[0]
    # medians away from 0, different per density: symbols are coded around them
    eb = params["entropy"]
    offset = np.random.default_rng(3).uniform(-0.5, 0.5, eb["quantiles"].shape[:1])
    params = dict(params, entropy=dict(eb, quantiles=np.asarray(eb["quantiles"])
                                       + offset[:, None].astype(np.float32)))
    errors = []
    for q in codec.qualities:
        data = codec.at_quality(q).encode(params, image)
        assert bitstream.read_header(data).quality == q
        err = np.abs(codec.decoded_latents(params, data) - y).max()
        assert err <= codec.quant_steps[q] / 2 + 1e-5, (q, err)
        errors.append(err)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 2, errors
    assert codec.qualities == (0, 1, 2, 3)


def test_bad_input_and_files(codec, params, image, stream):
    # the container: the seeded fuzz of tests/entropy (every case fails before decoding)
    run_fuzz(lambda d: codec.decode(params, d), stream, fuzz_cases(stream, 60, seed=4),
             per_case_s=2.0)
    with pytest.raises(TruncatedError):
        codec.decode(params, stream[:-3])
    bad = bytearray(stream)
    bad[-1] ^= 0xFF
    with pytest.raises(CorruptError):
        codec.decode(params, bytes(bad))
    header, sections = bitstream.unpack(stream)
    foreign = bitstream.pack(1, header.fingerprint, sections, height=40, width=72)
    with pytest.raises(WrongCodecError):
        codec.decode(params, foreign)
    other = dict(params, entropy=jax.tree_util.tree_map(lambda a: np.asarray(a) * 1.01,
                                                        params["entropy"]))
    with pytest.raises(WrongModelError):
        codec.decode(other, stream)
    with pytest.raises(InputError):
        codec.encode(params, image.astype(np.float32))
    with pytest.raises(InputError):
        codec.decode(params, stream, num_steps=0)
    with pytest.raises(InputError):  # the CLI's --steps
        codec.decode(params, stream, steps=0)
    with pytest.raises(InputError):
        codec.at_quality(4)
    with pytest.raises(InputError):
        DiffAECodec(quality=0, vae_config=None, unet_config=None)


@pytest.mark.slow
def test_loss_trains_every_part(codec, params):
    x = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, 3), np.float32))

    @jax.jit
    def step(p):
        (loss, (metrics, stats)), grads = jax.value_and_grad(
            lambda p: (lambda r: (r[0], r[1:]))(diffae_loss(codec, p, x, jax.random.key(1))),
            has_aux=True)(p)
        return loss, metrics, stats, grads

    loss, metrics, stats, grads = step(params)
    assert np.isfinite(float(loss)) and float(metrics["bpp"]) > 0
    for part in ("encoder", "entropy", "unet"):
        leaves = jax.tree_util.tree_leaves(grads[part])
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert any(np.any(g != 0) for g in leaves), part
    assert not np.allclose(stats["proj_norm"]["mean"],
                           params["encoder"]["batch_stats"]["proj_norm"]["mean"])


@pytest.mark.slow
def test_taef2_first_stage_roundtrip():
    """The default first stage (TAEF2 weights from ../shared/data/taesd), small networks."""
    kw = codec_kwargs("")
    kw.update(unet_config=codec_kwargs("smoke")["unet_config"],
              encoder_width=0.25, encoder_depth=0.1, num_steps=2)
    codec = DiffAECodec(quality=1, **kw)
    assert (codec.first_stage.channels, codec.first_stage.factor, codec.up) == (32, 8, 4)
    params = codec.init(jax.random.key(0))
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    data = codec.encode(params, image)
    out = codec.decode(params, data)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(codec.decode(params, data), out)
