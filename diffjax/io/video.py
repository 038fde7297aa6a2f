"""Reading and writing video: the one place diffjax touches video files.

Frames are always uint8 ``[T, H, W, 3]`` RGB (any size, odd included); the frame rate is a
:class:`fractions.Fraction` (``None`` when the source does not store one: a folder of
frames, a y4m header with ``F0:0``).

Reading (:func:`read_video`, streaming: :func:`iter_video`):

* ``.y4m`` (YUV4MPEG2) is parsed here, in numpy: 8-bit ``C420`` / ``C420jpeg`` /
  ``C420mpeg2`` / ``C420paldv``, ``C422``, ``C444`` and ``Cmono``. Other chroma formats
  (``C411``, ``C444alpha``, ...) and high bit depths (``C420p10``, ...) raise
  :class:`~diffjax.errors.InputError`. YCbCr -> RGB uses the BT.601 matrix (Kr = 0.299,
  Kb = 0.114; ITU-R BT.601-7), limited range (Y in [16, 235], Cb/Cr in [16, 240]) unless the
  header says ``XCOLORRANGE=FULL``, which is what ffmpeg assumes for untagged SD video.
  Subsampled chroma is upsampled by sample replication (chroma siting is not modelled).
* ``.mp4 .mkv .mov .avi .webm`` are decoded with PyAV (FFmpeg) and converted to 8-bit RGB
  by FFmpeg's swscale (``frame.to_ndarray(format="rgb24")``), with the colour matrix the
  stream signals (BT.601 when unsignalled).
* a folder of PNG / JPEG / BMP / PPM / TIFF / WebP frames, natural-sorted by name
  (``f2.png`` before ``f10.png``), each read by :func:`diffjax.io.images.read_image` in
  ``"rgb"`` mode (the one image policy: grey repeated, alpha dropped, 16-bit reduced to its
  high byte).

Writing (:func:`write_video`; frames may be an array or any iterable of ``[H, W, 3]``
frames, so a decoder can stream into it):

* ``.y4m``: ``C444`` (no chroma subsampling, so the only loss is the 8-bit RGB -> YCbCr
  rounding: at most a few levels, see the tests) BT.601 limited range, tagged
  ``XCOLORRANGE=LIMITED``; ``y4m_chroma="420"`` writes ``C420jpeg`` (2x2 box-averaged
  chroma, centre sited) for tools that only take 4:2:0. The bytes are a pure function of
  the frames and fps (deterministic).
* ``.mkv``: FFV1 (level 3) in ``bgr0``, i.e. lossless RGB: reading it back gives the
  identical frames. Muxed with FFmpeg's ``bitexact`` flags, so the bytes are deterministic.
* ``.mp4``: H.264 (libx264, ``crf`` 18, ``yuv420p``; ``yuv444p`` when a side is odd, since
  4:2:0 needs even sides): lossy, for viewing.
* a path with no suffix or ending in ``/``: a folder of ``frame_00000.png``, ... (lossless).

Files are written to a temporary file beside the target and moved into place with
``os.replace``, so the target is either the old file or the complete new one and no
temporary file is left behind on error. A frame folder is written to a temporary folder
and swapped in; an existing folder is only replaced if it holds nothing but
``frame_*.png`` files. The default frame rate is 25 fps.
"""
from __future__ import annotations

import fractions
import itertools
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Iterable, Iterator

import numpy as np

from diffjax.errors import InputError
from diffjax.io.images import IMAGE_SUFFIXES

CONTAINER_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm")
VIDEO_SUFFIXES = (".y4m",) + CONTAINER_SUFFIXES
FRAME_SUFFIXES = IMAGE_SUFFIXES
WRITE_SUFFIXES = (".y4m", ".mkv", ".mp4")
DEFAULT_FPS = fractions.Fraction(25)
FRAME_NAME = "frame_{:05d}.png"

