"""The residual video codec (issue 28): x265 backbone + refiner, through the CLI and the API.

Tiny refiner (8, 16) started from the stored tiny image model (``data/residual_tiny``,
with :func:`~diffjax.models.video_refiner.from_image_params`: no init compilation), 3
frames of a training clip with odd sides.

* compress with the CLI in one process, decompress in another: bit-identical to the
  in-process decode, and the CLI's file is the bytes this process encodes;
* the x265 section decodes with plain ``ffmpeg`` to the frames the refiner saw, and
  ``--steps 0`` is exactly that decode (and the x265 baseline's stream and frames);
* damaged sections inside a valid container (CRCs recomputed) are typed errors.
"""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import diffjax.codecs
from diffjax.codecs import pretrained
from diffjax.codecs.residual_video import ResidualVideoCodec
from diffjax.entropy import bitstream as B
from diffjax.errors import BitstreamError, CheckpointError, InputError
from diffjax.eval.baselines import FfmpegVideoCoder
from diffjax.io.video import read_video, write_video
from diffjax.models.video_refiner import from_image_params

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "entropy"))
from bitstream_fuzz import fuzz_cases, run_fuzz, section_cases  # noqa: E402

TINY_IMAGE = pathlib.Path(__file__).parent / "data" / "residual_tiny"
CFG = dict(refiner_channels=(8, 16), refiner_groups=4, patch=4, steps=2)


def _abstract(codec):
    return jax.eval_shape(codec.init, jax.random.PRNGKey(0))


def tiny_params(codec, image_params):
    """Video params from the tiny image model; the new rows (previous frame, CRF map)
    random, so that the test sees them act."""
    params = jax.tree.map(np.array, from_image_params(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract(codec)), image_params,
        codec.model))
    kernel = params["refiner"]["unet"]["conv_in"]["kernel"]
    rows = 2 * 3 * codec.model.patch ** 2
    kernel[..., rows:, :] = np.random.default_rng(0).normal(
        0, 0.1, kernel[..., rows:, :].shape).astype(np.float32)
    return params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    """(codec, params, model folder, clip path, its 3 frames)."""
    image = pretrained.load_model(TINY_IMAGE)
    codec = diffjax.codecs.get("residual-video", crf=30, **CFG)
    params = tiny_params(codec, image.params)
    root = tmp_path_factory.mktemp("rv")
    pretrained.save_model(root / "model", "residual-video",
                          {**codec.model.config(), "steps": 2}, params)
    frames, fps = read_video(next((shared_data / "video_clips").glob("carphone*")),
                             max_frames=4)
    clip = root / "clip.mp4"
    write_video(clip, np.ascontiguousarray(frames[:, 40:87, 60:123]), fps=fps)
    source, _ = read_video(clip, max_frames=3)
    return codec, params, root / "model", clip, source


