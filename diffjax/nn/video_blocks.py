"""Down, mid and up blocks of the video UNets: the SD blocks with temporal layers inserted.

Both video UNets keep every spatial layer of the Stable Diffusion UNet (same
:class:`~diffjax.nn.unet_blocks.BlockBase` resnets, same ``Transformer2DModel``, same
resamplers and names) and insert temporal layers after them, on frames folded into the
batch (``[B * F, H, W, C]``):

* ``kind="3d"`` - diffusers ``CrossAttnDownBlock3D`` & co. (ModelScope text-to-video,
  Wang et al. 2023): per layer ``resnet -> temp_conv -> spatial transformer ->
  temporal transformer``; names ``resnets_i``, ``temp_convs_i``, ``attentions_i``,
  ``temp_attentions_i``.
* ``kind="motion"`` - diffusers ``CrossAttnDownBlockMotion`` & co. (AnimateDiff, Guo et
  al. 2024, sec. 4.2): per layer ``resnet -> spatial transformer -> motion module``;
  names ``resnets_i``, ``attentions_i``, ``motion_modules_i``. Everything but
  ``motion_modules_*`` is exactly the 2-D UNet's, so SD fine-tunes and LoRAs apply.

Blocks return / consume skip tuples exactly as the 2-D blocks do, so the UNet's skip
bookkeeping and ControlNet residuals are unchanged.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.errors import InputError
from diffjax.nn.resnet import Downsample2D, Upsample2D
from diffjax.nn.temporal import TemporalConvLayer, TransformerTemporalModel
from diffjax.nn.unet_blocks import CrossAttnBlockBase

KINDS = ("3d", "motion")


class VideoBlockBase(CrossAttnBlockBase):
    """Shared settings: ``kind``, whether the block has spatial attention, temporal heads.

    ``temporal_heads``: heads of the temporal transformers (3d: ``C // head_dim``;
    motion: ``motion_num_attention_heads``). ``temporal_layers``: transformer depth of
    each motion module (int or one per layer). ``temp_conv_dropout``: diffusers hard-codes
    0.1 in the ModelScope blocks.
    """

    kind: str = "motion"
    has_attention: bool = True
    temporal_heads: int = 8
    temporal_layers: int | Sequence[int] = 1
    max_seq_length: int = 32
    temp_conv_dropout: float = 0.1

    def _check(self):
        if self.kind not in KINDS:
            raise InputError(f"video block kind must be one of {KINDS}, got {self.kind!r}")

    def temp_conv(self, index: int):
        return TemporalConvLayer(norm_num_groups=self.resnet_groups,
                                 dropout=self.temp_conv_dropout, name=f"temp_convs_{index}",
                                 **self._kw())

    def temporal(self, index: int, channels: int, name: str):
        """The temporal transformer after spatial layer ``index`` (3d or motion flavour)."""
        heads = self.temporal_heads
        if channels % heads:
            raise InputError(f"{channels} channels do not split into {heads} temporal heads")
        layers = self.temporal_layers
        layers = layers if isinstance(layers, int) else layers[index]
        motion = self.kind == "motion"
        return TransformerTemporalModel(
            heads, channels // heads, num_layers=layers, norm_num_groups=self.resnet_groups,
            positional_embeddings="sinusoidal" if motion else None,
            num_positional_embeddings=self.max_seq_length if motion else None,
            zero_init_out=motion, remat=self.remat,
            attention_implementation=self.attention_implementation, name=name, **self._kw())

    def layer(self, i: int, x, temb, context, context_bias, num_frames, deterministic):
        """One ``resnet [-> temp_conv] [-> attention] -> temporal`` layer."""
        x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
        if self.kind == "3d":
            x = self.temp_conv(i)(x, num_frames, deterministic)
        if self.has_attention:
            x = self.transformer(i, self.out_channels, f"attentions_{i}")(
                x, context, context_bias, deterministic)
        if self.kind == "3d":
            if self.has_attention:
                x = self.temporal(i, self.out_channels, f"temp_attentions_{i}")(
                    x, num_frames, deterministic)
        else:
            x = self.temporal(i, self.out_channels, f"motion_modules_{i}")(
                x, num_frames, deterministic)
        return x


class VideoDownBlock(VideoBlockBase):
    """``num_layers`` video layers then an optional ``Downsample2D``; returns ``(h, skips)``."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context, context_bias, num_frames: int,
                 deterministic: bool = True):
        self._check()
        skips = []
        for i in range(self.num_layers):
            x = self.layer(i, x, temb, context, context_bias, num_frames, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding,
                             name="downsamplers_0", **self._kw())(x)
            skips.append(x)
        return x, tuple(skips)


class VideoUpBlock(VideoBlockBase):
    """Video layers over ``concat(h, skip)`` (skips popped from the end), optional upsampler."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, context_bias, num_frames: int,
                 upsample_size=None, deterministic: bool = True):
        self._check()
        for i in range(self.num_layers):
            skip, skips = skips[-1], skips[:-1]
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.layer(i, x, temb, context, context_bias, num_frames, deterministic)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw())(x, upsample_size)
        return x


class VideoMidBlock(VideoBlockBase):
    """3d: ``resnet, temp_conv, (attn, temp_attn, resnet, temp_conv) x n``;
    motion: ``resnet, (attn, motion_module, resnet) x n``."""

    @nn.compact
    def __call__(self, x, temb, context, context_bias, num_frames: int,
                 deterministic: bool = True):
        self._check()
        c = x.shape[-1]
        x = self.resnet("resnets_0", c)(x, temb, deterministic)
        if self.kind == "3d":
            x = self.temp_conv(0)(x, num_frames, deterministic)
        for i in range(self.num_layers):
            x = self.transformer(i, c, f"attentions_{i}")(x, context, context_bias, deterministic)
            name = f"temp_attentions_{i}" if self.kind == "3d" else f"motion_modules_{i}"
            x = self.temporal(i, c, name)(x, num_frames, deterministic)
            x = self.resnet(f"resnets_{i + 1}", c)(x, temb, deterministic)
            if self.kind == "3d":
                x = self.temp_conv(i + 1)(x, num_frames, deterministic)
        return x
