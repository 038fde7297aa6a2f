"""The hints of the hint-guided video codec (IKIN, "Diffusion-Based Compression", Westcott &
Vela): per-frame weak guidance extracted at the transmitter and sent as ordinary video.

Each hint is one H.264 (libx264) or H.265 (libx265) stream written by ffmpeg at its own
CRF and resolution (the paper's Table I gives both per hint), and the receiver decodes it
with ffmpeg. Three kinds (:data:`HINTS`):

* ``canny``: OpenCV's Canny detector (Canny 1986) on the grey frame, thresholds ``low`` /
  ``high`` as settings, the binary map as a grey picture
  (:class:`diffjax.input.conditions.CannyEdges`, as the released canny ControlNets take it);
* ``colour``: the frame itself, area-downscaled to the stream resolution (the low-res colour
  hint; :class:`~diffjax.input.conditions.LowResColour` is its ControlNet-training twin);
* ``depth``: a depth map per frame from a pluggable :class:`DepthSource` (no monocular depth
  estimator ships with diffjax), min-max normalised per frame to ``[0, 1]`` (near = bright, as
  MiDaS writes inverse depth), with an optional temporal median filter of radius
  ``median_radius`` frames (Table I: "depth median radius") against flicker.

**Plugging in a depth model.** ``depth`` is any of

* a folder of depth maps (8/16-bit PNG or ``.npy``, one per frame, sorted by name);
* a video file of depth maps (read with :func:`diffjax.io.video.read_video`; the first
  channel is the depth);
* a callable ``depth(frames) -> [T, H, W]`` (any float or integer scale), e.g. a MiDaS or
  Depth Anything model run on uint8 RGB frames ``[T, H, W, 3]``::

      import torch
      midas = torch.hub.load("intel-isl/MiDaS", "MiDaS_small").eval()
      tf = torch.hub.load("intel-isl/MiDaS", "transforms").small_transform
      def depth(frames):
          with torch.no_grad():
              return np.stack([midas(tf(f)).squeeze().numpy() for f in frames])
      codec = diffjax.codecs.get("hint", ..., depth_source=depth)

  Maps of another size are resized (bilinear) to the frame size.

Streams (:func:`code_hint`): the hint picture is resized to the stream size with OpenCV's
area filter, coded by :class:`diffjax.eval.baselines.FfmpegVideoCoder` (``x264`` / ``x265``,
preset medium, 4:2:0, raw Annex-B without the settings SEI) and the CRC32 of the stream is
kept, so that the receiver refuses a damaged stream that ffmpeg would silently conceal (or
that still decodes, e.g. a truncated trailing slice of skipped blocks); H.264 / HEVC
decoding itself is bit-exact by the standards. Stream sides are even and at least
:data:`MIN_STREAM_SIDE` (the encoders' smallest block); the condition images the ControlNets
see are the decoded pictures upscaled to the condition size (:func:`condition_images`;
bicubic for colour, bilinear for canny and depth), the same function at both ends.
"""
from __future__ import annotations

import fractions
import os
import pathlib
import zlib
from typing import Any, Callable, Mapping

import numpy as np

from diffjax.errors import BitstreamError, InputError

HINTS = ("canny", "colour", "depth")
STREAM_CODECS = {"h264": "x264", "h265": "x265"}
MIN_STREAM_SIDE = 16
_DEPTH_SUFFIXES = (".png", ".npy", ".tif", ".tiff", ".pgm")

DepthSource = str | os.PathLike | Callable[[np.ndarray], Any]


def _cv2():
    from diffjax.input.conditions import _cv2 as load

    return load()


# ----------------------------------------------------------------------------- extraction
def canny(frames: np.ndarray, low: int, high: int) -> np.ndarray:
    """Binary Canny edges of uint8 RGB ``[T, H, W, 3]`` -> uint8 ``[T, H, W, 3]`` (0 / 255)."""
    from diffjax.input.conditions import CannyEdges

    if not 0 <= int(low) <= int(high) <= 255 * 4:
        raise InputError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    edges = CannyEdges(low=int(low), high=int(high), channels=3)
    return np.stack([np.rint(edges(f) * 255.0).astype(np.uint8) for f in frames])


