"""LoRA fine-tune of a frozen SD-compatible UNet with the denoising loss (task ``lora_finetune``).

The transmitter of the hint-guided video codec (IKIN) fine-tunes a LoRA of a foundation
diffusion model on each clip's frames; this task does that (and plain per-dataset LoRA
training) on a folder of images (``{"image": [B, H, W, 3]}``) or on clips
(``{"video": [B, T, H, W, 3]}``, every frame one training image).

Only the adapters train: the train state's parameters are ``{"lora": tree}``
(:mod:`diffjax.nn.lora`), so gradients, the optimizer state and the Orbax checkpoints hold
LoRA leaves only (``alpha`` is frozen by :meth:`param_labels`). The base UNet (and the
optional VAE that turns images into latents) are loaded once on the host and enter the
jitted step as constants, never as trained parameters; the UNet runs the *unmerged*
LoRA path (``x down up * alpha / r`` added to each adapted layer).

Loss: diffusers' DDPM training objective (Ho et al. 2020, eq. 14), ``||f(x_t, t, c) -
target||^2`` with integer ``t ~ U{0..N-1}`` of the scheduler config and the UNet's
prediction type, :func:`diffjax.diffusion.losses.denoising_loss`. ``c`` is a fixed
context: a ``.npy`` text embedding ``[S, D]`` (e.g. the empty prompt's CLIP embedding)
or, without one, a seeded random stand-in.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion.losses import denoising_loss
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.errors import InputError
from diffjax.nn import lora as L
from diffjax.train.task import Task

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear"}


def _model(spec: str | Mapping[str, Any], class_name: str, seed: int):
    """``(module, host params)`` of a converted model directory, or a random-weight model
    built from a diffusers config dict (tests, smoke runs)."""
    from diffjax.convert import core

    if isinstance(spec, (str, pathlib.Path)):
        module, params = core.load_pretrained(spec)
        if type(module).__name__ != class_name:
            raise InputError(f"{spec} holds a {type(module).__name__}, expected {class_name}")
        return module, jax.tree.map(np.asarray, params)
    import flax

    from diffjax.nn.layers import host_random_params

    module = core.build_model(dict(spec), class_name)
    # Host-drawn weights: tracing and compiling Flax's initialisers costs minutes on CPU.
    template = flax.traverse_util.unflatten_dict(core.param_template(module))
    return module, host_random_params(template, seed, jitter=0.1)


class LoraFinetuneTask(Task):
    """See the module docstring.

    Args:
      unet: converted UNet directory (``diffjax convert``) or a diffusers UNet config dict
        (random weights from ``base_seed``).
      targets, rank, alpha: LoRA layout (:func:`diffjax.nn.lora.init`).
      vae: converted AutoencoderKL directory / config dict, or None to diffuse the images
        themselves (the UNet then needs 3 input channels).
      scheduler: diffusers scheduler config (default: SD's scaled-linear 1000 steps).
      prediction_type: default the UNet's.
      context: ``.npy`` file ``[S, D]``; None = ``context_tokens`` seeded N(0, 1) tokens.
    """

    per_example_rng = True

    def __init__(self, unet: str | Mapping[str, Any], targets: str | Sequence[str] =
                 "to_q|to_k|to_v|to_out.0", rank: int = 4, alpha: float | None = None,
                 vae: str | Mapping[str, Any] | None = None,
                 scheduler: Mapping[str, Any] | None = None, prediction_type: str | None = None,
                 context: str | None = None, context_tokens: int = 8, context_seed: int = 0,
                 base_seed: int = 0):
        self.unet, self.unet_params = _model(unet, "UNet2DConditionModel", base_seed)
        self.vae, self.vae_params = (None, None) if vae is None else _model(
            vae, "AutoencoderKL", base_seed + 1)
        want = self.vae.latent_channels if self.vae is not None else 3
        if self.unet.in_channels != want:
            raise InputError(f"the UNet takes {self.unet.in_channels} channels but the "
                             f"{'VAE latents have' if self.vae else 'images have'} {want}")
        self.targets = targets if isinstance(targets, str) else list(targets)
        self.rank, self.alpha = int(rank), alpha
        L.select(self.unet_params, self.targets)  # fail now on a target matching nothing
        self.schedule = DiscreteSchedule.from_config(dict(scheduler or SD_SCHEDULER))
        self.prediction_type = prediction_type or self.unet.prediction_type
        cross = self.unet.dummy_inputs()[0][2].shape[-1]
        if context:
            ctx = np.load(context).astype(np.float32)
            if ctx.ndim != 2 or ctx.shape[-1] != cross:
                raise InputError(f"context {context}: shape {ctx.shape}, expected [S, {cross}]")
        else:
            ctx = np.random.default_rng(context_seed).standard_normal(
                (int(context_tokens), cross)).astype(np.float32)
        self.context = ctx

    @functools.cached_property
    def _boxed_template(self):
        args, kwargs = self.unet.dummy_inputs()
        return jax.eval_shape(lambda: self.unet.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]

    # ----------------------------------------------------------------- task protocol
    def init_params(self, rng, batch_spec=None) -> dict:
        """``{"lora": ...}`` boxed with its base kernels' logical axes (mesh sharding)."""
        lora = L.init(rng, self.unet_params, self.targets, self.rank, self.alpha)
        return {"lora": L.logical_partitioning(lora, self._boxed_template)}

    def param_labels(self, params):
        return {"lora": L.param_labels(params["lora"])}

    def latents(self, images: jax.Array) -> jax.Array:
        """``[N, H, W, 3]`` in [0, 1] -> diffusion inputs (VAE mean x scaling factor)."""
        x = images.astype(jnp.float32) * 2.0 - 1.0
        if self.vae is None:
            return x
        post = self.vae.apply({"params": self.vae_params}, x, method="encode")
        return jax.lax.stop_gradient(post.mean * self.vae.scaling_factor)

    def denoise(self, lora, x_t, time, scale: float = 1.0):
        ctx = jnp.broadcast_to(jnp.asarray(self.context), (x_t.shape[0],) + self.context.shape)
        return L.apply(self.unet, self.unet_params, lora, x_t, time, ctx, scale=scale)

    def loss_fn(self, params, batch, rng, step):
        if "video" in batch:
            v = batch["video"]
            images = v.reshape((-1,) + v.shape[2:])
        elif "image" in batch:
            images = batch["image"]
        else:
            raise InputError(f"lora_finetune needs 'image' or 'video' batches, got {sorted(batch)}")
        y = self.latents(images)
        loss, aux = denoising_loss(lambda x_t, t: self.denoise(params["lora"], x_t, t), y, rng,
                                   schedule=self.schedule, prediction_type=self.prediction_type)
        return loss, {"mse": jnp.mean(aux["per_example"])}
