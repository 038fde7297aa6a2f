"""Random-access data sources over local image folders, frame folders and video files.

Each source implements grain's ``RandomAccessDataSource`` protocol (``__len__`` and
``__getitem__``) and returns *uint8* numpy arrays: images ``[H, W, 3]`` and, for video,
the decoded sequence on demand (``read_clip``). Random crops, flips and the conversion to
float happen later, in :mod:`diffjax.input.transforms`, so that every random choice comes
from grain's per-record seeded generator (deterministic given a seed).

Video files are decoded with PyAV (FFmpeg). To read a clip in the middle of a long file
without decoding everything before it, the source demuxes each file once (cheap: no
decoding) to list the presentation timestamps of all frames, seeks to the keyframe before
the first wanted frame and decodes from there; the timestamps of the decoded frames are
checked against the list, and a file whose seeking is unreliable falls back to decoding
from the start. Raw planar YUV 4:2:0 files (``*_{W}x{H}_*.yuv``, as the JCT-VC / UVG test
sequences are named) are read with numpy and converted to RGB by FFmpeg's swscale.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Sequence

import numpy as np

from diffjax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".y4m", ".yuv")


def _natural_key(path: pathlib.Path):
    """Sort ``im2.png`` before ``im10.png`` (frame files are often not zero padded)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def list_files(root: str | os.PathLike, extensions: Sequence[str], *,
               recursive: bool = True) -> list[pathlib.Path]:
    """Files under ``root`` whose suffix is in ``extensions``, in natural sorted order."""
    root = pathlib.Path(root).expanduser()
    if not root.exists():
        raise InputError(f"data path {str(root)!r} does not exist")
    if root.is_file():
        files = [root]
    else:
        pattern = "**/*" if recursive else "*"
        files = [p for p in root.glob(pattern) if p.is_file()]
    exts = tuple(e.lower() for e in extensions)
    files = sorted((p for p in files if p.suffix.lower() in exts), key=_natural_key)
    if not files:
        raise InputError(f"no files with extension {'/'.join(exts)} under {str(root)!r}")
    return files


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB ``[H, W, 3]``: :func:`diffjax.io.images.read_image`
    (grayscale repeated, alpha dropped, 16-bit images reduced to their high byte)."""
    from diffjax.io.images import read_image

    return read_image(path, mode="rgb")


class ImageFolderSource:
    """All images under a folder (recursively), as uint8 ``[H, W, 3]`` arrays.

    Images may have any size; cropping happens in the transforms. Files are listed once,
    in natural sorted order, so the record index of a file is stable across runs/hosts.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = pathlib.Path(root)
        self.files = list_files(root, extensions)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"image": load_image(self.files[index]), "index": np.int32(index)}

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self)} images)"


# ----------------------------------------------------------------------------- video


