"""ControlNet training on a frozen Stable Diffusion UNet (Zhang et al. 2023, sec. 3.3-3.4).

The objective is the latent diffusion loss of the frozen UNet with the ControlNet's
residuals added (eq. 5): ``L = E || target - eps_theta(z_t, t, c_text, c_f) ||^2`` with
``z_0 = E_vae(x)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``, ``t ~ U{0..N-1}``
(the training timesteps of the scheduler config), and the target in the UNet's
prediction type (eps / v / x0). Only the ControlNet trains: the VAE, the UNet and the text
context are frozen parameters (label ``"frozen"``: no optimiser state, gradients stopped).
The condition images ``c_f`` come from the pipeline's extractors
(:mod:`diffjax.input.conditions`: canny, low-resolution colour optionally H.26x-coded,
depth from files) as ``batch["cond"]`` beside ``batch["image"]``.

The ControlNet starts as :func:`diffjax.models.controlnet.from_unet` of the frozen UNet
(zero convolutions at zero: step 0 is the plain UNet), or from a converted ControlNet
(``controlnet_path``). Text: this project has no text encoder; the context is a stored
empty-prompt embedding (``context_path``) or zeros -- the paper's 50 % empty-prompt
training is then the 100 % case. Resume is exact (the loop's guarantee: the state holds
everything and the conditioned pipeline is a pure function of seed and step).

``config.task.kwargs``: ``vae`` ("sd" or "taesd"), ``vae_config``, ``unet_config``,
``scheduler_config``, ``pretrained`` (a ``diffjax convert`` SD pipeline directory),
``unet_path``, ``taesd_encoder`` / ``taesd_decoder``, ``context_path``, ``controlnet_path``,
``conditioning_embedding_out_channels``, ``conditioning_channels``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.foundation import Backbone, host_params
from diffjax.diffusion.losses import denoising_loss
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.errors import InputError
from diffjax.models.controlnet import (ControlNetModel, check_compatible,
                                       controlnet_for_unet, from_unet)
from diffjax.train.optim import FROZEN, TRAINABLE
from diffjax.train.task import Task

TASK_NAME = "controlnet"


class ControlNetTask(Task):
    """Train a ControlNet on (image, condition) pairs with a frozen VAE and UNet."""

    per_example_rng = True

    def __init__(self, vae: str = "sd", vae_config: Mapping | None = None,
                 unet_config: Mapping | None = None, scheduler_config: Mapping | None = None,
                 pretrained: str | None = None, unet_path: str | None = None,
                 taesd_encoder: str | None = None, taesd_decoder: str | None = None,
                 context_path: str | None = None, controlnet_path: str | None = None,
                 conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                 conditioning_channels: int = 3):
        from diffjax.convert.core import read_model_config

        if pretrained:
            vae_config = read_model_config(f"{pretrained}/vae")["config"]
            unet_config = read_model_config(f"{pretrained}/unet")["config"]
        elif unet_path:
            unet_config = read_model_config(unet_path)["config"]
        if vae_config is None or unet_config is None or scheduler_config is None:
            raise InputError("the controlnet task needs the SD backbone: set pretrained (a "
                             "`diffjax convert` SD directory) or vae_config + unet_config, "
                             "and scheduler_config")
        self.backbone = Backbone(vae, vae_config, unet_config, scheduler_config)
        self.schedule = DiscreteSchedule.from_config(self.backbone.scheduler_config)
        self.paths = dict(pretrained=pretrained, unet_path=unet_path, context_path=context_path,
                          taesd_encoder=taesd_encoder, taesd_decoder=taesd_decoder,
                          controlnet_path=controlnet_path)
        if controlnet_path:
            self.controlnet = ControlNetModel.from_config(
                read_model_config(controlnet_path)["config"])
        else:
            self.controlnet = controlnet_for_unet(
                self.backbone.unet,
                conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                conditioning_channels=int(conditioning_channels))
        check_compatible(self.controlnet, self.backbone.unet)
        if self.controlnet.condition_factor != self.backbone.vae_factor:
            raise InputError(f"the ControlNet's condition encoder downsamples by "
                             f"{self.controlnet.condition_factor}, the autoencoder by "
                             f"{self.backbone.vae_factor}: conditions would not match the "
                             "latents (set conditioning_embedding_out_channels)")

    # ----------------------------------------------------------------- params
    def _frozen_loaders(self) -> dict:
        from diffjax.codecs.foundation import backbone_loaders

        return backbone_loaders(self.paths)

    def init_params(self, rng, batch_spec=None) -> dict:
        """``{"controlnet", "unet", "vae"[, "context"]}``; the last ones frozen.

        Without paths the backbone is random (smoke runs and tests), drawn on the host.
        """
        shapes, loaders = self.backbone.param_shapes(), self._frozen_loaders()
        params = {}
        for name in ("vae", "unet"):
            load = loaders.get(name) or (lambda n=name: self.backbone.random_params()[n])
            params[name] = host_params(shapes[name], load)
        if self.paths["controlnet_path"]:
            import flax

            from diffjax.convert.core import load_pretrained, param_template

            shapes_cn = flax.traverse_util.unflatten_dict(param_template(self.controlnet))
            params["controlnet"] = host_params(
                shapes_cn, lambda: load_pretrained(self.paths["controlnet_path"])[1])
        else:
            _, params["controlnet"] = from_unet(
                self.backbone.unet, params["unet"], rng,
                conditioning_embedding_out_channels=self.controlnet.conditioning_embedding_out_channels,
                conditioning_channels=self.controlnet.conditioning_channels)
        if self.paths["context_path"]:
            ctx = np.load(self.paths["context_path"])
            dim = self.backbone.cross_attention_dim
            if ctx.ndim != 3 or ctx.shape[0] != 1 or ctx.shape[2] != dim:
                raise InputError(f"context {self.paths['context_path']} has shape {ctx.shape}, "
                                 f"expected [1, S, {dim}]")
            params["context"] = jnp.asarray(ctx, jnp.float32)
        return params

    def param_labels(self, params):
        return {k: jax.tree.map(lambda _: TRAINABLE if k == "controlnet" else FROZEN, v)
                for k, v in params.items()}

    # ----------------------------------------------------------------- loss
    def guided_unet(self, params, y_t, timesteps, context, cond):
        """The frozen UNet's output with the ControlNet's residuals (scale 1)."""
        down, mid = self.controlnet.apply({"params": params["controlnet"]}, y_t, timesteps,
                                          context, cond)
        return self.backbone.unet.apply({"params": params["unet"]}, y_t, timesteps, context,
                                        down_block_additional_residuals=down,
                                        mid_block_additional_residual=mid)

    def loss_fn(self, params, batch, rng, step):
        if "cond" not in batch:
            raise InputError("the controlnet task needs {'image', 'cond'} batches: use "
                             "config.data.kind = 'conditioned_images'")
        frozen = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k != "controlnet"}
        params = {**params, **frozen}
        bb = self.backbone
        y = jax.lax.stop_gradient(bb.encode(params["vae"], batch["image"]))
        ctx = bb.context(params, y.shape[0])

        def denoise(y_t, timesteps, c):
            return self.guided_unet(params, y_t, timesteps, c["context"], c["cond"])

        loss, aux = denoising_loss(denoise, y, rng, schedule=self.schedule,
                                   prediction_type=bb.prediction_type,
                                   cond={"context": ctx, "cond": batch["cond"]})
        return loss, {"mse": jnp.mean(aux["per_example"]),
                      "t": jnp.mean(aux["t"].astype(jnp.float32))}
