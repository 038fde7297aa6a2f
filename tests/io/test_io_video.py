"""diffjax.io.video: round trips of every format, y4m colour against FFmpeg, every error."""
import fractions
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from diffjax.errors import InputError
from diffjax.io.video import iter_video, load_clip, read_video, write_video

FFMPEG = shutil.which("ffmpeg")


def _noise(t=3, h=33, w=47, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _smooth(t=4, h=34, w=46):
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([(xx * 5 + 9 * i) % 256, (yy * 7) % 256,
                        np.full_like(xx, 60 + 20 * i)], -1) for i in range(t)]
    return np.stack(frames).astype(np.uint8)


def _leftovers(folder):
    return [p for p in os.listdir(folder) if p.endswith(".tmp") or ".tmp." in p]


# ----------------------------------------------------------------------------- y4m

def test_y4m_444_roundtrip_within_two_levels_and_deterministic(tmp_path):
    """C444 BT.601 limited: the 8-bit YCbCr rounding costs at most 2 levels (measured over
    all 2^24 colours; a 37^3 grid of them here); fps stored; same bytes twice."""
    v = np.arange(0, 256, 7, dtype=np.uint8)
    cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(1, 37 * 37, 37, 3)
    frames = np.concatenate([cube, cube[:, ::-1]])
    a, b = tmp_path / "a.y4m", tmp_path / "b.y4m"
    assert write_video(a, frames, fps=fractions.Fraction(30000, 1001)) == 2
    write_video(b, iter(list(frames)), fps=fractions.Fraction(30000, 1001))  # a generator
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes().split(b"\n", 1)[0] == (
        b"YUV4MPEG2 W37 H1369 F30000:1001 Ip A1:1 C444 XYSCSS=444 XCOLORRANGE=LIMITED")
    back, fps = read_video(a)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert fps == fractions.Fraction(30000, 1001)
    err = np.abs(back.astype(int) - frames)
    assert err.max() <= 2 and err.mean() < 0.5
    assert not _leftovers(tmp_path)


def test_y4m_420_odd_size_and_default_fps(tmp_path):
    x = _smooth(h=33, w=47)
    path = tmp_path / "c.y4m"
    write_video(path, x, y4m_chroma="420")
    assert b"F25:1" in path.read_bytes()[:80] and b"C420jpeg" in path.read_bytes()[:80]
    # 4:2:0 of odd sides: chroma planes of ceil(side / 2)
    assert path.stat().st_size == len(path.read_bytes().split(b"\n", 1)[0]) + 1 + 4 * (
        6 + 33 * 47 + 2 * 17 * 24)
    back, fps = read_video(path)
    assert back.shape == x.shape and fps == 25
    psnr = 10 * np.log10(255 ** 2 / np.mean((back.astype(float) - x) ** 2))
    assert psnr > 30


@pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary")
@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuvj420p", "yuv422p", "yuv444p", "gray"])
def test_y4m_reader_matches_ffmpeg(pix_fmt, shared_data, tmp_path):
    """y4m files written by FFmpeg decode to FFmpeg's own RGB within 3 levels (BT.601,
    limited or XCOLORRANGE=FULL; FFmpeg's fixed-point tables round differently)."""
    src = shared_data / "video_clips" / "realshort_320x240.mp4"
    y4m = tmp_path / "c.y4m"
    subprocess.run([FFMPEG, "-v", "error", "-i", str(src), "-frames:v", "2", "-pix_fmt",
                    pix_fmt, str(y4m)], check=True)
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(y4m), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    ref = np.frombuffer(raw, np.uint8).reshape(2, 240, 320, 3)
    got, fps = read_video(y4m)
    assert fps == fractions.Fraction(45000, 1499)
    diff = np.abs(got.astype(int) - ref)
    assert diff.max() <= 3 and diff.mean() < 1.1, (diff.max(), diff.mean())


