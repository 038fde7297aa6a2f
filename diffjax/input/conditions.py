"""Condition extractors for ControlNet training and hint-guided coding, and their pipeline.

ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models", sec. 4) trains on (image, condition) pairs made by running a detector on each
image; the hint-guided video codec (IKIN) transmits the same kinds of weak guidance --
canny edges, depth and low-resolution colour, coded with H.264/H.265 at a very high CRF --
and reconstructs from them. The extractors here are pluggable (``EXTRACTORS``, built from a
config dict by :func:`build_extractor`); each maps a uint8 RGB crop ``[h, w, 3]`` to a
float32 condition image ``[h, w, C]`` in ``[0, 1]`` at the same resolution (ControlNet
conditions are full resolution, 8x the latent):

* :class:`CannyEdges` -- OpenCV's Canny detector (Canny 1986) on the grey image; the
  released canny ControlNets take the binary edge map as a 3-channel image;
* :class:`LowResColour` -- downscale by ``factor`` (area filter), optionally code and decode
  with real H.264 (libx264) or H.265 (libx265) through ``ffmpeg`` at a given CRF so a
  ControlNet learns the codec's artefacts, then upscale back (bicubic);
* :class:`DepthFromFiles` -- depth maps read from files beside the dataset (no depth
  estimator ships here: run one, e.g. MiDaS, offline and store 8/16-bit PNGs or ``.npy``),
  normalised per image to ``[0, 1]``.

:func:`code_frames` is the H.26x round trip itself (any number of frames), reusable for
coding guidance videos.

Extractors are deterministic (ffmpeg runs single-threaded), so the pipeline of
:func:`conditioned_image_dataset` stays a pure function of ``(seed, step)`` and training
resumes exactly (see :mod:`diffjax.input.pipeline`). Batches are ``{"image": float32
[B, h, w, 3], "cond": float32 [B, h, w, C]}``; the config form is ``config.data.kind =
"conditioned_images"`` with ``config.data.condition = {"name": "canny", ...}``.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
from typing import Any, Mapping

import grain
import numpy as np

from diffjax.errors import InputError
from diffjax.input import pipeline, sources, transforms

CODECS = {"h264": "libx264", "h265": "libx265"}


def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - opencv is a runtime requirement
        raise InputError("the canny / resize extractors need OpenCV: pip install "
                         "opencv-python-headless") from err
    return cv2


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"extractors take uint8 RGB images [h, w, 3], got {image.dtype} "
                         f"{image.shape}")
    return image


@dataclasses.dataclass(frozen=True)
class CannyEdges:
    """Canny edges (``cv2.Canny(grey, low, high)``), as the released canny ControlNets.

    ``channels`` 3 repeats the binary map (what those models take), 1 keeps one channel.
    """

    low: int = 100
    high: int = 200
    channels: int = 3

    def __call__(self, image: np.ndarray, **_context) -> np.ndarray:
        cv2 = _cv2()
        grey = cv2.cvtColor(_check_image(image), cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(grey, int(self.low), int(self.high)).astype(np.float32) / 255.0
        return np.repeat(edges[..., None], self.channels, axis=-1)


def code_frames(frames: np.ndarray, codec: str = "h264", crf: int = 40,
                preset: str = "medium") -> tuple[np.ndarray, int]:
    """Encode and decode uint8 RGB ``frames [T, h, w, 3]`` with real H.264/H.265 (ffmpeg).

    4:2:0 chroma, ``crf`` quality (0-51, higher = coarser), one thread (deterministic).
    Odd sizes are edge-padded to even for the encoder and cropped back. Returns the decoded
    frames and the size of the coded stream in bytes.
    """
    if codec not in CODECS:
        raise InputError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if not 0 <= int(crf) <= 51:
        raise InputError(f"crf must be in [0, 51], got {crf}")
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise InputError("coding low-resolution colour needs the ffmpeg executable on PATH")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"code_frames takes uint8 [T, h, w, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    # even sizes for 4:2:0, and at least 16 px (the encoders' smallest block size)
    ph, pw = max(16, h + h % 2), max(16, w + w % 2)
    padded = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    enc = [exe, "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{pw}x{ph}", "-r", "25", "-i", "pipe:0", "-c:v", CODECS[codec],
           "-preset", preset, "-crf", str(int(crf)), "-pix_fmt", "yuv420p", "-threads", "1"]
    if codec == "h265":
        enc += ["-x265-params", "log-level=error:pools=1:frame-threads=1"]
    else:
        enc += ["-x264-params", "threads=1:lookahead-threads=1"]
    enc += ["-f", "matroska", "pipe:1"]
    coded = _run(enc, padded.tobytes())
    dec = [exe, "-nostdin", "-loglevel", "error", "-threads", "1", "-i", "pipe:0",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    raw = _run(dec, coded)
    if len(raw) != t * ph * pw * 3:
        raise InputError(f"ffmpeg decoded {len(raw)} bytes, expected {t} frames of {pw}x{ph}")
    out = np.frombuffer(raw, np.uint8).reshape(t, ph, pw, 3)[:, :h, :w]
    return np.ascontiguousarray(out), len(coded)


def _run(cmd: list[str], data: bytes) -> bytes:
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise InputError(f"ffmpeg failed ({' '.join(cmd[:12])} ...): "
                         f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    return proc.stdout


@dataclasses.dataclass(frozen=True)
class LowResColour:
    """Low-resolution colour: downscale by ``factor``, optionally H.26x-code, upscale back.

    ``codec`` None (plain downscale), ``"h264"`` or ``"h265"`` at ``crf``; the decoded
    low-resolution image is upscaled (bicubic) to the input size, so the condition has the
    codec's blocking and colour bleeding at the resolution a receiver would see.
    """

    factor: int = 8
    codec: str | None = None
    crf: int = 40

    def __post_init__(self):
        if int(self.factor) < 1:
            raise InputError(f"factor must be >= 1, got {self.factor}")
        if self.codec is not None and self.codec not in CODECS:
            raise InputError(f"codec must be None or one of {sorted(CODECS)}, got {self.codec!r}")

    def low_res(self, image: np.ndarray) -> np.ndarray:
        """The transmitted image: ``[ceil(h / f), ceil(w / f), 3]`` uint8 (decoded if coded)."""
        cv2 = _cv2()
        image = _check_image(image)
        h, w = image.shape[:2]
        size = (max(1, -(-w // self.factor)), max(1, -(-h // self.factor)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        if self.codec is not None:
            small = code_frames(small[None], self.codec, self.crf)[0][0]
        return small

    def __call__(self, image: np.ndarray, **_context) -> np.ndarray:
        cv2 = _cv2()
        h, w = np.shape(image)[:2]
        up = cv2.resize(self.low_res(image), (w, h), interpolation=cv2.INTER_CUBIC)
        return up.astype(np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class DepthFromFiles:
    """Depth maps stored beside the images: ``root / <image path relative to the data
    root, suffix replaced by `suffix`>`` (8/16-bit PNG or ``.npy``).

    The map is resized to the full image (bilinear), cropped and flipped exactly like the
    image, and normalised per image to ``[0, 1]`` (min-max; near = high as MiDaS writes
    inverse depth). ``channels`` 3 repeats it (the released depth ControlNets).
    """

    root: str
    suffix: str = ".png"
    channels: int = 3

    def path_for(self, relpath: str | os.PathLike) -> pathlib.Path:
        return pathlib.Path(self.root) / pathlib.Path(relpath).with_suffix(self.suffix)

    def read(self, relpath) -> np.ndarray:
        path = self.path_for(relpath)
        if not path.is_file():
            raise InputError(f"no depth map {str(path)!r} for image {str(relpath)!r}")
        if path.suffix == ".npy":
            depth = np.load(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                depth = np.asarray(im)
        depth = np.asarray(depth, np.float32)
        if depth.ndim == 3:
            depth = depth[..., 0]
        if depth.ndim != 2:
            raise InputError(f"depth map {str(path)!r} has shape {depth.shape}, expected [H, W]")
        return depth

    def __call__(self, image: np.ndarray, *, relpath=None, full_size=None, crop=(0, 0),
                 flipped=False, **_context) -> np.ndarray:
        if relpath is None:
            raise InputError("DepthFromFiles needs the image's path (use it through "
                             "conditioned_image_dataset)")
        cv2 = _cv2()
        h, w = np.shape(image)[:2]
        full_h, full_w = full_size or (h, w)
        depth = self.read(relpath)
        if depth.shape != (full_h, full_w):
            depth = cv2.resize(depth, (full_w, full_h), interpolation=cv2.INTER_LINEAR)
        top, left = crop
        depth = depth[top:top + h, left:left + w]
        if flipped:
            depth = depth[:, ::-1]
        lo, hi = float(depth.min()), float(depth.max())
        depth = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
        return np.repeat(depth[..., None], self.channels, axis=-1).astype(np.float32)


EXTRACTORS = {"canny": CannyEdges, "lowres": LowResColour, "depth": DepthFromFiles}


def build_extractor(cfg: Mapping[str, Any] | None):
    """``{"name": "canny" | "lowres" | "depth", **kwargs}`` -> an extractor."""
    cfg = dict(cfg or {})
    name = cfg.pop("name", None)
    if name not in EXTRACTORS:
        raise InputError(f"unknown condition extractor {name!r}; available: "
                         f"{', '.join(sorted(EXTRACTORS))}")
    try:
        return EXTRACTORS[name](**cfg)
    except TypeError as err:
        raise InputError(f"condition extractor {name!r}: bad arguments {sorted(cfg)}: {err}") from err


def num_channels(extractor) -> int:
    """Channels of an extractor's condition image."""
    return int(getattr(extractor, "channels", 3))


