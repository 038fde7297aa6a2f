"""Down, mid and up blocks of the Stable Diffusion UNet and VAE (diffusers ``unet_2d_blocks``).

Each block is a small Flax module with diffusers' child names (``resnets_i``,
``attentions_i``, ``downsamplers_0``, ``upsamplers_0``), so converted checkpoints map
key-for-key and other networks (a refiner UNet without cross-attention, ControlNet, a
video UNet that inserts temporal layers) can compose them:

* :class:`DownBlock2D` / :class:`CrossAttnDownBlock2D` return ``(h, skips)``; ``skips``
  holds every intermediate output, which the up path and ControlNet consume.
* :class:`UNetMidBlock2D` (optional self-attention) / :class:`UNetMidBlock2DCrossAttn`.
* :class:`UpBlock2D` / :class:`CrossAttnUpBlock2D` pop skips from the end.
* :class:`DownEncoderBlock2D` / :class:`UpDecoderBlock2D`: the VAE's blocks (no time embedding).

All fields have defaults so blocks can share the resnet settings of :class:`BlockBase`.
Set ``remat=True`` for gradient checkpointing of every resnet and transformer.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.nn.attention import SpatialSelfAttention, Transformer2DModel
from diffjax.nn.layers import maybe_remat
from diffjax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any


class BlockBase(nn.Module):
    """Settings shared by every block (resnet normalisation, activation, dtypes, remat)."""

    out_channels: int = 320
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    resnet_act_fn: str = "silu"
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    output_scale_factor: float = 1.0
    use_time_emb: bool = True
    dropout: float = 0.0
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def resnet(self, name: str, out_channels: int | None = None, groups_out: int | None = None):
        """A :class:`ResnetBlock2D` (remat-wrapped if asked) with this block's settings."""
        cls = maybe_remat(ResnetBlock2D, self.remat, static_argnums=(3,))
        return cls(
            out_channels or self.out_channels, groups=self.resnet_groups, groups_out=groups_out,
            eps=self.resnet_eps, act_fn=self.resnet_act_fn, use_time_emb=self.use_time_emb,
            time_embedding_norm=self.resnet_time_scale_shift,
            skip_time_act=self.resnet_skip_time_act,
            output_scale_factor=self.output_scale_factor, dropout=self.dropout, name=name,
            **self._kw(),
        )


class CrossAttnBlockBase(BlockBase):
    """:class:`BlockBase` plus the transformer settings of the cross-attention blocks."""

    num_attention_heads: int = 1
    transformer_layers: Sequence[int] | int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    has_cross_attention: bool = True

    def transformer(self, index: int, channels: int, name: str):
        layers = self.transformer_layers
        layers = layers if isinstance(layers, int) else layers[index]
        return Transformer2DModel(
            self.num_attention_heads, channels // self.num_attention_heads, num_layers=layers,
            norm_num_groups=self.resnet_groups, use_linear_projection=self.use_linear_projection,
            has_cross_attention=self.has_cross_attention,
            only_cross_attention=self.only_cross_attention, dropout=self.dropout,
            remat=self.remat, attention_implementation=self.attention_implementation,
            name=name, **self._kw(),
        )


class DownBlock2D(BlockBase):
    """``num_layers`` resnets, then an optional stride-2 ``Downsample2D``."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        """``[B, H, W, C] -> ([B, H', W', out], skips)``."""
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding,
                             name="downsamplers_0", **self._kw())(x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(CrossAttnBlockBase):
    """Resnet + ``Transformer2DModel`` pairs, then an optional ``Downsample2D``."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb=None, context=None, context_bias=None, deterministic: bool = True,
                 additional_residual=None):
        """``additional_residual`` (T2I-adapter style) is added after the last pair."""
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self.transformer(i, self.out_channels, f"attentions_{i}")(
                x, context, context_bias, deterministic)
            if i == self.num_layers - 1 and additional_residual is not None:
                x = x + additional_residual
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding,
                             name="downsamplers_0", **self._kw())(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2D(BlockBase):
    """``resnet, (attention, resnet) x num_layers``; attention is optional (VAE: on)."""

    add_attention: bool = True
    attention_head_dim: int | None = None

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        c = x.shape[-1]
        x = self.resnet("resnets_0", c)(x, temb, deterministic)
        for i in range(self.num_layers):
            if self.add_attention:
                head_dim = self.attention_head_dim or c
                x = SpatialSelfAttention(
                    c // head_dim, head_dim, norm_num_groups=self.resnet_groups,
                    eps=self.resnet_eps, rescale_output_factor=self.output_scale_factor,
                    attention_implementation=self.attention_implementation,
                    name=f"attentions_{i}", **self._kw())(x)
            x = self.resnet(f"resnets_{i + 1}", c)(x, temb, deterministic)
        return x


class UNetMidBlock2DCrossAttn(CrossAttnBlockBase):
    """``resnet, (transformer, resnet) x num_layers`` at the lowest resolution."""

    @nn.compact
    def __call__(self, x, temb=None, context=None, context_bias=None, deterministic: bool = True):
        c = x.shape[-1]
        x = self.resnet("resnets_0", c)(x, temb, deterministic)
        for i in range(self.num_layers):
            x = self.transformer(i, c, f"attentions_{i}")(x, context, context_bias, deterministic)
            x = self.resnet(f"resnets_{i + 1}", c)(x, temb, deterministic)
        return x


def _pop_skip(skips):
    return skips[-1], skips[:-1]


class UpBlock2D(BlockBase):
    """Resnets over ``concat(h, skip)`` (skips popped from the end), optional ``Upsample2D``."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb=None, upsample_size=None, deterministic: bool = True):
        for i in range(self.num_layers):
            skip, skips = _pop_skip(skips)
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw())(x, upsample_size)
        return x


class CrossAttnUpBlock2D(CrossAttnBlockBase):
    """Resnet + transformer pairs over ``concat(h, skip)``, optional ``Upsample2D``."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb=None, context=None, context_bias=None,
                 upsample_size=None, deterministic: bool = True):
        for i in range(self.num_layers):
            skip, skips = _pop_skip(skips)
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self.transformer(i, self.out_channels, f"attentions_{i}")(
                x, context, context_bias, deterministic)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw())(x, upsample_size)
        return x


class DownEncoderBlock2D(BlockBase):
    """VAE encoder block: resnets without time embedding, then ``Downsample2D(padding=0)``."""

    use_time_emb: bool = False
    add_downsample: bool = True
    downsample_padding: int = 0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, None, deterministic)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding,
                             name="downsamplers_0", **self._kw())(x)
        return x


class UpDecoderBlock2D(BlockBase):
    """VAE decoder block: resnets without time embedding, then ``Upsample2D``."""

    use_time_emb: bool = False
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, None, deterministic)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw())(x)
        return x
