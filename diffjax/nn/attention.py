"""Attention blocks of the Stable Diffusion UNet and VAE.

* :func:`attention` - scaled dot-product attention (Vaswani et al. 2017, eq. 1) through
  ``jax.nn.dot_product_attention``, so XLA, cuDNN or other fused kernels can be chosen
  (``implementation``); long attention on the CPU backend takes an exact query-blocked
  path instead (:func:`diffjax.nn.cpu_kernels.query_blocked_attention`, 2.7x faster there;
  GPU/TPU keep ``jax.nn.dot_product_attention`` and its fused kernels). Logits and softmax
  are float32 whatever the compute dtype, which is diffusers'
  ``upcast_attention``/``upcast_softmax`` behaviour.
* :class:`Attention` - multi-head attention with ``to_q``/``to_k``/``to_v``/``to_out_0``
  projections (self-attention, or cross-attention over a context sequence).
* :class:`FeedForward` - GEGLU (Shazeer 2020, eq. 6) or the other diffusers MLP variants.
* :class:`BasicTransformerBlock` - pre-LN self-attn, cross-attn and FF sublayers
  (LDM, Rombach et al. 2022, sec. 3.3 "SpatialTransformer").
* :class:`Transformer2DModel` - GroupNorm, ``proj_in`` (1x1 conv, or linear as in SD 2.x),
  a stack of transformer blocks, ``proj_out`` and the residual.
* :class:`SpatialSelfAttention` - the single-head self-attention of the VAE mid block.

Sequences are ``[B, T, C]``; images NHWC.
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.errors import InputError
from diffjax.nn import cpu_kernels
# Re-exported: these lived here before the CPU kernels moved to ``diffjax.nn.cpu_kernels``.
from diffjax.nn.cpu_kernels import (CPU_BLOCK_MIN_LOGITS, CPU_QUERY_BLOCK,  # noqa: F401
                                    query_blocked_attention)
from diffjax.nn.cpu_kernels import attention_core as _attention_core  # noqa: F401
from diffjax.nn.layers import conv2d, dense, group_norm, layer_norm, maybe_remat

Dtype = Any


def attention(q, k, v, *, bias=None, implementation: str | None = None,
              block_size: int | None = None):
    """``softmax(q k^T / sqrt(d) + bias) v`` over ``[B, T, N, H]`` heads, float32 softmax.

    Goes through ``jax.nn.dot_product_attention`` (so cuDNN or other fused kernels can be
    picked with ``implementation``), except when queries are processed in blocks by
    :func:`diffjax.nn.cpu_kernels.query_blocked_attention`, which is exact (each query's
    softmax is computed over all keys, as eq. 1 of Vaswani et al. 2017): whenever
    ``block_size`` is given (and there is no ``bias``), or automatically, with blocks of
    :data:`~diffjax.nn.cpu_kernels.CPU_QUERY_BLOCK`, for long attention without bias or
    ``implementation`` when the CPU kernels are on
    (:func:`~diffjax.nn.cpu_kernels.use_cpu_kernels`, the CPU backend by default;
    ``N * T * S >= CPU_BLOCK_MIN_LOGITS``).
    """
    _, t, n, _ = q.shape
    s = k.shape[1]
    if (block_size is None and implementation is None and bias is None
            and cpu_kernels.use_cpu_kernels() and cpu_kernels.wants_blocked_attention(n, t, s)):
        block_size = cpu_kernels.CPU_QUERY_BLOCK
    if block_size and bias is None:
        return cpu_kernels.query_blocked_attention(q, k, v, block_size)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


class Attention(nn.Module):
    """Multi-head attention (diffusers ``Attention`` with the default processor).

    Attributes:
      heads: number of heads; ``dim_head``: width of each head.
      out_dim: output width (defaults to the query input width).
      qkv_bias: bias on ``to_q/to_k/to_v`` (False in the UNet, True in the VAE).
      implementation: passed to ``jax.nn.dot_product_attention`` (None = let JAX pick).
    """

    heads: int
    dim_head: int
    out_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = True
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, bias=None):
        """``x [B, T, C]``, ``context [B, S, D]`` (None: self-attention) -> ``[B, T, out]``.

        ``bias`` is an additive logit bias broadcastable to ``[B, heads, T, S]``.
        """
        return multi_head_attention(
            x, context, bias, heads=self.heads, dim_head=self.dim_head, out_dim=self.out_dim,
            qkv_bias=self.qkv_bias, out_bias=self.out_bias, implementation=self.implementation,
            dtype=self.dtype, param_dtype=self.param_dtype)


def multi_head_attention(x, context=None, bias=None, *, heads: int, dim_head: int,
                         out_dim: int | None = None, qkv_bias: bool = False,
                         out_bias: bool = True, implementation: str | None = None,
                         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    """Projections + attention, creating ``to_q/to_k/to_v/to_out_0`` in the *calling* module.

    Must be called inside a ``@nn.compact`` method; shared by :class:`Attention` and
    :class:`SpatialSelfAttention` so both have diffusers' flat parameter names.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    inner = heads * dim_head
    context = x if context is None else context
    q = dense(inner, use_bias=qkv_bias, name="to_q", **kw)(x)
    k = dense(inner, use_bias=qkv_bias, name="to_k", **kw)(context)
    v = dense(inner, use_bias=qkv_bias, name="to_v", **kw)(context)
    split = lambda t: t.reshape(t.shape[:-1] + (heads, dim_head))
    out = attention(split(q), split(k), split(v), bias=bias, implementation=implementation)
    out = out.reshape(out.shape[:-2] + (inner,))
    return dense(out_dim or x.shape[-1], use_bias=out_bias, name="to_out_0", **kw)(out)


