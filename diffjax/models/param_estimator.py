"""Parameter estimation network P(y, lambda) and the adaptive quantiser of the foundation codec.

Relic et al., "Lossy Image Compression with Foundation Diffusion Models" (ECCV 2024), treat
the quantisation error of a diffusion model's latent as diffusion noise. A small CNN looks at
the latent ``y = E_vae(x)`` and the rate-distortion weight ``lambda`` and predicts

* ``gamma``: a per-channel affine transform (2 numbers per latent channel) that sets how
  finely each channel is quantised, and
* ``t`` in ``[0, 1]``: the diffusion time whose noise level the quantisation error matches,
  i.e. where the frozen diffusion model starts denoising at the decoder.

Network (fully convolutional, so any latent size works): ``[y, lambda * lambda_scale]``
(lambda broadcast spatially as one extra input channel) -> for each width ``w`` in
``features`` (widening with depth): ``conv3x3 stride 2 -> SiLU -> conv3x3 -> SiLU`` ->
global mean pooling -> a linear layer to ``2 C + 1`` numbers -> ``gamma = (log_scale,
shift)`` per channel and ``t = sigmoid(.)``. Outputs are float32 whatever the compute dtype.

Affine transform, on the quantisation grid (``s = exp(log_scale)``, per channel)::

    T(y, gamma)      = s * y + shift                 (analysis side, before rounding)
    T^-1(z, gamma)   = (z - shift) / s               (synthesis side, after decoding z)
    z = round(T(y, gamma)),   y_hat = T^-1(z, gamma)

so the quantisation error of ``y_hat`` is uniform with width ``1 / s`` per channel.
``quantize_latent(dequantize_latent(z, g), g) == z`` exactly for integer ``z`` (tested): a
decoder that re-quantises its input reproduces the transmitted symbols.
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.entropy.quantize import quantize as _quantize
from diffjax.nn.layers import conv2d

Dtype = Any

# |log_scale| is clipped so exp() stays finite and T stays invertible in float32.
MAX_LOG_SCALE = 8.0


class ParamEstimator(nn.Module):
    """``P(y, lambda) -> (gamma [B, 2, C], t [B])`` (Relic et al. 2024, sec. 3.2).

    Attributes:
      latent_channels: ``C``, channels of the diffusion latent.
      features: widths of the stride-2 stages (widening with depth).
      lambda_scale: the lambda input channel is ``lambda * lambda_scale`` (keeps the
        training lambdas {1, 5, 10, 20} near unit range).
      init_t: ``t`` predicted at initialisation (the output bias is ``logit(init_t)``);
        Relic et al. decode with 2-7 % of the process.
      init_log_scale: ``log s`` at initialisation (0: plain rounding of ``y``).
    """

    latent_channels: int
    features: Sequence[int] = (64, 128, 256)
    lambda_scale: float = 0.05
    init_t: float = 0.05
    init_log_scale: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array, lam) -> tuple[jax.Array, jax.Array]:
        """``y [B, h, w, C]``, ``lam`` scalar or ``[B]`` -> ``gamma [B, 2, C]``, ``t [B]``."""
        chex.assert_rank(y, 4)
        chex.assert_axis_dimension(y, 3, self.latent_channels)
        b, c = y.shape[0], self.latent_channels
        lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (b,))
        lam_map = jnp.broadcast_to((lam * self.lambda_scale)[:, None, None, None],
                                   y.shape[:3] + (1,))
        h = jnp.concatenate([y.astype(jnp.float32), lam_map], axis=-1).astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, width in enumerate(self.features):
            h = nn.silu(conv2d(width, stride=2, name=f"down_{i}", **kw)(h))
            h = nn.silu(conv2d(width, name=f"conv_{i}", **kw)(h))
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # global mean pooling
        bias = jnp.concatenate([
            jnp.full((c,), self.init_log_scale), jnp.zeros((c,)),
            jnp.full((1,), jnp.log(self.init_t) - jnp.log1p(-self.init_t))])
        out = nn.Dense(2 * c + 1, dtype=jnp.float32, param_dtype=self.param_dtype,
                       # small (not zero) so every layer gets gradients from step 0
                       kernel_init=nn.initializers.variance_scaling(1e-4, "fan_in", "normal"),
                       bias_init=lambda *_: bias.astype(self.param_dtype), name="head")(pooled)
        gamma = out[:, :2 * c].reshape(b, 2, c)
        t = jax.nn.sigmoid(out[:, 2 * c])
        chex.assert_shape(gamma, (b, 2, c))
        chex.assert_shape(t, (b,))
        return gamma, t


# ---------------------------------------------------------------------------- affine quantiser


def _scale_shift(gamma: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """``gamma [B, 2, C]`` -> ``(log_scale, shift)`` broadcastable to ``[B, ..., C]``."""
    chex.assert_rank(gamma, 3)
    chex.assert_axis_dimension(gamma, 1, 2)
    gamma = jnp.asarray(gamma, jnp.float32)
    expand = (slice(None),) + (None,) * (ndim - 2) + (slice(None),)
    log_scale = jnp.clip(gamma[:, 0], -MAX_LOG_SCALE, MAX_LOG_SCALE)[expand]
    return log_scale, gamma[:, 1][expand]


def affine_forward(y: jax.Array, gamma: jax.Array) -> jax.Array:
    """``T(y, gamma) = exp(log_scale) * y + shift`` per channel (float32)."""
    log_scale, shift = _scale_shift(gamma, y.ndim)
    return jnp.asarray(y, jnp.float32) * jnp.exp(log_scale) + shift


def affine_inverse(z: jax.Array, gamma: jax.Array) -> jax.Array:
    """``T^-1(z, gamma) = (z - shift) * exp(-log_scale)`` per channel (float32)."""
    log_scale, shift = _scale_shift(gamma, z.ndim)
    return (jnp.asarray(z, jnp.float32) - shift) * jnp.exp(-log_scale)


def quantize_latent(y: jax.Array, gamma: jax.Array) -> jax.Array:
    """Symbols the entropy coder writes: ``round(T(y, gamma))`` as int32 ``[B, h, w, C]``."""
    return jnp.round(affine_forward(y, gamma)).astype(jnp.int32)


def dequantize_latent(z: jax.Array, gamma: jax.Array) -> jax.Array:
    """``y_hat = T^-1(z, gamma)`` from decoded integer symbols ``z``."""
    return affine_inverse(z, gamma)


def quantize_for_training(y: jax.Array, gamma: jax.Array, mode: str = "noise", *,
                          rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Differentiable stand-in for ``round(T(y))`` during training.

    Returns ``(z_rate, z_decoder, y_hat)``: ``z_rate`` is where the entropy model's
    likelihood is evaluated, ``z_decoder`` the (straight-through) rounded symbols and
    ``y_hat = T^-1(z_decoder)`` what the diffusion model sees. ``mode`` is one of
    :data:`diffjax.entropy.quantize.MODES`.

    The default ``"noise"`` (Balle et al. 2017) gives ``y_hat = y + u / s`` with
    ``u ~ U(-1/2, 1/2)``: the "quantisation error as diffusion noise" view of Relic et al.;
    the distortion gradient reaches ``log s`` as ``d y_hat / d log s = -u / s``. With
    straight-through rounding (``"ste"``/``"mixed"``) it is ``y - y_hat`` (the actual
    rounding error), so both proxies train ``gamma`` through the distortion term too.
    """
    z = affine_forward(y, gamma)
    z_rate, z_dec = _quantize(z, mode, rng=rng)
    return z_rate, z_dec, affine_inverse(z_dec, gamma)