@pytest.mark.parametrize("chroma, match", [("C420p10", "10-bit"), ("C444alpha", "C444alpha"),
                                           ("C411", "C411")])
def test_y4m_unsupported_formats(chroma, match, tmp_path):
    path = tmp_path / "x.y4m"
    path.write_bytes(f"YUV4MPEG2 W4 H4 F25:1 {chroma}\nFRAME\n".encode() + bytes(64))
    with pytest.raises(InputError, match=match):
        read_video(path)


def test_y4m_corrupt_and_truncated(tmp_path):
    good = tmp_path / "g.y4m"
    write_video(good, _noise(t=2))
    data = good.read_bytes()
    cases = {"trunc.y4m": (data[:-10], "truncated"),
             "marker.y4m": (data.replace(b"FRAME", b"FRAMX", 2), "FRAME"),
             "header.y4m": (b"RIFF" + data[4:], "not a YUV4MPEG2"),
             "nowh.y4m": (b"YUV4MPEG2 F25:1 C444\n", "W/H")}
    for name, (blob, match) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(InputError, match=match):
            read_video(tmp_path / name)
    # max_frames stops before the damage
    (tmp_path / "t1.y4m").write_bytes(data[:-10])
    assert read_video(tmp_path / "t1.y4m", max_frames=1)[0].shape[0] == 1


# ----------------------------------------------------------------------------- PyAV

def test_ffv1_mkv_is_bit_exact_and_deterministic(tmp_path):
    x = _noise(t=4, h=33, w=47)
    a, b = tmp_path / "a.mkv", tmp_path / "b.mkv"
    assert write_video(a, x, fps=fractions.Fraction(30000, 1001)) == 4
    write_video(b, x, fps=fractions.Fraction(30000, 1001))
    assert a.read_bytes() == b.read_bytes()
    back, fps = read_video(a)
    np.testing.assert_array_equal(back, x)
    assert fps == fractions.Fraction(30000, 1001)
    assert read_video(a, max_frames=2)[0].shape == (2, 33, 47, 3)


@pytest.mark.parametrize("h, w", [(34, 46), (33, 47)])
def test_mp4_h264_frame_count_size_fps(h, w, tmp_path):
    x = _smooth(t=5, h=h, w=w)
    path = tmp_path / "c.mp4"
    write_video(path, x, fps=24)
    back, fps = read_video(path)
    assert back.shape == x.shape and fps == 24
    psnr = 10 * np.log10(255 ** 2 / np.mean((back.astype(float) - x) ** 2))
    assert psnr > 30
    import av

    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"


@pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary")
@pytest.mark.parametrize("suffix, codec", [(".mov", "ffv1"), (".avi", "ffv1"),
                                           (".webm", "libvpx")])
def test_read_other_containers(suffix, codec, tmp_path):
    """Files made by the ffmpeg command line in the other containers read back."""
    x = _smooth(t=3, h=32, w=48)
    src = tmp_path / "src.mkv"
    write_video(src, x, fps=10)
    out = tmp_path / f"c{suffix}"
    subprocess.run([FFMPEG, "-v", "error", "-i", str(src), "-c:v", codec,
                    *(["-pix_fmt", "bgr0"] if codec == "ffv1" else ["-b:v", "2M"]), str(out)],
                   check=True)
    back, fps = read_video(out)
    assert back.shape == x.shape and fps == 10
    if codec == "ffv1":
        np.testing.assert_array_equal(back, x)
    assert read_video(out, max_frames=2)[0].shape[0] == 2


