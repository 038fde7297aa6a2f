"""Data-parallel equivalence of the train step (8 fake CPU devices, see conftest).

* two steps on an 8-device data mesh (and on a 4x2 data x fsdp mesh) equal the steps on
  one device; the jax.pmap step (gradient pmean) equals the jit step, within 1e-6;
* the equality is not vacuous: SGD makes parameters follow the gradients, and with one
  shared noise key per device instead of per example (``per_example_rng=False``) pmap and
  jit differ;
* parameters are created already sharded (annotated and auto-fsdp); EMA follows its formula.
"""
import functools

import jax
import numpy as np
import pytest

from diffjax.train import optim, sharding as sh, state as st, step as sp
from diffjax.train.toy import ToyAutoencoderTask

STEPS = 2
DECAY = 0.9


@pytest.fixture(scope="module")
def setup():
    task = ToyAutoencoderTask(channels=8, latent=4, rate_weight=0.1)
    # SGD: the update is the gradient itself, so any gradient difference shows up.
    tx = optim.make_optimizer({"name": "sgd", "learning_rate": 0.5, "momentum": 0.9,
                               "grad_clip_norm": 10.0}, 10)
    batch = {"image": np.random.RandomState(0).rand(16, 16, 16, 3).astype(np.float32)}
    spec = st.abstract_batch(batch)
    rng = jax.random.PRNGKey(0)
    init = functools.partial(st.init_train_state, batch_spec=spec, task=task, tx=tx, use_ema=True)
    host_state = jax.device_get(jax.jit(init)(rng))
    return task, tx, batch, spec, rng, host_state


def run_jit(setup, mesh, state=None, shardings=None):
    task, tx, batch, spec, rng, host_state = setup
    if state is None:
        _, shardings = st.state_shardings(rng, spec, task=task, tx=tx, use_ema=True, mesh=mesh)
        state = jax.device_put(host_state, shardings)
    step = sp.jit_train_step(task=task, tx=tx, mesh=mesh, state_shardings=shardings,
                             batch_spec=spec, ema_decay=DECAY)
    losses, params = [], [host_state.params]
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        params.append(jax.device_get(state.params))
    return jax.device_get(state), np.array(losses), params


def run_pmap(setup, task=None):
    _, tx, batch, _, _, host_state = setup
    state = sp.replicate(host_state)
    step = sp.pmap_train_step(task=task or setup[0], tx=tx, ema_decay=DECAY)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, sp.split_for_devices(batch))
        per_device = np.asarray(metrics["loss"])
        np.testing.assert_array_equal(per_device, per_device[0])  # pmean-ed
        losses.append(float(per_device[0]))
    return jax.device_get(sp.unreplicate(state)), np.array(losses)


@pytest.fixture(scope="module")
def single(setup):
    return run_jit(setup, sh.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))


@pytest.fixture(scope="module")
def data8(setup):
    assert jax.device_count() == 8
    return run_jit(setup, sh.make_mesh({"data": -1, "fsdp": 1}))


def max_diff(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(leaves_a, leaves_b))


def test_data_parallel_jit_equals_single_device(single, data8, setup):
    assert max_diff(data8[0].params, single[0].params) < 1e-6
    assert max_diff(data8[0].opt_state, single[0].opt_state) < 1e-6
    np.testing.assert_allclose(data8[1], single[1], rtol=1e-6)
    assert max_diff(single[0].params, setup[5].params) > 1e-2  # the steps really trained


def test_pmap_step_equals_jit_step(setup, data8):
    pmapped, losses = run_pmap(setup)
    assert max_diff(pmapped.params, data8[0].params) < 1e-6
    assert max_diff(pmapped.opt_state, data8[0].opt_state) < 1e-6
    assert max_diff(pmapped.ema_params, data8[0].ema_params) < 1e-6
    np.testing.assert_allclose(losses, data8[1], rtol=1e-6)
    assert int(pmapped.step) == STEPS


def test_shared_noise_key_breaks_equivalence(setup, data8):
    """Control: without per-example keys each device draws its own noise for its shard,
    unlike the single draw of the jit step, so results differ. This is why tasks
    default to ``per_example_rng=True``."""
    task = ToyAutoencoderTask(channels=8, latent=4, rate_weight=0.1)
    task.per_example_rng = False
    pmapped, losses = run_pmap(setup, task)
    assert abs(losses[0] - data8[1][0]) > 1e-5
    assert max_diff(pmapped.params, data8[0].params) > 1e-4


def test_ema_follows_its_formula(data8):
    p0, p1, p2 = data8[2]
    expected = jax.tree.map(
        lambda a, b, c: DECAY**2 * a + DECAY * (1 - DECAY) * b + (1 - DECAY) * c, p0, p1, p2)
    assert max_diff(data8[0].ema_params, expected) < 1e-6
    assert int(data8[0].step) == STEPS


def test_fsdp_mesh_created_sharded_and_equal_to_single_device(setup, single):
    task, tx, _, spec, rng, _ = setup
    mesh = sh.make_mesh({"data": 4, "fsdp": 2})
    state, shardings = st.create_sharded_state(rng, spec, task=task, tx=tx, use_ema=True, mesh=mesh)
    kernel = state.params["enc0"]["kernel"]  # annotated ("conv_in", "conv_out") -> fsdp
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 4)
    assert state.ema_params["enc0"]["kernel"].sharding.spec == kernel.sharding.spec
    momentum = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
    assert momentum and all(m.sharding.spec == kernel.sharding.spec for m in momentum)
    assert max_diff(state.params, setup[5].params) == 0.0  # same init as the host copy
    fsdp, losses, _ = run_jit(setup, mesh, state, shardings)
    assert max_diff(fsdp.params, single[0].params) < 1e-6
    np.testing.assert_allclose(losses, single[1], rtol=1e-6)


def test_auto_fsdp_shards_unannotated_params(setup):
    task, tx, _, spec, rng, _ = setup
    mesh = sh.make_mesh({"data": 4, "fsdp": 2})
    _, shardings = st.state_shardings(rng, spec, task=task, tx=tx, use_ema=False, mesh=mesh,
                                      fsdp_min_size=64)
    dec = shardings.params["dec0"]["kernel"]  # unannotated (3, 3, 4, 8) -> split the 8
    assert dec.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert shardings.params["dec0"]["bias"].spec == jax.sharding.PartitionSpec()  # too small