def _diffjax(*argv, cwd):
    env = {**os.environ, "DIFFJAX_COMPILATION_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-m", "diffjax", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


def test_cli_compress_then_decompress_in_a_fresh_process(tiny, tmp_path):
    codec, params, model, clip, source = tiny
    proc = _diffjax("compress", clip, "--codec", "residual-video", "--crf", 30, "--frames", 3,
                    "--model", model, "-o", tmp_path / "c.djx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 frames" in proc.stdout and "crf 30" in proc.stdout
    data = (tmp_path / "c.djx").read_bytes()
    header = B.read_header(data)
    assert (header.codec_id, header.frames, header.height, header.width, header.quality) == \
        (6, 3, 47, 63, 30)
    # the encoder is deterministic across processes: the same frames give the same file
    _, fps = read_video(clip)
    assert codec.encode(params, source, fps=fps) == data
    proc = _diffjax("decompress", tmp_path / "c.djx", "-o", tmp_path / "d.mkv", "--model",
                    model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    decoded, _ = read_video(tmp_path / "d.mkv")  # FFV1: lossless
    here = codec.decode(params, data)
    np.testing.assert_array_equal(decoded, here)
    base = codec.decode(params, data, steps=0)
    assert np.abs(here.astype(int) - base).mean() > 0.5  # the refiner did something
    # bad input through the CLI: one line, no traceback
    proc = _diffjax("compress", clip, "--codec", "residual-video", "--crf", 60, "--model",
                    model, "-o", tmp_path / "e.djx", cwd=tmp_path)
    assert proc.returncode != 0 and "crf must be" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_x265_section_is_plain_ffmpeg_and_steps_0_is_its_decode(tiny, tmp_path):
    codec, params, _, _, source = tiny
    data = codec.encode(params, source)
    parts = codec.split(params, data)
    assert parts["backbone"] == "x265" and parts["crf"] == 30 and parts["steps"] == 2
    (tmp_path / "s.hevc").write_bytes(parts["stream"])
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(tmp_path / "s.hevc"), "-f",
                          "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                         check=True).stdout
    plain = np.frombuffer(raw, np.uint8).reshape(3, 48, 64, 3)[:, :47, :63]  # even-padded
    np.testing.assert_array_equal(codec.backbone_frames(params, data), plain)
    np.testing.assert_array_equal(codec.decode(params, data, steps=0), plain)
    # the same stream as the x265 baseline of `diffjax eval --video` (no bits added)
    coder = FfmpegVideoCoder("x265", 30)
    padded = np.pad(source, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    assert coder.encode(padded) == parts["stream"]
    assert len(data) - len(parts["stream"]) == B.header_size(2, B.VIDEO_VERSION) + 19
    # x264 with the same model (the backbone is in the file)
    x264 = diffjax.codecs.get("residual-video", backbone="x264", crf=35, **CFG)
    d264 = x264.encode(params, source)
    np.testing.assert_array_equal(codec.decode(params, d264, steps=0),
                                  FfmpegVideoCoder("x264", 35).decode(
                                      x264.split(params, d264)["stream"])[:, :47, :63])


def _repack(data, sections):
    h = B.read_header(data)
    return B.pack(h.codec_id, h.fingerprint, sections, height=h.height, width=h.width,
                  frames=h.frames, quality=h.quality, fps=h.fps)


def test_damaged_sections_are_typed_errors(tiny):
    codec, params, _, _, source = tiny
    data = codec.encode(params, source)
    _, (refiner, stream) = B.unpack(data)
    decode = lambda d: codec.decode(params, d, steps=0)  # noqa: E731
    # inside valid containers: truncations, flips and extensions of either section. Each
    # is a typed error, or decodes to exactly the original frames: another step count
    # (<= 100) in the refiner section, which steps=0 overrides, or junk appended after the
    # stream's last picture, which ffmpeg ignores (its pictures keep their MD5)
    want, errors = decode(data), 0
    cases = section_cases(data, 1, 4, seed=5) + section_cases(data, 0, 12, seed=6)
    for bad in cases:
        try:
            got = decode(bad)
        except BitstreamError:
            errors += 1
            continue
        np.testing.assert_array_equal(got, want)
        r, s = B.unpack(bad)[1]
        assert (r[:2] + r[3:], s[:len(stream)]) == (refiner[:2] + refiner[3:], stream)
    assert errors >= len(cases) - 3
    with pytest.raises(B.CorruptError, match="MD5"):
        flipped = bytearray(stream)
        flipped[len(stream) // 2] ^= 16
        decode(_repack(data, [refiner, bytes(flipped)]))
    with pytest.raises(B.CorruptError, match="inconsistent"):
        decode(_repack(data, [refiner[:1] + bytes([31]) + refiner[2:], stream]))
    # the container itself: the seeded fuzz of tests/entropy
    run_fuzz(decode, data, fuzz_cases(data, 100, seed=9), per_case_s=2.0)
    # other weights, another codec's file
    other = jax.tree.map(lambda a: a + 1, params)
    with pytest.raises(B.WrongModelError):
        codec.decode_frames(other, data)
    hp = diffjax.codecs.get("hyperprior", N=8, M=12, mean_scale=True)
    with pytest.raises(B.WrongCodecError):
        codec.decode(params, B.pack(hp.codec_id, bytes(16), [b"x"], height=4, width=4))


def test_bad_arguments_are_input_errors(tiny):
    codec, params, _, _, source = tiny
    for kwargs in ({"crf": 52}, {"crf": 3.5}, {"backbone": "vp9"}, {"steps": 101}):
        with pytest.raises(InputError):
            diffjax.codecs.get("residual-video", **{**CFG, **kwargs})
    with pytest.raises(InputError):
        codec.encode(params, source.astype(np.float32))
    with pytest.raises(InputError):
        codec.encode({"x": np.zeros(3)}, source)
    with pytest.raises(CheckpointError):  # other widths than the image model
        wide = diffjax.codecs.get("residual-video", refiner_channels=(16, 32))
        from_image_params(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract(wide)),
                          pretrained.load_model(TINY_IMAGE).params, wide.model)


def test_partial_load_copies_the_image_rows_and_zeroes_the_new_ones(tiny):
    codec, params, _, _, _ = tiny
    image = pretrained.load_model(TINY_IMAGE).params
    loaded = jax.tree.map(np.asarray, from_image_params(
        jax.tree.map(lambda s: np.ones(s.shape, s.dtype), _abstract(codec)), image,
        codec.model))
    img_in, vid_in = image["refiner"]["unet"]["conv_in"], loaded["refiner"]["unet"]["conv_in"]
    rows = 2 * 3 * codec.model.patch ** 2  # r_t and the backbone frame
    np.testing.assert_array_equal(vid_in["kernel"][..., :rows, :], img_in["kernel"][..., :rows, :])
    assert vid_in["kernel"].shape[-2] == rows + 1 + rows // 2  # + CRF map, previous frame
    assert not vid_in["kernel"][..., rows:, :].any()
    np.testing.assert_array_equal(vid_in["bias"], img_in["bias"])
    for a, b in zip(jax.tree.leaves({k: v for k, v in image["refiner"]["unet"].items()
                                     if k != "conv_in"}),
                    jax.tree.leaves({k: v for k, v in loaded["refiner"]["unet"].items()
                                     if k != "conv_in"})):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_learned_backbone_and_partial_load_from_the_image_model(tiny):
    """The learned backbone codes every frame with the image model's folded hyperprior;
    from the image model with the previous-frame rows at zero, the video refiner *is* the
    image refiner (same output for any previous frame)."""
    import jax.numpy as jnp

    _, _, _, _, source = tiny
    image = pretrained.load_model(TINY_IMAGE)
    learned = diffjax.codecs.get("residual-video", backbone="learned", N=8, M=12,
                                 num_qualities=2, quality=2, **CFG)
    params = from_image_params(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                            _abstract(learned)), image.params, learned.model)
    rng = np.random.default_rng(1)
    x, prev, r = (jnp.asarray(rng.random((1, 64, 64, 3)), jnp.float32) for _ in range(3))
    y = jnp.asarray(rng.normal(size=(1, 4, 4, 12)), jnp.float32)
    q, t = jnp.ones((1,), jnp.int32), jnp.full((1,), 500.0)
    img_model = diffjax.codecs.get("residual", **{k: v for k, v in image.config.items()
                                                  if k != "steps"}).model
    want = jax.jit(lambda p: img_model.apply({"params": p}, r, t, x, y, q,
                                             method="denoise"))(image.params)
    got = jax.jit(lambda p: learned.model.apply({"params": p}, r, t, x, prev, y, q, None,
                                                method="denoise"))(params)
    np.testing.assert_allclose(got, want, atol=1e-5)
    data = learned.encode(params, source[:2])
    assert B.read_header(data).quality == 2
    base = learned.decode(params, data, steps=0)
    image_codec = diffjax.codecs.get("residual", quality=2, steps=0,
                                     **{k: v for k, v in image.config.items() if k != "steps"})
    for frame, want in zip(source[:2], base):  # = the image codec's base decode, per frame
        np.testing.assert_array_equal(image_codec.decode(image.params, image_codec.encode(
            image.params, frame)), want)
    with pytest.raises(B.CorruptError):  # an x265 file is not a learned-backbone file
        codec = diffjax.codecs.get("residual-video", crf=30, **CFG)
        learned.split(params, _repack(data, [bytes([0, 30, 2]) + bytes(16),
                                             codec.encode(tiny[1], source[:1])]))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["learned", "x265"])
def test_refined_decode_without_previous_frame_conditioning(tiny, backbone):
    """The ablation model (``prev_frame=False``, frame by frame) and the learned backbone's
    refined decode: decodes deterministically, and the previous frame changes nothing."""
    _, _, _, _, source = tiny
    image = pretrained.load_model(TINY_IMAGE)
    extra = dict(N=8, M=12, num_qualities=2) if backbone == "learned" else {}
    codec = diffjax.codecs.get("residual-video", backbone=backbone, prev_frame=False,
                               **extra, **CFG)
    params = tiny_params(codec, image.params)
    data = codec.encode(params, source)
    out = codec.decode(params, data)
    assert out.shape == source.shape
    np.testing.assert_array_equal(out, codec.decode(params, data))
    assert np.abs(out.astype(int) - codec.decode(params, data, steps=0)).mean() > 0.5
