"""The train loop shared by every diffjax experiment.

``train(config, workdir)`` builds the task, the grain pipeline, the optimizer and the
train state (created already sharded, or restored from the latest Orbax checkpoint in
``workdir``), then runs ``config.num_train_steps`` steps with a tqdm bar, writing
``metrics.jsonl`` (and TensorBoard when ``config.tensorboard``) and one stdout line every
``log_every`` steps
and a checkpoint every ``checkpoint_every`` steps.

Resuming is exact: the state carries the optimizer state, EMA, step and root key, and
the input pipeline is random access (batch ``k`` depends only on the seed and ``k``), so
``N`` steps in one run and ``n + (N - n)`` steps with a restart give the same parameters
and the same logged losses.

``config.parallel`` picks the data-parallel implementation: ``"jit"`` (default; mesh from
``config.mesh``, shardings, donated state) or ``"pmap"`` (``jax.pmap`` with gradient
``pmean`` over the local devices). Both run :func:`diffjax.train.step.train_step`.
"""
from __future__ import annotations

import functools
import json
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import CheckpointError, InputError
from diffjax.input import pipeline
from diffjax.train import optim, sharding as sh, state as st, step as sp
from diffjax.train.checkpoint import Checkpointer
from diffjax.train.task import build_task
from diffjax.train.writers import JsonlWriter, TensorBoardWriter

Hook = Callable[[int, Any, Mapping[str, float] | None], None]


def _to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _section(config: Mapping[str, Any], key: str) -> dict:
    value = config.get(key) or {}
    return _to_dict(value) if not isinstance(value, dict) else dict(value)


def _rules(config):
    rules = config.get("logical_axis_rules")
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules) if rules else None


