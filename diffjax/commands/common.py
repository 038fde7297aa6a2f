"""Shared pieces of ``diffjax compress`` / ``decompress`` / ``demo``: image I/O, model
arguments, a stage progress bar.

Images: PNG/JPEG (anything Pillow reads) of any size. Modes: RGB; grayscale (``L``, ``1``)
is coded as gray and decoded to a grayscale PNG; images with transparency (``RGBA``,
``LA``, palette with transparency) keep their **alpha plane losslessly** (zlib inside the
bitstream) and decode to RGBA; ``CMYK``/``YCbCr`` JPEGs are converted to RGB. 16-bit and
float images (``I``, ``I;16``, ``F``) are refused with a one-line error. EXIF orientation
is applied before coding.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from diffjax.errors import InputError


def read_image(path: str):
    """``uint8 [H, W, 1|3|4]`` array of an image file (see the module docstring)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(f"cannot read {path!r}: no such file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("I", "F") or mode.startswith("I;"):
                raise InputError(f"{path!r}: {mode} images (16-bit or float) are not supported; "
                                 "convert to 8-bit RGB or grayscale first")
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "LA" or mode == "PA":
                im = im.convert("RGBA")
            elif mode == "1":
                im = im.convert("L")
            elif mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read {path!r} as an image: {err}") from err
    return arr[..., None] if arr.ndim == 2 else arr


def write_image(path: str, image) -> None:
    from PIL import Image

    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[-1]]
    try:
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(path)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot write {path!r}: {err}") from err


def quality_help() -> str:
    from diffjax.codecs.pretrained import shipped_info

    info = shipped_info()
    if info:
        n = info["model"]["num_qualities"]
        return (f"rate point, an integer from 1 (smallest file) to {n} (the shipped model's "
                f"{n} rate points); default: the middle one ({resolve_quality(None, n)} for the "
                "shipped model)")
    return ("rate point, an integer from 1 (smallest file) to the number of rate points of "
            "the model (no weights ship yet; see --model); default: the middle one")


def resolve_quality(quality: int | None, num_qualities: int) -> int:
    """``--quality`` as given, or the middle rate point (rounded down) when it was not."""
    return (int(num_qualities) + 1) // 2 if quality is None else quality


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a model folder (model.json + params.msgpack) or a training workdir "
                             "of experiments/train.py, instead of the shipped weights")


def positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


@contextlib.contextmanager
def stages(names, enabled: bool | None = None):
    """A tqdm bar over named stages: ``with stages([...]) as next_stage: next_stage()``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names), unit="stage", leave=False, file=sys.stderr,
               disable=(not sys.stderr.isatty()) if enabled is None else not enabled,
               bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
    state = {"i": 0}
    bar.set_description(names[0])

    def advance():
        bar.update(1)
        state["i"] += 1
        if state["i"] < len(names):
            bar.set_description(names[state["i"]])

    try:
        yield advance
    finally:
        bar.close()


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
