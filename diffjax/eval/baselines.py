"""Classical codecs with their real encoders: rate is the size of the file they write.

Images
  ``jpeg``, ``webp``, ``avif``: Pillow (libjpeg(-turbo), libwebp, libavif+libaom) swept
  over ``quality``, 4:2:0 chroma subsampling (Pillow's default); WebP with ``method=6``
  (its best compression) and AVIF with ``speed=4`` (libavif's usual quality setting;
  Pillow's default is the faster 6). JPEG uses Pillow's defaults.
  ``hevc``: HEVC intra with ffmpeg + libx265, ``av1``: AV1 intra with ffmpeg + libaom
  (``-usage allintra -still-picture 1``); both on full-range BT.601 Y'CbCr 4:4:4, the BPG
  setting, swept over ``-crf``. The stream is the raw elementary stream (``-f hevc`` /
  ``-f obu``), so no container overhead is counted, and x265's settings SEI is switched
  off (``info=0``; it is ~2 kB, 0.04 bpp on a Kodak image).
Video
  ``x264`` / ``x265`` (ffmpeg, preset ``medium``, 4:2:0, default GOP) swept over ``-crf``,
  raw Annex-B streams without the encoders' settings SEI; decoded by ffmpeg.

Every coder is an object with ``encode(image) -> bytes`` and ``decode(bytes) -> image``
(uint8 RGB ``[H, W, 3]``; video ``[T, H, W, 3]``); any encoder/decoder failure raises
:class:`diffjax.InputError` with ffmpeg's message.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import re
import shutil
import subprocess
from typing import Sequence

import numpy as np

from diffjax.errors import BitstreamError, InputError

# Quality sweeps covering about 0.1 - 1.5 bpp on Kodak (measured: results/kodak/).
DEFAULT_SWEEPS: dict[str, tuple[int, ...]] = {
    "jpeg": (5, 10, 20, 35, 50, 65, 80),
    "webp": (0, 5, 15, 30, 50, 75, 85),
    "avif": (10, 25, 40, 52, 62, 72, 80),
    "hevc": (42, 38, 34, 30, 26, 22, 18),
    "av1": (60, 54, 46, 38, 30, 22, 16),
}
VIDEO_SWEEPS: dict[str, tuple[int, ...]] = {
    "x264": (40, 35, 30, 25, 20),
    "x265": (40, 35, 30, 25, 20),
}
# The knob each baseline sweeps (a larger value means higher quality for Pillow's
# ``quality``, lower quality for ``crf``).
KNOB = {"jpeg": "quality", "webp": "quality", "avif": "quality", "hevc": "crf", "av1": "crf",
        "x264": "crf", "x265": "crf"}
PRETTY = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF", "hevc": "HEVC intra (x265)",
          "av1": "AV1 intra (libaom)", "x264": "H.264 (x264)", "x265": "HEVC (x265)"}

_PILLOW_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
_PILLOW_OPTIONS = {"jpeg": {}, "webp": {"method": 6}, "avif": {"speed": 4}}
_FFMPEG_IMAGE = {
    # name: (encoder args, raw stream format)
    "hevc": (["-c:v", "libx265", "-preset", "medium",
              "-x265-params", "log-level=error:info=0"], "hevc"),
    "av1": (["-c:v", "libaom-av1", "-usage", "allintra", "-still-picture", "1",
             "-cpu-used", "6", "-b:v", "0"], "obu"),
}
_FFMPEG_VIDEO = {
    # the encoders' version/settings SEI (x264: ~700 bytes per stream) is not counted
    "x264": (["-c:v", "libx264", "-preset", "medium", "-bsf:v", "filter_units=remove_types=6"],
             "h264"),
    "x265": (["-c:v", "libx265", "-preset", "medium",
              "-x265-params", "log-level=error:info=0"], "hevc"),
}
# RGB <-> full-range BT.601 Y'CbCr with accurate rounding (swscale), for the 4:4:4 paths.
_TO_YUV = "scale=out_color_matrix=bt601:out_range=full:flags=accurate_rnd+full_chroma_int"
_TO_RGB = "scale=in_color_matrix=bt601:in_range=full:flags=accurate_rnd+full_chroma_int"


def image_baselines() -> list[str]:
    return list(_PILLOW_FORMATS) + list(_FFMPEG_IMAGE)


def video_baselines() -> list[str]:
    return list(_FFMPEG_VIDEO)


@functools.lru_cache(maxsize=None)
def tool_versions() -> dict[str, str]:
    """Versions of the encoders, recorded in every result file."""
    import PIL

    out = {"pillow": PIL.__version__}
    exe = shutil.which("ffmpeg")
    if exe:
        first = subprocess.run([exe, "-version"], capture_output=True, text=True).stdout
        out["ffmpeg"] = first.splitlines()[0] if first else "unknown"
    return out


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise InputError("ffmpeg is not installed; run ./install.sh (it installs ffmpeg)")
    return exe


def _run(cmd: list[str], data: bytes, what: str) -> bytes:
    proc = subprocess.run(cmd, input=data, capture_output=True)
    if proc.returncode != 0 or not proc.stdout:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise InputError(f"{what} failed: {msg[-1] if msg else 'no output'}")
    return proc.stdout


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} "
                         f"{image.shape}")
    return np.ascontiguousarray(image)


@dataclasses.dataclass(frozen=True)
class PillowCoder:
    """JPEG / WebP / AVIF through Pillow at one ``quality``."""

    fmt: str
    quality: int

    def __post_init__(self):
        if self.fmt not in _PILLOW_FORMATS:
            raise InputError(f"unknown Pillow format {self.fmt!r}")
        from PIL import features

        if self.fmt in ("webp", "avif") and not features.check(self.fmt):
            raise InputError(f"this Pillow build has no {self.fmt.upper()} support")

    def encode(self, image: np.ndarray) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(_check_rgb(image), "RGB").save(buf, format=_PILLOW_FORMATS[self.fmt],
                                                        quality=int(self.quality),
                                                        **_PILLOW_OPTIONS[self.fmt])
        return buf.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise BitstreamError(f"{self.fmt} decode failed: {err}") from err


@dataclasses.dataclass(frozen=True)
class FfmpegImageCoder:
    """HEVC / AV1 intra coding of one RGB image through ffmpeg at one ``crf``."""

    codec: str
    crf: int

    def __post_init__(self):
        if self.codec not in _FFMPEG_IMAGE:
            raise InputError(f"unknown ffmpeg image codec {self.codec!r}")

    def encode(self, image: np.ndarray) -> bytes:
        image = _check_rgb(image)
        h, w, _ = image.shape
        args, fmt = _FFMPEG_IMAGE[self.codec]
        cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo",
               "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-i", "-", "-vf", _TO_YUV,
               "-pix_fmt", "yuv444p", "-color_range", "pc", "-frames:v", "1", *args,
               "-crf", str(int(self.crf)), "-f", fmt, "-"]
        return _run(cmd, image.tobytes(), f"{self.codec} encode")

    def decode(self, data: bytes) -> np.ndarray:
        return decode_ffmpeg_frames(data, _FFMPEG_IMAGE[self.codec][1], self.codec)[0]


_PPM_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")


def decode_ffmpeg_frames(data: bytes, fmt: str, what: str, to_rgb_vf: str | None = _TO_RGB
                         ) -> np.ndarray:
    """Decode a raw elementary stream to uint8 RGB frames ``[T, H, W, 3]``.

    ffmpeg writes binary PPM frames (``P6 W H 255`` + pixels) so the geometry comes with
    the pixels in one process."""
    cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", fmt, "-i", "-"]
    if to_rgb_vf:
        cmd += ["-vf", to_rgb_vf]
    cmd += ["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "-"]
    try:
        raw = _run(cmd, data, f"{what} decode")
    except InputError as err:
        raise BitstreamError(str(err)) from err
    m = _PPM_HEADER.match(raw)
    if not m:
        raise BitstreamError(f"{what} decode: unexpected decoder output")
    w, h = int(m.group(1)), int(m.group(2))
    step = m.end() + h * w * 3
    if len(raw) % step:
        raise BitstreamError(f"{what} decode: output is not a whole number of {w}x{h} frames")
    frames = [np.frombuffer(raw, np.uint8, h * w * 3, i + m.end()).reshape(h, w, 3)
              for i in range(0, len(raw), step)]
    return np.stack(frames)


@dataclasses.dataclass(frozen=True)
class FfmpegVideoCoder:
    """x264 / x265 coding of an RGB clip ``[T, H, W, 3]`` (4:2:0, even sides) at ``crf``.

    ``fps``: the frame rate given to the encoder (an int, or a ``"num/den"`` string)."""

    codec: str
    crf: int
    fps: int | str = 25

    def __post_init__(self):
        if self.codec not in _FFMPEG_VIDEO:
            raise InputError(f"unknown ffmpeg video codec {self.codec!r}")

    def encode(self, frames: np.ndarray) -> bytes:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} "
                             f"{frames.shape}")
        t, h, w, _ = frames.shape
        if h % 2 or w % 2:
            raise InputError(f"4:2:0 video needs even frame sides, got {w}x{h}")
        args, fmt = _FFMPEG_VIDEO[self.codec]
        cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo",
               "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(self.fps), "-i", "-",
               "-pix_fmt", "yuv420p", *args, "-crf", str(int(self.crf)), "-f", fmt, "-"]
        return _run(cmd, np.ascontiguousarray(frames).tobytes(), f"{self.codec} encode")

    def decode(self, data: bytes) -> np.ndarray:
        return decode_ffmpeg_frames(data, _FFMPEG_VIDEO[self.codec][1], self.codec,
                                    to_rgb_vf=None)

    def digest(self, data: bytes) -> bytes:
        """MD5 (16 bytes) of the stream's decoded pictures in their native 4:2:0 format
        (ffmpeg's ``streamhash`` muxer). H.264 / HEVC decoding is bit-exact by the
        standards, so the digest is the same on every platform; a changed stream that
        still decodes (ffmpeg conceals errors) changes it."""
        fmt = _FFMPEG_VIDEO[self.codec][1]
        cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", fmt, "-i", "-",
               "-map", "0:v:0", "-f", "streamhash", "-hash", "md5", "-"]
        try:
            out = _run(cmd, data, f"{self.codec} decode").decode(errors="replace")
        except InputError as err:
            raise BitstreamError(str(err)) from err
        m = re.search(r"MD5=([0-9a-f]{32})", out)
        if not m:
            raise BitstreamError(f"{self.codec} decode: no picture hash in {out[:80]!r}")
        return bytes.fromhex(m.group(1))


def make_coder(name: str, value: int):
    """The coder of baseline ``name`` at knob value ``value`` (quality or crf)."""
    if name in _PILLOW_FORMATS:
        return PillowCoder(name, int(value))
    if name in _FFMPEG_IMAGE:
        return FfmpegImageCoder(name, int(value))
    if name in _FFMPEG_VIDEO:
        return FfmpegVideoCoder(name, int(value))
    raise InputError(f"unknown baseline {name!r}; image: {', '.join(image_baselines())}; "
                     f"video: {', '.join(video_baselines())}")


def sweep(name: str, values: Sequence[int] | None = None) -> list[tuple[int, object]]:
    """``[(value, coder), ...]`` for a baseline over ``values`` (default sweep if None)."""
    if values is None:
        values = DEFAULT_SWEEPS.get(name) or VIDEO_SWEEPS.get(name)
    if values is None:
        make_coder(name, 0)  # raises the unknown-baseline error
    return [(int(v), make_coder(name, v)) for v in values]
