"""Model state in the train state (BatchNorm statistics; ``Task.stateful``).

* a stateful task's step updates ``TrainState.model_state`` (the batch's running
  averages), the optimizer never touches it, and it survives an Orbax save / restore;
* a checkpoint written before ``model_state`` existed restores (with ``{}``), and a
  stateful task refuses such a checkpoint with a clear error;
* ``merge_trees`` / ``split_tree`` put the state into the codec's tree and back.
"""
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.errors import CheckpointError, InputError
from diffjax.train import state as st, step as sp
from diffjax.train.checkpoint import Checkpointer
from diffjax.train.task import Task, merge_trees, split_tree, task_loss_and_state


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)


class BatchNormTask(Task):
    """A BatchNorm regressor: the smallest stateful task."""

    per_example_rng = False
    stateful = True

    def _init(self):
        return Net().init(jax.random.key(0), jnp.zeros((1, 3)), train=False)

    def init_params(self, rng, batch_spec):
        return {"net": {"params": self._init()["params"]}}

    def init_model_state(self, rng, batch_spec):
        return {"net": {"batch_stats": self._init()["batch_stats"]}}

    def loss_fn(self, params, batch, rng, step, model_state):
        variables = merge_trees(params, model_state)["net"]
        out, upd = Net().apply(variables, batch["x"], train=True, mutable=["batch_stats"])
        loss = jnp.mean(jnp.square(out - 1.0))
        return loss, {"mse": loss}, {"net": {"batch_stats": upd["batch_stats"]}}


@flax.struct.dataclass
class OldTrainState:  # the layout of checkpoints written before model_state
    step: Any
    params: Any
    opt_state: Any
    ema_params: Any
    rng: Any


def make(task, batch):
    tx = optax.adam(1e-2)
    spec = st.abstract_batch(batch)
    init = functools.partial(st.init_train_state, batch_spec=spec, task=task, tx=tx,
                             use_ema=False)
    return jax.jit(init)(jax.random.PRNGKey(0)), jax.jit(
        functools.partial(sp.train_step, task=task, tx=tx))


def test_stateful_step_and_checkpoint(tmp_path):
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (8, 3)), jnp.float32)}
    state, step = make(BatchNormTask(), batch)
    assert float(jnp.sum(state.model_state["net"]["batch_stats"]["BatchNorm_0"]["var"])) == 4.0
    s1, metrics = step(state, batch)
    s2, _ = step(s1, batch)
    stats0, stats2 = (jax.tree.leaves(s.model_state) for s in (state, s2))
    assert all(not np.allclose(a, b) for a, b in zip(stats0, stats2))
    assert np.isfinite(float(metrics["mse"])) and int(s2.step) == 2
    ck = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    ck.save(2, s2, {"task": {}})
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), s2)
    back = ck.restore(2, target)
    ck.close()
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a stateful loss needs the whole batch
    task = BatchNormTask()
    task.per_example_rng = True
    with pytest.raises(InputError, match="per_example_rng"):
        task_loss_and_state(task, state.params, batch, jax.random.key(0), 0, 0,
                            state.model_state)


def test_old_checkpoints_restore(tmp_path):
    params = {"w": jnp.arange(3.0)}
    old = OldTrainState(step=jnp.asarray(5, jnp.int32), params=params, opt_state=(),
                        ema_params={}, rng=jnp.zeros((2,), jnp.uint32))
    ck = Checkpointer(tmp_path / "ck", save_every=1, async_save=False)
    ck.save(5, old, {"task": {}})
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)  # noqa: E731
    target = st.TrainState(**{k: jax.tree.map(spec, getattr(old, k))
                              for k in ("step", "params", "opt_state", "ema_params", "rng")})
    back = ck.restore(5, target)
    assert isinstance(back, st.TrainState) and back.model_state == {}
    assert int(back.step) == 5
    np.testing.assert_array_equal(np.asarray(back.params["w"]), [0.0, 1.0, 2.0])
    stateful = target.replace(model_state={"bn": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(CheckpointError, match="no model state"):
        ck.restore(5, stateful)
    ck.close()


def test_merge_and_split():
    params = {"encoder": {"params": {"k": 1}}, "unet": {"w": 2}}
    state = {"encoder": {"batch_stats": {"m": 3}}}
    merged = merge_trees(params, state)
    assert merged == {"encoder": {"params": {"k": 1}, "batch_stats": {"m": 3}}, "unet": {"w": 2}}
    assert split_tree(merged, state) == (params, state)
    assert merge_trees(params, {}) is params
    with pytest.raises(InputError):
        merge_trees(params, {"unet": {"w": 5}})


def test_pmap_step_averages_the_model_state():
    """Under pmap each device normalises its own part of the batch; the new running
    statistics are the devices' mean (flax's ImageNet recipe), the same on every device."""
    n = jax.local_device_count()
    batch = {"x": jnp.asarray(np.random.default_rng(1).normal(0.0, 1.0, (2 * n, 3)), jnp.float32)}
    task = BatchNormTask()
    state, _ = make(task, batch)
    step = sp.pmap_train_step(task=task, tx=optax.adam(1e-2), donate=False)
    out, _ = step(sp.replicate(state), sp.split_for_devices(batch))
    means = np.asarray(out.model_state["net"]["batch_stats"]["BatchNorm_0"]["mean"])
    assert means.shape[0] == n and np.allclose(means, means[:1])
    parts = np.asarray(batch["x"]).reshape(n, 2, 3)
    kernel = np.asarray(state.params["net"]["params"]["Dense_0"]["kernel"])
    bias = np.asarray(state.params["net"]["params"]["Dense_0"]["bias"])
    per_device = (parts @ kernel + bias).mean(axis=1)  # momentum 0.5 from mean 0
    np.testing.assert_allclose(means[0], 0.5 * per_device.mean(0), rtol=1e-4, atol=1e-5)
