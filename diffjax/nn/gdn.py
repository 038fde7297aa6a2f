"""Generalized divisive normalization (GDN) and its inverse (IGDN).

Ballé, Laparra & Simoncelli, "Density modeling of images using a generalized
normalization transformation", ICLR 2016, eq. 1 (the simplified form used by the
hyperprior codecs)::

    GDN:   y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)
    IGDN:  y_i = x_i * sqrt(beta_i + sum_j gamma_ij x_j^2)

``beta`` and ``gamma`` are stored reparametrised so they stay non-negative during
training (Ballé et al. 2017, "End-to-end optimized image compression", appendix 6.1):
``beta = max(beta_raw, sqrt(beta_min + p))^2 - p`` with the pedestal
``p = reparam_offset^2``. This is CompressAI's ``NonNegativeParametrizer``; the parameter
values port across unchanged (``gamma`` is stored ``[C_in, C_out]`` here, the transpose
of CompressAI's ``[C_out, C_in]``).

The normalization is computed in float32 whatever ``dtype`` is.
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.entropy.quantize import lower_bound

Dtype = Any


def nonnegative(raw: jax.Array, minimum: float, reparam_offset: float) -> jax.Array:
    """Ballé's non-negative reparametrisation ``max(raw, bound)^2 - pedestal``."""
    pedestal = reparam_offset**2
    bound = (minimum + pedestal) ** 0.5
    return lower_bound(raw, bound) ** 2 - pedestal


def nonnegative_init(value: jax.Array, reparam_offset: float) -> jax.Array:
    """Inverse of :func:`nonnegative` for initial values: ``sqrt(max(v + p, p))``."""
    pedestal = reparam_offset**2
    return jnp.sqrt(jnp.maximum(value + pedestal, pedestal))


class GDN(nn.Module):
    """GDN (or IGDN with ``inverse=True``) over the last axis of ``[..., C]`` inputs.

    Parameters: ``beta`` ``[C]`` and ``gamma`` ``[C_in, C_out]`` (reparametrised).
    """

    inverse: bool = False
    beta_min: float = 1e-6
    gamma_init: float = 0.1
    reparam_offset: float = 2.0**-18
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        beta_raw = self.param(
            "beta",
            lambda key, shape, dtype: nonnegative_init(jnp.ones(shape, dtype), self.reparam_offset),
            (channels,),
            self.param_dtype,
        )
        gamma_raw = self.param(
            "gamma",
            lambda key, shape, dtype: nonnegative_init(
                self.gamma_init * jnp.eye(shape[0], dtype=dtype), self.reparam_offset
            ),
            (channels, channels),
            self.param_dtype,
        )
        chex.assert_shape(gamma_raw, (channels, channels))
        beta = nonnegative(beta_raw.astype(jnp.float32), self.beta_min, self.reparam_offset)
        gamma = nonnegative(gamma_raw.astype(jnp.float32), 0.0, self.reparam_offset)
        x32 = x.astype(jnp.float32)
        norm = jnp.einsum("...i,io->...o", x32 * x32, gamma, precision="highest") + beta
        scale = jnp.sqrt(norm) if self.inverse else jax.lax.rsqrt(norm)
        return (x32 * scale).astype(self.dtype)