def read_depth(source: DepthSource, frames: np.ndarray) -> np.ndarray:
    """Depth maps ``float32 [T, H, W]`` for ``frames`` from ``source`` (module docstring)."""
    t, h, w = frames.shape[:3]
    if source is None:
        raise InputError("the depth hint needs a depth source: a folder or video of depth maps, "
                         "or a callable frames -> [T, H, W] (see diffjax.codecs.hint_guidance)")
    if callable(source):
        maps = np.asarray(source(frames))
        where = "the depth callable"
    else:
        path = pathlib.Path(source)
        where = str(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in _DEPTH_SUFFIXES)
            if len(files) < t:
                raise InputError(f"depth folder {where!r} has {len(files)} maps, the clip {t} "
                                 "frames")
            maps = [_read_map(p) for p in files[:t]]
            if len({m.shape for m in maps}) != 1:
                raise InputError(f"depth maps in {where!r} differ in size")
            maps = np.stack(maps)
        elif path.is_file():
            from diffjax.io.video import read_video

            video, _ = read_video(path, max_frames=t)
            maps = video[..., 0]
        else:
            raise InputError(f"depth source {where!r} does not exist")
    if maps.ndim == 4 and maps.shape[-1] in (1, 3):
        maps = maps[..., 0]
    if maps.ndim != 3 or maps.shape[0] < t:
        raise InputError(f"{where} gave depth of shape {maps.shape}, expected [{t}, H, W]")
    maps = np.asarray(maps[:t], np.float32)
    if not np.all(np.isfinite(maps)):
        raise InputError(f"{where} gave non-finite depth values")
    if maps.shape[1:] != (h, w):
        cv2 = _cv2()
        maps = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps])
    return maps


