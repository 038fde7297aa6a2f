"""The ``lora_finetune`` task in the real train loop (8 fake devices, a tiny SD-layout UNet).

* only the adapters train: the state's parameters and its Orbax checkpoints hold the
  LoRA tree alone, the optimizer moments only its ``down``/``up`` leaves, ``alpha`` stays;
* resume is exact: 4 steps == 2 steps, restart, 2 more (parameters bit for bit);
* the pmap path gives the losses of the jit path;
* the smoke config builds (VAE + UNet) and a bad target is refused up front.

The three train-loop tests compile the tiny UNet's train step four times (minutes of CPU
on a shared 2-core machine), so they are in the slow tier (``-m slow``).
"""
import jax
import ml_collections
import numpy as np
import pytest

from diffjax.errors import InputError
from diffjax.nn import lora as L
from diffjax.train.loop import train
from diffjax.train.writers import read_metrics
from experiments.configs.lora_finetune import get_config

# One level, cross-attention, pixel space (3 channels, no VAE): the cheapest SD-layout
# UNet whose attention and convs the LoRA adapts.
PIXEL_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                  block_out_channels=(8,), norm_num_groups=4, cross_attention_dim=8,
                  attention_head_dim=2, use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",))


def make_config(shared_data, **overrides):
    c = get_config("smoke")
    c.task.kwargs = ml_collections.ConfigDict(dict(
        unet=dict(PIXEL_UNET), targets=["to_q|to_k|to_v|to_out.0", "conv1"], rank=4,
        alpha=4.0, prediction_type="epsilon"))
    c.data.path = str(shared_data / "bsds500" / "train")
    c.data.crop = 16
    c.batch_size = 8
    c.num_train_steps = 4
    c.checkpoint_every = 2
    c.keep_checkpoints = 2
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shared_data):
    workdir = tmp_path_factory.mktemp("lora_straight")
    state = train(make_config(shared_data), workdir, progress=False)
    return jax.device_get(state), read_metrics(workdir), workdir


@pytest.mark.slow
def test_only_lora_trains(straight):
    state, metrics, workdir = straight
    assert list(state.params) == ["lora"]
    assert len(metrics) == 4 and all(np.isfinite(m["loss"]) for m in metrics)
    lora = state.params["lora"]
    items = L.entries(lora)
    assert items and all(float(e["alpha"]) == 4.0 for e in items.values())
    assert any(float(np.abs(e["up"]).max()) > 0 for e in items.values())  # up left zero
    big = sorted(tuple(np.shape(a)) for a in jax.tree.leaves(state.opt_state) if np.ndim(a) > 0)
    want = sorted(tuple(np.shape(e[k])) for e in items.values() for k in ("down", "up"))
    assert big == sorted(want * 2)  # Adam mu, nu of the LoRA down/up leaves, nothing else
    from diffjax.train.checkpoint import read_workdir_params

    _, saved, _ = read_workdir_params(workdir, use_ema=False)
    assert list(saved) == ["lora"]
    assert jax.tree.structure(saved) == jax.tree.structure(jax.tree.map(np.asarray, state.params))


@pytest.mark.slow
def test_resume_is_exact(straight, tmp_path, shared_data):
    state, metrics, _ = straight
    cfg = make_config(shared_data)
    train(cfg, tmp_path, progress=False, stop_after=2)
    resumed = jax.device_get(train(cfg, tmp_path, progress=False))
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = read_metrics(tmp_path)
    np.testing.assert_allclose([m["loss"] for m in again], [m["loss"] for m in metrics],
                               rtol=1e-6)


@pytest.mark.slow
def test_pmap_losses_equal_jit(straight, tmp_path, shared_data):
    state, metrics, _ = straight
    pm = jax.device_get(train(make_config(shared_data, parallel="pmap"), tmp_path,
                              progress=False))
    np.testing.assert_allclose([m["loss"] for m in read_metrics(tmp_path)],
                               [m["loss"] for m in metrics], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pm.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_smoke_config_and_bad_target():
    from diffjax.train.task import build_task

    c = get_config("smoke")
    task = build_task(c.task.to_dict())
    assert task.vae is not None and task.unet.in_channels == 4
    kw = dict(c.task.kwargs.to_dict(), targets="no_such_layer")
    with pytest.raises(InputError, match="match no module"):
        build_task({"name": "lora_finetune", "kwargs": kw})
