"""Video quality: per-frame image metrics averaged over frames, and temporal consistency.

* ``psnr``, ``ms_ssim``, ``lpips``: computed on every frame independently and averaged over
  frames (and clips), as video-compression papers report them (e.g. DVC, Lu et al. CVPR
  2019; the residual diffusion codec of Brenig & Timofte).
* ``tlp`` (temporal consistency): tLP from TecoGAN (Chu et al., "Learning Temporal
  Coherence via Self-Supervision for GAN-based Video Generation", ACM TOG 2020, sec. 5):
  ``mean_t | LPIPS(x_t, x_{t-1}) - LPIPS(y_t, y_{t-1}) |``, i.e. how much the perceptual
  change between consecutive decoded frames differs from that of the source. 0 = the
  decoded video changes exactly as much as the source; flicker or frozen frames raise
  it. (TecoGAN tables print tLP x 100; diffjax reports the raw value.) It needs no
  optical flow, so it is well defined for any content.

Clips are ``[T, H, W, 3]`` or ``[N, T, H, W, 3]`` (NTHWC), uint8 or floats in [0, 1].
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from diffjax.errors import InputError
from diffjax.metrics._common import pair
from diffjax.metrics.perceptual import load_lpips_params, lpips_distance
from diffjax.metrics.pixelwise import psnr
from diffjax.metrics.structural import ms_ssim

VIDEO_METRICS = ("psnr", "ms_ssim", "lpips", "tlp")


def _clips(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5 or arr.shape[-1] != 3:
        raise InputError(f"{name}: expected a clip [T, H, W, 3] or clips [N, T, H, W, 3], "
                         f"got shape {arr.shape}")
    return arr


def _batched(fn: Callable, a: np.ndarray, b: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(a[i:i + batch], b[i:i + batch]))
                           for i in range(0, a.shape[0], batch)])


def video_metrics(x: Any, y: Any, metrics: Sequence[str] = VIDEO_METRICS, net: str = "alex",
                  lpips_params: Any = None, lpips_fn: Callable | None = None,
                  ms_ssim_fn: Callable | None = None, batch_size: int = 8) -> dict[str, float]:
    """Frame-averaged PSNR / MS-SSIM / LPIPS and tLP between source ``x`` and decoded ``y``.

    Args:
      x, y: clips ``[T, H, W, 3]`` or ``[N, T, H, W, 3]``, uint8 or float [0, 1].
      metrics: any of ``VIDEO_METRICS``; MS-SSIM needs frames larger than 160 px a side.
      lpips_fn: optional ``fn(params, a, b) -> [B]`` (e.g. ``jax.jit(lpips_distance, ...)``)
        used for LPIPS and tLP; eager :func:`lpips_distance` when ``None``.
      ms_ssim_fn: optional ``fn(a, b) -> [B]`` (e.g. a jitted ``ms_ssim(...,
        reduction="none")``); eager when ``None``.
    Returns:
      ``{name: value}`` as Python floats.
    """
    unknown = set(metrics) - set(VIDEO_METRICS)
    if unknown:
        raise InputError(f"unknown video metrics {sorted(unknown)}; choose from {VIDEO_METRICS}")
    cx, cy = _clips(x, "x"), _clips(y, "y")
    if cx.shape != cy.shape:
        raise InputError(f"x and y must have the same shape, got {cx.shape} and {cy.shape}")
    n, t = cx.shape[:2]
    fx, fy = pair(cx.reshape(n * t, *cx.shape[2:]), cy.reshape(n * t, *cy.shape[2:]))
    fx, fy = np.asarray(fx), np.asarray(fy)
    out: dict[str, float] = {}
    if "psnr" in metrics:
        out["psnr"] = float(np.mean(_batched(lambda a, b: psnr(a, b, reduction="none"),
                                             fx, fy, batch_size)))
    if "ms_ssim" in metrics:
        fn = ms_ssim_fn or (lambda a, b: ms_ssim(a, b, reduction="none"))
        out["ms_ssim"] = float(np.mean(_batched(fn, fx, fy, batch_size)))
    if "lpips" in metrics or "tlp" in metrics:
        params = lpips_params if lpips_params is not None else load_lpips_params(net)
        fn = lpips_fn or (lambda p, a, b: lpips_distance(p, a, b, net=net))

        def dist(a, b):
            return fn(params, a, b)

        if "lpips" in metrics:
            out["lpips"] = float(np.mean(_batched(dist, fx, fy, batch_size)))
        if "tlp" in metrics:
            if t < 2:
                raise InputError("tLP needs clips of at least 2 frames")
            vx, vy = fx.reshape(n, t, *fx.shape[1:]), fy.reshape(n, t, *fy.shape[1:])
            cur_x, prev_x = vx[:, 1:].reshape(-1, *fx.shape[1:]), vx[:, :-1].reshape(
                -1, *fx.shape[1:])
            cur_y, prev_y = vy[:, 1:].reshape(-1, *fy.shape[1:]), vy[:, :-1].reshape(
                -1, *fy.shape[1:])
            lx = _batched(dist, cur_x, prev_x, batch_size)
            ly = _batched(dist, cur_y, prev_y, batch_size)
            out["tlp"] = float(np.mean(np.abs(lx - ly)))
    return out
