"""SSIM and multi-scale SSIM (MS-SSIM).

SSIM: Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to
structural similarity", IEEE TIP 2004, eq. (13), with an 11x11 Gaussian window
(sigma = 1.5), K1 = 0.01, K2 = 0.03 and alpha = beta = gamma = 1.

MS-SSIM: Wang, Simoncelli & Bovik, "Multi-scale structural similarity for image quality
assessment", Asilomar 2003, eq. (7): M = 5 scales with exponents
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333); the contrast-structure term ``cs`` at scales
1..4 and the full SSIM at scale 5, a 2x2 average-pool between scales.

The implementation follows ``pytorch_msssim`` (the reference CompressAI and most learned
codec papers use) operation for operation, so values agree within 1e-4:

* the Gaussian blur is separable and "valid" (no padding), applied per channel;
* the statistics are averaged per channel; ``cs`` and the last-scale SSIM are clamped at 0
  (ReLU) before the weighted geometric mean; the per-channel MS-SSIM is averaged over the
  RGB channels;
* downsampling is ``avg_pool2d(kernel=2, padding=size % 2)`` with zero padding counted, as
  in ``pytorch_msssim``.

MS-SSIM needs a smaller side larger than ``(win_size - 1) * 2**4 = 160`` pixels.
Values are often reported in dB as ``-10 log10(1 - MS-SSIM)`` (:func:`ms_ssim_db`).
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.errors import InputError
from diffjax.metrics._common import pair, reduce

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian of odd ``size`` centred on ``size // 2``."""
    if size % 2 != 1:
        raise InputError(f"the SSIM window size must be odd, got {size}")
    coords = np.arange(size, dtype=np.float32) - size // 2
    g = np.exp(-(coords ** 2) / (2 * sigma ** 2)).astype(np.float32)
    return g / g.sum()


def _blur(x: jax.Array, win: np.ndarray) -> jax.Array:
    """Separable valid Gaussian blur of ``[N, H, W, C]``, per channel.

    Written as a weighted sum of shifted slices (11 taps per axis): the same valid
    convolution as ``pytorch_msssim``'s grouped ``conv2d``, but an elementwise program that
    XLA runs an order of magnitude faster on CPU than a 1-channel convolution.
    """
    k = len(win)
    for axis in (1, 2):
        n_out = x.shape[axis] - k + 1
        acc = None
        for i, w in enumerate(win):
            term = lax.slice_in_dim(x, i, i + n_out, axis=axis) * np.float32(w)
            acc = term if acc is None else acc + term
        x = acc
    return x


def _ssim_cs(x: jax.Array, y: jax.Array, win: np.ndarray, data_range: float,
             k: tuple[float, float]) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean SSIM and contrast-structure ``cs``, each ``[N, C]`` (TIP 2004)."""
    c1 = (k[0] * data_range) ** 2
    c2 = (k[1] * data_range) ** 2
    # one blur of the five maps stacked on the channel axis (a fifth of the program size)
    c = x.shape[-1]
    stats = _blur(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), win)
    mu1, mu2, xx, yy, xy = (stats[..., i * c:(i + 1) * c] for i in range(5))
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = xx - mu1_sq
    s2 = yy - mu2_sq
    s12 = xy - mu12
    cs_map = (2 * s12 + c2) / (s1 + s2 + c2)
    ssim_map = ((2 * mu12 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map
    return jnp.mean(ssim_map, axis=(1, 2)), jnp.mean(cs_map, axis=(1, 2))


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    """``torch.nn.functional.avg_pool2d(x, 2, padding=size % 2)`` (zero pad counted)."""
    _, h, w, _ = x.shape
    pad = ((0, 0), (h % 2, h % 2), (w % 2, w % 2), (0, 0))
    summed = lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), pad)
    return summed / 4.0


def ssim(x: Any, y: Any, win_size: int = 11, win_sigma: float = 1.5,
         k: tuple[float, float] = (0.01, 0.03), reduction: str = "mean") -> jax.Array:
    """Single-scale SSIM (Wang et al. 2004), averaged over channels then images.

    Args:
      x, y: uint8 ``[0, 255]`` or float ``[0, 1]`` images, ``[H, W, C]`` or ``[N, H, W, C]``
        with both spatial sides >= ``win_size``.
      reduction: ``"mean"`` or ``"none"`` (``[N]``).
    """
    a, b = pair(x, y, channels=None)
    if min(a.shape[1:3]) < win_size:
        raise InputError(f"SSIM needs images of at least {win_size}x{win_size} pixels, "
                         f"got {a.shape[1]}x{a.shape[2]}")
    per_channel, _ = _ssim_cs(a, b, gaussian_window(win_size, win_sigma), 1.0, k)
    values = jnp.mean(per_channel, axis=1)
    chex.assert_shape(values, (a.shape[0],))
    return reduce(values, reduction)


def ms_ssim(x: Any, y: Any, weights: Sequence[float] = MS_SSIM_WEIGHTS, win_size: int = 11,
            win_sigma: float = 1.5, k: tuple[float, float] = (0.01, 0.03),
            reduction: str = "mean") -> jax.Array:
    """Multi-scale SSIM (Wang et al. 2003, eq. 7) matching ``pytorch_msssim.ms_ssim``.

    Args:
      x: reference image(s), uint8 ``[0, 255]`` or float ``[0, 1]``, HWC or NHWC.
      y: distorted image(s), same shape.
      weights: per-scale exponents (default: the standard 5 scales).
      reduction: ``"mean"`` (scalar) or ``"none"`` (``[N]``).
    Returns:
      float32 MS-SSIM in [0, 1] (1 = identical).
    """
    a, b = pair(x, y, channels=None)
    levels = len(weights)
    min_side = (win_size - 1) * 2 ** (levels - 1)
    if min(a.shape[1:3]) <= min_side:
        raise InputError(f"MS-SSIM with {levels} scales needs both image sides > {min_side} "
                         f"pixels, got {a.shape[1]}x{a.shape[2]}")
    win = gaussian_window(win_size, win_sigma)
    factors = []
    for level in range(levels):
        per_channel, cs = _ssim_cs(a, b, win, 1.0, k)
        if level < levels - 1:
            factors.append(jax.nn.relu(cs))
            a, b = _avg_pool_2x2(a), _avg_pool_2x2(b)
    factors.append(jax.nn.relu(per_channel))
    stacked = jnp.stack(factors)  # [levels, N, C]
    w = jnp.asarray(weights, jnp.float32).reshape(-1, 1, 1)
    values = jnp.mean(jnp.prod(stacked ** w, axis=0), axis=1)
    chex.assert_shape(values, (stacked.shape[1],))
    return reduce(values, reduction)


def ms_ssim_db(value: Any) -> jax.Array:
    """MS-SSIM on the dB scale used in RD plots: ``-10 log10(1 - MS-SSIM)``."""
    return -10.0 * jnp.log10(1.0 - jnp.asarray(value, jnp.float32))
