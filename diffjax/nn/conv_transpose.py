"""Strided transposed convolution computed as a sub-pixel convolution.

``nn.ConvTranspose`` lowers to a convolution of the *dilated* input (``lhs_dilation``).
XLA:CPU runs that slowly, and the gradient with respect to its kernel pathologically so:
measured here, 9.0 s for one 5x5, stride-2, 64->64 channel layer on 8x64x64 inputs,
against 0.03-0.12 s for the gradients of ordinary convolutions of the same size. That
one gradient made a hyperprior training step 20x its forward pass.

The same function is a stride-1 convolution followed by depth-to-space (Shi et al.,
"Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel
Convolutional Neural Network", CVPR 2016, sec. 2.2): output phase ``r`` of every spatial
dimension only meets the kernel taps ``i = s·m + lo − r``, so the ``s·s`` phases are the
output channels of one small convolution whose kernel gathers those taps (zeros where a
phase has fewer taps). It does not multiply the inserted zeros (36 instead of 100
multiply-adds per input pixel and channel pair for k = 5, s = 2), and its gradients are
ordinary convolution gradients.

:class:`SubpixelConvTranspose` has exactly the parameters of ``nn.ConvTranspose(...,
transpose_kernel=True)`` (``kernel [k, k, out, in]``, ``bias [out]``, same initialisers), so
checkpoints and converters are unchanged, and computes the same values (float32 rounding
aside; tested against ``nn.ConvTranspose``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _phase_taps(kernel: int, stride: int, lo: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(m_lo, taps [M, s], valid [M, s])``: window offset of the sub-pixel convolution
    and, per window position ``m`` and output phase ``r``, the tap ``s·m + lo − r`` of the
    flipped kernel."""
    m_lo = -(lo // stride)
    m_hi = (kernel - 1 + stride - 1 - lo) // stride
    m = np.arange(m_lo, m_hi + 1)[:, None]
    taps = stride * m + lo - np.arange(stride)[None, :]
    valid = (taps >= 0) & (taps < kernel)
    return m_lo, np.clip(taps, 0, kernel - 1), valid


def subpixel_conv_transpose(x: jax.Array, kernel: jax.Array, stride: int,
                            padding: tuple[int, int]) -> jax.Array:
    """``lax.conv_transpose(x, kernel, (s, s), (padding, padding), transpose_kernel=True)``
    for square kernels, as a sub-pixel convolution.

    Args:
      x: ``[B, H, W, C_in]``.
      kernel: ``[k, k, C_out, C_in]`` (the ``transpose_kernel=True`` layout of Flax).
      stride: ``s``.
      padding: ``(lo, hi)`` of the equivalent convolution of the dilated input, with
        ``lo + hi == k + s − 2`` (output exactly ``s`` times the input size).
    Returns:
      ``[B, s·H, s·W, C_out]``.
    """
    k, s = kernel.shape[0], int(stride)
    lo, hi = padding
    if kernel.shape[0] != kernel.shape[1] or lo + hi != k + s - 2:
        raise ValueError(f"sub-pixel transposed convolution needs a square kernel and "
                         f"lo + hi = k + s - 2; got kernel {kernel.shape}, padding {padding}")
    b, h, w, _ = x.shape
    c_out = kernel.shape[2]
    # The kernel of the equivalent convolution: spatially flipped, [k, k, in, out].
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    m_lo, taps, valid = _phase_taps(k, s, lo)
    size = taps.shape[0]
    # [M, s, M, s, in, out]: tap (taps[mh, rh], taps[mw, rw]) for every window position/phase
    sub = flipped[taps[:, :, None, None], taps[None, None, :, :]]
    mask = (valid[:, :, None, None] & valid[None, None, :, :]).astype(kernel.dtype)
    sub = sub * mask[..., None, None]
    # -> [M, M, in, (rh, rw, out)]
    sub = sub.transpose(0, 2, 4, 1, 3, 5).reshape(size, size, -1, s * s * c_out)
    pad = (-m_lo, size - 1 + m_lo)
    y = jax.lax.conv_general_dilated(x, sub, (1, 1), (pad, pad),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(b, h, w, s, s, c_out).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h * s, w * s, c_out)


class SubpixelConvTranspose(nn.Module):
    """Drop-in for ``nn.ConvTranspose(features, (k, k), (s, s), padding=((lo, hi),) * 2,
    transpose_kernel=True)`` that runs as a sub-pixel convolution (module docstring).

    ``x [B, H, W, C_in] -> [B, s·H, s·W, features]``.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    padding: Sequence[tuple[int, int]]
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, k2 = self.kernel_size
        s, s2 = self.strides
        if k != k2 or s != s2 or self.padding[0] != self.padding[1]:
            raise ValueError("SubpixelConvTranspose supports square kernels, strides, paddings")
        kernel = self.param("kernel", self.kernel_init, (k, k, self.features, x.shape[-1]),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = subpixel_conv_transpose(x, kernel, s, tuple(self.padding[0]))
        return y if bias is None else y + bias
