"""Video latents through the sampler: a tiny AnimateDiff-style motion UNet, DDIM with
classifier-free guidance, sharded over 8 fake CPU devices (batch over ``data``, frames over
``time``) equals the single-device run; one compilation per shape."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from _diffusion_ref import SD21_BASE

from diffjax.diffusion import make_sampler
from diffjax.errors import InputError
from diffjax.models.unet3d import UNetMotionModel
from diffjax.nn.layers import host_random_params
from diffjax.train.sharding import make_mesh

TINY_SD = dict(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
               norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_ADAPTER = dict(block_out_channels=(16, 32), motion_layers_per_block=1,
                    motion_num_attention_heads=2, motion_max_seq_length=8)
B, F, S = 2, 4, 5


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() == 8
    module = UNetMotionModel.from_unet2d(TINY_SD, TINY_ADAPTER)
    args, _ = module.dummy_inputs(num_frames=F)
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))["params"]
    params = host_random_params(shapes, seed=0, jitter=0.2)  # motion modules are non-zero
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, F, 8, 8, 4)).astype(np.float32)
    cond = rng.standard_normal((B, S, 24)).astype(np.float32)
    uncond = rng.standard_normal((B, S, 24)).astype(np.float32)

    def apply(p, x_t, t, c):
        return module.apply({"params": p}, x_t, t, c)

    return module, params, x, cond, uncond, apply


@pytest.mark.slow  # default-suite budget; sharded image sampling stays in tests/diffusion
def test_sharded_video_sampling_equals_single_device(setup):
    _, params, x, cond, uncond, apply = setup
    kw = dict(scheduler_config=SD21_BASE, sampler="ddim", num_inference_steps=3,
              guidance_scale=5.0)
    single = make_sampler(apply, **kw)
    ref = np.asarray(single(params, x, cond=cond, uncond=uncond))
    ref_partial = np.asarray(single(params, x, cond=cond, uncond=uncond, start_step=1))
    assert single.jitted._cache_size() == 1  # one compilation per shape, any start step
    assert np.abs(ref).max() > 0 and np.abs(ref - ref_partial).max() > 1e-3

    mesh = make_mesh({"data": 2, "time": 4})  # batch over 2 devices, frames over 4
    sharded = make_sampler(apply, mesh=mesh, frame_axis="time", **kw)
    out = sharded(params, x, cond=cond, uncond=uncond)
    assert out.sharding.shard_shape(out.shape) == (1, 1, 8, 8, 4)  # batch and frames split
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)
    # frames really mix: the same clip with its frames reversed samples differently
    rev = np.asarray(single(params, x[:, ::-1].copy(), cond=cond, uncond=uncond))[:, ::-1]
    assert np.abs(rev - ref).max() > 1e-3

    with pytest.raises(InputError, match="frame count"):
        sharded(params, x[:, :3], cond=cond, uncond=uncond)
    with pytest.raises(InputError, match="frame_axis"):
        make_sampler(apply, mesh=make_mesh({"data": 8}), frame_axis="time", **kw)
