"""Training side of the foundation codec: the task, its configs and frozen-weight loading."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.codecs.foundation import FoundationTask, host_params
from diffjax.errors import InputError
from experiments.configs import foundation_sd21

SMOKE = foundation_sd21.get_config("smoke")


@pytest.fixture(scope="module")
def task():
    return FoundationTask(**SMOKE.task.kwargs.to_dict())


def test_lambda_is_drawn_per_step_from_the_training_set(task):
    lams = [float(task.lambda_for_step(s)) for s in range(40)]
    assert set(lams) == {1.0, 5.0, 10.0, 20.0}
    assert lams == [float(task.lambda_for_step(s)) for s in range(40)]  # deterministic


def test_labels_freeze_the_backbone(task):
    abstract = nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    labels = task.param_labels(abstract)
    assert set(jax.tree.leaves(labels["vae"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["unet"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["model"]["estimator"])) == {"trainable"}
    assert labels["model"]["entropy"]["entropy_bottleneck"]["quantiles"] == "aux"


def test_pretrained_sd_directory_is_loaded_inside_jit(tmp_path, task):
    from diffjax.convert.core import save_pretrained

    weights = task.codec.backbone.random_params(seed=7)
    save_pretrained(tmp_path / "sd" / "vae", task.codec.backbone.vae, weights["vae"])
    save_pretrained(tmp_path / "sd" / "unet", task.codec.backbone.unet, weights["unet"])
    kw = dict(SMOKE.task.kwargs.to_dict(), pretrained=str(tmp_path / "sd"))
    kw.pop("vae_config"), kw.pop("unet_config")
    loaded_task = FoundationTask(**kw)
    shapes, loaders = loaded_task.codec.backbone.param_shapes(), loaded_task._loaders()
    assert sorted(loaders) == ["unet", "vae"]
    # what init_params does for the frozen parts, under jit like the train loop
    params = jax.jit(lambda: {n: host_params(shapes[n], loaders[n]) for n in loaders})()
    for name in ("vae", "unet"):
        jax.tree.map(np.testing.assert_array_equal, params[name], weights[name])
    # eval_shape (used by the loop to derive shardings) never touches the disk
    abstract = jax.eval_shape(loaded_task.init_params, jax.random.key(1))
    assert jax.tree.structure(abstract["unet"]) == jax.tree.structure(weights["unet"])


def test_taef2_weights_are_loaded(shared_data):
    from diffjax.models.taesd import load_taesd

    d = shared_data / "taesd"
    unet = dict(foundation_sd21.TINY_UNET, in_channels=32, out_channels=32)
    t = FoundationTask(vae="taesd", vae_config={"latent_channels": 32, "arch_variant": "flux_2"},
                       unet_config=unet, scheduler_config=foundation_sd21.SD21_SCHEDULER,
                       taesd_encoder=str(d / "taef2_encoder.pth"),
                       taesd_decoder=str(d / "taef2_decoder.pth"),
                       estimator_features=(16,), hyper_channels=8)
    vae = jax.jit(lambda: host_params(t.codec.backbone.param_shapes()["vae"],
                                      t._loaders()["vae"]))()
    jax.tree.map(np.testing.assert_array_equal, vae["decoder"], load_taesd(d / "taef2_decoder.pth")[1])
    jax.tree.map(np.testing.assert_array_equal, vae["encoder"], load_taesd(d / "taef2_encoder.pth")[1])


def test_mismatched_pretrained_weights_are_refused(task):
    from diffjax.errors import CheckpointError

    shapes = task.codec.backbone.param_shapes()
    wrong = lambda: task.codec.backbone.random_params()["unet"]  # noqa: E731  (not the VAE)
    with pytest.raises(Exception) as err:
        jax.block_until_ready(jax.jit(lambda: host_params(shapes["vae"], wrong))())
    assert "do not match" in str(err.value) or isinstance(err.value, CheckpointError)


def test_bad_task_arguments():
    kw = SMOKE.task.kwargs.to_dict()
    with pytest.raises(InputError, match="lambdas"):
        FoundationTask(**dict(kw, lambdas=[]))
    with pytest.raises(InputError, match="distortion_scale"):
        FoundationTask(**dict(kw, distortion_scale=0.0))
    with pytest.raises(InputError, match="pretrained"):
        FoundationTask(**dict(kw, vae_config=None))
    with pytest.raises(ValueError, match="unknown config"):
        foundation_sd21.get_config("smoke,big")


@pytest.mark.slow
def test_smoke_config_trains_with_the_train_loop(tmp_path):
    """A few steps of the real loop: finite losses, estimator moves, backbone frozen."""
    from diffjax.train.loop import train

    c = foundation_sd21.get_config("smoke")
    seen = {}

    def hook(step, state, metrics):
        if metrics is not None:
            assert np.isfinite(metrics["loss"]) and metrics["lambda"] in (1.0, 5.0, 10.0, 20.0)
        seen.setdefault("first", jax.tree.map(np.asarray, state.params))

    state = train(c, tmp_path, hooks=[hook], progress=False)
    frozen = FoundationTask(**c.task.kwargs.to_dict()).codec.backbone.random_params()
    jax.tree.map(np.testing.assert_array_equal, state.params["unet"], frozen["unet"])
    jax.tree.map(np.testing.assert_array_equal, state.params["vae"], frozen["vae"])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                         state.params["model"]["estimator"], seen["first"]["model"]["estimator"])
    assert max(jax.tree.leaves(moved)) > 0


def test_taef2_configs_build():
    from experiments.configs import foundation_taef2

    for arg in ("", "smoke"):
        kw = foundation_taef2.get_config(arg).task.kwargs.to_dict()
        t = FoundationTask(**kw)
        bb = t.codec.backbone
        assert (bb.kind, bb.latent_channels, bb.vae_factor, bb.scaling_factor) == ("taesd", 32, 8, 1.2)
        assert sorted(t._loaders()) == ["vae"]  # the real TAEF2 weights; unet_path still to set


@pytest.mark.slow
def test_loss_sends_no_gradient_into_the_frozen_backbone(task):
    """The frozen VAE/UNet get zero gradients (so XLA drops their weight gradients) while
    the estimator and entropy model train."""
    params = nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, {"image": x}, jax.random.key(2), 0)[0]))(params)
    for name in ("vae", "unet"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[name])), name
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["model"]["estimator"])) > 0
