"""Networks of the video diffusion autoencoder (Rampas 2024, sec. 3.4.1).

* :class:`ConvUNet3D` -- the decoder: a UNet of 3x3x3 convolutions
  (:class:`~diffjax.nn.blocks3d.ResnetBlock3D`) with spatial-only stride
  (:class:`~diffjax.nn.blocks3d.SpatialDownsample3D` / ``SpatialUpsample3D``), so every
  frame of a group keeps its own output and neighbouring frames are mixed by the kernels'
  temporal extent. Fourier (sinusoidal) timestep features -> MLP -> added in every block,
  as the image UNet. Input: the noisy first-stage latents of a frame group with the
  condition concatenated on channels, ``[B, T, H, W, C_in]`` -> ``[B, T, H, W, out]``.
* :class:`VideoLatentCoder` -- the temporal compression of the encoder's per-frame latent
  and its learned inverse: :class:`~diffjax.nn.blocks3d.TemporalCompress` (1x1x1 conv +
  average pooling over ``f_t`` frames) and :class:`~diffjax.nn.blocks3d.TemporalDeflate`
  (the "deflate" layers) as two methods of one module (``compress`` / ``deflate``).
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from diffjax.errors import InputError
from diffjax.nn.blocks3d import (ResnetBlock3D, SpatialDownsample3D, SpatialUpsample3D,
                                 TemporalCompress, TemporalDeflate, conv3d)
from diffjax.nn.embeddings import TimestepEmbedding, timestep_embedding
from diffjax.nn.layers import group_norm

Dtype = Any


class ConvUNet3D(nn.Module):
    """3-D convolution UNet (spatial-only resampling; see the module docstring).

    ``x [B, T, H, W, in]``, ``timesteps [B]`` -> ``[B, T, H, W, out_channels]``; ``H, W``
    must be multiples of ``2 ** (len(block_out_channels) - 1)``.
    """

    out_channels: int
    block_out_channels: Sequence[int] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @nn.compact
    def __call__(self, x, timesteps):
        chex.assert_rank(x, 5)
        s = 2 ** self.num_upsamplers
        if x.shape[2] % s or x.shape[3] % s:
            raise InputError(f"ConvUNet3D needs H, W multiples of {s}, got {x.shape[2:4]}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = tuple(self.block_out_channels)
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps, jnp.float32), (-1,)),
                             (x.shape[0],))
        temb = TimestepEmbedding(4 * ch[0], name="time_embedding", **kw)(
            timestep_embedding(t, ch[0], flip_sin_to_cos=True, freq_shift=0.0))
        res = dict(groups=self.norm_num_groups, **kw)
        h = conv3d(ch[0], name="conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        for i, c in enumerate(ch):
            for j in range(self.layers_per_block):
                h = ResnetBlock3D(c, name=f"down_{i}_{j}", **res)(h, temb)
                skips.append(h)
            if i < len(ch) - 1:
                h = SpatialDownsample3D(c, name=f"downsample_{i}", **kw)(h)
                skips.append(h)
        h = ResnetBlock3D(ch[-1], name="mid_0", **res)(h, temb)
        h = ResnetBlock3D(ch[-1], name="mid_1", **res)(h, temb)
        for i, c in reversed(list(enumerate(ch))):
            for j in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResnetBlock3D(c, name=f"up_{i}_{j}", **res)(h, temb)
            if i > 0:
                h = SpatialUpsample3D(c, name=f"upsample_{i}", **kw)(h)
        h = nn.silu(group_norm(self.norm_num_groups, eps=1e-5, name="norm_out",
                               param_dtype=self.param_dtype)(h))
        return conv3d(self.out_channels, name="conv_out", **kw)(h.astype(self.dtype))


class VideoLatentCoder(nn.Module):
    """Temporal compression by ``factor`` (f_t in 2, 4, 8) and its learned deflate inverse.

    ``compress``: ``[B, T, h, w, C] -> [B, T / f_t, h, w, C]``;
    ``deflate``: ``[B, T / f_t, h, w, C] -> [B, T, h, w, C]`` (Rampas 2024, sec. 3.4.1).
    """

    channels: int
    factor: int = 2
    dtype: Dtype = jnp.float32

    def setup(self):
        self.compressor = TemporalCompress(self.channels, self.factor, dtype=self.dtype)
        self.deflater = TemporalDeflate(self.channels, self.factor, dtype=self.dtype)

    def compress(self, y):
        return self.compressor(y)

    def deflate(self, y):
        return self.deflater(y)

    def __call__(self, y):
        return self.deflate(self.compress(y))
