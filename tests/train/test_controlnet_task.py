"""ControlNet training task (``experiments/configs/controlnet.py``): frozen backbone, the
ControlNet starting as from_unet of the frozen UNet, a smoke run, exact resume."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from diffjax.errors import InputError
from diffjax.train.controlnet import ControlNetTask
from diffjax.train.loop import train
from experiments.configs import controlnet as cn_config


def smoke_config(shared_data, steps=2, **data):
    c = cn_config.get_config("smoke")
    c.data.path = str(shared_data / "bsds500" / "val")
    c.data.crop = 32
    c.batch_size = 2
    c.mesh = {"data": 2, "fsdp": 1}  # 2 of the 8 fake devices: data-parallel, small batch
    c.num_train_steps = steps
    c.checkpoint_every = 1
    for k, v in data.items():
        c.data[k] = v
    return c


@functools.lru_cache(maxsize=None)
def smoke_task():
    return ControlNetTask(**cn_config.get_config("smoke").task.kwargs.to_dict())


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_controlnet_starts_as_from_unet_and_only_it_trains():
    task = smoke_task()
    params = jax.jit(task.init_params)(jax.random.key(0))
    labels = task.param_labels(nn.unbox(params))
    assert set(jax.tree.leaves(labels["controlnet"])) == {"trainable"}
    assert set(jax.tree.leaves(labels["unet"])) == set(jax.tree.leaves(labels["vae"])) == {"frozen"}
    cn, unet = params["controlnet"], params["unet"]
    for name in ("conv_in", "time_embedding", "down_blocks_0", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, cn[name], unet[name])
    assert not np.any(np.asarray(cn["controlnet_mid_block"]["kernel"]))
    assert not np.any(np.asarray(cn["controlnet_cond_embedding"]["conv_out"]["kernel"]))
    assert np.any(np.asarray(cn["controlnet_cond_embedding"]["conv_in"]["kernel"]))


def test_mismatched_condition_encoder_is_a_clear_error():
    kw = cn_config.get_config("smoke").task.kwargs.to_dict()
    kw["conditioning_embedding_out_channels"] = [4, 8]  # /2, the VAE is /8
    with pytest.raises(InputError, match="downsamples by 2, the autoencoder by 8"):
        ControlNetTask(**kw)


def test_config_arguments():
    assert cn_config.get_config("").data.condition.name == "canny"
    assert cn_config.get_config("lowres").data.condition.codec == "h264"
    assert cn_config.get_config("lowres_h265,smoke").data.condition.codec == "h265"
    with pytest.raises(ValueError):
        cn_config.get_config("canny,depth")


@pytest.mark.slow
def test_smoke_run_trains_the_controlnet_only(shared_data, tmp_path):
    task = smoke_task()
    init = jax.jit(task.init_params)(jax.random.key(0))
    state = train(smoke_config(shared_data), tmp_path, progress=False)
    assert int(state.step) == 2
    before, after = flat(init), flat(state.params)
    for key in before:
        if key.startswith(("unet/", "vae/")):
            np.testing.assert_array_equal(after[key], before[key])
    moved = [k for k in before if k.startswith("controlnet/controlnet_")
             and np.abs(after[k] - before[k]).max() > 0]
    assert any("controlnet_mid_block" in k for k in moved)  # the zero convs left zero


@pytest.mark.slow
def test_resume_is_exact(shared_data, tmp_path):
    """4 steps straight == 2 steps, restart, 2 more (low-res colour through real H.264)."""
    cond = {"name": "lowres", "factor": 8, "codec": "h264", "crf": 45}
    straight = train(smoke_config(shared_data, 4, condition=cond), tmp_path / "a", progress=False)
    first = train(smoke_config(shared_data, 4, condition=cond), tmp_path / "b", progress=False,
                  stop_after=2)
    assert int(first.step) == 2
    resumed = train(smoke_config(shared_data, 4, condition=cond), tmp_path / "b", progress=False)
    assert int(resumed.step) == 4
    a, b = flat(straight.params), flat(resumed.params)
    assert max(np.abs(a[k] - b[k]).max() for k in a) == 0.0
    a, b = flat(straight.opt_state), flat(resumed.opt_state)
    assert max(np.abs(a[k] - b[k]).max() for k in a) == 0.0
