"""Rate points: one coder at one setting, the unit the rate-distortion runner evaluates.

A :class:`RatePoint` wraps anything that turns a uint8 ``[H, W, 3]`` image into bytes and
back: a classical baseline at one quality (:func:`baseline_points`), or a diffjax codec
(the protocol of :mod:`diffjax.codecs.base`) with one set of trained parameters
(:func:`codec_point`), possibly a model folder or a training checkpoint
(:func:`checkpoint_point`, read by :func:`diffjax.codecs.pretrained.load_model`). Points with the same ``curve`` form one RD curve.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from diffjax.errors import InputError
from diffjax.eval import baselines


@dataclasses.dataclass
class RatePoint:
    """One coder setting.

    Attributes:
      curve: the RD curve it belongs to (plot legend, BD-rate row).
      label: the setting within the curve (e.g. ``"quality=20"``, a checkpoint step).
      encode: uint8 ``[H, W, 3]`` -> bytes (the real bitstream / file).
      decode: bytes -> uint8 ``[H, W, 3]``.
      parallel: may run in worker threads (external encoders); JAX codecs run in the main
        thread, one image at a time, so their timings are not shared with other work.
      setting: JSON-able description recorded in the results.
      codec, params: the diffjax codec and its parameters behind a :func:`codec_point`
        (``None`` for baselines), so the video runner can code clips with it
        (:func:`diffjax.eval.video.as_video_point`).
    """

    curve: str
    label: str
    encode: Callable[[np.ndarray], bytes]
    decode: Callable[[bytes], np.ndarray]
    parallel: bool = False
    setting: dict = dataclasses.field(default_factory=dict)
    codec: Any = dataclasses.field(default=None, repr=False)
    params: Any = dataclasses.field(default=None, repr=False)


def baseline_points(name: str, values: Sequence[int] | None = None) -> list[RatePoint]:
    """Rate points of an image baseline (``jpeg``, ``webp``, ``avif``, ``hevc``, ``av1``)
    over ``values`` of its knob (default sweep covers ~0.1-1.5 bpp on Kodak)."""
    if name not in baselines.image_baselines():
        raise InputError(f"unknown image baseline {name!r}; choose from "
                         f"{', '.join(baselines.image_baselines())}")
    knob = baselines.KNOB[name]
    return [RatePoint(curve=baselines.PRETTY[name], label=f"{knob}={v}", encode=c.encode,
                      decode=c.decode, parallel=True,
                      setting={"baseline": name, knob: v})
            for v, c in baselines.sweep(name, values)]


def codec_point(codec: Any, params: Any, curve: str | None = None,
                label: str = "", setting: dict | None = None) -> RatePoint:
    """A diffjax codec (``encode(params, image)`` / ``decode(params, data)``) with params."""
    for attr in ("encode", "decode"):
        if not callable(getattr(codec, attr, None)):
            raise InputError(f"{codec!r} does not follow the codec protocol (no {attr})")
    name = getattr(codec, "name", type(codec).__name__)
    return RatePoint(curve=curve or f"diffjax {name}", label=label or name,
                     encode=lambda image: codec.encode(params, image),
                     decode=lambda data: codec.decode(params, data), parallel=False,
                     setting={"codec": name, **(setting or {})}, codec=codec, params=params)


def checkpoint_point(path: str | pathlib.Path, codec: str | None = None,
                     codec_kwargs: dict | None = None, step: int | None = None,
                     use_ema: bool | None = None, curve: str | None = None) -> RatePoint:
    """A rate point from a model folder or a training workdir (one checkpoint step): the
    codec and its constructor arguments come from the model (for a workdir, from its
    task, :attr:`diffjax.train.task.Task.codec_name`); ``codec_kwargs`` override them."""
    from diffjax.codecs import pretrained

    model = pretrained.load_model(path, codec, step=step, use_ema=use_ema)
    kwargs = dict(codec_kwargs or {})
    instance = model.codec(**kwargs)
    step = model.info.get("step")
    label = f"{pathlib.Path(path).name}@{step}" if step is not None else pathlib.Path(path).name
    setting = {"checkpoint": str(path), "step": step, "ema": model.info.get("ema", False),
               "codec_kwargs": {**model.config, **kwargs}}
    for key in ("lmbda", "lmbdas"):
        if key in model.info:
            setting[key] = model.info[key]
    return codec_point(instance, model.params, curve=curve, label=label,
                       setting=json.loads(json.dumps(setting, default=str)))
