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
* ``warping_error`` (temporal consistency): the flow-warping error E_warp of Lai et al.,
  "Learning Blind Video Temporal Consistency" (ECCV 2018, eq. 8), with OpenCV's Farneback
  flow instead of FlowNet2. See :func:`warping_error`.

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

VIDEO_METRICS = ("psnr", "ms_ssim", "lpips", "tlp", "warping_error")


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


# Farneback parameters: the values of OpenCV's optical-flow tutorial (a 3-level pyramid,
# 15 px averaging window, degree-2 polynomial fit over 5x5 with sigma 1.2), good for the
# few-pixel motions of consecutive frames.
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5,
             "poly_sigma": 1.2, "flags": 0}
# Occlusion thresholds of Ruder et al., "Artistic style transfer for videos" (GCPR 2016),
# as used in Lai et al.'s evaluation code (utils.detect_occlusion): a pixel is occluded if
#   |w~f + wb|^2 > 0.01 (|w~f|^2 + |wb|^2) + 0.5      (forward-backward inconsistent) or
#   |grad u|^2 + |grad v|^2 > 0.01 |wb|^2 + 0.002      (on a motion boundary),
# with wb the backward flow t -> t-1 and w~f the forward flow t-1 -> t warped to frame t.
OCCLUSION = {"consistency": (0.01, 0.5), "boundary": (0.01, 0.002)}


