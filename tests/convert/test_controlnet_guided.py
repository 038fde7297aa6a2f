"""UNet + ControlNet(s) end to end against diffusers: one denoising step and DDIM runs.

The diffusers side is what ``StableDiffusionControlNetPipeline`` does per step (ControlNet
or ``MultiControlNetModel`` residuals into ``UNet2DConditionModel``, then
``DDIMScheduler.step``), written out so the loop can start from a partially noised latent.
The diffjax side is :func:`diffjax.models.controlnet.controlled_apply_fn` inside
:func:`diffjax.diffusion.make_sampler` (the loop of :func:`diffjax.diffusion.sample` in
one jitted ``fori_loop``, batch sharded over a 2-device mesh). Tolerance:
``max|diff| <= 1e-4 * max|ref|``.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import _controlnet_reference as cref
import _sd_reference as ref
from diffjax.convert import convert_diffusers_state_dict
from diffjax.diffusion import make_sampler
from diffjax.models.controlnet import ControlNetModel, MultiControlNet, controlled_apply_fn
from diffjax.models.unet import UNet2DConditionModel
from diffjax.train.sharding import make_mesh

TOL = 1e-4
SIZE = 8
# Stable Diffusion 1.5's scheduler/scheduler_config.json (DDIM).
SD15_DDIM = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "trained_betas": None, "timestep_spacing": "leading",
}


@pytest.fixture(scope="module")
def models():
    unet_t = ref.build_unet(ref.TINY_SD15, seed=3)
    nets_t = [cref.build_controlnet(cref.CN_CONFIGS["sd15"], seed=s) for s in (11, 12)]
    # the second net: one input channel (e.g. depth), BGR order irrelevant then
    cfg1 = dict(cref.CN_CONFIGS["sd15"], conditioning_channels=1)
    nets_t[1] = cref.build_controlnet(cfg1, seed=12)
    unet = UNet2DConditionModel.from_config(dict(unet_t.config))
    nets = [ControlNetModel.from_config(dict(n.config)) for n in nets_t]
    params = {"unet": convert_diffusers_state_dict(dict(unet_t.config), unet_t.state_dict()),
              "controlnets": [convert_diffusers_state_dict(dict(n.config), n.state_dict())
                              for n in nets_t]}
    inputs = ref.unet_inputs(ref.TINY_SD15, size=SIZE)
    conds = [cref.cond_image(cref.CN_CONFIGS["sd15"], SIZE, seed=5),
             cref.cond_image(cfg1, SIZE, seed=6)]
    return dict(unet_t=unet_t, nets_t=nets_t, unet=unet, nets=nets, params=params,
                inputs=inputs, conds=conds)


@torch.no_grad()
def torch_eps(m, latents, t, scales):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    multi = MultiControlNetModel(m["nets_t"][:len(scales)])
    ctx = torch.from_numpy(m["inputs"]["context"])
    down, mid = multi(latents, t, ctx, controlnet_cond=[ref.nchw(c) for c in m["conds"][:len(scales)]],
                      conditioning_scale=list(scales), return_dict=False)
    return m["unet_t"](latents, t, ctx, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample


@torch.no_grad()
def torch_ddim(m, x, scales, steps=4, start=0):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SD15_DDIM)
    sched.set_timesteps(steps)
    lat = ref.nchw(x)
    for t in sched.timesteps[start:]:
        lat = sched.step(torch_eps(m, lat, t, scales), t, lat).prev_sample
    return ref.nhwc(lat)


def cond_of(m, n):
    return {"context": m["inputs"]["context"], "images": m["conds"][:n]}


def test_one_step_multi_controlnet_matches_diffusers(models):
    """One denoising step, two ControlNets (MultiControlNetModel) with their own scales."""
    m = models
    x = m["inputs"]["sample"]
    t = m["inputs"]["timesteps"]
    scales = (0.9, 0.6)
    want = ref.nhwc(torch_eps(m, ref.nchw(x), torch.from_numpy(t), scales))
    one = ref.nhwc(torch_eps(m, ref.nchw(x), torch.from_numpy(t), scales[:1]))
    plain = ref.run_unet(m["unet_t"], m["inputs"])
    assert np.abs(one - plain).max() > 0.1, "the first ControlNet must change the output"
    assert np.abs(want - one).max() > 0.1, "the second ControlNet must change it again"
    fn = controlled_apply_fn(m["unet"], MultiControlNet(tuple(m["nets"])), scales=scales)
    got = jax.jit(fn)(m["params"], x, t, cond_of(m, 2))
    assert cref.rel_error(got, want) <= TOL


def test_ddim_in_the_sharded_loop_matches_diffusers(models):
    """4-step DDIM in the jitted loop sharded over 2 devices: from pure noise, and from a
    partially noised latent (start at step 2 of 4; the start step is traced, one compile)."""
    m = models
    fn = controlled_apply_fn(m["unet"], [m["nets"][0]], scales=1.0)
    params = dict(m["params"], controlnets=m["params"]["controlnets"][:1])
    mesh = make_mesh({"data": 2, "fsdp": 1}, jax.devices()[:2])
    run = make_sampler(fn, scheduler_config=SD15_DDIM, sampler="ddim", num_inference_steps=4,
                       mesh=mesh)
    noise = np.random.default_rng(9).standard_normal(m["inputs"]["sample"].shape).astype(np.float32)
    got = run(params, noise, cond=cond_of(m, 1))
    assert len(got.sharding.device_set) == 2
    assert cref.rel_error(got, torch_ddim(m, noise, (1.0,))) <= TOL
    partial = m["inputs"]["sample"] * 0.7
    got2 = run(params, partial, cond=cond_of(m, 1), start_step=2)
    assert cref.rel_error(got2, torch_ddim(m, partial, (1.0,), start=2)) <= TOL
    assert np.abs(np.asarray(got2) - np.asarray(run(params, partial, cond=cond_of(m, 1)))).max() > 1e-2
