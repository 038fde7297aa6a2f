"""Video through the ``diffjax`` command: compress a real clip with the default codec
(intra-only with the shipped residual model), decompress it in a fresh process, twice.

Also: damaged, truncated and foreign video files get the container's typed errors (the
seeded fuzz of ``tests/entropy``), and the intra index is checked on its own.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffjax.codecs.hyperprior import HyperpriorCodec
from diffjax.codecs.intra import IntraCodec
from diffjax.entropy import bitstream as B
from diffjax.io.video import read_video, write_video

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "entropy"))
from bitstream_fuzz import fuzz_cases, run_fuzz  # noqa: E402


def _diffjax(*argv, cwd):
    """A fresh ``diffjax`` process with the persistent compilation cache in ``cwd/cache``."""
    env = {**os.environ, "DIFFJAX_COMPILATION_CACHE": "1", "DIFFJAX_CACHE_DIR": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, "-m", "diffjax", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def clip(tmp_path_factory, shared_data):
    """An .mp4 of 8 frames (64x48 crops of the carphone training clip)."""
    frames, fps = read_video(next((shared_data / "video_clips").glob("carphone*")),
                             max_frames=8)
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, np.ascontiguousarray(frames[:, 40:88, 60:124]), fps=fps)
    return path


def test_compress_mp4_then_decompress_in_fresh_processes(clip, tmp_path):
    out = _diffjax("compress", clip, "--frames", 6, "-o", tmp_path / "c.djx", cwd=tmp_path)
    assert "6 frames" in out
    data = (tmp_path / "c.djx").read_bytes()
    header = B.read_header(data)
    assert (header.frames, header.width, header.height) == (6, 64, 48)
    source, fps = read_video(clip, max_frames=6)
    assert header.fps == fps and header.version == B.VIDEO_VERSION
    info = json.loads(_diffjax("info", "--json", tmp_path / "c.djx", cwd=tmp_path))
    assert (info["codec"], info["frames"]) == ("intra", 6)
    _diffjax("decompress", tmp_path / "c.djx", "-o", tmp_path / "a.y4m", cwd=tmp_path)
    # the second process loads the compiled decoder from the persistent cache: same bytes
    assert any((tmp_path / "cache").rglob("*-cache"))
    _diffjax("decompress", tmp_path / "c.djx", "-o", tmp_path / "b.y4m", cwd=tmp_path)
    assert (tmp_path / "a.y4m").read_bytes() == (tmp_path / "b.y4m").read_bytes()
    decoded, dec_fps = read_video(tmp_path / "a.y4m")
    assert decoded.shape == source.shape and dec_fps == fps
    # a real reconstruction of the clip, not noise (intra q3 on 64x48 crops)
    err = decoded.astype(np.float32) - source
    assert 10 * np.log10(255 ** 2 / np.mean(err ** 2)) > 22


@pytest.fixture(scope="module")
def tiny_intra():
    codec = IntraCodec(HyperpriorCodec(N=8, M=12, mean_scale=True))
    params = codec.image_codec.init(jax.random.PRNGKey(0))
    frames = np.random.default_rng(0).integers(0, 256, (3, 20, 28, 3), np.uint8)
    return codec, params, frames, codec.encode(params, frames, fps=12)


def test_intra_round_trip_streams_and_checks(tiny_intra):
    codec, params, frames, data = tiny_intra
    out = codec.decode(params, data)
    assert out.shape == frames.shape and out.dtype == np.uint8
    for i, frame in enumerate(codec.decode_frames(params, data)):  # one frame at a time
        np.testing.assert_array_equal(frame, out[i])
        np.testing.assert_array_equal(
            frame, codec.image_codec.decode(params, codec.image_codec.encode(params, frames[i])))
    # other weights: the container's fingerprint check, before any frame is decoded
    other = codec.image_codec.init(jax.random.PRNGKey(1))
    with pytest.raises(B.WrongModelError):
        codec.decode_frames(params=other, data=data)
    # an index that does not add up is corrupt even when the container's CRCs are right
    header, (index, payload) = B.unpack(data)
    bad = B.pack(header.codec_id, header.fingerprint, [index[:-4], payload], height=20,
                 width=28, frames=3, fps=12)
    with pytest.raises(B.CorruptError, match="index"):
        codec.decode(params, bad)


def test_fuzzed_video_files_get_typed_errors(tiny_intra):
    codec, params, _, data = tiny_intra
    cases = fuzz_cases(data, 300, seed=7)
    run_fuzz(lambda d: codec.decode(params, d), data, cases, per_case_s=2.0)
