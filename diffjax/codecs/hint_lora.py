"""The per-clip LoRA of the hint-guided video codec (IKIN, "Diffusion-Based Compression").

The transmitter fine-tunes a low-rank adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models") of the frozen base UNet on the clip's own frames, with the denoising
loss taken *with the hints as conditions*: the ControlNets (Zhang et al. 2023, "Adding
Conditional Control to Text-to-Image Diffusion Models", eq. 5) see the decoded hint
pictures the receiver will see, so the adapter learns what the guidance leaves out.
Optionally each ControlNet gets its own adapter too (a "control-LoRA").

:class:`HintLoraTask` is an ordinary :class:`~diffjax.train.task.Task` (parameters
``{"lora": tree, "control_lora": {hint: tree}}``, ``alpha`` frozen by the labels), and
:func:`finetune` runs the project's train step (:func:`diffjax.train.step.train_step`,
optimiser from :func:`diffjax.train.optim.make_optimizer`) for ``steps`` steps on batches of
frames drawn by a seeded permutation, so a clip always trains to the same adapter on a
given platform. Loss: diffusers' DDPM objective (Ho et al. 2020, eq. 14) with integer
``t ~ U{0..N-1}`` and the base model's prediction type
(:func:`diffjax.diffusion.losses.denoising_loss`); the base UNet runs the *unmerged* LoRA
path (:func:`diffjax.nn.lora.adapted` around the UNet only, never around the ControlNets,
whose module paths repeat the UNet's encoder names).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import compile as compile_backbone
from diffjax.diffusion.losses import denoising_loss
from diffjax.errors import InputError
from diffjax.nn import lora as L
from diffjax.train.task import Task


# XLA's cheapest CPU code generation: 2-3x faster compiles of the tiny test / smoke models,
# slower steps (the codec's ``fast_compile`` setting).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fun, fast_compile: bool = False, **kwargs):
    """:func:`diffjax.compile.jit`, with :data:`FAST_COMPILE` added when ``fast_compile``."""
    options = dict(compile_backbone.compiler_options() or {})
    if fast_compile:
        options.update(FAST_COMPILE)
    return jax.jit(fun, compiler_options=options or None, **kwargs)


class HintLoraTask(Task):
    """Denoising loss of the ControlNet-guided base UNet with trainable adapters.

    Args:
      unet, unet_params: the frozen 2-D base UNet (module, parameters).
      controlnets: ``{hint: (module, params)}`` (frozen unless ``control_rank > 0``).
      control_scales: ``{hint: conditioning scale}``.
      context: ``[1, S, D]`` cross-attention context (the codec's, zeros by default).
      schedule: the training :class:`~diffjax.diffusion.schedules.DiscreteSchedule`.
      prediction_type: the UNet's output type.
      targets, rank, alpha: the UNet LoRA (:func:`diffjax.nn.lora.init`).
      control_targets, control_rank: the control-LoRA (rank 0 = none).

    Batches: ``{"latent": [B, h, w, C], "<hint>": [B, fh, fw, 3] per ControlNet}``.
    """

    per_example_rng = True

    def __init__(self, unet, unet_params, controlnets: Mapping[str, tuple], control_scales:
                 Mapping[str, float], context, schedule, prediction_type: str,
                 targets: str | Sequence[str], rank: int, alpha: float | None = None,
                 control_targets: str | Sequence[str] = (), control_rank: int = 0):
        self.unet, self.unet_params = unet, unet_params
        self.controlnets = dict(controlnets)
        self.control_scales = {k: float(control_scales[k]) for k in self.controlnets}
        self.context = jnp.asarray(context)
        self.schedule, self.prediction_type = schedule, prediction_type
        self.targets, self.rank, self.alpha = targets, int(rank), alpha
        self.control_targets, self.control_rank = control_targets, int(control_rank)
        L.select(unet_params, targets)  # an InputError now for a target matching nothing
        if self.control_rank:
            for _, p in self.controlnets.values():
                L.select(p, control_targets)

    def init_params(self, rng, batch_spec=None) -> dict:
        out = {"lora": L.init(rng, self.unet_params, self.targets, self.rank, self.alpha)}
        if self.control_rank:
            out["control_lora"] = {
                name: L.init(jax.random.fold_in(rng, i + 1), p, self.control_targets,
                             self.control_rank, self.alpha)
                for i, (name, (_, p)) in enumerate(sorted(self.controlnets.items()))}
        return out

    def param_labels(self, params):
        out = {"lora": L.param_labels(params["lora"])}
        if "control_lora" in params:
            out["control_lora"] = {n: L.param_labels(v)
                                   for n, v in params["control_lora"].items()}
        return out

    def denoise(self, params, x_t, t, conds: Mapping[str, Any]):
        """Guided UNet output for ``x_t [B, h, w, C]`` at timesteps ``t [B]``."""
        b = x_t.shape[0]
        ctx = jnp.broadcast_to(self.context, (b,) + self.context.shape[1:])
        down, mid = None, None
        for name in sorted(self.controlnets):
            net, p = self.controlnets[name]
            adapter = params.get("control_lora", {}).get(name)
            run = functools.partial(net.apply, {"params": p}, x_t, t, ctx, conds[name],
                                    conditioning_scale=self.control_scales[name])
            if adapter is None:
                d, m = run()
            else:
                with L.adapted(adapter):
                    d, m = run()
            down = d if down is None else tuple(a + c for a, c in zip(down, d))
            mid = m if mid is None else mid + m
        extra = {} if down is None else dict(down_block_additional_residuals=down,
                                             mid_block_additional_residual=mid)
        with L.adapted(params["lora"]):
            return self.unet.apply({"params": self.unet_params}, x_t, t, ctx, **extra)

    def loss_fn(self, params, batch, rng, step):
        conds = {name: batch[name] for name in self.controlnets}
        loss, aux = denoising_loss(lambda x_t, t: self.denoise(params, x_t, t, conds),
                                   batch["latent"], rng, schedule=self.schedule,
                                   prediction_type=self.prediction_type)
        return loss, {"mse": jnp.mean(aux["per_example"])}


def frame_batches(num_frames: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """``[steps, batch]`` frame indices: consecutive slices of seeded permutations."""
    if steps == 0:
        return np.zeros((0, batch), np.int64)
    rng = np.random.default_rng([int(seed), 0x4C6F5241])  # "LoRA"
    order = np.concatenate([rng.permutation(num_frames)
                            for _ in range(-(-steps * batch // num_frames))])
    return order[:steps * batch].reshape(steps, batch)


def finetune(task: HintLoraTask, data: Mapping[str, np.ndarray], *, steps: int, batch: int,
             learning_rate: float, seed: int, grad_clip_norm: float = 1.0,
             fast_compile: bool = False) -> tuple[dict, list]:
    """Train the adapters of ``task`` on ``data`` (``{"latent": [T, ...], hint: [T, ...]}``,
    one row per frame) for ``steps`` steps of ``batch`` frames with Adam at a constant
    ``learning_rate``. Returns ``(params, losses)``; ``steps = 0`` returns the initial
    adapters (``up = 0``: the base model). ``fast_compile``: see :func:`jit`."""
    from diffjax.train import optim, state as st
    from diffjax.train.step import train_step

    num = int(next(iter(data.values())).shape[0])
    if steps < 0 or batch < 1:
        raise InputError(f"LoRA steps must be >= 0 and batch >= 1, got {steps}, {batch}")
    batch = min(int(batch), num)
    spec = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype) for k, v in data.items()}
    rng = jax.random.PRNGKey(int(seed))
    abstract = jax.eval_shape(lambda r: task.init_params(jax.random.split(r)[0], spec), rng)
    tx = optim.make_optimizer({"name": "adam", "learning_rate": float(learning_rate),
                               "schedule": "constant", "grad_clip_norm": grad_clip_norm},
                              max(steps, 1), task.param_labels(abstract))
    state = jit(functools.partial(st.init_train_state, batch_spec=spec, task=task, tx=tx,
                                  use_ema=False), fast_compile)(rng)
    step_fn = jit(functools.partial(train_step, task=task, tx=tx), fast_compile,
                  donate_argnums=(0,))
    losses = []
    for idx in frame_batches(num, batch, steps, seed):
        state, metrics = step_fn(state, {k: v[idx] for k, v in data.items()})
        losses.append(metrics["loss"])
    return jax.tree.map(np.asarray, jax.device_get(state.params)), [float(x) for x in losses]
