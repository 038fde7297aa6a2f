"""Rate-distortion training of the hyperprior models (CompressAI recipe).

Loss (Ballé et al. 2018, eq. 13, as CompressAI's ``RateDistortionLoss``)::

    L = bpp + λ · 255² · MSE(x, x̂)        (x in [0, 1], MSE in float32)

plus the entropy bottleneck's auxiliary loss, which only reaches the ``quantiles``
parameters (it fits the learned tail quantiles used for coding). CompressAI trains those
with a separate Adam at lr 1e-3; here the quantiles carry the optimizer label ``"aux"``
so ``config.optimizer.groups.aux.learning_rate`` gives them their own rate within one
``optax.multi_transform``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from diffjax.train.optim import TRAINABLE, path_labels
from diffjax.train.task import Task


class RateDistortionTask(Task):
    """Train ``diffjax.models.hyperprior.HyperpriorModel(N, M, mean_scale)`` at ``lmbda``.

    ``lmbda`` follows CompressAI's quality table (0.0018 ... 0.0483 for q1..q8).
    """

    def __init__(self, N: int = 128, M: int = 192, mean_scale: bool = True,
                 lmbda: float = 0.0130, aux_weight: float = 1.0,
                 train_quantization: str = "noise"):
        from diffjax.models.hyperprior import HyperpriorModel

        self.model = HyperpriorModel(N=N, M=M, mean_scale=mean_scale,
                                     train_quantization=train_quantization)
        self.lmbda = float(lmbda)
        self.aux_weight = float(aux_weight)

    codec_name = "hyperprior"

    def codec_kwargs(self) -> dict:
        m = self.model
        return {"N": m.N, "M": m.M, "mean_scale": m.mean_scale}

    def provenance(self) -> dict:
        return {"lmbda": self.lmbda}

    def init_params(self, rng, batch_spec: Mapping[str, Any]):
        x = jnp.zeros((1,) + tuple(batch_spec["image"].shape[1:]), jnp.float32)
        rng, noise = jax.random.split(rng)
        return self.model.init({"params": rng, "noise": noise}, x, train=False)["params"]

    def loss_fn(self, params, batch, rng, step):
        from diffjax.models.hyperprior import rate_distortion_loss

        x = batch["image"]
        out = self.model.apply({"params": params}, x, train=True, rngs={"noise": rng})
        loss, metrics = rate_distortion_loss(out, x, self.lmbda)
        aux = self.model.apply({"params": params}, method="aux_loss")
        metrics = {"bpp": metrics["bpp"], "mse": metrics["mse"], "rd_loss": loss, "aux_loss": aux,
                   "psnr": -10.0 * jnp.log10(jnp.maximum(metrics["mse"], 1e-10))}
        return loss + self.aux_weight * aux, metrics

    def param_labels(self, params):
        base = jax.tree_util.tree_map_with_path(
            lambda path, _: "aux" if "quantiles" in jax.tree_util.keystr(path) else TRAINABLE,
            params)
        return path_labels(params, base=base)
