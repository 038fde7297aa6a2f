"""Stage 1 of the TAEF2 foundation codec: the latent-denoiser task, its config and export.

Real TAEF2 encoder weights (small), tiny UNet, 16-64 px images.
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.codecs.foundation import FoundationTask, host_params
from diffjax.codecs.latent_denoiser import (LatentDenoiserTask, export_denoiser, read_workdir,
                                            x0_error_factor)
from diffjax.diffusion.parameterization import to_x0, training_target
from diffjax.errors import CheckpointError, InputError
from diffjax.train.task import build_task
from experiments.configs import foundation_taef2, taef2_denoiser

SMOKE = taef2_denoiser.get_config("smoke")


@pytest.fixture(scope="module")
def task():
    return LatentDenoiserTask(**SMOKE.task.kwargs.to_dict())


@pytest.fixture(scope="module")
def one_step(task):
    """Loss, metrics and per-example terms at random ``t`` for 16 images, and the gradient
    w.r.t. the TAEF2 encoder weights, in one jitted call (the UNet's gradients are checked
    on the real train loop below)."""
    params = jax.jit(task.init_params)(jax.random.key(0))
    vae = jax.tree.map(jnp.asarray, task.vae_params)
    x = jnp.asarray(np.random.default_rng(0).random((16, 32, 32, 3), np.float32))

    def f(p, v, x, key):
        def loss(v):
            value, metrics, aux = task.loss_terms(p, x, key, vae_params=v)
            return value, (metrics, aux)

        (value, (metrics, aux)), g_vae = jax.value_and_grad(loss, has_aux=True)(v)
        return value, metrics, aux, g_vae

    return params, jax.jit(f)(params, vae, x, jax.random.key(1))


def test_params_are_the_unet_alone(task, one_step):
    params, _ = one_step
    assert set(params) == {"unet"}
    assert bool(jax.tree.leaves(params["unet"]))
    assert task.backbone.prediction_type == "v_prediction"  # read from SD21_SCHEDULER
    assert task.backbone.unet.prediction_type == "v_prediction"


def test_loss_is_finite_and_the_encoder_gets_no_gradient(one_step):
    _, (loss, metrics, aux, g_vae) = one_step
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert sorted(metrics) == ["mse", "t", "x0_mse", "x0_mse_identity"]
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(np.asarray(aux["x0_mse"])))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_vae))  # TAEF2 frozen


def test_t_is_drawn_in_the_low_noise_range(task, one_step):
    _, (_, metrics, aux, _) = one_step
    t = np.asarray(aux["t"])
    assert t.shape == (16,)
    assert np.all(t >= task.t_min) and np.all(t <= task.t_max) and task.t_max == 0.25
    assert t.max() > 0.5 * task.t_max and len(np.unique(t)) == 16  # continuous, spread
    np.testing.assert_allclose(float(metrics["t"]), t.mean(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_x0_error_factor_converts_the_target_space_error(kind):
    rng = np.random.default_rng(1)
    y, noise, out = (jnp.asarray(rng.standard_normal((3, 4, 4, 2), np.float32)) for _ in "abc")
    a = jnp.asarray([0.99, 0.9, 0.6], jnp.float32)
    s = jnp.sqrt(1 - a * a)
    a4, s4 = a[:, None, None, None], s[:, None, None, None]
    y_t = a4 * y + s4 * noise
    per = jnp.mean(jnp.square(out - training_target(y, noise, a4, s4, kind)), axis=(1, 2, 3))
    direct = jnp.mean(jnp.square(to_x0(out, y_t, a4, s4, kind) - y), axis=(1, 2, 3))
    np.testing.assert_allclose(per * x0_error_factor(a, s, kind), direct, rtol=1e-5)


def test_bad_arguments():
    kw = SMOKE.task.kwargs.to_dict()
    with pytest.raises(InputError, match="t_max"):
        LatentDenoiserTask(**dict(kw, t_max=0.0))
    with pytest.raises(InputError, match="weighting"):
        LatentDenoiserTask(**dict(kw, weighting="nope"))
    with pytest.raises(InputError, match="TAESD"):
        LatentDenoiserTask(**dict(kw, vae="sd"))
    with pytest.raises(ValueError, match="unknown config"):
        taef2_denoiser.get_config("smoke,big")


def test_cpu_config_is_small_and_registered():
    c = taef2_denoiser.get_config("")
    assert c.to_dict() == taef2_denoiser.get_config("cpu").to_dict()
    assert c.data.path.endswith("bsds500_trainval") and "kodak" not in c.data.path.lower()
    t = build_task(c.task.to_dict())
    assert isinstance(t, LatentDenoiserTask)
    shapes = jax.eval_shape(t.init_params, jax.random.key(0))
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert 1e6 < n < 5e6, n
    # stage 2 defaults to this very layout
    assert foundation_taef2.get_config("").task.kwargs.unet_config.to_dict() == \
        c.task.kwargs.unet_config.to_dict()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of the real train loop with the smoke config (on a one-device mesh: the
    smoke batch split over the 8 fake devices costs ~10 s more on 2 cores, and sharding
    is tested in tests/train)."""
    from diffjax.train.loop import train

    c = taef2_denoiser.get_config("smoke")
    c.num_train_steps = 2
    c.checkpoint_every = 2
    c.mesh.data = 1
    workdir = tmp_path_factory.mktemp("denoiser")
    logged, seen = [], []

    def hook(step, state, metrics):
        seen.append(jax.tree.map(np.asarray, state.params))
        if metrics is not None:
            logged.append(metrics)

    state = train(c, workdir, hooks=[hook], progress=False)
    return workdir, jax.tree.map(np.asarray, state.params), seen, logged