# BT.601 luma coefficients (ITU-R BT.601-7); the YCbCr matrices are derived from them.
_KR, _KB = 0.299, 0.114
_KG = 1.0 - _KR - _KB
_RGB_TO_YPBPR = np.array([[_KR, _KG, _KB],
                          [-_KR / (2 - 2 * _KB), -_KG / (2 - 2 * _KB), 0.5],
                          [0.5, -_KG / (2 - 2 * _KR), -_KB / (2 - 2 * _KR)]])
_YPBPR_TO_RGB = np.linalg.inv(_RGB_TO_YPBPR)
# (luma scale, luma offset, chroma scale) in 8-bit code values
_RANGES = {"LIMITED": (219.0, 16.0, 224.0), "FULL": (255.0, 0.0, 255.0)}
# y4m chroma tag -> (horizontal, vertical) subsampling; None = monochrome
_Y4M_CHROMA = {"420jpeg": (2, 2), "420paldv": (2, 2), "420mpeg2": (2, 2), "420": (2, 2),
               "422": (2, 1), "444": (1, 1), "mono": None}


def is_video_path(path: str | os.PathLike) -> bool:
    """True if ``path`` names something :func:`read_video` reads by its suffix (a video
    file) or is an existing folder (of frames)."""
    path = pathlib.Path(path)
    return path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir()


def _natural_key(p: pathlib.Path) -> list:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", p.name)]


def _as_fraction(fps: Any) -> fractions.Fraction:
    try:
        out = fractions.Fraction(fps).limit_denominator(1_000_000)
    except (TypeError, ValueError) as err:
        raise InputError(f"fps must be a positive number, got {fps!r}") from err
    if out <= 0:
        raise InputError(f"fps must be a positive number, got {fps!r}")
    return out


# ----------------------------------------------------------------------------- colour

def ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray,
                 color_range: str = "LIMITED") -> np.ndarray:
    """8-bit BT.601 Y'CbCr planes (same size) -> uint8 RGB ``[H, W, 3]``."""
    ys, yo, cs = _RANGES[color_range]
    ypbpr = np.stack([(y.astype(np.float64) - yo) / ys, (cb.astype(np.float64) - 128.0) / cs,
                      (cr.astype(np.float64) - 128.0) / cs], axis=-1)
    rgb = ypbpr @ _YPBPR_TO_RGB.T
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def rgb_to_ycbcr(rgb: np.ndarray, color_range: str = "LIMITED") -> np.ndarray:
    """uint8 RGB ``[..., 3]`` -> BT.601 Y'CbCr as float64 code values ``[..., 3]``
    (unrounded, so a caller can subsample chroma before rounding)."""
    ys, yo, cs = _RANGES[color_range]
    ypbpr = (rgb.astype(np.float64) / 255.0) @ _RGB_TO_YPBPR.T
    return np.stack([ypbpr[..., 0] * ys + yo, ypbpr[..., 1] * cs + 128.0,
                     ypbpr[..., 2] * cs + 128.0], axis=-1)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- y4m

def _parse_y4m_header(line: bytes, path: pathlib.Path) -> dict:
    tokens = line.decode("ascii", "replace").split()
    if not tokens or tokens[0] != "YUV4MPEG2":
        raise InputError(f"{path}: not a YUV4MPEG2 (.y4m) file")
    head = {"chroma": "420jpeg", "fps": None, "range": "LIMITED"}
    try:
        for tok in tokens[1:]:
            key, val = tok[0], tok[1:]
            if key == "W":
                head["width"] = int(val)
            elif key == "H":
                head["height"] = int(val)
            elif key == "F":
                num, den = (int(v) for v in val.split(":"))
                head["fps"] = fractions.Fraction(num, den) if num > 0 and den > 0 else None
            elif key == "C":
                head["chroma"] = val
            elif key == "X" and val.upper().startswith("COLORRANGE="):
                head["range"] = val.split("=", 1)[1].upper()
    except ValueError as err:
        raise InputError(f"{path}: bad y4m header {line[:80]!r}") from err
    if head.get("width", 0) <= 0 or head.get("height", 0) <= 0:
        raise InputError(f"{path}: y4m header has no valid W/H: {line[:80]!r}")
    if head["range"] not in _RANGES:
        raise InputError(f"{path}: unknown y4m colour range {head['range']!r}")
    chroma = head["chroma"]
    if chroma not in _Y4M_CHROMA:
        depth = re.search(r"p(\d+)$", chroma)
        what = (f"{depth.group(1)}-bit samples" if depth
                else f"chroma format C{chroma}")
        raise InputError(f"{path}: y4m with {what} is not supported; diffjax reads 8-bit "
                         f"C420*, C422, C444 and Cmono (convert with e.g. `ffmpeg -i IN "
                         f"-pix_fmt yuv420p OUT.y4m`)")
    return head


