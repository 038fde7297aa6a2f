"""The video diffusion-autoencoder codec (Rampas 2024, sec. 3.4.1): temporal compression,
frame groups, real bitstreams decoded bit-identically in a fresh process, bad files."""
import os
import pathlib
import subprocess
import sys
import textwrap

import flax
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax.codecs
from diffjax.entropy import bitstream as B
from diffjax.errors import InputError
from diffjax.models.diffae_video import VideoLatentCoder
from experiments.configs.diffae_video import codec_kwargs

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "entropy"))
from bitstream_fuzz import fuzz_cases, run_fuzz  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_temporal_compress_and_deflate_shapes(factor):
    coder = VideoLatentCoder(channels=6, factor=factor)
    y = jnp.zeros((2, 2 * factor, 3, 5, 6))
    params = flax.linen.unbox(jax.eval_shape(coder.init, jax.random.key(0), y))["params"]
    z = jax.eval_shape(lambda p: coder.apply({"params": p}, y, method="compress"), params)
    assert z.shape == (2, 2, 3, 5, 6)
    back = jax.eval_shape(lambda p, z: coder.apply({"params": p}, z, method="deflate"),
                          params, z)
    assert back.shape == y.shape
    assert params["compressor"]["proj"]["kernel"].shape == (1, 1, 1, 6, 6)
    assert params["deflater"]["proj"]["kernel"].shape == (1, 1, 1, 6, factor * 6)
    with pytest.raises(InputError):  # not a multiple of f_t
        jax.eval_shape(lambda p: coder.apply({"params": p}, jnp.zeros((1, factor + 1, 1, 1, 6)),
                                             method="compress"), params)
    for ft in ("ft2", "ft4", "ft8"):  # every config's group is a multiple of its f_t
        kw = codec_kwargs(f"smoke,{ft}")
        assert kw["group_frames"] % kw["temporal_factor"] == 0


def test_average_pooling_over_time():
    """The compressed step is the mean of its f_t projected frames (sec. 3.4.1)."""
    coder = VideoLatentCoder(channels=2, factor=2)
    y = jax.random.normal(jax.random.key(1), (1, 4, 1, 1, 2))
    params = flax.linen.unbox(jax.jit(coder.init)(jax.random.key(0), y))["params"]
    z = jax.jit(lambda p, y: coder.apply({"params": p}, y, method="compress"))(params, y)
    k = params["compressor"]["proj"]["kernel"][0, 0, 0]
    b = params["compressor"]["proj"]["bias"]
    want = (y[0, :, 0, 0] @ k + b).reshape(2, 2, 2).mean(1)
    np.testing.assert_allclose(z[0, :, 0, 0], want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def setup():
    codec = diffjax.codecs.get("diffae-video", quality=1, **codec_kwargs("smoke,ft2"))
    params = codec.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 20, 24, 3), np.uint8)  # 5 frames: not a multiple
    data = codec.encode(params, frames, fps=12)
    return codec, params, frames, data


def test_clip_not_multiple_of_group_roundtrips(setup, tmp_path):
    codec, params, frames, data = setup
    assert (codec.temporal_factor, codec.group_frames) == (2, 4)
    header = B.read_header(data)
    assert (header.codec_id, header.frames, header.height, header.width) == (8, 5, 20, 24)
    assert header.fps == 12 and header.quality == 1
    parts = codec.read(params, data)
    assert len(parts["y"]) == 2 and parts["y"][0].shape == (2, 1, 1, 16)  # 4 frames / f_t
    ours = codec.decode(params, data)
    assert ours.shape == frames.shape and ours.dtype == np.uint8
    # a fresh process decodes the file to the same bytes
    (tmp_path / "clip.djx").write_bytes(data)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    np.savez(tmp_path / "params.npz", **{k: np.asarray(v) for k, v in flat.items()})
    script = textwrap.dedent("""
        import pathlib, sys
        import flax, numpy as np
        import diffjax.codecs
        from experiments.configs.diffae_video import codec_kwargs
        d = pathlib.Path(sys.argv[1])
        codec = diffjax.codecs.get("diffae-video", quality=0, **codec_kwargs("smoke,ft2"))
        with np.load(d / "params.npz") as f:
            params = flax.traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")
        np.save(d / "decoded.npy", codec.decode(params, (d / "clip.djx").read_bytes()))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "decoded.npy"), ours)


def _repack(data, sections):
    h, _ = B.unpack(data)
    return B.pack(h.codec_id, h.fingerprint, sections, height=h.height, width=h.width,
                  frames=h.frames, quality=h.quality, fps=h.fps)


def test_bad_files_and_inputs(setup):
    codec, params, frames, data = setup
    decode = lambda d: codec.decode_frames(params, d)  # noqa: E731  (checks before frames)
    run_fuzz(decode, data, fuzz_cases(data, 60, seed=27), per_case_s=2.0)
    _, sections = B.unpack(data)
    meta = bytearray(sections[0])
    with pytest.raises(B.CorruptError, match="groups"):  # a group missing
        decode(_repack(data, sections[:-1]))
    meta[-1] = 4  # another f_t
    with pytest.raises(B.CorruptError, match="f_t"):
        decode(_repack(data, [bytes(meta)] + sections[1:]))
    with pytest.raises(B.CorruptError, match="section layout"):
        decode(_repack(data, [sections[0][:-1]] + sections[1:]))
    with pytest.raises(B.CorruptError):  # an empty latent stream
        decode(_repack(data, [sections[0], b"", sections[2]]))
    other = dict(params, temporal=jax.tree.map(lambda a: np.asarray(a) + 1, params["temporal"]))
    with pytest.raises(B.WrongModelError):
        codec.decode_frames(other, data)
    image = diffjax.codecs.get("hyperprior", N=8, M=12, mean_scale=True)
    with pytest.raises(B.WrongCodecError):
        decode(B.pack(image.codec_id, bytes(16), [b"x"], height=4, width=4))
    with pytest.raises(InputError):
        codec.encode(params, frames[0])
    with pytest.raises(InputError):
        codec.decode_frames(params, data, num_steps=0)
    with pytest.raises(InputError):  # the CLI's --steps
        codec.decode_frames(params, data, steps=1001)
    for kw in ({"temporal_factor": 3}, {"group_frames": 6}, {"quality": 9}):
        with pytest.raises(InputError):
            diffjax.codecs.get("diffae-video", **{**codec_kwargs("smoke,ft4"), **kw})
