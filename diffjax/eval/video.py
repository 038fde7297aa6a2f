"""Video rate-distortion: x264 / x265 CRF sweeps on clips, with video metrics.

Each clip (``[T, H, W, 3]`` uint8) is encoded as one stream per CRF; the rate is the size
of the raw stream in bits per pixel per frame (``8 * bytes / (T * H * W)``); quality is
:func:`diffjax.metrics.video_metrics` (frame-averaged PSNR / MS-SSIM / LPIPS and tLP
temporal consistency). Clips are coded in ``workers`` threads; metrics run in the main
thread. The result has the same layout as :func:`diffjax.eval.runner.evaluate_rd`, with
``per_clip`` records, so the same plots and BD-rate table apply.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from diffjax.errors import InputError
from diffjax.eval import baselines
from diffjax.eval.runner import _mean, bd_rate_table, environment, jitted_metrics
from diffjax.io.video import VIDEO_SUFFIXES, load_clip  # noqa: F401 (re-exported)
from diffjax.metrics import load_lpips_params, video_metrics

def _code(coder, frames: np.ndarray) -> dict:
    t0 = time.perf_counter()
    data = coder.encode(frames)
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = coder.decode(data)
    dec_s = time.perf_counter() - t0
    if decoded.shape != frames.shape:
        raise InputError(f"{coder.codec}: decoded {decoded.shape} for {frames.shape}")
    return {"bytes": len(data), "enc_s": enc_s, "dec_s": dec_s, "decoded": decoded}


def evaluate_video_rd(clips: Sequence[tuple[str, np.ndarray]],
                      codecs: Sequence[str] = ("x264", "x265"),
                      sweeps: dict | None = None, lpips_net: str = "alex", workers: int = 2,
                      anchor: str | None = None, progress: bool = True,
                      dataset: str = "") -> dict:
    """CRF sweeps of ``codecs`` on ``clips``; returns the RD result dict."""
    if not clips:
        raise InputError("no clips to evaluate")
    sweeps = sweeps or {}
    if not codecs or any(name not in baselines.video_baselines() for name in codecs):
        raise InputError(f"video codecs are {', '.join(baselines.video_baselines())}, "
                         f"got {list(codecs)}")
    jobs = [(name, crf, coder) for name in codecs
            for crf, coder in baselines.sweep(name, sweeps.get(name))]
    fns = jitted_metrics(lpips_net)
    lp_params = load_lpips_params(lpips_net)
    metrics = ("psnr", "ms_ssim", "lpips", "tlp")
    records: dict = {}
    bar = tqdm(total=len(jobs) * len(clips), desc="video RD", unit="clip", disable=not progress)
    try:
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(_code, coder, frames): (j, c)
                       for j, (_, _, coder) in enumerate(jobs)
                       for c, (_, frames) in enumerate(clips)}
            for fut in cf.as_completed(futures):
                j, c = futures[fut]
                out = fut.result()
                name, frames = clips[c]
                t, h, w = frames.shape[:3]
                use = metrics if min(h, w) > 160 else tuple(m for m in metrics if m != "ms_ssim")
                rec = {"clip": name, "frames": t, "bytes": out["bytes"],
                       "bpp": 8.0 * out["bytes"] / (t * h * w), "enc_s": out["enc_s"],
                       "dec_s": out["dec_s"], "ms_ssim": None}
                rec.update(video_metrics(frames, out["decoded"], metrics=use,
                                         lpips_params=lp_params, lpips_fn=fns["lpips"],
                                         ms_ssim_fn=fns["ms_ssim"]))
                records[j, c] = rec
                bar.update(1)
    finally:
        bar.close()
    curves: dict = {}
    for j, (name, crf, _) in enumerate(jobs):
        per_clip = [records[j, c] for c in range(len(clips))]
        agg = {k: _mean(r[k] for r in per_clip)
               for k in ("bpp", "psnr", "ms_ssim", "lpips", "tlp", "enc_s", "dec_s")}
        agg["ms_ssim_db"] = (float(-10 * np.log10(1 - agg["ms_ssim"]))
                             if agg["ms_ssim"] is not None and agg["ms_ssim"] < 1 else None)
        curves.setdefault(baselines.PRETTY[name], []).append(
            {"label": f"crf={crf}", "setting": {"baseline": name, "crf": crf}, **agg,
             "per_clip": per_clip})
    for pts in curves.values():
        pts.sort(key=lambda p: p["bpp"])
    result = {"format": "diffjax-video-rd/1",
              "dataset": {"name": dataset, "clips": [
                  {"name": n, "frames": int(f.shape[0]), "height": int(f.shape[1]),
                   "width": int(f.shape[2])} for n, f in clips]},
              "settings": {"lpips_net": lpips_net, "metrics": list(metrics),
                           "rate": "8 * stream bytes / (frames * height * width)"},
              "environment": environment(), "curves": curves, "references": {}}
    result["bd_rate"] = bd_rate_table(result, anchor)
    return result