def _read_map(path: pathlib.Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        m = np.load(path)
    else:
        from PIL import Image

        with Image.open(path) as im:
            m = np.asarray(im)
    m = np.asarray(m, np.float32)
    return m[..., 0] if m.ndim == 3 else m


def temporal_median(frames: np.ndarray, radius: int) -> np.ndarray:
    """Per-pixel median over the frames ``i - radius .. i + radius`` (clamped at the clip's
    ends) of ``[T, ...]``; radius 0 returns the input."""
    radius = int(radius)
    if radius < 0:
        raise InputError(f"median radius must be >= 0, got {radius}")
    if radius == 0:
        return frames
    t = frames.shape[0]
    out = [np.median(frames[max(0, i - radius): i + radius + 1], axis=0) for i in range(t)]
    return np.stack(out).astype(frames.dtype)


def depth_pictures(source: DepthSource, frames: np.ndarray, median_radius: int = 0) -> np.ndarray:
    """The depth hint: uint8 grey RGB ``[T, H, W, 3]``, per-frame min-max normalised,
    temporally median-filtered with ``median_radius``."""
    maps = temporal_median(read_depth(source, frames), median_radius)
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    norm = np.where(hi > lo, (maps - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    grey = np.rint(norm * 255.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- coding
def stream_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The coded size of a hint at ``scale`` of a ``height x width`` clip (even sides, at
    least :data:`MIN_STREAM_SIDE`)."""
    if not 0.0 < float(scale) <= 1.0:
        raise InputError(f"hint scale must be in (0, 1], got {scale}")

    def side(n):
        return max(MIN_STREAM_SIDE, 2 * int(round(n * float(scale) / 2.0)))

    return side(height), side(width)


def resize(pictures: np.ndarray, height: int, width: int, interpolation: str = "area"
           ) -> np.ndarray:
    """Resize uint8 ``[T, h, w, 3]`` (area / bilinear / bicubic, OpenCV)."""
    cv2 = _cv2()
    if pictures.shape[1:3] == (height, width):
        return np.ascontiguousarray(pictures)
    flag = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR,
            "bicubic": cv2.INTER_CUBIC}[interpolation]
    return np.stack([cv2.resize(p, (width, height), interpolation=flag) for p in pictures])


def coder(codec: str, crf: int, fps: Any = None):
    """The :class:`~diffjax.eval.baselines.FfmpegVideoCoder` of a hint stream."""
    from diffjax.eval.baselines import FfmpegVideoCoder

    if codec not in STREAM_CODECS:
        raise InputError(f"hint codec must be one of {', '.join(STREAM_CODECS)}, got {codec!r}")
    if not 0 <= int(crf) <= 51:
        raise InputError(f"hint crf must be an integer from 0 to 51, got {crf!r}")
    rate = fractions.Fraction(25 if fps is None else fps).limit_denominator(1 << 20)
    return FfmpegVideoCoder(STREAM_CODECS[codec], int(crf), fps=str(rate))


def code_hint(pictures: np.ndarray, size: tuple[int, int], codec: str, crf: int,
              fps: Any = None) -> tuple[bytes, int, np.ndarray]:
    """Code hint pictures uint8 ``[T, H, W, 3]`` at ``size``: ``(stream, its CRC32, decoded
    pictures [T, h, w, 3])`` -- the decoded pictures are what the receiver sees."""
    stream = coder(codec, crf, fps).encode(resize(pictures, *size))
    crc = zlib.crc32(stream)
    return stream, crc, decode_hint(stream, codec, size, pictures.shape[0], crc)


def decode_hint(stream: bytes, codec: str, size: tuple[int, int], frames: int,
                crc: int) -> np.ndarray:
    """Verify a hint stream's CRC32, decode it with ffmpeg and check its geometry; a damaged
    stream raises :class:`~diffjax.entropy.bitstream.CorruptError`."""
    from diffjax.entropy.bitstream import CorruptError

    if zlib.crc32(stream) != crc:
        raise CorruptError("hint stream is damaged (CRC mismatch)")
    try:
        pictures = coder(codec, 0).decode(stream)
    except (BitstreamError, InputError) as err:
        raise CorruptError(f"hint stream does not decode: {err}") from err
    if pictures.shape != (frames, size[0], size[1], 3):
        raise CorruptError(f"hint stream decodes to {pictures.shape}, the file says "
                           f"{(frames, size[0], size[1], 3)}")
    return pictures


def condition_images(name: str, pictures: np.ndarray, height: int, width: int) -> np.ndarray:
    """Decoded hint pictures -> ControlNet conditions float32 ``[T, height, width, 3]`` in
    ``[0, 1]`` (bicubic for colour, bilinear for canny / depth; the same at both ends)."""
    up = resize(pictures, height, width, "bicubic" if name == "colour" else "bilinear")
    return up.astype(np.float32) / 255.0


def check_hint_settings(name: str, cfg: Mapping[str, Any]) -> dict:
    """Validate one hint's settings (``scale``, ``crf``, ``codec``, ``control_scale``, and
    ``low`` / ``high`` for canny, ``median_radius`` for depth)."""
    if name not in HINTS:
        raise InputError(f"unknown hint {name!r}; hints are {', '.join(HINTS)}")
    allowed = {"scale", "crf", "codec", "control_scale"} | (
        {"low", "high"} if name == "canny" else {"median_radius"} if name == "depth" else set())
    unknown = set(cfg) - allowed
    if unknown:
        raise InputError(f"hint {name!r}: unknown setting(s) {sorted(unknown)}; "
                         f"known: {sorted(allowed)}")
    out = dict(cfg)
    stream_size(64, 64, out["scale"])
    coder(out["codec"], out["crf"])
    if not 0.0 <= float(out["control_scale"]) <= 4.0:
        raise InputError(f"hint {name!r}: control_scale must be in [0, 4], got "
                         f"{out['control_scale']}")
    if name == "canny":
        if not 0 <= int(out["low"]) <= int(out["high"]):
            raise InputError(f"canny thresholds must satisfy 0 <= low <= high, got "
                             f"{out['low']}, {out['high']}")
    if name == "depth" and not 0 <= int(out["median_radius"]) <= 32:
        raise InputError(f"depth median_radius must be 0..32, got {out['median_radius']}")
    return out


def hint_pictures(name: str, frames: np.ndarray, cfg: Mapping[str, Any],
                  depth_source: DepthSource | None = None) -> np.ndarray:
    """The full-resolution hint pictures uint8 ``[T, H, W, 3]`` of ``frames``."""
    if name == "canny":
        return canny(frames, cfg["low"], cfg["high"])
    if name == "colour":
        return frames
    if name == "depth":
        return depth_pictures(depth_source, frames, cfg.get("median_radius", 0))
    raise InputError(f"unknown hint {name!r}")

