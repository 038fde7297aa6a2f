"""Jitted (optionally sharded) sampling entry point: the modern form of ``pjit``.

:func:`make_sampler` builds the host-side plan once and returns a function that runs the
whole sampling loop under one ``jax.jit`` with explicit ``in_shardings``/``out_shardings``
on a :class:`jax.sharding.Mesh`: the batch (sample, conditioning) is split over the mesh's
batch axes (``data``/``fsdp``), parameters are replicated or split by logical axis rules
(:func:`diffjax.train.sharding.logical_param_shardings`). The start step is a traced
argument, so partial denoising from any step reuses the same executable. Without a mesh it
is a plain ``jax.jit`` on the default device.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax import compile as compile_backbone
from diffjax.diffusion.samplers import make_plan
from diffjax.diffusion.sampling import CFG, run_plan
from diffjax.errors import InputError
from diffjax.train.sharding import batch_axes, batch_sharding, replicated


def make_sampler(apply_fn: Callable, *, scheduler_config, sampler: str = "ddim",
                 num_inference_steps: int = 50, mesh: Mesh | None = None,
                 param_shardings: Any = None, eta: float = 0.0,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                 frame_axis: str | None = None):
    """A jitted sampler ``run(params, x, *, key=None, start_step=0, cond=None, uncond=None)``.

    Args:
      apply_fn: ``apply_fn(params, x_t, t)`` or, when ``cond`` is passed at call time,
        ``apply_fn(params, x_t, t, cond)`` -> model output in the config's prediction type.
      scheduler_config, sampler, num_inference_steps, eta: as :func:`diffjax.diffusion.sample`.
      mesh: device mesh; ``None`` runs unsharded on the default device.
      param_shardings: a sharding (or a tree of them matching ``params``) for the
        parameters; default replicated. Use ``logical_param_shardings`` for FSDP-style splits.
      guidance_scale, guidance_rescale: classifier-free guidance (:class:`CFG`); ``uncond``
        is then required at call time (same structure as ``cond``).
      frame_axis: for video samples ``[B, F, H, W, C]``, a mesh axis over which the frames
        are also split (the batch stays on ``data``/``fsdp``); XLA inserts the collectives
        the model's temporal layers need. ``F`` must be a multiple of its size.

    Returns:
      ``run``; ``run.plan`` is the static plan and ``run.jitted`` the underlying jitted
      function ``(params, x, key, start_step, cond, uncond) -> x_0`` (sharded over the batch).
    """
    plan = make_plan(scheduler_config, sampler, num_inference_steps)

    def _run(params, x, key, start_step, cond, uncond):
        if cond is None:
            def denoise(x_t, t):
                return apply_fn(params, x_t, t)
        else:
            def denoise(x_t, t, c):
                return apply_fn(params, x_t, t, c)
        guidance = None
        if guidance_scale is not None:
            guidance = CFG(guidance_scale, uncond, guidance_rescale)
        return run_plan(plan, denoise, x, start_step=start_step, key=key, eta=eta,
                        guidance=guidance, cond=cond)

    frame_devices = 1
    if mesh is None:
        jitted = compile_backbone.jit(_run)
        batch_devices = 1
    else:
        batch, rep = batch_sharding(mesh), replicated(mesh)
        x_sh = batch
        if frame_axis is not None:
            if frame_axis not in mesh.axis_names:
                raise InputError(f"frame_axis {frame_axis!r} is not an axis of the mesh "
                                 f"{mesh.axis_names}")
            x_sh = NamedSharding(mesh, PartitionSpec(batch_axes(mesh) or None, frame_axis))
            frame_devices = mesh.shape[frame_axis]
        jitted = compile_backbone.jit(
            _run,
            in_shardings=(param_shardings if param_shardings is not None else rep,
                          x_sh, rep, rep, batch, batch),
            out_shardings=x_sh,
        )
        batch_devices = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))

    def run(params, x, *, key=None, start_step=0, cond=None, uncond=None):
        """Sample from ``x`` (VP sample at ``plan.timesteps[start_step]``)."""
        shape = np.shape(x)
        if len(shape) < 1 or shape[0] % batch_devices:
            raise InputError(f"batch size {shape[0] if shape else None} must be a multiple of "
                             f"the {batch_devices} devices on the mesh's batch axes")
        if frame_devices > 1 and (len(shape) < 2 or shape[1] % frame_devices):
            raise InputError(f"frame count {shape[1] if len(shape) > 1 else None} must be a "
                             f"multiple of the {frame_devices} devices on {frame_axis!r}")
        if guidance_scale is not None and (cond is None or uncond is None):
            raise InputError("guidance_scale needs both cond= and uncond=")
        if isinstance(start_step, (int, np.integer)) and not 0 <= start_step < plan.num_steps:
            raise InputError(f"start_step must be in [0, {plan.num_steps}), got {start_step}")
        return jitted(params, x, key, jnp.asarray(start_step, jnp.int32), cond, uncond)

    run.plan = plan
    run.jitted = jitted
    return run
