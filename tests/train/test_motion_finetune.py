"""Motion-module fine-tuning (AnimateDiff) with the ``video_denoiser`` task, 8 fake devices.

* the jit step on an 8-device data mesh trains only the temporal layers (``train_only``):
  every spatial parameter is bit-for-bit unchanged and has no optimizer state, every
  motion module moves;
* the pmap step gives the same loss and parameters as the jit step (slow tier);
* resume is exact: 2 steps, Orbax checkpoint, restore, 1 more == 3 straight steps.
"""
import flax
import jax
import numpy as np
import pytest

from diffjax.models.unet3d import TEMPORAL_PATTERN, is_temporal_path
from diffjax.train import optim, sharding as sh, state as st, step as sp
from diffjax.nn.layers import host_random_params
from diffjax.train.checkpoint import Checkpointer
from diffjax.train.task import build_task

# one resolution level: the smallest motion UNet (compiling its train step is what costs)
TINY_SD = dict(in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
               norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2,
               down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
TINY_ADAPTER = dict(block_out_channels=(16,), motion_layers_per_block=1,
                    motion_num_attention_heads=2, motion_max_seq_length=8)


def flat(tree):
    return {"/".join(k): np.asarray(v)
            for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def setup():
    task = build_task({"name": "video_denoiser", "kwargs": {
        "unet2d_config": TINY_SD, "adapter_config": TINY_ADAPTER, "train_only_temporal": True}})
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((8, 2, 8, 8, 4)).astype(np.float32),
             "context": rng.standard_normal((8, 5, 24)).astype(np.float32)}
    spec = st.abstract_batch(batch)
    key = jax.random.PRNGKey(0)
    abstract = jax.eval_shape(lambda r: task.init_params(r, spec), key)
    # host-drawn parameters: jitting Flax's initialisers compiles for minutes on CPU
    params = host_random_params(flax.linen.meta.unbox(abstract), seed=0, jitter=0.1)
    # SGD + momentum: updates follow the gradients (Adam's first step is sign(g), which
    # would hide or exaggerate rounding differences between the jit and pmap paths)
    tx = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}, 10,
                              task.param_labels(params))
    host_state = st.TrainState(step=np.zeros((), np.int32), params=params,
                               opt_state=jax.device_get(tx.init(params)), ema_params={},
                               rng=np.asarray(key, np.uint32))
    mesh = sh.make_mesh({"data": 8, "fsdp": 1})
    _, shardings = st.state_shardings(key, spec, task=task, tx=tx, use_ema=False, mesh=mesh)
    step = sp.jit_train_step(task=task, tx=tx, mesh=mesh, state_shardings=shardings,
                             batch_spec=spec, donate=False)
    return task, tx, batch, host_state, shardings, step


def run(setup, state, n):
    batch, step = setup[2], setup[5]
    losses = []
    for _ in range(n):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.slow
def test_only_temporal_layers_train(setup):
    task, tx, batch, host_state, shardings, step = setup
    state, losses = run(setup, jax.device_put(host_state, shardings), 1)
    before, after = flat(host_state.params), flat(state.params)
    temporal = [k for k in before if is_temporal_path(k)]
    assert temporal and all("motion_modules" in k for k in temporal)
    for k in before:
        if k in temporal:
            continue
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    moved = [k for k in temporal if np.abs(after[k] - before[k]).max() > 0]
    assert len(moved) == len(temporal)
    assert np.isfinite(losses).all()
    # frozen parameters carry no optimizer state (momentum)
    n_moments = sum(np.size(x) for x in jax.tree.leaves(jax.device_get(state.opt_state)))
    n_temporal = sum(before[k].size for k in temporal)
    assert n_temporal <= n_moments <= n_temporal + 8  # + step counters


@pytest.mark.slow  # a second compilation of the train step (minutes on 2 loaded cores)
def test_pmap_step_equals_jit_step(setup):
    task, tx, batch, host_state, shardings, step = setup
    jit_state, jit_losses = run(setup, jax.device_put(host_state, shardings), 1)
    pstep = sp.pmap_train_step(task=task, tx=tx, donate=False)
    p_state, metrics = pstep(sp.replicate(host_state), sp.split_for_devices(batch))
    assert abs(float(np.asarray(metrics["loss"])[0]) - jit_losses[0]) < 1e-5
    a, b = flat(sp.unreplicate(p_state).params), flat(jit_state.params)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


@pytest.mark.slow  # default-suite budget: the loop's exact resume is tested in tests/train/test_loop.py
def test_resume_is_exact(setup, tmp_path):
    task, tx, batch, host_state, shardings, step = setup
    straight, straight_losses = run(setup, jax.device_put(host_state, shardings), 3)
    first, losses = run(setup, jax.device_put(host_state, shardings), 2)
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
    ckpt.save(2, first, {"train_only": TEMPORAL_PATTERN})
    ckpt.wait()
    target = st.with_shardings(jax.eval_shape(lambda: first), shardings)
    restored = ckpt.restore(ckpt.latest_step(), target)
    ckpt.close()
    resumed, more = run(setup, restored, 1)
    assert losses + more == straight_losses
    a, b = flat(resumed.params), flat(straight.params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