def _unit_clips(x: Any, name: str) -> np.ndarray:
    arr = _clips(x, name)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def optical_flow(a: np.ndarray, b: np.ndarray, farneback: dict | None = None) -> np.ndarray:
    """Dense Farneback flow from frame ``a`` to frame ``b`` (RGB ``[H, W, 3]`` in [0, 1]),
    computed on their 8-bit BT.601 grey levels with OpenCV: ``[H, W, 2]`` float32
    ``(dx, dy)`` such that ``a(p) ~ b(p + flow(p))``."""
    import cv2

    p = {**FARNEBACK, **(farneback or {})}
    ga, gb = (cv2.cvtColor(np.rint(f * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
              for f in (a, b))
    return cv2.calcOpticalFlowFarneback(ga, gb, None, p["pyr_scale"], p["levels"],
                                        p["winsize"], p["iterations"], p["poly_n"],
                                        p["poly_sigma"], p["flags"])


def backward_warp(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``out(p) = image(p + flow(p))``, bilinear (``cv2.remap``), and a bool ``[H, W]``
    mask of the pixels whose source point lies inside the image."""
    import cv2

    h, w = flow.shape[:2]
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    mx, my = gx + flow[..., 0], gy + flow[..., 1]
    out = cv2.remap(np.ascontiguousarray(image, dtype=np.float32), mx, my, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return out.reshape(image.shape), inside


def occlusion_mask(flow_bw: np.ndarray, flow_fw: np.ndarray) -> np.ndarray:
    """Bool ``[H, W]``, True where frame t's pixel has no reliable match in frame t-1:
    forward-backward inconsistent, on a motion boundary (see ``OCCLUSION``), or mapped
    outside frame t-1. ``flow_bw`` is t -> t-1, ``flow_fw`` is t-1 -> t."""
    a1, a2 = OCCLUSION["consistency"]
    b1, b2 = OCCLUSION["boundary"]

    def sq(f):
        return np.sum(np.square(f, dtype=np.float64), axis=-1)

    fw_warped, inside = backward_warp(flow_fw, flow_bw)
    inconsistent = sq(fw_warped + flow_bw) > a1 * (sq(fw_warped) + sq(flow_bw)) + a2
    du = np.zeros_like(flow_bw)
    dv = np.zeros_like(flow_bw)
    du[:, :-1] = flow_bw[:, :-1] - flow_bw[:, 1:]
    dv[:-1] = flow_bw[:-1] - flow_bw[1:]
    boundary = sq(du) + sq(dv) > b1 * sq(flow_bw) + b2
    return inconsistent | boundary | ~inside


def reference_flows(x: Any, farneback: dict | None = None, mask: bool = True,
                    flow_fn: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`warping_error` needs of the reference, computed once per clip:
    ``(flow_bw [N, T - 1, H, W, 2], valid [N, T - 1, H, W])`` with ``flow_bw[:, k]`` the
    flow from frame k + 1 to frame k and ``valid`` the non-occluded pixels (all True when
    ``mask`` is False). ~3x the clip's uint8 size in memory."""
    cx = _unit_clips(x, "x")
    if cx.shape[1] < 2:
        raise InputError("the warping error needs clips of at least 2 frames")
    if flow_fn is None:
        def flow_fn(a, b):
            return optical_flow(a, b, farneback)
    n, t, h, w = cx.shape[:4]
    flows = np.zeros((n, t - 1, h, w, 2), np.float32)
    valid = np.ones((n, t - 1, h, w), bool)
    for i in range(n):
        for k in range(1, t):
            flows[i, k - 1] = flow_fn(cx[i, k], cx[i, k - 1])
            if mask:
                flow_fw = np.asarray(flow_fn(cx[i, k - 1], cx[i, k]), np.float32)
                valid[i, k - 1] = ~occlusion_mask(flows[i, k - 1], flow_fw)
    return flows, valid


def warping_error(x: Any, y: Any, farneback: dict | None = None, mask: bool = True,
                  reduction: str = "mean", flow_fn: Callable | None = None,
                  flows: tuple[np.ndarray, np.ndarray] | None = None) -> float | np.ndarray:
    """Flow-warping error E_warp (Lai et al., ECCV 2018, eq. 8) of decoded ``y`` against
    reference ``x``: lower = temporally more consistent.

    For each t >= 1 the backward flow t -> t-1 (and the forward flow t-1 -> t, for the
    occlusion mask) is computed on the *reference* frames (:func:`optical_flow`, OpenCV
    Farneback with ``FARNEBACK``); decoded frame t-1 is warped to t with it
    (:func:`backward_warp`), and::

        E_t = sum_p M_t(p) ||y_t(p) - warp(y_{t-1})(p)||^2 / sum_p M_t(p)

    with RGB in [0, 1], the squared error summed over the 3 channels, and M_t = 1 - the
    :func:`occlusion_mask` (``mask=False``: every pixel). As in Lai et al.'s evaluation
    code, E_warp is the mean of E_t over the T - 1 frame pairs (and over clips). Using the
    reference's flow means the decoded video is judged against the true motion: flicker
    scores high. A copy of the reference does not score 0 on real content (flow errors,
    lighting changes, occlusions the mask misses), so read a codec's E_warp beside the
    reference's own ``warping_error(x, x)``.

    Args:
      x, y: clips ``[T, H, W, 3]`` or ``[N, T, H, W, 3]``, uint8 or float [0, 1], T >= 2.
      farneback: overrides of ``FARNEBACK``.
      mask: exclude occluded pixels (False: average over every pixel).
      flow_fn: ``fn(a, b) -> [H, W, 2]`` flow with ``a(p) ~ b(p + flow(p))`` on float
        [0, 1] frames, replacing Farneback (e.g. a learned flow such as RAFT, or exact flows
        in tests).
      flows: :func:`reference_flows` of ``x``, precomputed (then ``farneback``, ``mask`` and
        ``flow_fn`` are those it was computed with), to score many decodes of one clip.
      reduction: ``"mean"`` (a float) or ``"none"`` (``[N, T - 1]`` per-pair values).

    Note: Lai et al. used FlowNet2, whose flow is sharp at object edges. Farneback's flow is
    smooth, so with the same thresholds the motion-boundary test flags a band several
    pixels wide around moving objects and the flow inside that band is less exact: compare
    E_warp values only between codecs measured with the same flow.

    Returns:
      E_warp; a pair whose pixels are all occluded is NaN and left out of the mean.
    """
    cx, cy = _unit_clips(x, "x"), _unit_clips(y, "y")
    if cx.shape != cy.shape:
        raise InputError(f"x and y must have the same shape, got {cx.shape} and {cy.shape}")
    if reduction not in ("mean", "none"):
        raise InputError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    flow_bw, valid = flows if flows is not None else reference_flows(cx, farneback, mask,
                                                                      flow_fn)
    n, t = cx.shape[:2]
    if flow_bw.shape != (n, t - 1, *cx.shape[2:4], 2) or valid.shape != flow_bw.shape[:-1]:
        raise InputError(f"flows {flow_bw.shape} / {valid.shape} do not fit clips {cx.shape}")
    errors = np.full((n, t - 1), np.nan)
    for i in range(n):
        for k in range(1, t):
            warped, _ = backward_warp(cy[i, k - 1], flow_bw[i, k - 1])
            count = int(valid[i, k - 1].sum())
            if count:
                sq = np.sum(np.square(cy[i, k].astype(np.float64) - warped), axis=-1)
                errors[i, k - 1] = float(sq[valid[i, k - 1]].sum() / count)
    if reduction == "none":
        return errors
    return float(np.nanmean(errors)) if np.isfinite(errors).any() else float("nan")


def video_metrics(x: Any, y: Any, metrics: Sequence[str] = VIDEO_METRICS, net: str = "alex",
                  lpips_params: Any = None, lpips_fn: Callable | None = None,
                  ms_ssim_fn: Callable | None = None, batch_size: int = 8,
                  warp_flows: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Frame-averaged PSNR / MS-SSIM / LPIPS, tLP and the warping error between source
    ``x`` and decoded ``y``.

    Args:
      x, y: clips ``[T, H, W, 3]`` or ``[N, T, H, W, 3]``, uint8 or float [0, 1].
      metrics: any of ``VIDEO_METRICS``; MS-SSIM needs frames larger than 160 px a side.
      lpips_fn: optional ``fn(params, a, b) -> [B]`` (e.g. ``jax.jit(lpips_distance, ...)``)
        used for LPIPS and tLP; eager :func:`lpips_distance` when ``None``.
      ms_ssim_fn: optional ``fn(a, b) -> [B]`` (e.g. a jitted ``ms_ssim(...,
        reduction="none")``); eager when ``None``.
      warp_flows: :func:`reference_flows` of ``x`` for the warping error (computed here
        when ``None``).
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
    if "warping_error" in metrics:
        out["warping_error"] = warping_error(cx, cy, flows=warp_flows)
    return out
