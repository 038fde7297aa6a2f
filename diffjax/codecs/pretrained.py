"""Trained codecs on disk: one model-folder format for every codec, and training workdirs.

A **model folder** holds

* ``model.json``: ``{"format": "diffjax.codec", "format_version": 1, "codec": NAME,
  "kwargs": {constructor arguments}, ...provenance}``, where the provenance keys are free
  (``step``, ``stages`` of training, ``lmbdas``, data and licence notes, ...);
* ``params.msgpack``: ``flax.serialization`` of the parameter tree (float16 leaves are
  widened to float32 on load, so a model may ship in half precision).

``diffjax.codecs.load(path) -> (codec, params)`` reads a model folder or a **training
workdir** of ``experiments/train.py`` (``config.json`` + Orbax ``checkpoints/``): the
task named in the config says which codec it trains (:attr:`diffjax.train.task.Task.codec_name`
and :meth:`~diffjax.train.task.Task.codec_kwargs`), and the latest step's parameters are
read without the optimizer state, so a run in progress can be tried with
``diffjax compress --model runs/NAME``. :func:`export_model` (``python -m
experiments.export``) turns a workdir into a model folder. The shipped models live in
``diffjax/weights/<codec name>/`` with their ``MODEL_CARD.md``.

Folders written before this format (``{"codec": "residual", "model": {...},
"default_steps": n, ...}``) still load.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import numpy as np

from diffjax.errors import CheckpointError, InputError

FORMAT = "diffjax.codec"
FORMAT_VERSION = 1
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "weights"
DEFAULT_CODEC = "residual"
SHIPPED_DIR = WEIGHTS_DIR / DEFAULT_CODEC  # the default codec's shipped model


class NoWeightsError(InputError):
    """No trained weights where they were looked for."""


@dataclasses.dataclass
class LoadedModel:
    """A trained codec: its name, constructor ``config``, ``params``, ``info`` (the
    provenance of ``model.json``) and where it came from."""

    codec_name: str
    config: dict
    params: Any
    info: dict
    source: str

    def codec(self, **overrides):
        """The codec, built from ``config`` with ``overrides`` (e.g. ``quality``, ``steps``)."""
        from diffjax.codecs.base import get

        return get(self.codec_name, **{**self.config, **overrides})

    @functools.cached_property
    def qualities(self) -> tuple:
        """The valid ``quality`` values of this model (``()`` when it has none); built once
        (constructing a codec derives its tables)."""
        return tuple(getattr(self.codec(), "qualities", ()))

    @property
    def num_qualities(self) -> int:
        return len(self.qualities)

    def default_quality(self) -> int | None:
        """The middle rate point (rounded down), ``None`` for a codec without rate points."""
        q = self.qualities
        return q[(len(q) - 1) // 2] if q else None


def shipped_dir(codec_name: str = DEFAULT_CODEC) -> pathlib.Path:
    return WEIGHTS_DIR / codec_name


def shipped_info(codec_name: str = DEFAULT_CODEC) -> dict | None:
    """``model.json`` of a shipped model (no jax import), or ``None`` if none ships."""
    path = shipped_dir(codec_name) / "model.json"
    return _normalised(json.loads(path.read_text()), path) if path.is_file() else None


def shipped_codecs() -> list[str]:
    """Names of the codecs that ship trained weights."""
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "model.json").is_file())


def load_model(path: str | pathlib.Path | None = None, codec: str | None = None, *,
               step: int | None = None, use_ema: bool | None = None) -> LoadedModel:
    """A model folder, a training workdir, or (``path=None``) the shipped model of ``codec``
    (default: the default codec). ``step``/``use_ema`` select a workdir checkpoint."""
    if path is None:
        name = codec or DEFAULT_CODEC
        folder = shipped_dir(name)
        if not (folder / "model.json").is_file():
            shipped = ", ".join(shipped_codecs()) or "none"
            raise NoWeightsError(f"no trained {name} weights ship with this diffjax (shipped: "
                                 f"{shipped}); pass --model PATH (a model folder or a "
                                 "training workdir)")
        return _load_folder(folder)
    path = pathlib.Path(path)
    if not path.exists():
        raise NoWeightsError(f"model path {str(path)!r} does not exist")
    if (path / "model.json").is_file():
        model = _load_folder(path)
    elif (path / "config.json").is_file() or (path / "checkpoints").is_dir() \
            or (path / "state").is_dir() or path.name == "checkpoints":
        model = _load_workdir(path, step=step, use_ema=use_ema)
    else:
        raise NoWeightsError(f"{str(path)!r} is neither a model folder (model.json + "
                             "params.msgpack) nor a training workdir (config.json + checkpoints/)")
    if codec is not None and model.codec_name != codec:
        raise InputError(f"{str(path)!r} holds a {model.codec_name} model, not a {codec} model")
    return model


def load(path: str | pathlib.Path | None = None, codec: str | None = None, **overrides):
    """``(codec, params)`` of a model folder, a training workdir or a shipped model;
    ``overrides`` are codec constructor arguments (``quality=3``, ``steps=0``, ...)."""
    model = load_model(path, codec)
    return model.codec(**overrides), model.params


def _normalised(meta: dict, where) -> dict:
    """``model.json`` in the current layout (older residual folders converted)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("codec"), str):
        raise CheckpointError(f"{where} is not a diffjax codec model (no codec name)")
    if "format" not in meta and isinstance(meta.get("model"), dict):  # pre-kit layout
        meta = dict(meta)
        kwargs = meta.pop("model")
        if "default_steps" in meta:
            kwargs["steps"] = meta.pop("default_steps")
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, kwargs=kwargs)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a diffjax codec model (format "
                              f"{meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: model format version {meta.get('format_version')}; "
                              f"this diffjax reads version {FORMAT_VERSION}")
    if not isinstance(meta.get("kwargs"), dict):
        raise CheckpointError(f"{where} has no constructor arguments (kwargs)")
    return meta


