"""The trainable networks of the foundation codec: P(y, lambda), the adaptive quantiser and
the latent hyperprior.

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

from diffjax.entropy.models import DEFAULT_SCALE_TABLE, EntropyBottleneck, GaussianConditional
from diffjax.models.hyperprior import conv as hp_conv, deconv as hp_deconv
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


# ---------------------------------------------------------------------------- entropy model


class LatentHyperprior(nn.Module):
    """Scale hyperprior (Balle et al., ICLR 2018, fig. 4) over the grid-domain latent ``z``.

    ``w = h_a(|z|)`` (conv3 s1, conv5 s2, conv5 s2 with ReLUs; total stride 4) is coded
    with the factorized :class:`~diffjax.entropy.models.EntropyBottleneck`; ``sigma =
    h_s(w_hat)`` (two stride-2 transposed convs, conv3, ReLU) are the scales of the
    zero-mean :class:`~diffjax.entropy.models.GaussianConditional` of ``z``. ``z`` itself is
    coded as the integers ``round(z)`` (no mean offset), so the transmitted symbols are
    exactly the grid of :func:`quantize_latent`. Layers are CompressAI's (``conv``/``deconv``
    of :mod:`diffjax.models.hyperprior`).
    """

    channels: int
    hyper_channels: int = 64
    scale_table: tuple = DEFAULT_SCALE_TABLE
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = self.hyper_channels
        self.h_a = [hp_conv(n, 3, 1, **kw), hp_conv(n, **kw), hp_conv(n, **kw)]
        self.h_s = [hp_deconv(n, **kw), hp_deconv(n, **kw), hp_conv(self.channels, 3, 1, **kw)]
        self.entropy_bottleneck = EntropyBottleneck(n, **kw)
        self.gaussian_conditional = GaussianConditional(self.scale_table)

    def hyper_analysis(self, z: jax.Array) -> jax.Array:
        """``z [B, h, w, C]`` (h, w multiples of 4) -> ``w [B, h/4, w/4, N]``."""
        h = jnp.abs(z).astype(self.dtype)
        for i, layer in enumerate(self.h_a):
            h = layer(h)
            if i < len(self.h_a) - 1:
                h = nn.relu(h)
        return h

    def hyper_synthesis(self, w_hat: jax.Array) -> jax.Array:
        """``w_hat`` -> scales ``[B, 4 h', 4 w', C]`` of ``z`` (float32)."""
        h = w_hat.astype(self.dtype)
        for layer in self.h_s:
            h = nn.relu(layer(h))
        return h.astype(jnp.float32)

    def w_medians(self) -> jax.Array:
        return self.entropy_bottleneck.medians()

    def table_indexes(self, scales: jax.Array) -> jax.Array:
        return self.gaussian_conditional.table_indexes(scales)

    def aux_loss(self) -> jax.Array:
        return self.entropy_bottleneck.aux_loss()

    def __call__(self, z: jax.Array, *, train: bool, mode: str | None = None):
        """``z`` (continuous, grid units) -> ``(z_hat, {"z": lik, "w": lik})``.

        ``mode`` as :func:`diffjax.entropy.quantize.quantize` (default: ``"noise"`` when
        training, ``"round"`` otherwise); noise comes from the ``"noise"`` RNG stream.
        """
        w = self.hyper_analysis(z)
        w_hat, w_lik = self.entropy_bottleneck(w, train=train, mode=mode)
        scales = self.hyper_synthesis(w_hat)
        z_hat, z_lik = self.gaussian_conditional(z.astype(jnp.float32), scales, train=train,
                                                 mode=mode)
        return z_hat, {"z": z_lik, "w": w_lik}


class FoundationModel(nn.Module):
    """The trainable part of the foundation codec: :class:`ParamEstimator` + :class:`LatentHyperprior`.

    ``__call__(y, lam, train=...)`` runs ``gamma, t = P(y, lam)``, ``z = T(y, gamma)``,
    quantises ``z`` through the entropy model and returns ``{"gamma", "t", "z_hat", "y_hat",
    "likelihoods"}`` with ``y_hat = T^-1(z_hat, gamma)``. The frozen VAE and denoiser live
    in :class:`diffjax.codecs.foundation.Backbone`.
    """

    latent_channels: int
    estimator_features: Sequence[int] = (64, 128, 256)
    hyper_channels: int = 64
    lambda_scale: float = 0.05
    init_t: float = 0.05
    init_log_scale: float = 0.0
    train_quantization: str = "noise"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.estimator = ParamEstimator(self.latent_channels, tuple(self.estimator_features),
                                        self.lambda_scale, self.init_t, self.init_log_scale, **kw)
        # float32 always: encoder and decoder must pick the same scale-table rows
        self.entropy = LatentHyperprior(self.latent_channels, self.hyper_channels,
                                        param_dtype=self.param_dtype)

    def estimate(self, y: jax.Array, lam) -> tuple[jax.Array, jax.Array]:
        return self.estimator(y, lam)

    def __call__(self, y: jax.Array, lam, *, train: bool) -> dict:
        gamma, t = self.estimator(y, lam)
        z = affine_forward(y, gamma)
        z_hat, likelihoods = self.entropy(z, train=train,
                                          mode=self.train_quantization if train else "round")
        return {"gamma": gamma, "t": t, "z_hat": z_hat, "y_hat": affine_inverse(z_hat, gamma),
                "likelihoods": likelihoods}
