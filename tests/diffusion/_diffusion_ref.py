"""Shared pieces of the diffusion tests: SD 2.1 scheduler configs, one deterministic
denoise function written twice (JAX NHWC / torch NCHW), and a diffusers reference loop.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (v-prediction) and the
# 2-1-base variant (epsilon); metadata keys and DDIM-only keys are kept on purpose: every
# sampler must accept the file as is.
SD21 = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SD21_BASE = dict(SD21, prediction_type="epsilon")


def denoise_jax(x, t):
    """Smooth closed-form stand-in for a network: elementwise in x, t and a channel mean."""
    tau = jnp.asarray(t, jnp.float32) / 1000.0
    return (0.6 * x * jnp.cos(0.9 * tau) + 0.3 * jnp.sin(2.0 * x + 3.0 * tau)
            + 0.1 * jnp.mean(x, axis=-1, keepdims=True))


def denoise_torch(x, t):
    tau = torch.as_tensor(t, dtype=torch.float32) / 1000.0
    return (0.6 * x * torch.cos(0.9 * tau) + 0.3 * torch.sin(2.0 * x + 3.0 * tau)
            + 0.1 * x.mean(dim=1, keepdim=True))


def scheduler_class(name):
    import diffusers

    return {
        "ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
    }[name]


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


_NOISE_FNS = {}


def step_noises(key, num_steps, shape) -> np.ndarray:
    """``[S, *shape]``: diffjax's per-step noise ``step_noise(key, i)`` for every step."""
    from diffjax.diffusion import step_noise

    fn = _NOISE_FNS.setdefault(tuple(shape), jax.jit(lambda k, i: step_noise(k, i, shape)))
    return np.stack([np.asarray(fn(key, jnp.int32(i))) for i in range(num_steps)])


@contextlib.contextmanager
def patched_randn(noise_of_step):
    """Make diffusers' schedulers draw ``noise_of_step()`` (NCHW) instead of torch noise."""
    from diffusers.schedulers import (
        scheduling_ddim,
        scheduling_ddpm,
        scheduling_dpmsolver_multistep,
        scheduling_euler_ancestral_discrete,
        scheduling_euler_discrete,
    )

    mods = [scheduling_ddpm, scheduling_ddim, scheduling_euler_discrete,
            scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep]
    saved = [m.randn_tensor for m in mods]

    def fake(shape, generator=None, device=None, dtype=None, **kwargs):
        out = noise_of_step()
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out.to(dtype or torch.float32)

    try:
        for m in mods:
            m.randn_tensor = fake
        yield
    finally:
        for m, f in zip(mods, saved):
            m.randn_tensor = f


def run_diffusers(name, config, n, x_work, *, start=0, noises=None, eta=0.0, cond_fn=None):
    """diffusers' loop as its pipelines run it.

    ``x_work``: NHWC sample in the scheduler's own space (multiplied by init_noise_sigma or
    produced by add_noise). Returns the scheduler, the list of ``prev_sample`` (NHWC, the
    scheduler's space) and of ``pred_original_sample`` (or None).
    """
    sch = scheduler_class(name).from_config(config)
    sch.set_timesteps(n)
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    x = nchw(x_work)
    current = {"i": start}

    def noise_of_step():
        return nchw(noises[current["i"]])

    xs, x0s = [], []
    with patched_randn(noise_of_step):
        for i in range(start, len(sch.timesteps)):
            current["i"] = i
            t = sch.timesteps[i]
            inp = sch.scale_model_input(x, t)
            out = (cond_fn or denoise_torch)(inp, t.float())
            kwargs = {"eta": eta} if name == "ddim" else {}
            res = sch.step(out, t, x, **kwargs)
            x = res.prev_sample
            xs.append(nhwc(x))
            x0 = getattr(res, "pred_original_sample", None)
            x0s.append(None if x0 is None else nhwc(x0))
    return sch, xs, x0s
