"""The sampling loop: full sampling, partial denoising, SDEdit, classifier-free guidance.

:func:`sample` is pure and traceable: callers ``jax.jit`` it (or use
:func:`diffjax.diffusion.sharded.make_sampler`). The loop is a ``lax.fori_loop`` (or a
``lax.scan`` when the trajectory is requested), so a whole run compiles once per shape.

Samples are variance preserving throughout the public API: ``x_t = alpha x_0 + sigma eps``,
so pure noise is ``x = eps`` for every sampler (the Euler samplers rescale internally, see
:mod:`diffjax.diffusion.samplers`). Partial denoising (Relic et al. 2024: decode from a
quantised latent at an intermediate step, no fresh noise) is ``start_step > 0`` with the given
``x`` taken as the sample at ``timesteps[start_step]``. SDEdit (Meng et al. 2022) noises a clean
``x_0`` to that step first.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.diffusion.noise import standard_normal, step_noise  # noqa: F401
from diffjax.diffusion.samplers import Plan, get_sampler
from diffjax.errors import InputError

DenoiseFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), as diffusers' SD pipelines.

    The model runs once on the doubled batch ``[uncond; cond]`` (every leaf of ``cond`` and
    ``uncond`` has a leading batch axis); ``out = u + scale * (c - u)``. ``rescale > 0`` applies
    Lin et al. 2024, eq. 15-16: match the per-example std of the guided output to that of the
    conditional one (Bessel-corrected, as diffusers), mixed by ``rescale``.
    """

    scale: float
    uncond: Any
    rescale: float = 0.0

    def __call__(self, denoise_fn: DenoiseFn, x, t, cond):
        if cond is None:
            raise InputError("CFG needs the `cond` argument of sample() (the conditional "
                             "inputs); the unconditional ones go in CFG(uncond=...)")
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), self.uncond, cond)
        out = denoise_fn(jnp.concatenate([x, x], axis=0), t, both)
        out_u, out_c = jnp.split(out, 2, axis=0)
        guided = out_u + self.scale * (out_c - out_u)
        if self.rescale:
            axes = tuple(range(1, out.ndim))
            std_c = jnp.std(out_c, axis=axes, keepdims=True, ddof=1)
            std_g = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
            guided = self.rescale * guided * (std_c / std_g) + (1 - self.rescale) * guided
        return guided


def _call_model(denoise_fn, guidance, x, t, cond):
    if guidance is not None:
        return guidance(denoise_fn, x, t, cond)
    if cond is None:
        return denoise_fn(x, t)
    return denoise_fn(x, t, cond)


def _static_int(value) -> int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def run_plan(plan: Plan, denoise_fn: DenoiseFn, x, *, start_step=0, key=None, eta=0.0,
             guidance=None, cond=None, return_trajectory: bool = False):
    """Run a prebuilt :class:`~diffjax.diffusion.samplers.Plan` (see :func:`sample`)."""
    sampler = get_sampler(plan.sampler)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
        raise InputError(f"x must be a floating array [B, ...], got {x.dtype} {x.shape}")
    num = plan.num_steps
    start = _static_int(start_step)
    if start is not None and not 0 <= start < num:
        raise InputError(f"start_step must be in [0, {num}), got {start}")
    if start is None:
        if return_trajectory:
            raise InputError("return_trajectory needs a Python int start_step")
        start_step = jnp.asarray(start_step, jnp.int32)
        chex.assert_shape(start_step, ())
    if plan.sampler != "ddim" and not (isinstance(eta, (int, float)) and eta == 0):
        raise InputError(f"eta applies to the DDIM sampler only (sampler={plan.sampler!r})")
    stochastic = sampler.stochastic(plan.config, eta)
    if stochastic and key is None:
        raise InputError(f"sampler {plan.sampler!r} draws fresh noise: pass key=")
    if guidance is not None and not callable(guidance):
        raise InputError("guidance must be callable (e.g. CFG(scale, uncond))")

    tab = plan.arrays()
    out_dtype = x.dtype
    x_work = x.astype(jnp.float32) * tab["scale"][start_step]

    def body(i, state):
        xw, carry = state
        t = tab["timesteps"][i]
        out = _call_model(denoise_fn, guidance, sampler.model_input(plan, tab, i, xw), t, cond)
        if out.shape != xw.shape:
            raise InputError(f"denoise_fn returned shape {out.shape}, expected {xw.shape}")
        noise = step_noise(key, i, xw.shape) if stochastic else None
        xw, x0, carry = sampler.step(plan, tab, i, xw, out.astype(jnp.float32), carry, noise,
                                     i == start_step, eta)
        return xw, carry, x0

    init = (x_work, sampler.init_carry(x_work))
    if return_trajectory:
        def scan_body(state, i):
            xw, carry, x0 = body(i, state)
            return (xw, carry), (xw / tab["scale"][i + 1], x0)

        (x_work, _), (xs, x0s) = lax.scan(scan_body, init, jnp.arange(start, num))
        final = (x_work / tab["scale"][num]).astype(out_dtype)
        return final, {"x": xs, "x0": x0s, "timesteps": tab["timesteps"][start:]}

    x_work, _ = lax.fori_loop(start_step, num, lambda i, s: body(i, s)[:2], init)
    return (x_work / tab["scale"][num]).astype(out_dtype)


