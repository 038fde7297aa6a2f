"""Timestep embeddings of the Stable Diffusion UNet.

:func:`timestep_embedding` is the sinusoidal embedding of DDPM (Ho et al. 2020, appendix B,
after Vaswani et al. 2017, sec. 3.5) exactly as diffusers' ``get_timestep_embedding``
computes it; :class:`TimestepEmbedding` is the two-layer MLP that follows it
(``linear_1 -> act -> linear_2``).
"""
from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from diffjax.nn.layers import activation, dense

Dtype = Any


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding ``[B] -> [B, dim]`` in float32.

    ``freq_k = exp(-log(max_period) * k / (dim // 2 - freq_shift))``; the output is
    ``[sin(t freq), cos(t freq)]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero padded
    when ``dim`` is odd. Timesteps may be fractional.
    """
    timesteps = jnp.asarray(timesteps, jnp.float32)
    chex.assert_rank(timesteps, 1)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps[:, None] * jnp.exp(exponent)[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> act -> linear_2 [-> post_act]`` (diffusers ``TimestepEmbedding``).

    Attributes:
      time_embed_dim: width of ``linear_1``.
      out_dim: width of ``linear_2`` (defaults to ``time_embed_dim``).
    """

    time_embed_dim: int
    out_dim: int | None = None
    act_fn: str = "silu"
    post_act_fn: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """``x [B, D] -> [B, out_dim]``."""
        x = x.astype(self.dtype)
        x = dense(self.time_embed_dim, name="linear_1", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
        x = activation(self.act_fn)(x)
        x = dense(self.out_dim or self.time_embed_dim, name="linear_2", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
        if self.post_act_fn is not None:
            x = activation(self.post_act_fn)(x)
        return x