def _config_differences(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _initialise_from(state: st.TrainState, init_from: str, verbose: bool) -> st.TrainState:
    """A new run's state with the parameters of another run's latest checkpoint
    (``config.init_from``: a training workdir, or a model folder with ``params.msgpack``
    such as a shipped model), e.g. to fine-tune a subtree of a trained model with other
    losses or frozen parts, or to continue training shipped weights. Step, optimizer
    state and RNG stay those of a fresh run; EMA parameters (if any) start from the loaded
    parameters, the model state (BatchNorm statistics) of a stateful task from the loaded one. Any missing, unexpected or mis-shaped parameter is a ``CheckpointError``
    listing them."""
    if not init_from:
        return state
    from diffjax.train.checkpoint import check_same_structure, read_workdir_params
    from diffjax.train.task import split_tree

    folder = pathlib.Path(init_from)
    if (folder / "params.msgpack").is_file():
        from flax import serialization

        try:
            loaded = serialization.msgpack_restore((folder / "params.msgpack").read_bytes())
        except (OSError, ValueError, TypeError) as err:
            raise CheckpointError(f"init_from {init_from!r}: cannot read params.msgpack: "
                                  f"{err}") from err
        meta = folder / "model.json"
        info = {"step": json.loads(meta.read_text()).get("step") if meta.is_file() else None}
        # a model folder holds the merged tree (codec parameters + model state)
        loaded, info["model_state"] = split_tree(loaded, state.model_state)
    else:
        _, loaded, info = read_workdir_params(init_from, use_ema=False)
    check_same_structure(loaded, state.params, f"init_from {init_from!r}")
    put = lambda a, ref: jax.device_put(np.asarray(a, ref.dtype), ref.sharding)  # noqa: E731
    params = jax.tree.map(put, loaded, state.params)
    ema = jax.tree.map(jnp.copy, params) if jax.tree.leaves(state.ema_params) else state.ema_params
    model_state = state.model_state
    if jax.tree.leaves(model_state):  # e.g. BatchNorm statistics: taken over too
        check_same_structure(info["model_state"], model_state,
                             f"init_from {init_from!r} (model state)")
        model_state = jax.tree.map(put, info["model_state"], model_state)
    if verbose:
        print(f"diffjax train: parameters initialised from {init_from} (step {info['step']})")
    return state.replace(params=params, ema_params=ema, model_state=model_state)


def train(config, workdir: str | pathlib.Path, *, hooks: Iterable[Hook] = (),
          progress: bool = True, stop_after: int | None = None,
          stop_after_minutes: float | None = None):
    """Train (or resume) the experiment ``config`` in ``workdir``; returns the final state.

    ``hooks`` are called after every step as ``hook(step, state, metrics)`` (``metrics``
    is a dict of floats on logged steps, else ``None``). ``stop_after``: stop (with a
    checkpoint) once this step is reached, e.g. to fit a job's time slot; the schedule
    still follows ``config.num_train_steps`` so a later run continues exactly.
    ``stop_after_minutes``: the same, once this much wall time has passed since the call
    (single-process runs only: hosts of a pod would stop at different steps).
    """
    started = time.perf_counter()
    cfg_dict = _to_dict(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    num_steps = int(config.num_train_steps)
    parallel = config.get("parallel", "jit")
    if parallel not in ("jit", "pmap"):
        raise InputError(f"config.parallel must be 'jit' or 'pmap', got {parallel!r}")

    task = build_task(_section(config, "task"))
    data_cfg = _section(config, "data")
    ds = pipeline.dataset_from_config(data_cfg, global_batch_size=int(config.batch_size),
                                      seed=int(config.seed))
    batch_spec = st.abstract_batch(ds[0], int(config.batch_size))
    rng = jax.random.PRNGKey(int(config.seed))

    opt_cfg = _section(config, "optimizer")
    labels = _param_labels(task, opt_cfg, rng, batch_spec)
    tx = optim.make_optimizer(opt_cfg, num_steps, labels)
    schedule = optim.make_schedule(opt_cfg, num_steps)
    ema_decay = float(config.get("ema_decay", 0.0) or 0.0)

    ckpt = Checkpointer(workdir / "checkpoints", save_every=int(config.checkpoint_every),
                        keep=config.get("keep_checkpoints", 3))
    start = ckpt.latest_step() or 0
    if start:
        diffs = _config_differences(ckpt.restore_config(start), cfg_dict)
        diffs = [d for d in diffs if not d.startswith("num_train_steps:")]
        if diffs and is_main:
            print(f"diffjax train: resuming step {start} with a changed config: " + "; ".join(diffs))

    if parallel == "jit":
        mesh = sh.make_mesh(_section(config, "mesh") or None)
        n_batch_devices = int(np.prod([mesh.shape[a] for a in sh.batch_axes(mesh)]))
        if int(config.batch_size) % n_batch_devices:
            raise InputError(f"batch_size {config.batch_size} is not divisible by the "
                             f"{n_batch_devices} devices of the batch mesh axes")
        kw = dict(task=task, tx=tx, use_ema=ema_decay > 0, mesh=mesh, rules=_rules(config),
                  fsdp_min_size=int(config.get("fsdp_min_size", 0) or 0))
        if start:
            abstract, shardings = st.state_shardings(rng, batch_spec, **kw)
            state = ckpt.restore(start, st.with_shardings(abstract, shardings))
        else:
            state, shardings = st.create_sharded_state(rng, batch_spec, **kw)
            state = _initialise_from(state, config.get("init_from", ""), is_main)
        step_fn = sp.jit_train_step(task=task, tx=tx, mesh=mesh, state_shardings=shardings,
                                    batch_spec=batch_spec, ema_decay=ema_decay,
                                    rules=_rules(config))
        batch_sh = sh.batch_sharding(mesh)
        put = functools.partial(jax.tree.map, lambda x: jax.make_array_from_process_local_data(batch_sh, x))
        to_save = lambda s: s  # noqa: E731
    else:
        init = functools.partial(st.init_train_state, batch_spec=batch_spec, task=task, tx=tx,
                                 use_ema=ema_decay > 0)
        if start:
            device = jax.local_devices()[0]
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                               sharding=jax.sharding.SingleDeviceSharding(device)),
                jax.eval_shape(init, rng))
            host_state = ckpt.restore(start, abstract)
        else:
            host_state = _initialise_from(jax.jit(init)(rng), config.get("init_from", ""), is_main)
        state = sp.replicate(host_state)
        step_fn = sp.pmap_train_step(task=task, tx=tx, ema_decay=ema_decay)
        put = sp.split_for_devices
        to_save = sp.unreplicate

    writers = [JsonlWriter(workdir)] if is_main else []
    if is_main and config.get("tensorboard", False):
        writers.append(TensorBoardWriter(workdir))
    if is_main:
        writers[0].truncate_after(start)
        (workdir / "config.json").write_text(json.dumps(cfg_dict, indent=2, default=str))

    log_every = max(1, int(config.get("log_every", 50)))
    batches = pipeline.prefetch_to_device(
        pipeline.iterate(ds, start=start, num_threads=int(data_cfg.get("num_threads", 4)),
                         prefetch_buffer_size=int(data_cfg.get("prefetch", 8)),
                         worker_count=int(data_cfg.get("worker_count", 0))),
        put, size=2)
    from tqdm.auto import tqdm

    end = num_steps if stop_after is None else min(num_steps, int(stop_after))
    if stop_after_minutes is not None and jax.process_count() > 1:
        raise InputError("stop_after_minutes is for single-process runs; use stop_after")
    deadline = None if stop_after_minutes is None else started + 60.0 * stop_after_minutes
    bar = tqdm(total=num_steps, initial=start, disable=not (progress and is_main),
               desc="train", unit="step", dynamic_ncols=True)
    last_saved = start
    t0, t_step = time.perf_counter(), start
    try:
        for step in range(start, end):
            state, metrics = step_fn(state, next(batches))
            done = step + 1
            host_metrics = None
            if done % log_every == 0 or done == end:
                host_metrics = {k: float(np.asarray(v).reshape(-1)[0])
                                for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                host_metrics["learning_rate"] = float(schedule(step))
                host_metrics["steps_per_sec"] = (done - t_step) / max(now - t0, 1e-9)
                t0, t_step = now, done
                for w in writers:
                    w.write(done, host_metrics)
                bar.set_postfix(loss=f"{host_metrics['loss']:.4g}")
                if is_main:  # stdout, also in logs of runs without the bar
                    tqdm.write(format_metrics(done, num_steps, host_metrics), file=sys.stdout)
            bar.update(1)
            if ckpt.should_save(done) and ckpt.save(done, to_save(state), cfg_dict):
                last_saved = done
            for hook in hooks:
                hook(done, state, host_metrics)
            if deadline is not None and time.perf_counter() > deadline and done < end:
                if last_saved != done:
                    ckpt.save(done, to_save(state), cfg_dict, force=True)
                if is_main:
                    print(f"diffjax train: time budget reached at step {done}; checkpoint saved")
                break
            if ckpt.reached_preemption(done):
                if last_saved != done:
                    ckpt.save(done, to_save(state), cfg_dict, force=True)
                if is_main:
                    print(f"diffjax train: preemption at step {done}; checkpoint saved")
                break
        else:
            if last_saved != end and end > start:
                ckpt.save(end, to_save(state), cfg_dict, force=True)
    finally:
        bar.close()
        ckpt.close()  # waits for in-flight async saves, so none is left half written
        for w in writers:
            w.close()
    return to_save(state)


def format_metrics(step: int, num_steps: int, metrics: Mapping[str, float]) -> str:
    """One stdout line per logged step: ``step 100/1000: loss=0.6123 bpp=0.4201 ...``."""
    keys = ["loss"] + sorted(k for k in metrics if k != "loss")
    return f"step {step}/{num_steps}: " + " ".join(f"{k}={metrics[k]:.4g}" for k in keys
                                                    if k in metrics)


def _param_labels(task, opt_cfg: Mapping[str, Any], rng, batch_spec):
    """The task's labels, refined by ``optimizer.train_only`` / ``optimizer.freeze``."""
    import flax.linen as nn

    abstract = nn.meta.unbox(jax.eval_shape(
        lambda r: task.init_params(jax.random.split(r)[0], batch_spec), rng))
    labels = task.param_labels(abstract)
    if opt_cfg.get("train_only") or opt_cfg.get("freeze"):
        labels = optim.path_labels(abstract, train_only=opt_cfg.get("train_only"),
                                   freeze=opt_cfg.get("freeze"), base=labels)
    return labels