class FrameFolderSource:
    """Sequences stored as folders of frame images (Vimeo-90k, extracted UVG, ...).

    Every folder under ``root`` that directly holds at least ``min_frames`` images is one
    sequence (``root`` itself counts when it holds the frames); frames are ordered by
    natural sort of their file names (``im1.png .. im7.png``, ``f001.png ..``).
    """

    def __init__(self, root: str | os.PathLike, min_frames: int = 1,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = pathlib.Path(root)
        files = list_files(root, extensions)
        by_dir: dict[pathlib.Path, list[pathlib.Path]] = {}
        for f in files:
            by_dir.setdefault(f.parent, []).append(f)
        self.sequences = [sorted(v, key=_natural_key)
                          for k, v in sorted(by_dir.items(), key=lambda kv: _natural_key(kv[0]))
                          if len(v) >= min_frames]
        if not self.sequences:
            raise InputError(f"no folder under {str(root)!r} holds at least {min_frames} frames")

    def __len__(self) -> int:
        return len(self.sequences)

    def num_frames(self, index: int) -> int:
        return len(self.sequences[index])

    def read_clip(self, index: int, start: int, length: int) -> np.ndarray:
        """uint8 ``[length, H, W, 3]``: frames ``start .. start+length-1`` of sequence ``index``."""
        seq = self.sequences[index]
        if start < 0 or start + length > len(seq):
            raise InputError(f"clip [{start}, {start + length}) outside the {len(seq)} frames "
                             f"of {str(seq[0].parent)!r}")
        frames = [load_image(p) for p in seq[start:start + length]]
        if len({f.shape for f in frames}) != 1:
            raise InputError(f"frames of {str(seq[0].parent)!r} differ in size")
        return np.stack(frames)

    def __getitem__(self, index: int) -> dict:
        return {"sequence": np.int32(index)}


_YUV_GEOMETRY = re.compile(r"(\d+)x(\d+)")


def yuv420_geometry(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` parsed from a raw YUV file name such as ``Beauty_1920x1080_...``."""
    match = _YUV_GEOMETRY.search(pathlib.Path(path).name)
    if not match:
        raise InputError(f"cannot tell the frame size of raw YUV file {str(path)!r}: "
                         f"its name must contain WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def read_yuv420_frames(path: str | os.PathLike, start: int, length: int, *,
                       width: int | None = None, height: int | None = None,
                       colorspace: str = "itu709") -> np.ndarray:
    """Read frames of a raw 8-bit planar YUV 4:2:0 (I420) file as uint8 RGB ``[T, H, W, 3]``.

    The colour conversion is FFmpeg's (swscale via PyAV) with the given matrix
    (``"itu709"`` for HD test sequences such as UVG, ``"itu601"`` for SD ones).
    """
    import av

    if width is None or height is None:
        width, height = yuv420_geometry(path)
    if width % 2 or height % 2:
        raise InputError(f"4:2:0 YUV needs an even frame size, got {width}x{height}")
    frame_bytes = width * height * 3 // 2
    total = os.path.getsize(path) // frame_bytes
    if start < 0 or start + length > total:
        raise InputError(f"clip [{start}, {start + length}) outside the {total} frames of {str(path)!r}")
    data = np.fromfile(path, np.uint8, count=length * frame_bytes, offset=start * frame_bytes)
    out = []
    for planes in data.reshape(length, frame_bytes):
        frame = av.VideoFrame.from_ndarray(planes.reshape(height * 3 // 2, width), format="yuv420p")
        out.append(frame.reformat(format="rgb24", src_colorspace=colorspace).to_ndarray())
    return np.stack(out)


def _frame_timestamps(path: pathlib.Path) -> list[int] | None:
    """Sorted presentation timestamps of every frame of the first video stream (demux only).

    ``None`` when some packet has no timestamp (then the file is read from the start).
    """
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            pts = []
            for packet in container.demux(stream):
                if packet.size == 0:  # flush packet at the end of the stream
                    continue
                if packet.pts is None:
                    return None
                pts.append(packet.pts)
    except (av.error.FFmpegError, IndexError) as err:
        raise InputError(f"cannot read video {str(path)!r}: {err}") from err
    return sorted(pts)


class VideoFileSource:
    """Video files (anything FFmpeg reads, plus raw ``*_WxH_*.yuv``) decoded with PyAV."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike],
                 min_frames: int = 1, yuv_colorspace: str = "itu709"):
        if isinstance(paths, (str, os.PathLike)):
            paths = list_files(paths, VIDEO_EXTENSIONS)
        self.paths = [pathlib.Path(p) for p in paths]
        self.yuv_colorspace = yuv_colorspace
        self._pts: list[list[int] | None] = []
        self._counts: list[int] = []
        for p in self.paths:
            if p.suffix.lower() == ".yuv":
                w, h = yuv420_geometry(p)
                self._pts.append(None)
                self._counts.append(os.path.getsize(p) // (w * h * 3 // 2))
            else:
                pts = _frame_timestamps(p)
                self._pts.append(pts)
                self._counts.append(len(pts) if pts is not None else _count_by_decoding(p))
        keep = [i for i, n in enumerate(self._counts) if n >= min_frames]
        if not keep:
            raise InputError(f"no video with at least {min_frames} frames among {len(self.paths)} files")
        self.paths = [self.paths[i] for i in keep]
        self._pts = [self._pts[i] for i in keep]
        self._counts = [self._counts[i] for i in keep]

    def __len__(self) -> int:
        return len(self.paths)

    def num_frames(self, index: int) -> int:
        return self._counts[index]

    def __getitem__(self, index: int) -> dict:
        return {"sequence": np.int32(index)}

    def read_clip(self, index: int, start: int, length: int) -> np.ndarray:
        """uint8 ``[length, H, W, 3]``: frames ``start .. start+length-1`` in display order."""
        path, n = self.paths[index], self._counts[index]
        if start < 0 or start + length > n:
            raise InputError(f"clip [{start}, {start + length}) outside the {n} frames of {str(path)!r}")
        if path.suffix.lower() == ".yuv":
            return read_yuv420_frames(path, start, length, colorspace=self.yuv_colorspace)
        pts = self._pts[index]
        if pts is not None:
            clip = _decode_after_seek(path, pts[start:start + length])
            if clip is not None:
                return clip
        return _decode_sequential(path, start, length)


def _decode_after_seek(path: pathlib.Path, wanted_pts: list[int]) -> np.ndarray | None:
    """Seek to the keyframe before ``wanted_pts[0]`` and decode; ``None`` if the decoded
    timestamps do not match exactly (unreliable seeking), so the caller falls back."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        container.seek(wanted_pts[0], stream=stream, backward=True, any_frame=False)
        frames = []
        for frame in container.decode(stream):
            if frame.pts is None:
                return None
            if frame.pts < wanted_pts[0]:
                continue
            if frame.pts != wanted_pts[len(frames)]:
                return None
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == len(wanted_pts):
                return np.stack(frames)
    return None


def _decode_sequential(path: pathlib.Path, start: int, length: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = []
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == length:
                return np.stack(frames)
    raise InputError(f"{str(path)!r} ended before frame {start + length}")


def _count_by_decoding(path: pathlib.Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))