def test_container_errors(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(InputError, match="bad.mp4"):
        read_video(tmp_path / "bad.mp4")
    # a valid container without a video stream
    import av

    with av.open(str(tmp_path / "audio.mkv"), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(InputError, match="no video stream"):
        read_video(tmp_path / "audio.mkv")


# ----------------------------------------------------------------------------- folders

def test_frame_folder_roundtrip_natural_order_and_replace(tmp_path):
    x = _noise(t=3)
    out = tmp_path / "frames"
    assert write_video(out, x) == 3
    assert sorted(os.listdir(out)) == [f"frame_{i:05d}.png" for i in range(3)]
    back, fps = read_video(out)
    np.testing.assert_array_equal(back, x)
    assert fps is None
    # rewriting with fewer frames replaces the folder (no stale frame_00002.png)
    write_video(f"{out}/", x[:2])
    assert len(os.listdir(out)) == 2
    assert not _leftovers(tmp_path)
    # natural sort: f2 before f10
    nat = tmp_path / "nat"
    nat.mkdir()
    for i, name in enumerate(["f10.png", "f2.png", "f1.jpg"]):
        Image.fromarray(np.full((8, 6, 3), 40 * i, np.uint8)).save(nat / name)
    got = load_clip(nat)
    assert [int(f[0, 0, 0]) for f in got] == [80, 40, 0]


def test_frame_folder_modes(tmp_path):
    """Frames follow diffjax.io.images' policy: grey -> RGB, alpha dropped, 16-bit -> the
    high byte."""
    folder = tmp_path / "m"
    folder.mkdir()
    rgb = _noise(t=1, h=6, w=5)[0]
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(rgb[..., 0]).save(folder / "b.png")
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(folder / "c.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 256 + 99).save(folder / "d.png")
    clip, _ = read_video(folder)
    np.testing.assert_array_equal(clip[0], rgb)
    np.testing.assert_array_equal(clip[1], np.repeat(rgb[..., :1], 3, -1))
    np.testing.assert_array_equal(clip[2], rgb)
    np.testing.assert_array_equal(clip[3], np.repeat(rgb[..., 1:2], 3, -1))


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no frames"):
        read_video(tmp_path / "empty")
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(sizes / "0.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(sizes / "1.png")
    with pytest.raises(InputError, match="one size"):
        read_video(sizes)
    assert read_video(sizes, max_frames=1)[0].shape == (1, 8, 8, 3)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(InputError, match="0.png"):
        read_video(corrupt)
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(InputError, match="unknown video suffix"):
        read_video(tmp_path / "clip.gif")
    with pytest.raises(InputError, match="max_frames"):
        read_video(tmp_path / "empty", max_frames=0)


def test_write_errors_leave_nothing_behind(tmp_path):
    x = _noise(t=2)
    with pytest.raises(InputError, match="cannot write"):
        write_video(tmp_path / "c.avi", x)
    (tmp_path / "dir.mkv").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        write_video(tmp_path / "dir.mkv", x)
    with pytest.raises(InputError, match="uint8"):
        write_video(tmp_path / "c.y4m", x.astype(np.float32))
    with pytest.raises(InputError, match="no frames"):
        write_video(tmp_path / "c.y4m", iter([]))
    with pytest.raises(InputError, match="fps"):
        write_video(tmp_path / "c.y4m", x, fps=0)
    # a frame of another size mid-stream: the old file stays, no temporary is left
    for name in ("c.y4m", "c.mkv", "c.mp4", "frames"):
        target = tmp_path / name
        write_video(target, x)
        before = sorted(os.listdir(target)) if target.is_dir() else target.read_bytes()
        with pytest.raises(InputError, match="one size"):
            write_video(target, iter([x[0], x[1], x[1, :5]]))
        after = sorted(os.listdir(target)) if target.is_dir() else target.read_bytes()
        assert after == before, name
    assert not _leftovers(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="other files"):
        write_video(other, x)
    assert (other / "notes.txt").read_text() == "mine"


def test_iter_video_streams(tmp_path):
    x = _noise(t=3)
    write_video(tmp_path / "c.mkv", x, fps=12)
    fps, frames = iter_video(tmp_path / "c.mkv")
    assert fps == 12
    first = next(frames)
    np.testing.assert_array_equal(first, x[0])
    frames.close()
