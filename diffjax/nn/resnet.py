"""ResNet block and resamplers of the Stable Diffusion UNet and VAE.

:class:`ResnetBlock2D` is the pre-activation residual block of DDPM (Ho et al. 2020,
appendix B; He et al. 2016) as used by LDM/Stable Diffusion (Rombach et al. 2022):
``GN -> act -> conv -> (+ time embedding) -> GN -> act -> dropout -> conv``, plus a 1x1
shortcut when the channel count changes. :class:`Downsample2D` / :class:`Upsample2D` are
the stride-2 conv and nearest-neighbour x2 + conv resamplers. Layout is NHWC.

With the CPU kernels on (:func:`diffjax.nn.cpu_kernels.use_cpu_kernels`, the CPU backend by
default) an exact x2 :class:`Upsample2D` of a larger map runs as :class:`NearestUpsampleConv`;
otherwise it upsamples and then convolves, as diffusers does.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffjax.errors import InputError
from diffjax.nn import cpu_kernels
from diffjax.nn.layers import CONV_AXES, activation, conv2d, dense, group_norm
# Names importable from here before the CPU kernels moved to ``diffjax.nn.cpu_kernels``.
from diffjax.nn.cpu_kernels import fold_taps as _fold_taps  # noqa: F401,E402
from diffjax.nn.layers import (CPU_PATCH_CONV_MAX_PIXELS, NHWC_DIMS,  # noqa: F401,E402
                               CpuFriendlyConv)

Dtype = Any


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (names: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut).

    Attributes:
      out_channels: output channels (the input width is read from the input).
      groups / groups_out: GroupNorm groups of norm1 / norm2 (``groups_out`` defaults to ``groups``).
      eps: GroupNorm epsilon.
      use_time_emb: whether a ``time_emb_proj`` exists (False in the VAE).
      time_embedding_norm: ``"default"`` (add) or ``"scale_shift"`` (FiLM after norm2).
      output_scale_factor: the sum ``shortcut + residual`` is divided by it.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    use_time_emb: bool = True
    time_embedding_norm: str = "default"
    skip_time_act: bool = False
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        """``x [B, H, W, Cin]``, ``temb [B, T]`` -> ``[B, H, W, out_channels]``."""
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise InputError(f"unsupported time_embedding_norm {self.time_embedding_norm!r}")
        act = activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = x
        h = group_norm(self.groups, eps=self.eps, name="norm1", param_dtype=self.param_dtype)(x)
        h = act(h).astype(self.dtype)
        h = conv2d(self.out_channels, name="conv1", **kw)(h)
        scale_shift = None
        if self.use_time_emb:
            if temb is None:
                raise InputError("ResnetBlock2D with use_time_emb=True needs a time embedding")
            t = temb if self.skip_time_act else act(temb)
            width = self.out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = dense(width, name="time_emb_proj", **kw)(t)[:, None, None, :]
            if self.time_embedding_norm == "default":
                h = h + t
            else:
                scale_shift = jnp.split(t, 2, axis=-1)
        h = group_norm(self.groups_out or self.groups, eps=self.eps, name="norm2",
                       param_dtype=self.param_dtype)(h)
        if scale_shift is not None:
            h = h * (1 + scale_shift[0]) + scale_shift[1]
        h = act(h).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
        h = conv2d(self.out_channels, name="conv2", **kw)(h)
        if shortcut.shape[-1] != self.out_channels:
            shortcut = conv2d(self.out_channels, kernel_size=1, name="conv_shortcut", **kw)(shortcut)
        out = shortcut.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 downsampling: a 3x3 conv named ``conv`` (or 2x2 average pooling).

    ``padding=1`` pads every side by one (UNet); ``padding=0`` pads only bottom/right by one
    before an unpadded conv (the LDM VAE encoder), as diffusers does.
    """

    out_channels: int
    use_conv: bool = True
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels]`` (conv path)."""
        if not self.use_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv2d(self.out_channels, stride=2, padding=pad, name="conv",
                      dtype=self.dtype, param_dtype=self.param_dtype)(x)


def nearest_upsample(x, size: Sequence[int] | None = None):
    """Nearest-neighbour upsampling of ``[B, H, W, C]`` by 2 or to ``size = (H', W')``.

    Uses PyTorch's ``F.interpolate(mode="nearest")`` index rule ``src = floor(dst * in / out)``
    (in float32, as torch does) so that odd target sizes match the reference exactly.
    """
    if size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = _nearest_index(x.shape[1], int(size[0]))
    cols = _nearest_index(x.shape[2], int(size[1]))
    return x[:, rows][:, :, cols]


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's nearest source index (float32 scale, ``floorf``, clamped), static."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


class Upsample2D(nn.Module):
    """Nearest x2 (or to ``output_size``) then a 3x3 conv named ``conv``.

    With the CPU kernels on (:func:`~diffjax.nn.cpu_kernels.use_cpu_kernels`), an exact x2
    of a map of more than 64 pixels runs as :class:`NearestUpsampleConv` (the same
    parameters, 2.25x fewer multiply-adds); otherwise (GPU/TPU, small maps, other output
    sizes) it upsamples first and then convolves, as diffusers does.
    """

    out_channels: int
    use_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: Sequence[int] | None = None):
        """``[B, H, W, C] -> [B, 2H, 2W, out_channels]`` (or ``output_size``)."""
        doubling = output_size is None or tuple(output_size) == (2 * x.shape[1], 2 * x.shape[2])
        if (self.use_conv and doubling and cpu_kernels.use_cpu_kernels()
                and cpu_kernels.wants_folded_upsample(x.shape[1], x.shape[2])):
            return NearestUpsampleConv(self.out_channels, name="conv", dtype=self.dtype,
                                       param_dtype=self.param_dtype)(x)
        x = nearest_upsample(x, output_size)
        if self.use_conv:
            x = conv2d(self.out_channels, name="conv", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)
        return x


class NearestUpsampleConv(nn.Module):
    """``conv3x3(nearest_upsample_x2(x))`` computed on the low-resolution input, a CPU kernel.

    Four 2x2 convolutions with summed kernels, one per output phase
    (:func:`diffjax.nn.cpu_kernels.nearest_upsample_conv`, which has the derivation), plus
    the bias. Parameters ``kernel [3, 3, Cin, Cout]`` and ``bias`` exactly as the
    ``nn.Conv`` of :func:`~diffjax.nn.layers.conv2d` (converted checkpoints load unchanged).
    Used by :class:`Upsample2D` only when the CPU kernels are on; applied directly, it
    always computes the folded form.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.linear.default_kernel_init, CONV_AXES), (3, 3, x.shape[-1], self.features),
            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return cpu_kernels.nearest_upsample_conv(x, kernel) + bias

