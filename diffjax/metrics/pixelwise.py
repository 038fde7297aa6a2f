"""Peak signal-to-noise ratio for 8-bit RGB images.

PSNR = 10 log10(MAX^2 / MSE) with MAX = 255 on the 0..255 scale (equivalently MAX = 1 on the
[0, 1] scale used internally). Following the learned-compression literature (Ballé et al.
2018; CompressAI's ``compute_metrics``), the MSE is taken over all pixels and the three RGB
channels of *one* image, PSNR is computed per image and then averaged over the set, so
``psnr`` of a batch is the mean of per-image PSNRs, not the PSNR of the pooled MSE.
Identical images give ``inf``.
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from diffjax.metrics._common import pair, reduce


def mse(x: Any, y: Any, reduction: str = "mean") -> jax.Array:
    """Mean squared error on the [0, 1] scale, per image (``[N]``) or averaged.

    Args:
      x, y: uint8 ``[0, 255]`` or float ``[0, 1]`` images, ``[H, W, C]`` or ``[N, H, W, C]``.
      reduction: ``"mean"`` (scalar) or ``"none"`` (``[N]``).
    """
    a, b = pair(x, y, channels=None)
    err = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    chex.assert_shape(err, (a.shape[0],))
    return reduce(err, reduction)


def psnr(x: Any, y: Any, reduction: str = "mean") -> jax.Array:
    """PSNR in dB, computed per image then averaged (see the module docstring).

    Args:
      x: reference image(s), uint8 ``[0, 255]`` or float ``[0, 1]``, HWC or NHWC.
      y: distorted image(s), same shape.
      reduction: ``"mean"`` (scalar, mean of per-image PSNRs) or ``"none"`` (``[N]``).
    Returns:
      float32 PSNR in dB; ``inf`` for identical images.
    """
    per_image = mse(x, y, reduction="none")
    values = -10.0 * jnp.log10(per_image)  # MAX = 1 on the [0, 1] scale
    return reduce(values, reduction)
