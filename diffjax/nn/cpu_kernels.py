"""XLA:CPU fast paths of diffjax's core layers, behind one backend switch.

XLA's CPU backend runs some of the operations of the Stable Diffusion UNet and VAE much
slower than their arithmetic suggests. This module holds the kernels diffjax uses there
instead; each computes exactly the sum the plain XLA op computes, in a different
summation order, so outputs agree to float32 rounding (``tests/nn/test_cpu_kernels.py``):

* :func:`conv_general_dilated` - NHWC x HWIO convolution: a 1x1 stride-1 convolution as a
  matmul over channels, a k x k one with a small output (<= :data:`CPU_PATCH_CONV_MAX_PIXELS`)
  as one GEMM over gathered patches (:func:`patch_matmul_conv`), anything else through
  ``lax.conv_general_dilated``.
* :func:`query_blocked_attention` - exact attention one head and :data:`CPU_QUERY_BLOCK`
  queries at a time, with the softmax kept apart from the two matmuls.
* :func:`nearest_upsample_conv` - ``conv3x3(nearest_upsample_x2(x))`` as four 2x2
  convolutions on the low-resolution input.

The core layers (:mod:`diffjax.nn.layers`, :mod:`~diffjax.nn.resnet`,
:mod:`~diffjax.nn.attention`) call the plain XLA op (``lax.conv_general_dilated``,
``jax.nn.dot_product_attention``, nearest upsampling then a convolution) unless
:func:`use_cpu_kernels` is true. It is true when JAX's default backend is the CPU, and can
be forced either way:

* the environment variable ``DIFFJAX_CPU_KERNELS``: ``1`` (kernels on any backend), ``0``
  (plain XLA ops on any backend), ``auto`` or unset (kernels on the CPU backend only);
* the context manager :func:`override`, which takes precedence over the variable::

      with diffjax.nn.cpu_kernels.override(False):
          out = jax.jit(model.apply)(params, x)   # traced with the plain XLA ops

The switch is read when a function is *traced*, and it is not part of ``jax.jit``'s cache
key: a function already traced keeps the path it was traced with, even wrapped in a new
``jax.jit``. Set the switch before the first call, or trace a fresh function (a new
``lambda``), or call ``jax.clear_caches()`` after changing it.
The kernels hold no parameters; parameter names and shapes are the same on both paths.

Measured on the 2-core CPU (XLA:CPU, jaxlib 0.10.2; README "SD backbone"); the kernels are
not used on GPU/TPU, where XLA's convolution and the fused attention kernels are the fast
choice.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import InputError

ENV_VAR = "DIFFJAX_CPU_KERNELS"

_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "diffjax_cpu_kernels", default=None)
_ENV_VALUES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False,
               "auto": None, "": None}


def use_cpu_kernels() -> bool:
    """Whether the core layers take this module's kernels (read at trace time).

    In order: the innermost :func:`override`; else ``DIFFJAX_CPU_KERNELS`` (``1`` / ``0``,
    ``auto`` or unset for the default); else ``jax.default_backend() == "cpu"``.
    """
    forced = _OVERRIDE.get()
    if forced is not None:
        return forced
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw not in _ENV_VALUES:
        raise InputError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1, 0 or auto")
    from_env = _ENV_VALUES[raw]
    if from_env is not None:
        return from_env
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def override(enabled: bool | None) -> Iterator[None]:
    """Force the CPU kernels on (``True``) or off (``False``) inside the ``with`` block;
    ``None`` restores the default (environment variable, then backend). Nests; per thread
    and async context (a ``contextvars`` variable)."""
    token = _OVERRIDE.set(None if enabled is None else bool(enabled))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


# ------------------------------------------------------------------------------------------
# Convolution
# ------------------------------------------------------------------------------------------

# XLA:CPU's convolution is slow on small feature maps with many channels; gathering the
# k*k shifted copies of the input ("im2col", Chellapilla et al. 2006) and doing one GEMM is
# 1.4-3.7x faster there (SD 2.1 UNet levels, 2-core CPU: 8x8 1280->1280 78 -> 21 ms,
# 16x16 1920->640 102 -> 56 ms, 16x16 640->640 21 -> 15 ms), but 2-5x slower on large maps
# (64x64 320->320 57 -> 135 ms), where XLA's kernel is within 1.1-1.4x of PyTorch.
CPU_PATCH_CONV_MAX_PIXELS = 16 * 16   # output H * W up to which the GEMM path is used
# ``lax.conv_dimension_numbers`` of ("NHWC", "HWIO", "NHWC"), what ``nn.Conv`` passes
NHWC_DIMS = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                         out_spec=(0, 3, 1, 2))


def patch_matmul_conv(lhs, rhs, window_strides, padding, precision=None):
    """NHWC x HWIO convolution with explicit ``((top, bottom), (left, right))`` padding as
    one matmul over gathered patches (exactly the sum ``lax.conv_general_dilated`` computes,
    in a different summation order)."""
    kh, kw, cin, cout = rhs.shape
    sh, sw = window_strides
    x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    patches = jnp.concatenate(
        [x[:, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw]
         for dy in range(kh) for dx in range(kw)], axis=-1)  # (dy, dx, cin): HWIO order
    return jnp.einsum("bhwk,kc->bhwc", patches, rhs.reshape(kh * kw * cin, cout),
                      precision=precision)


def pointwise_conv(lhs, rhs, precision=None):
    """A 1x1, stride-1, unpadded NHWC x HWIO convolution as a matmul over the channels
    (XLA:CPU's convolution kernel is 1.3-2x slower for it, e.g. 64x64 640->320: 25 vs
    12 ms)."""
    return jnp.einsum("bhwc,cd->bhwd", lhs, rhs[0, 0], precision=precision)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
    """``lax.conv_general_dilated`` with the CPU kernels where they apply.

    For NHWC maps with explicit padding, no dilation and no feature groups: a 1x1 stride-1
    unpadded convolution runs as :func:`pointwise_conv`, a k x k one whose output has at
    most :data:`CPU_PATCH_CONV_MAX_PIXELS` pixels as :func:`patch_matmul_conv`; everything
    else goes to ``lax.conv_general_dilated`` unchanged. Does not consult the switch.
    """
    dense_conv = (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
                  and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
                  and dimension_numbers == NHWC_DIMS)
    pointwise = (rhs.shape[:2] == (1, 1) and tuple(window_strides) == (1, 1)
                 and all(p == 0 for pair in (padding if dense_conv else ()) for p in pair))
    if dense_conv and pointwise:
        return pointwise_conv(lhs, rhs, precision)
    if dense_conv and rhs.shape[0] * rhs.shape[1] > 1:
        out_pixels = np.prod([(lhs.shape[1 + i] + sum(padding[i]) - rhs.shape[i])
                              // window_strides[i] + 1 for i in range(2)])
        if out_pixels <= CPU_PATCH_CONV_MAX_PIXELS:
            return patch_matmul_conv(lhs, rhs, window_strides, padding, precision)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)


# ------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------

# On the CPU backend, XLA fuses the softmax of ``jax.nn.dot_product_attention`` into its two
# matmuls, which then no longer run as library GEMMs: SD 2.1's self-attention at a 32x32 latent
# (1024 tokens, 5 heads of 64) took 41 ms there against 15 ms for the same three steps kept
# apart by ``optimization_barrier`` and run over blocks of 128 queries (744 vs 263 ms at 4096
# tokens, 204 ms with one head per block; PyTorch's fused CPU kernel: 10-12 / 180-192 ms;
# micro-benchmarks on the 2-core CPU, see README "SD backbone").
CPU_BLOCK_MIN_LOGITS = 2 ** 22   # N * T * S from which the blocked path pays (measured)
CPU_QUERY_BLOCK = 128            # queries per block (128 and 256 measured best)


def wants_blocked_attention(heads: int, queries: int, keys: int) -> bool:
    """Whether attention of this size is long enough for :func:`query_blocked_attention`
    to pay on XLA:CPU (``heads * queries * keys >= CPU_BLOCK_MIN_LOGITS``)."""
    return heads * queries * keys >= CPU_BLOCK_MIN_LOGITS


def attention_core(q, k, v):
    """``[B, N, T, H]`` heads-first attention; logits and softmax in float32.

    The softmax's normalisation is applied to the ``[T, H]`` output instead of the
    ``[T, S]`` probabilities (``softmax(l) v = (exp(l - max l) v) / sum exp(l - max l)``),
    which saves one pass over the logits. The ``optimization_barrier`` s keep XLA from
    fusing the softmax into the matmuls (on XLA:CPU a fused matmul runs as a slow loop
    instead of a GEMM).
    """
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = jax.lax.optimization_barrier(logits)
    scale = q.shape[-1] ** -0.5
    unnormalised = jnp.exp((logits - jnp.max(logits, axis=-1, keepdims=True)) * scale)
    unnormalised = jax.lax.optimization_barrier(unnormalised)
    out = jnp.einsum("bnts,bnsh->bnth", unnormalised.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / jnp.sum(unnormalised, axis=-1, keepdims=True)).astype(q.dtype)


def query_blocked_attention(q, k, v, block_size: int = CPU_QUERY_BLOCK):
    """Exact attention over ``[B, T, N, H]``, one head and ``block_size`` queries at a time.

    Each block sees all keys of its head (no online softmax needed), so the working set is
    ``block_size * S`` logits instead of ``N * T * S``; blocks run one after the other
    (``lax.map``). ``T`` not a multiple of ``block_size`` (or ``T <= block_size``): all
    queries of a head form one block. No bias (mask) is supported.
    """
    b, t, n, h = q.shape
    blocks = t // block_size if t > block_size and t % block_size == 0 else 1

    def one_head(qkv):  # [B, T, H], [B, S, H], [B, S, H]
        qn, kn, vn = (a[:, None] for a in qkv)  # a single head: [B, 1, ., H]
        if blocks == 1:
            return attention_core(qn, kn, vn)[:, 0]
        qb = qn.reshape(b, 1, blocks, t // blocks, h).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda one: attention_core(one, kn, vn), qb)  # [blocks, B, 1, bs, H]
        return out.transpose(1, 0, 3, 2, 4).reshape(b, t, h)

    out = jax.lax.map(one_head, tuple(a.transpose(2, 0, 1, 3) for a in (q, k, v)))  # [N, B, T, H]
    return out.transpose(1, 2, 0, 3)


# ------------------------------------------------------------------------------------------
# Nearest x2 upsampling + 3x3 convolution
# ------------------------------------------------------------------------------------------


def wants_folded_upsample(height: int, width: int) -> bool:
    """Whether a nearest x2 + 3x3 conv of an ``height x width`` input should run as
    :func:`nearest_upsample_conv`.

    Folding the kernel costs a pass over its Cin x Cout taps; on maps small enough for the
    patch-GEMM conv (<= 16x16 output) that costs more than the multiply-adds it saves
    (SD 2.1, 8x8 1280 -> 16x16: 104 ms folded, 61 ms upsample + patch conv).
    """
    return 4 * height * width > CPU_PATCH_CONV_MAX_PIXELS


def fold_taps(kernel, axis: int, phase: int):
    """The 3 taps of ``kernel`` along ``axis`` as seen by output phase ``phase`` of a nearest
    x2 upsampling: ``(w0, w1 + w2)`` for phase 0, ``(w0 + w1, w2)`` for phase 1."""
    w0, w1, w2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    return jnp.stack((w0, w1 + w2) if phase == 0 else (w0 + w1, w2), axis=axis)


def nearest_upsample_conv(x, kernel):
    """``conv3x3(nearest_upsample_x2(x))`` (zero padding 1, no bias) on the low-res input.

    Output pixel ``(2i + a, 2j + b)`` of the upsampled 3x3 convolution only sees input rows
    ``i - 1, i`` (``a = 0``, taps ``w0`` and ``w1 + w2``) or ``i, i + 1`` (``a = 1``, taps
    ``w0 + w1`` and ``w2``), and likewise for columns: four 2x2 convolutions with summed
    kernels give the four output phases (the "sub-pixel" view of resize-convolution, Shi et
    al. 2016; Odena et al. 2016), 16 instead of 36 multiply-adds per input pixel and
    channel pair. ``x [B, H, W, Cin]``, ``kernel [3, 3, Cin, Cout]`` -> ``[B, 2H, 2W, Cout]``;
    the phase convolutions go through :func:`conv_general_dilated`.
    """
    pads = ((1, 0), (0, 1))  # phase 0 reads rows i-1, i; phase 1 reads i, i+1
    phases = [[conv_general_dilated(x, fold_taps(fold_taps(kernel, 0, a), 1, b), (1, 1),
                                    (pads[a], pads[b]), dimension_numbers=NHWC_DIMS)
               for b in (0, 1)]
              for a in (0, 1)]
    out = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B,H,2,W,2,C]
    n, h, _, w, _, c = out.shape
    return out.reshape(n, 2 * h, 2 * w, c)
