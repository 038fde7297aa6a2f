"""Bjøntegaard delta rate and delta quality.

G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves", VCEG-M33,
2001, with the piecewise cubic (PCHIP) interpolation that replaced the original cubic
polynomial fit in later VCEG/JVET practice (VCEG-AL22; JVET common test conditions):

* BD-rate: log-rate is interpolated as a monotone piecewise cubic function of quality for
  both curves, integrated over the overlapping quality interval; the mean difference
  ``D`` gives ``BD-rate = (exp(D) - 1) * 100`` percent. Negative = the test codec needs
  fewer bits for the same quality than the anchor.
* BD-quality (BD-PSNR): quality as a function of log-rate, mean difference over the
  overlapping log-rate interval, in the quality's unit (dB).

MS-SSIM curves are compared in dB, ``-10 log10(1 - MS-SSIM)`` (``metric="ms-ssim"``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator

from diffjax.errors import InputError

_METRICS = ("psnr", "ms-ssim", "db")


def _quality(values: Sequence[float], metric: str, name: str) -> np.ndarray:
    q = np.asarray(values, np.float64)
    if metric == "ms-ssim":
        if np.any((q <= 0) | (q >= 1)):
            raise InputError(f"{name}: MS-SSIM values must lie in (0, 1), got {q}")
        return -10.0 * np.log10(1.0 - q)
    if metric in ("psnr", "db"):
        return q
    raise InputError(f"metric must be one of {_METRICS}, got {metric!r}")


def _curve(rate: Sequence[float], quality: Sequence[float], metric: str, name: str):
    r = np.asarray(rate, np.float64)
    q = _quality(quality, metric, name)
    if r.ndim != 1 or r.shape != q.shape:
        raise InputError(f"{name}: rate and quality must be 1-D of equal length, got "
                         f"{r.shape} and {q.shape}")
    if r.size < 2:
        raise InputError(f"{name}: at least 2 rate points are needed, got {r.size}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(q))) or np.any(r <= 0):
        raise InputError(f"{name}: rates must be positive and all values finite")
    return np.log(r), q


def _mean_over_overlap(x1, y1, x2, y2, what: str) -> float:
    """Mean of ``f2 - f1`` over the overlap of the x ranges, ``f_i`` = PCHIP(x_i, y_i)."""
    lo, hi = max(x1.min(), x2.min()), min(x1.max(), x2.max())
    if not hi > lo:
        raise InputError(f"the two RD curves do not overlap in {what}")
    areas = []
    for x, y in ((x1, y1), (x2, y2)):
        order = np.argsort(x)
        xs, ys = x[order], y[order]
        if np.any(np.diff(xs) <= 0):
            raise InputError(f"{what} values must be distinct along a curve, got {xs}")
        areas.append(PchipInterpolator(xs, ys).integrate(lo, hi))
    return float((areas[1] - areas[0]) / (hi - lo))


def bd_rate(rate_anchor: Sequence[float], quality_anchor: Sequence[float],
            rate_test: Sequence[float], quality_test: Sequence[float],
            metric: str = "psnr") -> float:
    """Bjøntegaard delta rate of ``test`` against ``anchor`` in percent.

    Args:
      rate_*: bit rates (e.g. bpp), positive.
      quality_*: PSNR in dB (``metric="psnr"``), MS-SSIM in (0, 1) (``"ms-ssim"``,
        converted to dB) or any dB quality (``"db"``).
    Returns:
      percent; -20.0 means the test codec needs 20 % fewer bits at equal quality.
    """
    lr1, q1 = _curve(rate_anchor, quality_anchor, metric, "anchor")
    lr2, q2 = _curve(rate_test, quality_test, metric, "test")
    return float((np.exp(_mean_over_overlap(q1, lr1, q2, lr2, "quality")) - 1.0) * 100.0)


def bd_quality(rate_anchor: Sequence[float], quality_anchor: Sequence[float],
               rate_test: Sequence[float], quality_test: Sequence[float],
               metric: str = "psnr") -> float:
    """Bjøntegaard delta quality (BD-PSNR for ``metric="psnr"``) in dB; positive = the
    test codec is better at equal rate."""
    lr1, q1 = _curve(rate_anchor, quality_anchor, metric, "anchor")
    lr2, q2 = _curve(rate_test, quality_test, metric, "test")
    return _mean_over_overlap(lr1, q1, lr2, q2, "log-rate")


bd_psnr = bd_quality
