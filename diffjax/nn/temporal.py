"""Temporal layers of video diffusion UNets, NTHWC.

Video UNets run their spatial layers (ResNets, spatial transformers) on every frame at once
by folding frames into the batch (``[B, F, H, W, C] <-> [B * F, H, W, C]``,
:func:`fold_frames` / :func:`unfold_frames`), and mix information across frames with the
temporal layers below, each a residual branch that is zero-initialised so that a fresh
video UNet starts as the image UNet applied frame by frame:

* :class:`TemporalConvLayer` - four ``GN -> SiLU -> conv(3x1x1)`` stages with a residual
  (the temporal convolution of ModelScope's spatio-temporal blocks, Wang et al. 2023,
  "ModelScope Text-to-Video Technical Report"; diffusers ``TemporalConvLayer``). The last
  conv is zero-initialised.
* :class:`TransformerTemporalModel` - GroupNorm, ``proj_in``, transformer blocks whose
  self-attention runs over the frames at every spatial position, ``proj_out``, residual
  (ModelScope's temporal attention; diffusers ``TransformerTemporalModel``). With
  ``positional_embeddings="sinusoidal"`` it is AnimateDiff's motion module (Guo et al.
  2024, "AnimateDiff", sec. 4.2: sinusoidal frame-position encoding added before each
  self-attention; diffusers ``AnimateDiffTransformer3D``).

GroupNorm statistics of both layers are taken over frames *and* pixels of a clip (PyTorch
``GroupNorm`` on ``[B, C, F, H, W]``), which :class:`~diffjax.nn.layers.GroupNorm` does for
a rank-5 input. Parameter names are those of diffusers (``conv1_0`` = ``conv1.0``, ...).
"""
from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffjax.errors import InputError
from diffjax.nn.attention import Attention, FeedForward
from diffjax.nn.layers import dense, group_norm, layer_norm

Dtype = Any

# Logical axes of a 3-D conv kernel [T, H, W, Cin, Cout] (same rules as 2-D convs).
CONV3D_AXES = (None, None, None, "conv_in", "conv_out")


