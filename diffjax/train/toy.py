"""A tiny stochastic autoencoder task, for tests and for checking a training setup.

It has what the real codecs have, at a size that trains in seconds on CPU: a strided
conv encoder, additive uniform noise on the latent during training (the quantisation
proxy of Ballé et al. 2017, drawn from the ``"noise"`` RNG stream), a transposed-conv
decoder, a logically partitioned parameter (so fsdp sharding is exercised) and a
rate-like penalty. Not a compression model: use the codecs for that.
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.train.optim import path_labels
from diffjax.train.task import Task


class ToyAutoencoder(nn.Module):
    """``[B, H, W, 3]`` -> ``(x_hat [B, H, W, 3], y [B, H/2, W/2, latent])``."""

    channels: int = 8
    latent: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        kinit = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                             (None, None, "conv_in", "conv_out"))
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=kinit, name="enc0")(x)
        h = nn.gelu(h)
        y = nn.Conv(self.latent, (3, 3), strides=(2, 2), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="enc1")(h)
        if train:
            y_tilde = y + jax.random.uniform(self.make_rng("noise"), y.shape, y.dtype, -0.5, 0.5)
        else:
            y_tilde = jnp.round(y)
        h = nn.ConvTranspose(self.channels, (3, 3), strides=(2, 2), dtype=self.dtype,
                             param_dtype=self.param_dtype, name="dec0")(y_tilde)
        h = nn.gelu(h)
        x_hat = nn.Conv(3, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="dec1")(h)
        return x_hat, y_tilde


class ToyAutoencoderTask(Task):
    """Loss = MSE(x, x_hat) + ``rate_weight`` * mean |y~| on ``batch["image"]``.

    ``freeze``: path regexes of frozen parameters (e.g. ``["^enc"]``), for testing
    partial training.
    """

    def __init__(self, channels: int = 8, latent: int = 4, rate_weight: float = 0.01,
                 freeze: tuple[str, ...] = ()):
        self.model = ToyAutoencoder(channels=channels, latent=latent)
        self.rate_weight = rate_weight
        self.freeze = tuple(freeze)

    def init_params(self, rng, batch_spec: Mapping[str, Any]):
        x = jnp.zeros((1,) + tuple(batch_spec["image"].shape[1:]), jnp.float32)
        return self.model.init({"params": rng}, x, train=False)["params"]

    def loss_fn(self, params, batch, rng, step):
        x = batch["image"]
        chex.assert_rank(x, 4)
        x_hat, y = self.model.apply({"params": params}, x, train=True, rngs={"noise": rng})
        mse = jnp.mean(jnp.square(x_hat.astype(jnp.float32) - x))
        rate = jnp.mean(jnp.abs(y.astype(jnp.float32)))
        return mse + self.rate_weight * rate, {"mse": mse, "rate": rate}

    def param_labels(self, params):
        return path_labels(params, freeze=self.freeze) if self.freeze else None