def _sigmoid_gelu(x):
    """``x * sigmoid(1.702 x)`` (Hendrycks & Gimpel 2016, sec. 2), diffusers' ApproximateGELU."""
    return x * jax.nn.sigmoid(1.702 * x)


# diffusers FeedForward activation name -> (gated, activation applied to h or to the gate)
_FF_KINDS = {
    "geglu": (True, lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu": (False, lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu-approximate": (False, lambda x: jax.nn.gelu(x, approximate=True)),
    "geglu-approximate": (False, _sigmoid_gelu),
    "swiglu": (True, jax.nn.silu),
    "linear-silu": (False, jax.nn.silu),
}


class _ProjAct(nn.Module):
    """``proj`` then the activation; gated kinds project to 2x width and return
    ``h * act(gate)`` (GEGLU / SwiGLU, Shazeer 2020, "GLU Variants", eq. 6)."""

    dim_out: int
    kind: str = "geglu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gated, act = _FF_KINDS[self.kind]
        x = dense(self.dim_out * (2 if gated else 1), name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
        if not gated:
            return act(x)
        h, gate = jnp.split(x, 2, axis=-1)
        return h * act(gate)


class FeedForward(nn.Module):
    """diffusers ``FeedForward``: ``net_0`` (``proj`` + activation) -> dropout -> ``net_2``.

    ``activation_fn`` as in diffusers: ``geglu`` (SD), ``gelu``, ``gelu-approximate``
    (tanh), ``geglu-approximate`` (``x * sigmoid(1.702 x)``, not gated despite its name),
    ``swiglu``, ``linear-silu``. Hidden width is ``mult * dim``.
    """

    dim_out: int
    mult: int = 4
    activation_fn: str = "geglu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.activation_fn not in _FF_KINDS:
            raise InputError(f"unsupported feed-forward activation {self.activation_fn!r}; "
                             f"supported: {', '.join(_FF_KINDS)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _ProjAct(x.shape[-1] * self.mult, self.activation_fn, name="net_0", **kw)(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
        return dense(self.dim_out, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"``.

    ``x = x + attn1(norm1(x)); x = x + attn2(norm2(x), context); x = x + ff(norm3(x))``.
    With ``only_cross_attention`` attn1 also attends to the context; without a context
    dimension (``has_cross_attention=False``) there is no attn2/norm2 unless
    ``double_self_attention``.
    """

    dim: int
    heads: int
    dim_head: int
    has_cross_attention: bool = True
    only_cross_attention: bool = False
    double_self_attention: bool = False
    attention_bias: bool = False
    activation_fn: str = "geglu"
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    dropout: float = 0.0
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, context_bias=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(heads=self.heads, dim_head=self.dim_head, qkv_bias=self.attention_bias,
                       implementation=self.attention_implementation, **kw)
        ln = lambda name: layer_norm(eps=self.norm_eps, name=name, param_dtype=self.param_dtype,
                                     elementwise_affine=self.norm_elementwise_affine)
        h = ln("norm1")(x).astype(self.dtype)
        if self.only_cross_attention:
            h = Attention(name="attn1", **attn_kw)(h, context, context_bias)
        else:
            h = Attention(name="attn1", **attn_kw)(h)
        x = x + h
        if self.has_cross_attention or self.double_self_attention:
            h = ln("norm2")(x).astype(self.dtype)
            if self.double_self_attention:
                h = Attention(name="attn2", **attn_kw)(h)
            else:
                h = Attention(name="attn2", **attn_kw)(h, context, context_bias)
            x = x + h
        h = ln("norm3")(x).astype(self.dtype)
        x = x + FeedForward(self.dim, activation_fn=self.activation_fn, dropout=self.dropout,
                            name="ff", **kw)(h, deterministic)
        return x


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` for continuous (image) inputs, NHWC.

    ``GN(eps=1e-6) -> proj_in -> blocks -> proj_out + residual``; ``proj_in``/``proj_out``
    are 1x1 convs (SD 1.x) or linear layers (``use_linear_projection``, SD 2.x / SDXL).
    """

    num_attention_heads: int
    attention_head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    has_cross_attention: bool = True
    only_cross_attention: bool = False
    double_self_attention: bool = False
    attention_bias: bool = False
    activation_fn: str = "geglu"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, context_bias=None, deterministic: bool = True):
        """``x [B, H, W, C]``, ``context [B, S, D]`` -> ``[B, H, W, C]``."""
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.num_attention_heads * self.attention_head_dim
        residual = x
        h = group_norm(self.norm_num_groups, eps=1e-6, name="norm",
                       param_dtype=self.param_dtype)(x).astype(self.dtype)
        if self.use_linear_projection:
            h = dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
        else:
            h = conv2d(inner, kernel_size=1, name="proj_in", **kw)(h).reshape(b, hgt * wid, inner)
        block_cls = maybe_remat(BasicTransformerBlock, self.remat, static_argnums=(4,))
        for i in range(self.num_layers):
            h = block_cls(
                inner, self.num_attention_heads, self.attention_head_dim,
                has_cross_attention=self.has_cross_attention,
                only_cross_attention=self.only_cross_attention,
                double_self_attention=self.double_self_attention,
                attention_bias=self.attention_bias, activation_fn=self.activation_fn,
                norm_eps=self.norm_eps, dropout=self.dropout,
                attention_implementation=self.attention_implementation,
                name=f"transformer_blocks_{i}", **kw,
            )(h, context, context_bias, deterministic)
        if self.use_linear_projection:
            h = dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wid, c)
        else:
            h = conv2d(c, kernel_size=1, name="proj_out", **kw)(h.reshape(b, hgt, wid, inner))
        return h + residual.astype(self.dtype)


class SpatialSelfAttention(nn.Module):
    """Self-attention over all pixels with GroupNorm and residual (VAE mid block).

    diffusers ``Attention(..., residual_connection=True, _from_deprecated_attn_block=True)``:
    ``(x + to_out(attn(group_norm(x)))) / rescale_output_factor``; names ``group_norm``,
    ``to_q``, ``to_k``, ``to_v`` (with bias) and ``to_out_0``.
    """

    heads: int = 1
    dim_head: int | None = None
    norm_num_groups: int = 32
    eps: float = 1e-6
    rescale_output_factor: float = 1.0
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """``[B, H, W, C] -> [B, H, W, C]``."""
        b, hgt, wid, c = x.shape
        dim_head = self.dim_head or c // self.heads
        chex.assert_equal(self.heads * dim_head, c)
        h = group_norm(self.norm_num_groups, eps=self.eps, name="group_norm",
                       param_dtype=self.param_dtype)(x).astype(self.dtype)
        h = multi_head_attention(h.reshape(b, hgt * wid, c), heads=self.heads,
                                 dim_head=dim_head, qkv_bias=True,
                                 implementation=self.attention_implementation,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        out = h.reshape(b, hgt, wid, c) + x.astype(self.dtype)
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
