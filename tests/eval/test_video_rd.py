"""Video RD evaluation: a diffjax video codec (defined here) beside x264, through the API
and the ``diffjax eval --video`` command; image codecs are wrapped intra-only."""
import argparse
import json
import struct
import sys
import zlib

import numpy as np
import pytest

from diffjax.errors import InputError
from diffjax.eval.points import codec_point
from diffjax.eval.video import as_video_point, evaluate_video_rd, video_codec_point
from diffjax.io.video import write_video

_HEAD = struct.Struct("<4sHHHBB")


class ZlibVideo:
    """A toy video codec with real bytes: frames box-downscaled by ``factor``, quantised to
    steps of ``step`` levels, zlib-compressed; decoded by nearest upsampling."""

    name = "zlibvideo-test"
    codec_id = 250
    media = "video"
    qualities = ()

    def __init__(self, factor: int = 2, step: int = 8):
        self.factor, self.step = factor, step

    def init(self, key):  # for --random-init: the toy has no real parameters
        import jax.numpy as jnp

        return {"unused": jnp.zeros(())}

    def fingerprint(self, params):
        return b"\x00" * 16

    def encode(self, params, frames, fps=None):
        t, h, w, _ = frames.shape
        f = self.factor
        x = np.pad(frames.astype(np.float64), ((0, 0), (0, -h % f), (0, -w % f), (0, 0)),
                   mode="edge")
        small = x.reshape(t, x.shape[1] // f, f, x.shape[2] // f, f, 3).mean(axis=(2, 4))
        q = np.rint(small / self.step).astype(np.uint8)
        return _HEAD.pack(b"ZLBV", t, h, w, f, self.step) + zlib.compress(q.tobytes(), 9)

    def decode_frames(self, params, data):
        magic, t, h, w, f, step = _HEAD.unpack_from(data)
        if magic != b"ZLBV":
            raise InputError("not a toy stream")
        hs, ws = -(-h // f), -(-w // f)
        q = np.frombuffer(zlib.decompress(data[_HEAD.size:]), np.uint8).reshape(t, hs, ws, 3)
        for frame in q:
            big = np.repeat(np.repeat(frame.astype(np.float64) * step, f, 0), f, 1)
            yield np.clip(np.rint(big[:h, :w]), 0, 255).astype(np.uint8)

    def decode(self, params, data):
        return np.stack(list(self.decode_frames(params, data)))


def _clip(t=4, size=32):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size + 3 * t, 0:size + 3 * t]
    base = np.stack([128 + 60 * np.sin(xx / 5.0), 128 + 60 * np.cos(yy / 4.0),
                     128 + 40 * np.sin((xx + yy) / 7.0)], -1)
    base = base + rng.normal(0, 4, base.shape)
    frames = [base[i:i + size, 2 * i:2 * i + size] for i in range(t)]  # panning
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def test_video_codec_beside_x264(tmp_path):
    """Real file bytes, every metric incl. tLP and the warping error, per clip and per
    point; curves sorted by rate; BD-rate vs x264 computed; streams kept on request."""
    clip = _clip()
    points = [video_codec_point(ZlibVideo(f, 8), None, label=f"f={f}") for f in (1, 2, 4)]
    result = evaluate_video_rd([("pan", clip)], ["x264"], {"x264": [40, 28]}, points=points,
                               progress=False, bitstream_dir=tmp_path / "streams",
                               dataset="pan")
    assert list(result["curves"]) == ["H.264 (x264)", "diffjax zlibvideo-test"]
    toy = result["curves"]["diffjax zlibvideo-test"]
    assert [p["label"] for p in toy] == ["f=4", "f=2", "f=1"]  # sorted by bpp
    for curve in result["curves"].values():
        for p in curve:
            for key in ("bpp", "psnr", "lpips", "tlp", "warping_error", "enc_s", "dec_s"):
                assert np.isfinite(p[key]), (p["label"], key)
            assert p["ms_ssim"] is None  # 32 px frames: too small for MS-SSIM
            assert p["per_clip"][0]["frames"] == 4
    # the rate is the stored stream: the toy's bytes are exactly known
    codec = ZlibVideo(2, 8)
    data = codec.encode(None, clip)
    f2 = next(p for p in toy if p["label"] == "f=2")
    assert f2["per_clip"][0]["bytes"] == len(data)
    assert f2["bpp"] == pytest.approx(8 * len(data) / (4 * 32 * 32))
    stored = list((tmp_path / "streams").rglob("*.bin"))
    assert len(stored) == 5 and data in {p.read_bytes() for p in stored}
    # the frame-averaged PSNR is that of the decoded frames
    dec = codec.decode(None, data).astype(np.float64)
    psnrs = [10 * np.log10(255 ** 2 / np.mean((dec[i] - clip[i]) ** 2)) for i in range(4)]
    assert f2["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert toy[-1]["psnr"] > toy[0]["psnr"]
    assert result["bd_rate"]["anchor"] == "H.264 (x264)"
    assert "diffjax zlibvideo-test" in result["bd_rate"]["psnr"]
    assert result["settings"]["warping_error"]["farneback"]["winsize"] == 15
    # the warping error uses the reference's flow: the same value as computed directly
    from diffjax.metrics.video import warping_error

    assert f2["warping_error"] == pytest.approx(warping_error(clip, dec.astype(np.uint8)),
                                                rel=1e-6)
    assert result["dataset"]["clips"][0]["warping_error"] == pytest.approx(
        warping_error(clip, clip), rel=1e-6)


def test_cli_eval_video_with_codec(tmp_path, monkeypatch, capsys):
    """``diffjax eval --video CLIP --codec NAME --random-init --baselines x264``."""
    from diffjax.codecs import base
    from diffjax.commands import eval as eval_cmd

    monkeypatch.setitem(base._REGISTRY, ZlibVideo.name, ZlibVideo)
    clip_path = tmp_path / "pan.mkv"
    write_video(clip_path, _clip(t=5), fps=25)
    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([str(clip_path), "--video", "--frames", "4", "--codec",
                              ZlibVideo.name, "--random-init", "--baselines", "x264",
                              "--sweep", "x264=40,30", "--out", str(out), "--no-progress"])
    assert eval_cmd.run(args) == 0
    result = json.loads((out / "rd.json").read_text())
    (info,) = result["dataset"]["clips"]
    assert {k: info[k] for k in ("name", "frames", "height", "width")} == {
        "name": "pan.mkv", "frames": 4, "height": 32, "width": 32}
    assert 0 <= info["warping_error"] < 1e-3  # the source's own E_warp (panning: ~0)
    toy = result["curves"][f"diffjax {ZlibVideo.name} (random init)"]
    assert toy[0]["setting"]["media"] == "video" and toy[0]["warping_error"] >= 0
    assert all(p["tlp"] is not None for p in result["curves"]["H.264 (x264)"])
    assert (out / "bd_rate.md").read_text().startswith("BD-rate vs H.264 (x264)")
    for png in ("rd_psnr", "rd_lpips", "rd_tlp", "rd_warping_error"):
        assert (out / f"{png}.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "warp " in printed and "tLP " in printed


def test_image_codec_is_wrapped_intra_only(monkeypatch):
    """An image codec point becomes an intra-only video point; without the wrapper module,
    a clear error."""
    from diffjax.codecs.base import Codec
    from diffjax.entropy import bitstream

    class ZlibImage(Codec):
        name, codec_id = "zlibimage-test", 251

        def fingerprint(self, params):
            return b"\x01" * 16

        def encode(self, params, image):
            h, w = image.shape[:2]
            return bitstream.pack(self.codec_id, self.fingerprint(params),
                                  [zlib.compress(image.tobytes())], height=h, width=w)

        def decode(self, params, data):
            header, (section,) = bitstream.unpack(data, codec_id=self.codec_id)
            return np.frombuffer(zlib.decompress(section), np.uint8).reshape(
                header.height, header.width, 3)

    point = codec_point(ZlibImage(), None, label="lossless")
    monkeypatch.setitem(sys.modules, "diffjax.codecs.intra", None)
    with pytest.raises(InputError, match="intra-only wrapper"):
        as_video_point(point)
    monkeypatch.undo()
    pytest.importorskip("diffjax.codecs.intra")
    vpoint = as_video_point(point)
    assert vpoint.curve == "diffjax zlibimage-test (intra)"
    assert vpoint.setting["intra"] == "zlibimage-test" and vpoint.setting["codec"] == "intra"
    clip = _clip(t=3, size=16)
    np.testing.assert_array_equal(vpoint.decode(vpoint.encode(clip)), clip)


def test_video_rd_errors():
    clip = _clip()
    with pytest.raises(InputError, match="nothing to evaluate"):
        evaluate_video_rd([("c", clip)], [], progress=False)
    with pytest.raises(InputError, match="video baselines"):
        evaluate_video_rd([("c", clip)], ["jpeg"], progress=False)
    with pytest.raises(InputError, match="2 frames"):
        evaluate_video_rd([("c", clip[:1])], ["x264"], progress=False)
    with pytest.raises(InputError, match="not a diffjax codec"):
        from diffjax.eval.points import baseline_points

        as_video_point(baseline_points("jpeg", [50])[0])
