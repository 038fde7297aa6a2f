"""Video denoiser training: fine-tune the motion modules (or all layers) of a video UNet.

:class:`VideoDenoiserTask` is the task ``video_denoiser`` of :data:`diffjax.train.task.TASKS`.
On a batch ``{"latents": [B, F, H, W, C], "context": [B, S, D] or [B, F, S, D]}`` it draws
one DDPM timestep per clip and per-frame noise, and regresses the UNet's prediction on the
target of its ``prediction_type`` (eps / v / x0, Ho et al. 2020 eq. 14; Salimans & Ho 2022
for v), optionally with Min-SNR weighting (Hang et al. 2023).

``train_only_temporal=True`` is AnimateDiff's motion-module training (Guo et al. 2024,
sec. 4.2): the spatial (image) layers stay frozen (``optax.set_to_zero``, no optimizer
state) and only the temporal layers (``motion_modules_*``, or ModelScope's ``temp_convs_*``
/ ``temp_attentions_*`` / ``transformer_in``) train.
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion.losses import min_snr
from diffjax.errors import InputError
from diffjax.train.optim import path_labels
from diffjax.train.task import Task


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> np.ndarray:
    """``alpha_bar_t`` of SD's / ModelScope's / AnimateDiff's "scaled_linear" DDPM schedule."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                        dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


class VideoDenoiserTask(Task):
    """Denoising loss of a video UNet (see the module docstring).

    Args:
      model_config: the diffusers config of the UNet (``UNet3DConditionModel`` or
        ``UNetMotionModel``); or give ``unet2d_config`` + ``adapter_config`` to build a
        motion UNet as ``UNetMotionModel.from_unet2d`` does.
      class_name: the model class when ``model_config`` is given.
      train_only_temporal: freeze every spatial parameter.
      min_snr_gamma: Min-SNR-gamma weighting (0 = constant weights).
      remat: gradient checkpointing of every resnet / transformer.
    """

    def __init__(self, model_config: Mapping[str, Any] | None = None,
                 class_name: str = "UNetMotionModel", unet2d_config: Mapping | None = None,
                 adapter_config: Mapping | None = None, train_only_temporal: bool = True,
                 min_snr_gamma: float = 0.0, num_train_timesteps: int = 1000,
                 remat: bool = False):
        from diffjax.models.unet3d import UNet3DConditionModel, UNetMotionModel

        if unet2d_config is not None:
            self.model = UNetMotionModel.from_unet2d(unet2d_config, adapter_config, remat=remat)
        elif model_config is not None:
            classes = {"UNetMotionModel": UNetMotionModel,
                       "UNet3DConditionModel": UNet3DConditionModel}
            if class_name not in classes:
                raise InputError(f"video_denoiser: class_name must be one of {sorted(classes)}")
            self.model = classes[class_name].from_config(model_config, remat=remat)
        else:
            raise InputError("video_denoiser needs model_config or unet2d_config (+ adapter_config)")
        self.train_only_temporal = train_only_temporal
        self.weighting = min_snr(min_snr_gamma) if min_snr_gamma else None
        self.alphas_cumprod = scaled_linear_alphas_cumprod(num_train_timesteps)

    def init_params(self, rng, batch_spec: Mapping[str, Any]):
        lat, ctx = batch_spec["latents"], batch_spec["context"]
        x = jnp.zeros((1,) + tuple(lat.shape[1:]), jnp.float32)
        c = jnp.zeros((1,) + tuple(ctx.shape[1:]), jnp.float32)
        return self.model.init({"params": rng}, x, jnp.zeros((1,)), c)["params"]

    def loss_fn(self, params, batch, rng, step):
        x0 = jnp.asarray(batch["latents"], jnp.float32)
        chex.assert_rank(x0, 5)
        k_t, k_eps = jax.random.split(rng)
        b = x0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, len(self.alphas_cumprod))
        abar = jnp.asarray(self.alphas_cumprod)[t][:, None, None, None, None]
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
        pred = self.model.apply({"params": params}, x_t, t.astype(jnp.float32),
                                batch["context"]).astype(jnp.float32)
        kind = self.model.prediction_type
        target = {"epsilon": eps, "sample": x0,
                  "v_prediction": jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0}[kind]
        per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3, 4))
        if self.weighting is not None:
            logsnr = jnp.log(abar[:, 0, 0, 0, 0] / (1.0 - abar[:, 0, 0, 0, 0]))
            per_example = per_example * self.weighting(logsnr, kind)
        loss = jnp.mean(per_example)
        return loss, {"mse": jnp.mean(jnp.square(pred - target))}

    def param_labels(self, params):
        if not self.train_only_temporal:
            return None
        from diffjax.models.unet3d import TEMPORAL_PATTERN

        return path_labels(params, train_only=[TEMPORAL_PATTERN])