@dataclasses.dataclass
class ConditionedCropFlip(grain.transforms.RandomMap):
    """``{"image": uint8, "index"}`` -> ``{"image": float32 [h, w, 3], "cond": float32
    [h, w, C]}``: one random crop (and flip) of the image, and the condition of that crop."""

    extractor: Any
    source: sources.ImageFolderSource
    height: int
    width: int
    flip: bool = True

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        if image.shape[0] < self.height or image.shape[1] < self.width:
            image = transforms._upscale_to_fit(image, self.height, self.width)
        crop, (top, left) = transforms.random_crop(image, self.height, self.width, rng)
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            crop = crop[:, ::-1]
        crop = np.ascontiguousarray(crop)
        path = self.source.files[int(element["index"])]
        relpath = path.relative_to(self.source.root) if self.source.root.is_dir() else path.name
        cond = self.extractor(crop, relpath=relpath, full_size=image.shape[:2],
                              crop=(top, left), flipped=flipped)
        return {"image": transforms.to_float(crop), "cond": np.asarray(cond, np.float32)}


def conditioned_image_dataset(root: str | os.PathLike, *, crop: int | tuple[int, int],
                              condition: Mapping[str, Any], global_batch_size: int, seed: int,
                              flip: bool = True, **shard) -> grain.MapDataset:
    """Batches ``{"image", "cond"}`` (see the module docstring) from an image folder."""
    h, w = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    source = sources.ImageFolderSource(root)
    transform = ConditionedCropFlip(build_extractor(condition), source, h, w, flip)
    return pipeline.batched_dataset(source, transform, global_batch_size=global_batch_size,
                                    seed=seed, **shard)