def _load_folder(path: pathlib.Path) -> LoadedModel:
    from flax import serialization

    from diffjax.codecs.base import available

    try:
        meta = _normalised(json.loads((path / "model.json").read_text()), path / "model.json")
        params = serialization.msgpack_restore((path / "params.msgpack").read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read the model in {str(path)!r}: {err}") from err
    if meta["codec"] not in available():
        raise CheckpointError(f"{str(path)!r} holds a model of codec {meta['codec']!r}, which "
                              f"this diffjax does not have ({', '.join(available())})")
    info = {k: v for k, v in meta.items() if k not in ("format", "format_version", "codec",
                                                        "kwargs")}
    return LoadedModel(meta["codec"], dict(meta["kwargs"]), _device(params), info, str(path))


def _load_workdir(path: pathlib.Path, step: int | None = None,
                  use_ema: bool | None = None) -> LoadedModel:
    from diffjax.train.checkpoint import read_workdir_params
    from diffjax.train.task import build_task

    try:
        cfg, params, info = read_workdir_params(path, step=step, use_ema=use_ema)
    except CheckpointError as err:
        raise NoWeightsError(str(err)) from err
    task = build_task(cfg["task"])
    if not task.codec_name:
        raise CheckpointError(f"{str(path)!r} trains task {cfg['task'].get('name')!r}, which "
                              "is not a codec")
    state = info.get("model_state") or {}
    info = {**task.provenance(), "step": info["step"], "ema": info["ema"],
            "task": cfg["task"].get("name")}
    params = task.codec_params(task.merge_model_state(params, state) if state else params)
    return LoadedModel(task.codec_name, task.codec_kwargs(), _device(_to_numpy(params)), info,
                       str(path))


def _device(tree: Any) -> Any:
    """jax arrays (floats as float32): codecs cache derived tables by the identity of leaves."""
    import jax
    import jax.numpy as jnp

    def put(a):
        a = np.asarray(a)
        return jnp.asarray(a, jnp.float32 if np.issubdtype(a.dtype, np.floating) else a.dtype)

    return jax.tree.map(put, tree)


def _to_numpy(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    a = np.asarray(tree)
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def save_model(directory: str | pathlib.Path, codec_name: str, config: dict, params: Any,
               **info) -> pathlib.Path:
    """Write a model folder (``model.json`` + ``params.msgpack``); ``info``: provenance."""
    from flax import serialization

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(config, default=_jsonable))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "codec": codec_name,
            "kwargs": config, **info}
    (directory / "params.msgpack").write_bytes(
        serialization.msgpack_serialize(_to_numpy(params)))
    (directory / "model.json").write_text(json.dumps(meta, indent=2, default=_jsonable) + "\n")
    return directory


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return float(value)


def export_model(workdir: str | pathlib.Path, directory: str | pathlib.Path, *,
                 step: int | None = None, use_ema: bool | None = None, **info) -> LoadedModel:
    """Export a checkpoint of a training workdir (default: the latest) as a model folder."""
    model = _load_workdir(pathlib.Path(workdir), step=step, use_ema=use_ema)
    save_model(directory, model.codec_name, model.config, model.params, **{**model.info, **info})
    return _load_folder(pathlib.Path(directory))
