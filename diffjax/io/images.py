"""Reading and writing images: the one place diffjax decodes an image file.

:func:`read_image` returns uint8 ``[H, W, C]``:

* ``mode="rgb"`` (training data, evaluation, video frames): always ``C = 3``; grayscale is
  repeated, alpha is dropped, palette / CMYK / YCbCr are converted by Pillow;
* ``mode="native"`` (what the codecs' CLI codes): grayscale (``L``, ``1``) stays one
  channel, images with transparency (``RGBA``, ``LA``, palette with transparency) keep
  their alpha as a 4th channel, everything else becomes RGB.

**16-bit and other high-bit-depth images** (Pillow modes ``I;16*``, ``I``) are reduced to 8
bits by keeping the high byte (``v >> 8``), the same everywhere. Pillow's own
``convert("RGB")`` would clip them to 255 (a white image), which is never what a user
wants. Float images (mode ``F``) have no defined range and are refused. EXIF orientation
is applied. Errors are :class:`~diffjax.errors.InputError` with the path in the message.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from diffjax.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _high_byte(im) -> np.ndarray:
    """uint8 gray ``[H, W]`` of a 16/32-bit integer image (see the module docstring)."""
    gray = np.asarray(im).astype(np.int64)
    if im.mode.startswith("I;16") or gray.max(initial=0) > 255:
        gray = np.clip(gray, 0, 65535) >> 8
    return np.clip(gray, 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, mode: str = "rgb") -> np.ndarray:
    """uint8 ``[H, W, C]`` of an image file (see the module docstring for ``mode``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if mode not in ("rgb", "native"):
        raise ValueError(f"mode must be 'rgb' or 'native', not {mode!r}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"cannot read {str(path)!r}: it is a directory, not an image file")
    if not path.is_file():
        raise InputError(f"cannot read {str(path)!r}: no such file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "F":
                raise InputError(f"{str(path)!r}: float images are not supported; convert to "
                                 "8-bit RGB or grayscale first")
            if im.mode.startswith("I"):
                gray = _high_byte(im)
                arr = gray[..., None] if mode == "native" else np.repeat(gray[..., None], 3, -1)
                return arr
            if mode == "rgb":
                return np.asarray(im.convert("RGB"), np.uint8)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("LA", "PA"):
                im = im.convert("RGBA")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read {str(path)!r} as an image: {err}") from err
    return arr[..., None] if arr.ndim == 2 else arr


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write uint8 ``[H, W, 1|3|4]`` (format from the suffix; PNG is lossless), atomically:
    the target is either untouched or complete, and no temporary file is left behind."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise InputError(f"expected a uint8 image [H, W, 1|3|4], got {image.dtype} {image.shape}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {str(path)!r}: it is a directory")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[-1]]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(tmp)
        os.replace(tmp, path)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot write {str(path)!r}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[pathlib.Path]:
    """Image files of ``folder`` sorted by name (first ``limit``)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r}: not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files if limit is None else files[:limit]