def fold_frames(x):
    """``[B, F, H, W, C] -> [B * F, H, W, C]`` (frame-major within each clip)."""
    chex.assert_rank(x, 5)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold_frames(x, num_frames: int):
    """``[B * F, ...] -> [B, F, ...]``; the inverse of :func:`fold_frames`."""
    if x.shape[0] % num_frames:
        raise InputError(f"leading axis {x.shape[0]} is not a multiple of {num_frames} frames")
    return x.reshape((x.shape[0] // num_frames, num_frames) + x.shape[1:])


def frames_to_sequences(x):
    """``[B, F, H, W, C] -> [B * H * W, F, C]``: one sequence over time per pixel."""
    b, f, h, w, c = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, c)


def sequences_to_frames(x, batch: int, height: int, width: int):
    """``[B * H * W, F, C] -> [B, F, H, W, C]``; the inverse of :func:`frames_to_sequences`."""
    f, c = x.shape[1], x.shape[2]
    return x.reshape(batch, height, width, f, c).transpose(0, 3, 1, 2, 4)


def sinusoidal_positions(num_positions: int, dim: int) -> np.ndarray:
    """``[num_positions, dim]`` float32 table, ``pe[p, 2i] = sin(p w_i)``, ``pe[p, 2i+1] =
    cos(p w_i)``, ``w_i = 10000^(-2i / dim)`` (Vaswani et al. 2017, sec. 3.5), as diffusers'
    ``SinusoidalPositionalEmbedding`` computes it in float32."""
    position = np.arange(num_positions, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    pe = np.zeros((num_positions, dim), np.float32)
    pe[:, 0::2] = np.sin(position * div)
    pe[:, 1::2] = np.cos(position * div)[:, : dim // 2]
    return pe


class TemporalConv(nn.Module):
    """A ``(k, 1, 1)`` convolution over the frame axis of ``[B, F, H, W, Cin]``, zero padded
    by ``k // 2`` frames (PyTorch ``Conv3d(kernel_size=(k, 1, 1), padding=(k // 2, 0, 0))``).

    Computed as ``k`` matmuls over shifted frames (a 1x1 spatial kernel needs no
    convolution). Parameters ``kernel [k, 1, 1, Cin, Cout]`` and ``bias [Cout]``, the layout
    of a Flax 3-D ``nn.Conv`` (converted from PyTorch ``[Cout, Cin, k, 1, 1]``).
    """

    features: int
    kernel_frames: int = 3
    kernel_init: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_frames, x.shape[-1]
        init = self.kernel_init or nn.linear.default_kernel_init
        kernel = self.param("kernel", nn.with_logical_partitioning(init, CONV3D_AXES),
                            (k, 1, 1, cin, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x = x.astype(self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)[:, 0, 0]  # [k, Cin, Cout]
        frames = x.shape[1]
        pad = k // 2
        xp = jnp.pad(x, ((0, 0), (pad, k - 1 - pad), (0, 0), (0, 0), (0, 0)))
        out = sum(jnp.einsum("bthwc,cd->bthwd", xp[:, i:i + frames], kernel[i])
                  for i in range(k))
        return out + jnp.asarray(bias, self.dtype)


class TemporalConvLayer(nn.Module):
    """diffusers ``TemporalConvLayer`` (ModelScope): ``x + conv4(conv3(conv2(conv1(x))))``.

    Each ``convN`` is ``GroupNorm -> SiLU [-> Dropout] -> TemporalConv(3)`` (names
    ``convN_0`` for the norm, ``conv1_2`` / ``conv{2,3,4}_3`` for the conv, as the PyTorch
    ``nn.Sequential`` indices). ``conv4``'s conv starts at zero, so the layer starts as
    the identity. Works on folded frames ``[B * F, H, W, C]`` (pass ``num_frames``) or on
    ``[B, F, H, W, C]`` (``num_frames=None``).
    """

    out_dim: int | None = None
    norm_num_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, num_frames: int | None = None, deterministic: bool = True):
        folded = num_frames is not None
        if folded:
            x = unfold_frames(x, num_frames)
        chex.assert_rank(x, 5)
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        identity = x
        h = x
        for i, (out, conv_index) in enumerate(((self.out_dim or c, 2), (c, 3), (c, 3), (c, 3))):
            h = group_norm(self.norm_num_groups, eps=1e-5, name=f"conv{i + 1}_0",
                           param_dtype=self.param_dtype)(h)
            h = nn.silu(h).astype(self.dtype)
            if i > 0:
                h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0)
            init = nn.initializers.zeros_init() if i == 3 else None
            h = TemporalConv(out, kernel_init=init, name=f"conv{i + 1}_{conv_index}", **kw)(h)
        out = identity.astype(self.dtype) + h
        return fold_frames(out) if folded else out


class TemporalTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` as the temporal transformers use it.

    ``x += attn1(pe(norm1(x)))``; ``x += attn2(pe(norm2(x)))`` (a second *self*-attention,
    ``double_self_attention``); ``x += ff(norm3(x))``. ``pe`` adds the sinusoidal frame
    positions when ``positional_embeddings == "sinusoidal"`` (AnimateDiff) and is the
    identity otherwise (ModelScope). Sequences are ``[N, F, dim]``, one per pixel.
    """

    dim: int
    heads: int
    dim_head: int
    double_self_attention: bool = True
    positional_embeddings: str | None = None
    num_positional_embeddings: int | None = None
    activation_fn: str = "geglu"
    attention_bias: bool = False
    dropout: float = 0.0
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _positions(self, h):
        if self.positional_embeddings is None:
            return h
        if self.positional_embeddings != "sinusoidal":
            raise InputError(f"positional_embeddings={self.positional_embeddings!r} is not "
                             "supported (only None or 'sinusoidal')")
        frames = h.shape[1]
        limit = self.num_positional_embeddings or 32
        if frames > limit:
            raise InputError(f"{frames} frames exceed the motion module's "
                             f"max_seq_length={limit}")
        pe = sinusoidal_positions(limit, h.shape[-1])[:frames]
        return (h.astype(jnp.float32) + pe).astype(self.dtype)

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, qkv_bias=self.attention_bias,
                    implementation=self.attention_implementation, **kw)
        ln = lambda name: layer_norm(eps=1e-5, name=name, param_dtype=self.param_dtype)
        h = self._positions(ln("norm1")(x).astype(self.dtype))
        x = x + Attention(name="attn1", **attn)(h)
        if self.double_self_attention:
            h = self._positions(ln("norm2")(x).astype(self.dtype))
            x = x + Attention(name="attn2", **attn)(h)
        h = ln("norm3")(x).astype(self.dtype)
        return x + FeedForward(self.dim, activation_fn=self.activation_fn, dropout=self.dropout,
                               name="ff", **kw)(h, deterministic)


class TransformerTemporalModel(nn.Module):
    """diffusers ``TransformerTemporalModel`` / ``AnimateDiffTransformer3D`` on NTHWC.

    ``GN(eps=1e-6, over frames and pixels) -> proj_in (linear) -> blocks over [B*H*W, F, .]
    -> proj_out (linear) + residual``. Input ``[B * F, H, W, C]`` with ``num_frames``, or
    ``[B, F, H, W, C]`` (``num_frames=None``); output in the same layout.
    ``zero_init_out`` zero-initialises ``proj_out`` (AnimateDiff trains motion modules
    from zero so the image model is kept at the start).
    """

    num_attention_heads: int
    attention_head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    double_self_attention: bool = True
    positional_embeddings: str | None = None
    num_positional_embeddings: int | None = None
    activation_fn: str = "geglu"
    attention_bias: bool = False
    dropout: float = 0.0
    zero_init_out: bool = False
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, num_frames: int | None = None, deterministic: bool = True):
        folded = num_frames is not None
        if folded:
            x = unfold_frames(x, num_frames)
        chex.assert_rank(x, 5)
        b, f, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.num_attention_heads * self.attention_head_dim
        h = group_norm(self.norm_num_groups, eps=1e-6, name="norm",
                       param_dtype=self.param_dtype)(x).astype(self.dtype)
        h = dense(inner, name="proj_in", **kw)(frames_to_sequences(h))
        block = nn.remat(TemporalTransformerBlock, static_argnums=(2,)) if self.remat \
            else TemporalTransformerBlock
        for i in range(self.num_layers):
            h = block(inner, self.num_attention_heads, self.attention_head_dim,
                      double_self_attention=self.double_self_attention,
                      positional_embeddings=self.positional_embeddings,
                      num_positional_embeddings=self.num_positional_embeddings,
                      activation_fn=self.activation_fn, attention_bias=self.attention_bias,
                      dropout=self.dropout,
                      attention_implementation=self.attention_implementation,
                      name=f"transformer_blocks_{i}", **kw)(h, deterministic)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else \
            nn.linear.default_kernel_init
        h = nn.Dense(c, name="proj_out", kernel_init=nn.with_logical_partitioning(
            out_init, ("mlp", "embed")), **kw)(h)
        out = sequences_to_frames(h, b, hgt, wid) + x.astype(self.dtype)
        return fold_frames(out) if folded else out
