"""Orbax checkpointing of the train state, with the experiment config beside it.

Each step directory ``<workdir>/checkpoints/<step>/`` holds two items: ``state`` (the
:class:`~diffjax.train.state.TrainState`, sharded arrays written by every host) and
``config`` (the experiment config as JSON). Saves are asynchronous and atomic: Orbax
writes into ``<step>.orbax-checkpoint-tmp*`` and renames when complete, so a save that
is interrupted (crash, preemption, Ctrl-C) never produces a step that looks valid;
leftover temporary directories are ignored and removed on the next start
(``cleanup_tmp_directories``). Restores place every array directly with the sharding of
the running job.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from diffjax.errors import CheckpointError


class Checkpointer:
    """Thin wrapper of ``ocp.CheckpointManager`` for train states.

    ``save_every``: save when ``step % save_every == 0`` (plus forced saves);
    ``keep``: number of most recent checkpoints kept (``None`` = all).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int | None = 3,
                 async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.save_every = max(1, int(save_every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(save_every)), max_to_keep=keep, create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` would write (interval, not yet saved)."""
        step = int(step)
        return step % self.save_every == 0 and bool(self.manager.should_save(step))

    def save(self, step: int, state: Any, config: Mapping[str, Any], *, force: bool = False) -> bool:
        """Start saving ``state`` at ``step`` if the interval says so (or ``force``)."""
        return self.manager.save(
            int(step), force=force,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    config=ocp.args.JsonSave(dict(config))))

    def restore(self, step: int, target: Any) -> Any:
        """Restore the state saved at ``step`` into the layout of ``target`` (an abstract
        tree of ``jax.ShapeDtypeStruct`` with shardings, see ``state.with_shardings``)."""
        legacy = self._without_model_state(step, target)
        try:
            out = self.manager.restore(
                int(step), args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target if legacy is None else legacy)))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {err}") from err
        if legacy is None:
            return out.state
        return target.replace(**dict(out.state), model_state={})

    def _without_model_state(self, step: int, target: Any):
        """Checkpoints written before ``TrainState.model_state`` existed have no such item:
        for a target whose model state is empty, the other fields as a dict (restored,
        then put back into the target's dataclass with ``model_state={}``); else ``None``."""
        if not hasattr(target, "model_state") or not hasattr(target, "replace"):
            return None
        try:
            saved = self.manager.item_metadata(int(step))["state"]
            saved = getattr(saved, "tree", saved)
        except Exception:  # no metadata: let the restore itself report
            return None
        if not isinstance(saved, Mapping) or "model_state" in saved:
            return None
        if jax.tree.leaves(target.model_state):
            raise CheckpointError(f"step {step} in {self.directory} has no model state "
                                  "(e.g. BatchNorm statistics), which this task needs")
        return {k: getattr(target, k) for k in saved}

    def restore_config(self, step: int) -> dict:
        out = self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out.config)

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (all hosts agree on the step)."""
        return bool(self.manager.reached_preemption(int(step)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct`` tree (with shardings) of concrete arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def latest_step(workdir: str | os.PathLike) -> int:
    """The latest finished checkpoint step of a training workdir (``CheckpointError`` if none)."""
    ckpts = pathlib.Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) \
        if ckpts.is_dir() else []
    if not steps:
        raise CheckpointError(f"{str(workdir)!r} has no finished checkpoint yet")
    return steps[-1]


def read_workdir_params(workdir: str | os.PathLike, *, step: int | None = None,
                        use_ema: bool | None = None, task: str | None = None
                        ) -> tuple[dict, Any, dict]:
    """``(config, params, info)`` of a training workdir, as host numpy arrays: the one
    reader of training runs (exports, evaluation, ``--model WORKDIR``, ``init_from``).

    ``workdir`` may also be its ``checkpoints/`` folder or one step folder
    (``checkpoints/<step>``, which selects that step). Reads ``params`` (or ``ema_params``: ``use_ema=None`` picks them when the run kept an
    EMA) of checkpoint ``step`` (default: the latest) without rebuilding the optimizer, so a
    run can be exported, evaluated or used to initialise another run while it trains.
    ``task``: the expected ``config.task.name`` (a clear error for another kind of run).
    ``info = {"step", "ema", "model_state"}`` (``model_state``: the run's non-parameter
    collections such as BatchNorm statistics, ``{}`` for most tasks; see
    :meth:`diffjax.train.task.Task.merge_model_state`).
    """
    import json
    import warnings

    import numpy as np

    workdir = pathlib.Path(workdir)
    if (workdir / "state").is_dir() and workdir.name.isdigit():  # a step folder
        step = int(workdir.name) if step is None else step
        workdir = workdir.parent.parent
    elif workdir.name == "checkpoints" and not (workdir / "checkpoints").is_dir():
        workdir = workdir.parent
    if not workdir.exists():
        raise CheckpointError(f"{str(workdir)!r} is not a training workdir (no such folder)")
    if (workdir / "config.json").is_file():
        try:
            cfg = json.loads((workdir / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{str(workdir)!r}: unreadable config.json: {err}") from err
    else:  # a bare checkpoints/ folder: the config saved beside each step
        if not (workdir / "checkpoints").is_dir():
            raise CheckpointError(f"{str(workdir)!r} is not a training workdir "
                                  "(config.json + checkpoints/)")
        step = latest_step(workdir) if step is None else int(step)
        if not (workdir / "checkpoints" / str(step) / "config").is_dir():
            raise CheckpointError(f"{str(workdir)!r} is not a training workdir "
                                  "(config.json + checkpoints/)")
        manager = Checkpointer(workdir / "checkpoints", save_every=1, async_save=False)
        try:
            cfg = manager.restore_config(step)
        except Exception as err:  # orbax raises many types
            raise CheckpointError(f"cannot read the config of {workdir}/checkpoints/{step}: "
                                  f"{err}") from err
        finally:
            manager.close()
    name = cfg.get("task", {}).get("name")
    if task is not None and name != task:
        raise CheckpointError(f"{str(workdir)!r} is a {name!r} run, not a {task!r} run")
    step = latest_step(workdir) if step is None else int(step)
    step_dir = (workdir / "checkpoints" / str(step) / "state").absolute()
    try:
        with warnings.catch_warnings():  # host numpy arrays are what we want here
            warnings.filterwarnings("ignore", "Sharding info not provided", UserWarning)
            state = ocp.PyTreeCheckpointer().restore(step_dir)
    except Exception as err:  # orbax raises many types
        raise CheckpointError(f"cannot restore {step_dir}: {err}") from err
    has_ema = bool(jax.tree.leaves(state.get("ema_params") or {}))
    if use_ema and not has_ema:
        raise CheckpointError(f"{step_dir} has no EMA parameters (ema_decay was 0)")
    ema = has_ema if use_ema is None else bool(use_ema)
    params = jax.tree.map(np.asarray, state["ema_params" if ema else "params"])
    model_state = jax.tree.map(np.asarray, state.get("model_state") or {})
    return cfg, params, {"step": step, "ema": ema, "model_state": model_state}


def check_same_structure(loaded: Any, expected: Any, what: str) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped parameters."""
    def flat(tree):
        return {jax.tree_util.keystr(p): tuple(getattr(v, "shape", ()))
                for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    got, want = flat(loaded), flat(expected)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(f"{k}: {got[k]} != {want[k]}" for k in set(got) & set(want)
                    if got[k] != want[k])
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(v)}): {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
                 for label, v in (("missing", missing), ("unexpected", unexpected),
                                  ("wrong shape", shapes)) if v]
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