def _iter_y4m(path: pathlib.Path) -> tuple[fractions.Fraction | None, Iterator[np.ndarray]]:
    fh = open(path, "rb")
    try:
        head = _parse_y4m_header(fh.readline(65536), path)
    except BaseException:
        fh.close()
        raise
    w, h, sub = head["width"], head["height"], _Y4M_CHROMA[head["chroma"]]
    if sub is None:
        cw = ch = 0
    else:
        cw, ch = -(-w // sub[0]), -(-h // sub[1])
    size = w * h + 2 * cw * ch

    def frames() -> Iterator[np.ndarray]:
        with fh:
            index = 0
            while True:
                marker = fh.readline(1024)
                if not marker:
                    return
                if not marker.startswith(b"FRAME") or not marker.endswith(b"\n"):
                    raise InputError(f"{path}: corrupt y4m, frame {index} does not start "
                                     f"with FRAME")
                buf = fh.read(size)
                if len(buf) != size:
                    raise InputError(f"{path}: truncated y4m, frame {index} has {len(buf)} "
                                     f"of {size} bytes")
                data = np.frombuffer(buf, np.uint8)
                y = data[:w * h].reshape(h, w)
                if sub is None:
                    cb = cr = np.full_like(y, 128)
                else:
                    cb = data[w * h:w * h + cw * ch].reshape(ch, cw)
                    cr = data[w * h + cw * ch:].reshape(ch, cw)
                    cb = np.repeat(np.repeat(cb, sub[1], 0), sub[0], 1)[:h, :w]
                    cr = np.repeat(np.repeat(cr, sub[1], 0), sub[0], 1)[:h, :w]
                yield ycbcr_to_rgb(y, cb, cr, head["range"])
                index += 1

    return head["fps"], frames()


def _y4m_bytes(frame: np.ndarray, chroma: str) -> bytes:
    ycc = rgb_to_ycbcr(frame)
    y = _to_u8(ycc[..., 0])
    if chroma == "444":
        return y.tobytes() + _to_u8(ycc[..., 1]).tobytes() + _to_u8(ycc[..., 2]).tobytes()
    # 4:2:0: average each 2x2 block (edge-replicated for odd sides) before rounding
    h, w = y.shape
    c = np.pad(ycc[..., 1:], ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    c = c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2, 2).mean(axis=(1, 3))
    return y.tobytes() + _to_u8(c[..., 0]).tobytes() + _to_u8(c[..., 1]).tobytes()


# ----------------------------------------------------------------------------- PyAV

def _iter_container(path: pathlib.Path) -> tuple[fractions.Fraction | None,
                                                 Iterator[np.ndarray]]:
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise InputError(f"{path}: cannot open video ({err})") from err
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: the file has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    fps = fractions.Fraction(rate) if rate and rate > 0 else None

    def frames() -> Iterator[np.ndarray]:
        with container:
            try:
                for frame in container.decode(stream):
                    yield frame.to_ndarray(format="rgb24")
            except av.error.FFmpegError as err:
                raise InputError(f"{path}: cannot decode video ({err})") from err

    return fps, frames()


def _write_container(tmp: str, fmt: str, codec: str, frames: Iterator[np.ndarray],
                     first: np.ndarray, fps: fractions.Fraction, crf: int) -> None:
    import av

    h, w = first.shape[:2]
    # bitexact: no encoder version string / random segment UID, so the bytes are
    # a function of the frames (and the FFmpeg build)
    with av.open(tmp, "w", format=fmt, options={"fflags": "+bitexact"}) as container:
        if codec == "ffv1":
            stream = container.add_stream("ffv1", rate=fps, options={"level": "3"})
            stream.pix_fmt = "bgr0"  # FFV1's 8-bit RGB layout: lossless
        else:
            stream = container.add_stream("libx264", rate=fps,
                                          options={"crf": str(crf), "preset": "medium"})
            stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        stream.width, stream.height = w, h
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for frame in frames:
            packets = stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
            container.mux(packets)
        container.mux(stream.encode())


# ----------------------------------------------------------------------------- folders

def _read_frame(p: pathlib.Path) -> np.ndarray:
    from diffjax.io.images import read_image

    return read_image(p, mode="rgb")


def _iter_folder(path: pathlib.Path) -> tuple[None, Iterator[np.ndarray]]:
    files = sorted((p for p in path.iterdir()
                    if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
    if not files:
        raise InputError(f"{path}: a folder with no frames ({', '.join(FRAME_SUFFIXES)})")
    return None, (_read_frame(p) for p in files)


# ----------------------------------------------------------------------------- public

def iter_video(path: str | os.PathLike, max_frames: int | None = None
               ) -> tuple[fractions.Fraction | None, Iterator[np.ndarray]]:
    """``(fps, frames)``: a video's frame rate and a generator of its uint8 ``[H, W, 3]``
    frames, decoded one at a time (see the module docstring for the formats). All frames
    have the size of the first; a different size raises :class:`InputError`."""
    path = pathlib.Path(path)
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be at least 1, got {max_frames}")
    if path.is_dir():
        fps, frames = _iter_folder(path)
    elif not path.exists():
        raise InputError(f"{path}: no such file or folder")
    elif path.suffix.lower() == ".y4m":
        fps, frames = _iter_y4m(path)
    elif path.suffix.lower() in CONTAINER_SUFFIXES:
        fps, frames = _iter_container(path)
    else:
        raise InputError(f"{path}: unknown video suffix {path.suffix!r}; diffjax reads "
                         f"{', '.join(VIDEO_SUFFIXES)} files and folders of frames")

    def checked() -> Iterator[np.ndarray]:
        shape = None
        try:
            # islice stops before decoding frame max_frames (it may be damaged)
            for i, frame in enumerate(itertools.islice(frames, max_frames)):
                if shape is None:
                    shape = frame.shape
                elif frame.shape != shape:
                    raise InputError(f"{path}: frame {i} is {frame.shape[1]}x{frame.shape[0]}"
                                     f", frame 0 is {shape[1]}x{shape[0]}; all frames must "
                                     f"have one size")
                yield frame
        finally:
            frames.close()

    return fps, checked()


def read_video(path: str | os.PathLike, max_frames: int | None = None
               ) -> tuple[np.ndarray, fractions.Fraction | None]:
    """A whole clip: ``(frames uint8 [T, H, W, 3], fps)``; ``max_frames`` keeps the first
    N. ``fps`` is ``None`` for a folder of frames or a y4m without a rate.

    Raises:
      InputError: missing path, unknown suffix, a folder without frames, frames of
        different sizes, an undecodable or truncated file, an unsupported y4m format.
    """
    fps, frames = iter_video(path, max_frames)
    stacked = list(frames)
    if not stacked:
        raise InputError(f"{path}: no frames decoded")
    return np.stack(stacked), fps


def load_clip(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames of a clip (:func:`read_video` without the fps)."""
    return read_video(path, max_frames)[0]


def _frames_iter(frames: Any) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """First frame and an iterator over all frames, each checked to be uint8 [H, W, 3]
    with the first one's size."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"frames must be uint8 [T, H, W, 3], got shape {frames.shape}")
        iterator: Iterator = iter(frames)
    else:
        iterator = iter(frames)
    try:
        first = next(iterator)
    except StopIteration:
        raise InputError("no frames to write") from None

    def check(i: int, frame: Any) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise InputError(f"frame {i}: expected uint8 [H, W, 3], got {frame.dtype} "
                             f"{frame.shape}")
        if i and frame.shape != first.shape:
            raise InputError(f"frame {i} is {frame.shape}, frame 0 is {first.shape}; all "
                             f"frames must have one size")
        return np.ascontiguousarray(frame)

    first = check(0, first)

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        for i, frame in enumerate(iterator, 1):
            yield check(i, frame)

    return first, all_frames()


def _is_folder_target(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or pathlib.Path(text).suffix == ""


def write_video(path: str | os.PathLike, frames: np.ndarray | Iterable[np.ndarray],
                fps: Any = None, *, y4m_chroma: str = "444", crf: int = 18) -> int:
    """Write frames (uint8 ``[T, H, W, 3]`` or an iterable of ``[H, W, 3]``) to ``path``
    (``.y4m``, ``.mkv`` FFV1 lossless, ``.mp4`` H.264, or a frame folder: no suffix or a
    trailing ``/``), atomically. ``fps`` defaults to 25; ``y4m_chroma`` is ``"444"`` or
    ``"420"``; ``crf`` is the H.264 quality of ``.mp4``. Returns the number of frames."""
    fps = DEFAULT_FPS if fps is None else _as_fraction(fps)
    if y4m_chroma not in ("444", "420"):
        raise InputError(f"y4m_chroma must be '444' or '420', got {y4m_chroma!r}")
    folder = _is_folder_target(path)
    target = pathlib.Path(path)
    suffix = target.suffix.lower()
    if not folder and suffix not in WRITE_SUFFIXES:
        raise InputError(f"{target}: cannot write {suffix!r}; diffjax writes "
                         f"{', '.join(WRITE_SUFFIXES)} or a frame folder (a path without "
                         f"suffix)")
    if not folder and target.is_dir():
        raise InputError(f"{target}: is a folder; give a file name")
    first, all_frames = _frames_iter(frames)
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        return _write_folder(target, all_frames)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    count = 0

    def counted() -> Iterator[np.ndarray]:
        nonlocal count
        for frame in all_frames:
            count += 1
            yield frame

    try:
        if suffix == ".y4m":
            h, w = first.shape[:2]
            tag = "C444 XYSCSS=444" if y4m_chroma == "444" else "C420jpeg XYSCSS=420JPEG"
            with os.fdopen(fd, "wb") as fh:
                fh.write(f"YUV4MPEG2 W{w} H{h} F{fps.numerator}:{fps.denominator} Ip A1:1 "
                         f"{tag} XCOLORRANGE=LIMITED\n".encode("ascii"))
                for frame in counted():
                    fh.write(b"FRAME\n" + _y4m_bytes(frame, y4m_chroma))
        else:
            os.close(fd)
            fmt, codec = {".mkv": ("matroska", "ffv1"), ".mp4": ("mp4", "libx264")}[suffix]
            _write_container(tmp, fmt, codec, counted(), first, fps, crf)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _write_folder(target: pathlib.Path, frames: Iterator[np.ndarray]) -> int:
    from PIL import Image

    if target.exists():
        if not target.is_dir():
            raise InputError(f"{target}: exists and is not a folder")
        foreign = [p.name for p in target.iterdir()
                   if not re.fullmatch(r"frame_\d+\.png", p.name)]
        if foreign:
            raise InputError(f"{target}: folder holds other files ({foreign[0]}, ...); "
                             f"write the frames to a new or empty folder")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                        dir=target.parent))
    old = None
    try:
        count = 0
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / FRAME_NAME.format(i), compress_level=6)
            count += 1
        if target.exists():
            old = target.with_name(f"{tmp.name}.old")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return count
