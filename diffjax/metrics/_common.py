"""Input conventions shared by every metric in :mod:`diffjax.metrics`.

All image metrics accept

* ``uint8`` arrays with values in ``[0, 255]`` (8-bit RGB, the usual compression setting), or
* floating arrays with values in ``[0, 1]``,

shaped ``[H, W, C]`` (one image) or ``[N, H, W, C]`` (a batch, NHWC). They are converted to
``float32`` NHWC in ``[0, 1]``. Values outside ``[0, 1]`` are refused with an
:class:`~diffjax.InputError` when the array is concrete (a numpy array or a committed jax
array); under a caller's ``jax.jit`` the values are abstract and only shapes are checked.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import InputError

_REDUCTIONS = ("mean", "none")


def is_concrete(x: Any) -> bool:
    """True when the values of ``x`` can be inspected (not a tracer under jit/grad)."""
    return not isinstance(x, jax.core.Tracer)


def to_unit_nhwc(x: Any, name: str = "image", channels: int | None = 3) -> jax.Array:
    """Convert ``uint8 [0,255]`` or ``float [0,1]`` HWC/NHWC input to float32 NHWC in [0, 1].

    Args:
      x: the image(s).
      name: used in error messages.
      channels: required channel count, or ``None`` for any.
    Returns:
      ``float32 [N, H, W, C]``.
    """
    if isinstance(x, (list, tuple)):
        x = np.stack([np.asarray(v) for v in x])
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"{name}: expected an image [H, W, C] or a batch [N, H, W, C], "
                         f"got shape {tuple(x.shape)}")
    if channels is not None and x.shape[-1] != channels:
        raise InputError(f"{name}: expected {channels} channels (NHWC), got shape "
                         f"{tuple(x.shape)}")
    if min(x.shape) == 0:
        raise InputError(f"{name}: empty array of shape {tuple(x.shape)}")
    dtype = np.dtype(x.dtype)
    if dtype == np.uint8:
        return jnp.asarray(x, jnp.float32) / 255.0
    if not np.issubdtype(dtype, np.floating):
        raise InputError(f"{name}: expected uint8 in [0, 255] or floats in [0, 1], got {dtype}")
    if is_concrete(x):
        arr = np.asarray(x)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"{name}: float images must lie in [0, 1], got values in "
                             f"[{lo:.4g}, {hi:.4g}] (pass uint8 for 0..255 data)")
    return jnp.asarray(x, jnp.float32)


def pair(x: Any, y: Any, channels: int | None = 3) -> tuple[jax.Array, jax.Array]:
    """Convert a (reference, distorted) pair and check that the shapes agree."""
    a = to_unit_nhwc(x, "x", channels)
    b = to_unit_nhwc(y, "y", channels)
    if a.shape != b.shape:
        raise InputError(f"x and y must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return a, b


def reduce(values: jax.Array, reduction: str) -> jax.Array:
    """``"mean"`` over the batch or ``"none"`` (per image ``[N]``)."""
    if reduction == "mean":
        return jnp.mean(values)
    if reduction == "none":
        return values
    raise InputError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
