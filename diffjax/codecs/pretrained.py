"""Trained residual-codec weights: the shipped model, exported folders, training workdirs.

A *model folder* holds ``model.json`` (``{"codec": "residual", "model": {...constructor
arguments...}, "lmbdas": [...], "default_steps": n, "step": training step}``) and
``params.msgpack`` (``flax.serialization`` of the ``"params"`` tree, float32). The shipped
model lives in ``diffjax/weights/residual/`` with its ``MODEL_CARD.md``.

:func:`load_model` also accepts a training workdir of ``experiments/train.py``
(``config.json`` + Orbax ``checkpoints/``): the latest step's parameters are read without
rebuilding the optimizer state, so a run in progress can be tried with
``diffjax compress --model runs/residual-cpu``. :func:`export_model` turns such a workdir
into a model folder (what ships).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from diffjax.errors import CheckpointError, InputError

SHIPPED_DIR = pathlib.Path(__file__).resolve().parents[1] / "weights" / "residual"
_MODEL_KEYS = ("N", "M", "num_qualities", "refiner_channels", "refiner_layers",
               "refiner_groups", "patch", "residual_scale")


class NoWeightsError(InputError):
    """No trained weights where they were looked for."""


@dataclasses.dataclass
class LoadedModel:
    """A residual model: ``config`` (constructor arguments), ``params``, ``info`` (the rest
    of ``model.json``: lambdas, training step, default steps) and where it came from."""

    config: dict
    params: Any
    info: dict
    source: str

    @property
    def num_qualities(self) -> int:
        return int(self.config["num_qualities"])

    def codec(self, quality: int, steps: int | None = None):
        """The :class:`~diffjax.codecs.residual.ResidualCodec` of one rate point."""
        from diffjax.codecs.residual import ResidualCodec

        steps = self.info.get("default_steps", 4) if steps is None else steps
        return ResidualCodec(quality=quality, steps=steps, **self.config)


def shipped_info() -> dict | None:
    """``model.json`` of the shipped model (no jax import), or ``None`` if none ships."""
    path = SHIPPED_DIR / "model.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_model(path: str | pathlib.Path | None = None) -> LoadedModel:
    """Load the shipped model (``path=None``), a model folder or a training workdir."""
    if path is None:
        if not (SHIPPED_DIR / "model.json").is_file():
            raise NoWeightsError("no trained residual-codec weights ship with this diffjax yet; "
                                 "pass --model PATH (a model folder or a training workdir)")
        path = SHIPPED_DIR
    path = pathlib.Path(path)
    if not path.exists():
        raise NoWeightsError(f"model path {str(path)!r} does not exist")
    if (path / "model.json").is_file():
        return _load_folder(path)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        return _load_workdir(path)
    raise NoWeightsError(f"{str(path)!r} is neither a model folder (model.json + "
                         "params.msgpack) nor a training workdir (config.json + checkpoints/)")


def _load_folder(path: pathlib.Path) -> LoadedModel:
    from flax import serialization

    try:
        info = json.loads((path / "model.json").read_text())
        if info.get("codec") != "residual":
            raise CheckpointError(f"{path}/model.json is not a residual-codec model")
        config = {k: info["model"][k] for k in _MODEL_KEYS}
        params = serialization.msgpack_restore((path / "params.msgpack").read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read the model in {str(path)!r}: {err}") from err
    return LoadedModel(config, _device(params), {k: v for k, v in info.items() if k != "model"},
                       str(path))


def _config_from_training(cfg: dict) -> tuple[dict, dict]:
    kwargs = dict(cfg["task"]["kwargs"])
    lmbdas = list(kwargs.get("lmbdas", ()))
    defaults = {"N": 64, "M": 96, "refiner_channels": [32, 64], "refiner_layers": 1,
                "refiner_groups": 8, "patch": 4, "residual_scale": 5.0}
    config = {k: kwargs.get(k, defaults.get(k)) for k in _MODEL_KEYS if k != "num_qualities"}
    config["num_qualities"] = len(lmbdas)
    config["refiner_channels"] = list(config["refiner_channels"])
    return config, {"lmbdas": lmbdas, "rho": kwargs.get("rho")}


def _load_workdir(path: pathlib.Path) -> LoadedModel:
    from diffjax.train.checkpoint import latest_step, read_workdir_params

    try:
        step = latest_step(path)
    except CheckpointError as err:
        raise NoWeightsError(str(err)) from err
    cfg, params, _ = read_workdir_params(path, step=step, use_ema=False, task="residual")
    config, info = _config_from_training(cfg)
    info.update(step=step, default_steps=4, codec="residual")
    return LoadedModel(config, _device(_to_numpy(params)), info, str(path))


def _device(tree: Any) -> Any:
    """jax arrays: the codec caches its derived tables by the identity of these leaves."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def save_model(directory: str | pathlib.Path, config: dict, params: Any, **info) -> pathlib.Path:
    """Write a model folder (``model.json`` + ``params.msgpack``)."""
    from flax import serialization

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    meta = {"codec": "residual", "model": config, **info}
    (directory / "params.msgpack").write_bytes(serialization.msgpack_serialize(_to_numpy(
        _plain(params))))
    (directory / "model.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
    return directory


def _plain(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {str(k): _plain(v) for k, v in tree.items()}
    return np.asarray(tree)


def export_model(workdir: str | pathlib.Path, directory: str | pathlib.Path, **info) -> LoadedModel:
    """Export the latest checkpoint of a training workdir as a model folder."""
    model = _load_workdir(pathlib.Path(workdir))
    save_model(directory, model.config, model.params, **{**model.info, **info})
    return _load_folder(pathlib.Path(directory))


def add_rate_point(model: LoadedModel, lmbda: float, end: str = "low") -> LoadedModel:
    """A copy of ``model`` with one more rate point below (``end="low"``) or above the others.

    The new gain rows continue the two nearest rows geometrically (log-linear
    extrapolation, as Cui et al. 2021 interpolate gains between trained rates), and the
    refiner's quality one-hot input channel copies the nearest quality's weights, so the
    new point starts as a sensible codec and fine-tuning with ``lmbda`` (CompressAI's
    ``λᶜ`` of the new point) only has to refine it. Existing points keep their parameters;
    with ``end="low"`` their quality indices move up by one.
    """
    if end not in ("low", "high"):
        raise ValueError(f"end must be 'low' or 'high', not {end!r}")
    if model.num_qualities < 2:
        raise ValueError("extrapolating a gain needs a model with at least two rate points")
    lmbdas = [float(v) for v in model.info.get("lmbdas", ())]
    if len(lmbdas) != model.num_qualities:
        raise ValueError(f"model.json lists {len(lmbdas)} lambdas for "
                         f"{model.num_qualities} qualities")
    low = end == "low"
    if (low and not lmbda < lmbdas[0]) or (not low and not lmbda > lmbdas[-1]):
        raise ValueError(f"lambda {lmbda} is not {'below' if low else 'above'} the model's "
                         f"range {lmbdas[0]}..{lmbdas[-1]}")
    params = _to_numpy(_plain(model.params))

    def extend(rows: np.ndarray) -> np.ndarray:
        logs = np.log(rows)
        new = 2 * logs[0] - logs[1] if low else 2 * logs[-1] - logs[-2]
        stacked = [new[None], logs] if low else [logs, new[None]]
        return np.exp(np.concatenate(stacked)).astype(np.float32)

    params["gain"] = extend(params["gain"])
    params["inv_gain"] = extend(params["inv_gain"])
    kernel = params["refiner"]["unet"]["conv_in"]["kernel"]  # [..., in, out], one-hot last
    q = model.num_qualities
    head, onehot = kernel[..., :-q, :], kernel[..., -q:, :]
    new = onehot[..., :1, :] if low else onehot[..., -1:, :]
    params["refiner"]["unet"]["conv_in"]["kernel"] = np.concatenate(
        [head, new, onehot] if low else [head, onehot, new], axis=-2)
    config = {**model.config, "num_qualities": q + 1}
    info = {**model.info, "lmbdas": [lmbda] + lmbdas if low else lmbdas + [lmbda]}
    return LoadedModel(config, _device(params), info, model.source)
