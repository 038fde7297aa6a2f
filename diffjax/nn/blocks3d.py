"""3-D convolution blocks for the video diffusion autoencoder (Rampas 2024, sec. 3.4.1).

Rampas ("On Neural Compression using Diffusion Autoencoders", 2024, sec. 3.4.1) extends the
image diffusion autoencoder to video by replacing the decoder UNet's 2-D convolutions with
3-D ones and by compressing the latent along time: a 1x1x1 convolution followed by average
pooling over ``f_t`` frames (``f_t`` = 2, 4 or 8), undone on the decoder side by learned
"deflate" layers. The parts, all on NTHWC video ``[B, T, H, W, C]``:

* :func:`conv3d` - a ``nn.Conv`` matching PyTorch ``nn.Conv3d`` (symmetric zero padding).
* :class:`ResnetBlock3D` - the DDPM/LDM pre-activation ResNet block (Ho et al. 2020,
  appendix B) with 3x3x3 convolutions: ``GN -> SiLU -> conv -> (+ time embedding) -> GN ->
  SiLU -> dropout -> conv`` plus a 1x1x1 shortcut when the width changes. GroupNorm
  statistics cover frames and pixels.
* :class:`SpatialDownsample3D` / :class:`SpatialUpsample3D` - stride 2 (nearest x2) in
  ``H, W`` only; the frame count is unchanged. The 3x3x3 kernel still mixes neighbouring
  frames, as every convolution of the 3-D UNet does.
* :class:`TemporalCompress` - ``conv1x1x1`` then average pooling over ``f_t`` consecutive
  frames: ``[B, T, H, W, C] -> [B, T / f_t, H, W, C']``.
* :class:`TemporalDeflate` - the learned inverse: a ``conv1x1x1`` to ``f_t * C`` channels
  whose channel groups become the ``f_t`` frames of each compressed step (a sub-pixel
  shuffle along time, Shi et al. 2016): ``[B, T / f_t, H, W, C'] -> [B, T, H, W, C]``.
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from diffjax.errors import InputError
from diffjax.nn.layers import activation, dense, group_norm
from diffjax.nn.temporal import CONV3D_AXES

Dtype = Any
TEMPORAL_FACTORS = (2, 4, 8)


def conv3d(features: int, *, name: str | None = None, dtype: Dtype, param_dtype: Dtype,
           kernel_size: int | Sequence[int] = 3, stride: int | Sequence[int] = 1,
           kernel_init=None) -> nn.Conv:
    """``nn.Conv`` over ``[B, T, H, W, C]`` with ``(k - 1) // 2`` zero padding per side."""
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    st = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    init = kernel_init or nn.linear.default_kernel_init
    return nn.Conv(features, kernel_size=ks, strides=st,
                   padding=tuple(((k - 1) // 2, (k - 1) // 2) for k in ks), dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(init, CONV3D_AXES))


def _check_video(x, what: str):
    if x.ndim != 5:
        raise InputError(f"{what} expects NTHWC video [B, T, H, W, C], got shape {x.shape}")


class ResnetBlock3D(nn.Module):
    """Pre-activation ResNet block with 3x3x3 convs (names as ``ResnetBlock2D``).

    ``x [B, T, H, W, Cin]``, optional ``temb [B, D]`` -> ``[B, T, H, W, out_channels]``.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    use_time_emb: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        _check_video(x, "ResnetBlock3D")
        act = activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = act(group_norm(self.groups, eps=self.eps, name="norm1",
                           param_dtype=self.param_dtype)(x)).astype(self.dtype)
        h = conv3d(self.out_channels, name="conv1", **kw)(h)
        if self.use_time_emb:
            if temb is None:
                raise InputError("ResnetBlock3D with use_time_emb=True needs a time embedding")
            t = dense(self.out_channels, name="time_emb_proj", **kw)(act(temb))
            h = h + t[:, None, None, None, :]
        h = act(group_norm(self.groups, eps=self.eps, name="norm2",
                           param_dtype=self.param_dtype)(h)).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
        h = conv3d(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv3d(self.out_channels, kernel_size=1, name="conv_shortcut", **kw)(x)
        return x.astype(self.dtype) + h


class SpatialDownsample3D(nn.Module):
    """3x3x3 conv with stride ``(1, 2, 2)``: ``[B, T, H, W, C] -> [B, T, ceil(H/2),
    ceil(W/2), out]``; time is not subsampled."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        _check_video(x, "SpatialDownsample3D")
        return conv3d(self.out_channels, stride=(1, 2, 2), name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)


class SpatialUpsample3D(nn.Module):
    """Nearest x2 in ``H, W`` then a 3x3x3 conv: ``[B, T, H, W, C] -> [B, T, 2H, 2W, out]``."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        _check_video(x, "SpatialUpsample3D")
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return conv3d(self.out_channels, name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)


def _check_factor(factor: int, frames: int, what: str):
    if factor not in TEMPORAL_FACTORS:
        raise InputError(f"{what}: temporal factor f_t must be one of {TEMPORAL_FACTORS}, "
                         f"got {factor}")
    if frames % factor:
        raise InputError(f"{what}: {frames} frames are not a multiple of f_t={factor}")


class TemporalCompress(nn.Module):
    """``conv1x1x1`` then average pooling over ``factor`` frames (Rampas 2024, sec. 3.4.1).

    ``[B, T, H, W, C] -> [B, T / factor, H, W, out_channels]``; ``T`` must be a multiple of
    ``factor`` (2, 4 or 8).
    """

    out_channels: int
    factor: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        _check_video(x, "TemporalCompress")
        b, t, h, w, _ = x.shape
        _check_factor(self.factor, t, "TemporalCompress")
        x = conv3d(self.out_channels, kernel_size=1, name="proj", dtype=self.dtype,
                   param_dtype=self.param_dtype)(x)
        pooled = x.astype(jnp.float32).reshape(b, t // self.factor, self.factor, h, w, -1)
        return jnp.mean(pooled, axis=2).astype(self.dtype)


class TemporalDeflate(nn.Module):
    """Learned inverse of :class:`TemporalCompress` ("deflate", Rampas 2024, sec. 3.4.1).

    A ``conv1x1x1`` to ``factor * out_channels`` channels; channel group ``k`` becomes frame
    ``k`` of each compressed step: ``[B, T', H, W, C'] -> [B, T' * factor, H, W, out]``.
    """

    out_channels: int
    factor: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        _check_video(z, "TemporalDeflate")
        _check_factor(self.factor, self.factor, "TemporalDeflate")
        b, t, h, w, _ = z.shape
        y = conv3d(self.factor * self.out_channels, kernel_size=1, name="proj",
                   dtype=self.dtype, param_dtype=self.param_dtype)(z)
        y = y.reshape(b, t, h, w, self.factor, self.out_channels)
        out = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, t * self.factor, h, w, self.out_channels)
        chex.assert_shape(out, (b, t * self.factor, h, w, self.out_channels))
        return out
