"""The train step: one pure function, two ways to run it data-parallel.

:func:`train_step` computes the loss and gradients of a :class:`~diffjax.train.task.Task`,
applies the optax update and the EMA. It is the only step implementation:

* :func:`jit_train_step` jits it over a ``Mesh`` with ``in_shardings``/``out_shardings``
  and donated state (the pjit path; data and fsdp parallelism come from the shardings);
* :func:`pmap_train_step` ``jax.pmap``s it with ``axis_name``; gradients, loss and
  metrics are averaged with ``lax.pmean`` (the classic data-parallel recipe).

Both give the same result because every example draws its noise from
``fold_in(fold_in(root, step), global_example_index)`` (see :mod:`diffjax.train.task`).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from diffjax import compile as compile_backbone
from diffjax.train import sharding as sh
from diffjax.train.state import TrainState
from diffjax.train.task import Task, batch_size_of, task_loss_and_state


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, task: Task,
               tx: optax.GradientTransformation, ema_decay: float = 0.0,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step. Returns the new state and float32 scalar metrics
    (``loss``, ``grad_norm`` and the task's own metrics), averaged over the global batch.

    ``axis_name``: set when run under ``jax.pmap``; ``batch`` is then the per-device
    part and gradients are ``pmean``-ed over that axis.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    offset = 0
    if axis_name is not None:
        local = batch_size_of(batch)
        offset = jax.lax.axis_index(axis_name) * local
        if not task.per_example_rng:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        return task_loss_and_state(task, params, batch, rng, state.step, offset,
                                   state.model_state)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if axis_name is not None:  # model state (batch statistics): the devices' mean
        grads, loss, metrics, model_state = jax.lax.pmean((grads, loss, metrics, model_state),
                                                          axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay > 0:
        ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1.0 - ema_decay), ema, params)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in dict(metrics).items()}
    metrics.update(loss=jnp.asarray(loss, jnp.float32),
                   grad_norm=optax.global_norm(grads).astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema, model_state=model_state)
    return new_state, metrics


def jit_train_step(*, task: Task, tx: optax.GradientTransformation, mesh: Mesh,
                   state_shardings: Any, batch_spec: Mapping[str, Any],
                   ema_decay: float = 0.0, rules=None, donate: bool = True):
    """``step(state, batch) -> (state, metrics)`` jitted on ``mesh``.

    The batch is split over the ``data``/``fsdp`` axes, the state keeps
    ``state_shardings``, metrics are replicated; the input state is donated.
    """
    rules = tuple(rules) if rules is not None else sh.DEFAULT_LOGICAL_AXIS_RULES
    batch_sh = jax.tree.map(lambda _: sh.batch_sharding(mesh), dict(batch_spec))

    def step(state, batch):
        with nn.logical_axis_rules(rules):
            return train_step(state, batch, task=task, tx=tx, ema_decay=ema_decay)

    jitted = compile_backbone.jit(step, in_shardings=(state_shardings, batch_sh),
                     out_shardings=(state_shardings, sh.replicated(mesh)),
                     donate_argnums=(0,) if donate else ())

    @functools.wraps(step)
    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted
    return run


def pmap_train_step(*, task: Task, tx: optax.GradientTransformation, ema_decay: float = 0.0,
                    axis_name: str = "batch", donate: bool = True):
    """``step(replicated_state, device_batch) -> (state, metrics)`` with ``jax.pmap``.

    ``replicated_state`` comes from :func:`replicate`, ``device_batch`` from
    :func:`split_for_devices` (leading axis = local devices). Metrics come back with a
    leading device axis (all equal after ``pmean``).
    """
    return jax.pmap(functools.partial(train_step, task=task, tx=tx, ema_decay=ema_decay,
                                      axis_name=axis_name),
                    axis_name=axis_name, donate_argnums=(0,) if donate else ())


def replicate(tree: Any, devices=None) -> Any:
    """Copy ``tree`` to every local device (leading device axis), for the pmap path."""
    from flax import jax_utils

    return jax_utils.replicate(tree, devices)


def unreplicate(tree: Any) -> Any:
    """First device's copy of a replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_devices(batch: Mapping[str, Any], num_devices: int | None = None) -> dict:
    """``[B, ...]`` host arrays -> ``[num_devices, B // num_devices, ...]``."""
    n = num_devices or jax.local_device_count()
    def split(x):
        if x.shape[0] % n:
            from diffjax.errors import InputError

            raise InputError(f"per-host batch {x.shape[0]} is not divisible by {n} devices")
        return np.asarray(x).reshape((n, x.shape[0] // n) + tuple(x.shape[1:]))

    return jax.tree.map(split, dict(batch))