def test_smoke_config_trains_the_unet_with_the_train_loop(trained):
    workdir, params, seen, logged = trained
    assert set(params) == {"unet"}  # no encoder weights in the state / checkpoints
    assert len(logged) == 2
    for m in logged:
        assert all(np.isfinite(m[k]) for k in ("loss", "x0_mse", "mse", "grad_norm"))
        assert m["grad_norm"] > 0 and 0 < m["t"] <= 0.25
    # Adam keeps moving (step 2) every parameter that had a non-zero gradient: all of the
    # UNet but the cross-attention, which the zeros context makes a constant (its out
    # bias), and the norm in front of it
    flat = {jax.tree_util.keystr(k): (a, b) for (k, a), b in zip(
        jax.tree_util.tree_leaves_with_path(seen[0]), jax.tree.leaves(params))}
    still = sorted(k for k, (a, b) in flat.items() if np.array_equal(a, b))
    allowed = r"\['transformer_blocks_\d+'\]\['(attn2'\]\['to_\w+'\]\['kernel|norm2'\]\['\w+)'\]$"
    assert all(re.search(allowed, k) for k in still), [k[-60:] for k in still]
    assert len(still) < 0.2 * len(flat)
    assert json.loads((workdir / "config.json").read_text())["task"]["name"] == "latent_denoiser"


def test_export_is_loaded_by_the_foundation_task(trained, tmp_path):
    from diffjax.convert.core import read_model_config

    workdir, params, _, _ = trained
    out = export_denoiser(workdir, tmp_path / "unet")
    doc = read_model_config(out)
    assert doc["class_name"] == "UNet2DConditionModel"
    assert doc["metadata"]["step"] == 2 and doc["metadata"]["t_max"] == 0.25
    assert doc["config"]["prediction_type"] == "v_prediction"
    with pytest.raises(InputError, match="exists"):
        export_denoiser(workdir, out)
    with pytest.raises(CheckpointError, match="EMA"):
        export_denoiser(workdir, tmp_path / "ema", use_ema=True)

    kw = dict(foundation_taef2.get_config("smoke").task.kwargs.to_dict(), unet_path=str(out))
    stage2 = FoundationTask(**kw)
    assert sorted(stage2._loaders()) == ["unet", "vae"]
    bb = stage2.codec.backbone
    assert bb.prediction_type == "v_prediction"
    assert bb.unet.to_config() == LatentDenoiserTask(
        **SMOKE.task.kwargs.to_dict()).backbone.unet.to_config()
    # what FoundationTask.init_params does for the frozen UNet, under jit like the loop
    shapes = bb.param_shapes()["unet"]
    loaded = jax.jit(lambda: host_params(shapes, stage2._loaders()["unet"]))()
    jax.tree.map(np.testing.assert_array_equal, loaded, params["unet"])


def test_read_workdir_refuses_other_runs(tmp_path):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"task": {"name": "foundation"}}))
    with pytest.raises(CheckpointError, match="not a 'latent_denoiser' run"):
        read_workdir(other)
    (other / "config.json").write_text(json.dumps({"task": {"name": "latent_denoiser"}}))
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        read_workdir(other)
