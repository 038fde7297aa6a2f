"""Shared pieces of ``diffjax compress`` / ``decompress`` / ``demo``: reading inputs,
loading the model a command needs, atomic output, a stage progress bar.

Images are read by :mod:`diffjax.io.images` (``mode="native"``: gray stays gray, alpha is
kept; 16-bit images keep their high byte), video by :mod:`diffjax.io.video`.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import pathlib
import sys
import time

from diffjax.errors import InputError


def read_image(path: str):
    """``uint8 [H, W, 1|3|4]`` of an image file (:func:`diffjax.io.images.read_image`)."""
    from diffjax.io.images import read_image as read

    return read(path, mode="native")


def write_image(path: str, image) -> None:
    from diffjax.io.images import write_image as write

    write(path, image)


def is_video_input(path: str) -> bool:
    """A video file (by suffix) or a folder (of frames)."""
    from diffjax.io.video import is_video_path

    return os.path.isdir(path) or is_video_path(path)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` atomically (temp file + rename); no temporary file is left behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"cannot write {path!r}: {err.strerror or err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def output_path(output: str | None, input_path: str, suffix: str,
                into_folder: bool = True) -> str:
    """``-o`` as given, else the input path with ``suffix``. With ``into_folder``, an
    existing folder given as ``-o`` receives ``INPUT-STEM + suffix``."""
    src = pathlib.Path(input_path)
    stem = src.name if src.is_dir() else src.stem
    if output is None:
        return str(src.parent / (stem + suffix))
    if into_folder and os.path.isdir(output):
        return os.path.join(output, stem + suffix)
    return output


def accepts(factory, name: str) -> bool:
    """Whether a codec class / method takes keyword ``name``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def quality_help() -> str:
    from diffjax.codecs.pretrained import DEFAULT_CODEC, shipped_info

    info = shipped_info(DEFAULT_CODEC)
    if info and "num_qualities" in info["kwargs"]:
        n = info["kwargs"]["num_qualities"]
        return (f"rate point of the codec; for the default codec ({DEFAULT_CODEC}) an integer "
                f"from 1 (smallest file) to {n} (the shipped model's {n} rate points); "
                f"default: the middle one ({resolve_quality(None, n)} for the shipped model)")
    return ("rate point, an integer from 1 (smallest file) to the number of rate points of "
            "the model (see --model); default: the middle one")


def resolve_quality(quality: int | None, num_qualities: int) -> int:
    """``--quality`` as given, or the middle rate point (rounded down) when it was not."""
    return (int(num_qualities) + 1) // 2 if quality is None else quality


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a model folder (model.json + params.msgpack) or a training workdir "
                             "of experiments/train.py, instead of the shipped weights of the "
                             "codec")


def load_model(model_path: str | None, codec: str | None):
    """The model a command runs: ``--model PATH`` (checked against ``--codec``) or the
    shipped weights of ``codec`` (default: the default codec)."""
    from diffjax.codecs import pretrained

    return pretrained.load_model(model_path, codec)


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
