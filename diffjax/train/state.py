"""The train state pytree and its creation directly in sharded form.

``TrainState`` holds everything a run needs to continue bit-exactly: parameters,
optimizer state, EMA parameters, the step counter, the root RNG key (raw ``uint32[2]``
so Orbax stores it as a plain array) and the task's non-trained model state
(``model_state``: e.g. BatchNorm running statistics, updated by the step rather than by
the optimizer; ``{}`` for tasks without any, see :meth:`Task.init_model_state`). Per-step randomness is ``fold_in(rng, step)``
(DESIGN: one root key), so the key itself never changes.

Sharded creation (the pjit recipe): ``jax.eval_shape`` of the init function gives the
abstract state, the logical annotations of the parameters give their mesh shardings
(:func:`diffjax.train.sharding.logical_param_shardings`), optimizer moments and EMA
weights inherit the sharding of the parameter they copy, scalars are replicated; the init
function is then jitted with those ``out_shardings`` so no full copy of the parameters
is ever materialised on one device.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffjax.train import sharding as sh
from diffjax.train.task import Task


@flax.struct.dataclass
class TrainState:
    """``step`` int32 scalar; ``params``/``ema_params`` parameter trees (``ema_params`` is
    an empty dict when EMA is off); ``opt_state`` the optax state; ``rng`` uint32[2];
    ``model_state`` the task's mutable non-parameter collections (``{}`` for most tasks;
    checkpoints written before it existed restore with ``{}``)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    model_state: Any = flax.struct.field(default_factory=dict)


def abstract_batch(batch: Mapping[str, Any], global_batch_size: int | None = None):
    """``ShapeDtypeStruct`` tree of a (host) batch, with the leading dimension replaced by
    the global batch size when given."""
    def spec(x):
        shape = tuple(x.shape)
        if global_batch_size is not None:
            shape = (global_batch_size,) + shape[1:]
        return jax.ShapeDtypeStruct(shape, x.dtype)

    return jax.tree.map(spec, dict(batch))


def init_train_state(rng: jax.Array, *, batch_spec: Mapping[str, Any], task: Task,
                     tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    """Pure init: parameters from ``task.init_params``, optimizer state, EMA copy.

    ``batch_spec`` is a ``ShapeDtypeStruct`` tree (see :func:`abstract_batch`)."""
    init_rng, _ = jax.random.split(rng)
    params = nn.meta.unbox(task.init_params(init_rng, batch_spec))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if use_ema else {},
                      rng=jnp.asarray(rng, jnp.uint32),
                      model_state=nn.meta.unbox(task.init_model_state(init_rng, batch_spec)))


def state_shardings(rng: jax.Array, batch_spec: Mapping[str, Any], *, task: Task,
                    tx: optax.GradientTransformation, use_ema: bool, mesh: Mesh,
                    rules=None, fsdp_min_size: int = 0):
    """``(abstract_state, shardings)`` of the train state, computed with ``jax.eval_shape``."""
    init_rng, _ = jax.random.split(rng)
    boxed = jax.eval_shape(lambda r: task.init_params(r, batch_spec), init_rng)
    param_sh = sh.logical_param_shardings(boxed, mesh, rules, fsdp_min_size)
    init = functools.partial(init_train_state, batch_spec=batch_spec, task=task, tx=tx,
                             use_ema=use_ema)
    abstract = jax.eval_shape(init, rng)
    replicated = sh.replicated(mesh)
    shardings = TrainState(
        step=replicated,
        params=param_sh,
        opt_state=sh.match_param_shardings(abstract.opt_state, abstract.params, param_sh,
                                           replicated),
        ema_params=param_sh if use_ema else {},
        rng=replicated,
        model_state=jax.tree.map(lambda _: replicated, abstract.model_state),
    )
    return abstract, shardings


def create_sharded_state(rng: jax.Array, batch_spec: Mapping[str, Any], *, task: Task,
                         tx: optax.GradientTransformation, use_ema: bool, mesh: Mesh,
                         rules=None, fsdp_min_size: int = 0):
    """Create the train state already laid out on ``mesh``; returns ``(state, shardings)``."""
    _, shardings = state_shardings(rng, batch_spec, task=task, tx=tx, use_ema=use_ema, mesh=mesh,
                                   rules=rules, fsdp_min_size=fsdp_min_size)
    init = jax.jit(functools.partial(init_train_state, batch_spec=batch_spec, task=task, tx=tx,
                                     use_ema=use_ema), out_shardings=shardings)
    with jax.set_mesh(mesh):
        state = init(rng)
    return state, shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract tree whose ``ShapeDtypeStruct`` leaves carry ``shardings`` (Orbax restore
    target that places every array directly where it belongs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