def sample(denoise_fn: DenoiseFn, x, *, scheduler_config, sampler: str = "ddim",
           num_inference_steps: int = 50, start_step=0, key=None, eta=0.0, guidance=None,
           cond=None, return_trajectory: bool = False):
    """Denoise ``x`` with a diffusers-compatible sampler.

    Args:
      denoise_fn: ``denoise_fn(x_t, t)`` (or ``denoise_fn(x_t, t, cond)`` when ``cond`` is
        given) -> the model output ``[B, ...]`` in the config's ``prediction_type``. ``t`` is a
        float32 scalar: the training timestep (fractional for Euler with linspace spacing).
      x: ``[B, ...]`` VP sample at ``timesteps[start_step]``; pure noise ``eps`` for a full run.
      scheduler_config: a diffusers scheduler config dict or ``scheduler_config.json`` path.
      sampler: ``"ddpm"``, ``"ddim"``, ``"euler"``, ``"euler_ancestral"``, ``"dpmsolver++"`` (or
        the diffusers class name). Sampler-specific defaults are those of the diffusers class.
      num_inference_steps: number of steps of the full schedule.
      start_step: first step to run (partial denoising, no fresh noise); a Python int or a
        traced int32 scalar (no recompilation per value).
      key: PRNG key; required by stochastic samplers (DDPM, Euler ancestral, DDIM with
        ``eta > 0``, SDE-DPM-Solver++). Step ``i`` uses :func:`step_noise` ``(key, i)``.
      eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
      guidance: ``None`` or a hook ``guidance(denoise_fn, x_in, t, cond) -> output``, e.g.
        :class:`CFG`.
      cond: conditioning pytree passed untouched to ``denoise_fn`` (cross-attention context,
        channel-concatenated latents, control residuals, ...).
      return_trajectory: also return ``{"x": [S', B, ...], "x0": [S', B, ...], "timesteps"}``
        (sample after each step and the ``x_0`` estimate of each step; VP space).

    Returns:
      The denoised sample ``[B, ...]`` (dtype of ``x``), and the trajectory if requested.
    """
    plan = get_sampler(sampler).plan(scheduler_config, num_inference_steps)
    return run_plan(plan, denoise_fn, x, start_step=start_step, key=key, eta=eta,
                    guidance=guidance, cond=cond, return_trajectory=return_trajectory)


def noise_to_step(plan: Plan, x0, noise, step):
    """Forward-diffuse ``x0`` to the noise level of inference step ``step`` (VP sample)."""
    tab = plan.arrays()
    return tab["alpha"][step] * x0 + tab["sigma"][step] * noise


def sdedit_start_step(num_inference_steps: int, strength: float) -> int:
    """First step of an img2img/SDEdit run, as diffusers' img2img pipelines compute it."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    init = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init, 0)
    if start >= num_inference_steps:
        raise InputError(f"strength {strength} leaves no step to run with "
                         f"{num_inference_steps} steps")
    return start


def sdedit(denoise_fn: DenoiseFn, x0, *, scheduler_config, strength: float, key,
           sampler: str = "ddim", num_inference_steps: int = 50, noise=None, eta=0.0,
           guidance=None, cond=None, return_trajectory: bool = False):
    """SDEdit (Meng et al. 2022): noise a clean ``x0`` to ``strength`` of the schedule, then
    denoise from there. ``noise`` defaults to ``normal(split(key)[0])``; the sampler's own
    noise uses ``split(key)[1]``."""
    if key is None:
        raise InputError("sdedit needs key=")
    plan = get_sampler(sampler).plan(scheduler_config, num_inference_steps)
    start = sdedit_start_step(plan.num_steps, strength)
    k_noise, k_loop = jax.random.split(key)
    x0 = jnp.asarray(x0)
    if noise is None:
        noise = standard_normal(k_noise, x0.shape)
    chex.assert_equal_shape([x0, noise])
    x_t = noise_to_step(plan, x0.astype(jnp.float32), noise, start).astype(x0.dtype)
    return run_plan(plan, denoise_fn, x_t, start_step=start, key=k_loop, eta=eta,
                    guidance=guidance, cond=cond, return_trajectory=return_trajectory)


def start_step_for_t(t, plan: Plan) -> jax.Array:
    """The inference step whose timestep is nearest the continuous ``t`` in ``[0, 1]``
    (training timestep ``t * N - 1``); jittable, for codecs that predict ``t``."""
    num_train = plan.config["num_train_timesteps"]
    target = jnp.asarray(t, jnp.float32) * num_train - 1.0
    return jnp.argmin(jnp.abs(jnp.asarray(plan.timesteps) - target)).astype(jnp.int32)


def initial_noise_scale(plan: Plan) -> float:
    """Factor ``s`` such that ``sample(x=s * eps)`` starts exactly where a diffusers pipeline
    starts (``latents = eps * scheduler.init_noise_sigma``). 1 except for the Euler samplers,
    whose ``init_noise_sigma`` is ``sigma_max`` ("linspace"/"trailing") or
    ``sqrt(sigma_max^2 + 1)`` ("leading") rather than the first step's ``sqrt(sigma^2 + 1)``."""
    if plan.sampler not in ("euler", "euler_ancestral"):
        return 1.0
    sig_max = float(np.max(plan.tables["sig"]))
    if plan.config["timestep_spacing"] in ("linspace", "trailing"):
        init = sig_max
    else:
        init = float(np.sqrt(np.float32(sig_max) ** 2 + np.float32(1)))
    return float(np.float32(init) / plan.scale[0])
