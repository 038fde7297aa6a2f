"""Rate points: one coder at one setting, the unit the rate-distortion runner evaluates.

A :class:`RatePoint` wraps anything that turns a uint8 ``[H, W, 3]`` image into bytes and
back: a classical baseline at one quality (:func:`baseline_points`), or a diffjax codec
(the protocol of :mod:`diffjax.codecs.base`) with one set of trained parameters
(:func:`codec_point`), possibly restored from a training checkpoint
(:func:`checkpoint_point`). Points with the same ``curve`` form one RD curve.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from diffjax.errors import CheckpointError, InputError
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


# training task name -> (codec name, config keys that are codec constructor arguments)
TASK_CODECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rate_distortion": ("hyperprior", ("N", "M", "mean_scale")),
}


def _find_step_dir(path: pathlib.Path, step: int | None) -> tuple[pathlib.Path, int]:
    """Resolve a workdir, its ``checkpoints/`` directory or one step directory."""
    if (path / "state").is_dir():
        try:
            return path.parent, int(path.name)
        except ValueError as err:
            raise CheckpointError(f"{path}: a step directory must be named by its step") from err
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()
                   and (p / "state").is_dir())
    if not steps:
        raise CheckpointError(f"{path}: no Orbax checkpoint steps found (expected "
                              f"<dir>/checkpoints/<step>/state)")
    if step is None:
        return root, steps[-1]
    if step not in steps:
        raise CheckpointError(f"{path}: step {step} not found; available {steps}")
    return root, step


def load_checkpoint(path: str | pathlib.Path, step: int | None = None,
                    use_ema: bool = False) -> tuple[Any, dict, int]:
    """Parameters and config of a diffjax training checkpoint (``diffjax.train``).

    Returns:
      ``(params, config, step)``; ``params`` are the EMA parameters if ``use_ema``.
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    root, step = _find_step_dir(path, step)
    config: dict = {}
    try:
        with ocp.CheckpointManager(root.absolute(), item_names=("state", "config")) as mgr:
            args = {"state": ocp.args.StandardRestore()}
            if (root / str(step) / "config").is_dir():
                args["config"] = ocp.args.JsonRestore()
            out = mgr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        raise CheckpointError(f"cannot restore {root}/{step}: {err}") from err
    if "config" in args:
        config = dict(out.config or {})
    state = out.state
    key = "ema_params" if use_ema else "params"
    params = state.get(key) if isinstance(state, dict) else getattr(state, key, None)
    if not params:
        raise CheckpointError(f"{root}/{step}: the state has no {key!r}")
    return params, config, step


def checkpoint_point(path: str | pathlib.Path, codec: str | None = None,
                     codec_kwargs: dict | None = None, step: int | None = None,
                     use_ema: bool = False, curve: str | None = None) -> RatePoint:
    """A rate point from a training checkpoint: the codec and its constructor arguments
    come from the saved config (``task.name`` / ``task.kwargs``) unless given."""
    from diffjax import codecs

    params, config, step = load_checkpoint(path, step, use_ema)
    task = config.get("task", {}) if isinstance(config, dict) else {}
    kwargs = dict(codec_kwargs or {})
    if codec is None:
        name = task.get("name", "")
        if name not in TASK_CODECS:
            raise CheckpointError(f"{path}: cannot tell the codec of task {name!r}; pass "
                                  f"the codec name explicitly")
        codec, keys = TASK_CODECS[name]
        task_kwargs = task.get("kwargs", {})
        kwargs = {k: task_kwargs[k] for k in keys if k in task_kwargs} | kwargs
    instance = codecs.get(codec, **kwargs)
    label = f"{pathlib.Path(path).name}@{step}"
    setting = {"checkpoint": str(path), "step": step, "ema": use_ema, "codec_kwargs": kwargs}
    if "lmbda" in task.get("kwargs", {}):
        setting["lmbda"] = task["kwargs"]["lmbda"]
    return codec_point(instance, params, curve=curve, label=label,
                       setting=json.loads(json.dumps(setting, default=str)))
