"""Video rate-distortion: diffjax video codecs beside x264 / x265 CRF sweeps, on clips.

Each clip (``[T, H, W, 3]`` uint8) is coded as one stream per rate point: a baseline at one
CRF, or a diffjax video codec with one set of parameters (:func:`video_codec_point`; an
image codec is wrapped intra-only, every frame coded on its own). Every stream is written
to a file and decoded from the file read back; the rate is that file's size in bits per
pixel per frame (``8 * bytes / (T * H * W)``). Quality is
:func:`diffjax.metrics.video_metrics`: frame-averaged PSNR / MS-SSIM / LPIPS, and two
temporal measures, tLP (TecoGAN) and the flow-warping error (Lai et al. 2018, with OpenCV
Farneback flow on the reference clip).

diffjax codecs run first, in the main thread, alone on the machine and after one untimed
warm-up per clip shape (jit compilation), so their timings are their own; the baselines
then run in ``workers`` threads. The result has the same layout as
:func:`diffjax.eval.runner.evaluate_rd`, with ``per_clip`` records instead of
``per_image``, so the same plots and BD-rate table apply (:func:`plot_video_rd` adds the
tLP and warping-error plots).

    from diffjax.eval.video import evaluate_video_rd, load_clip, video_codec_point
    clips = [("bp", load_clip("../shared/data/basketballpass", 30))]
    result = evaluate_video_rd(clips, ["x264"], points=[video_codec_point(codec, params)])
"""
from __future__ import annotations

import concurrent.futures as cf
import pathlib
import re
import tempfile
import time
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from diffjax.errors import InputError
from diffjax.eval import baselines
from diffjax.eval.points import RatePoint
from diffjax.eval.runner import _mean, bd_rate_table, environment, jitted_metrics
from diffjax.io.video import VIDEO_SUFFIXES, load_clip  # noqa: F401 (re-exported)
from diffjax.metrics import load_lpips_params, video_metrics
from diffjax.metrics.video import FARNEBACK, OCCLUSION, reference_flows, warping_error

METRICS = ("psnr", "ms_ssim", "lpips", "tlp", "warping_error")
_MS_SSIM_MIN_SIDE = 160
TEMPORAL_PLOTS = {  # file stem -> (result key, y label); lower is better for both
    "rd_tlp": ("tlp", "tLP (lower is better)"),
    "rd_warping_error": ("warping_error", "warping error E_warp (lower is better)"),
}


def _is_video_codec(codec: Any) -> bool:
    return getattr(codec, "media", "image") == "video"


def intra_codec(image_codec: Any) -> Any:
    """``diffjax.codecs.intra.IntraCodec(image_codec)``: every frame coded on its own."""
    try:
        from diffjax.codecs.intra import IntraCodec
    except ImportError as err:
        raise InputError(
            f"{getattr(image_codec, 'name', image_codec)!r} is an image codec; coding clips "
            f"with it needs the intra-only wrapper diffjax.codecs.intra, which this install "
            f"does not have: give a video codec") from err
    return IntraCodec(image_codec)


def video_codec_point(codec: Any, params: Any, curve: str | None = None, label: str = "",
                      setting: dict | None = None) -> RatePoint:
    """A video rate point of a diffjax codec with ``params``: ``encode(frames) -> bytes``,
    ``decode(bytes) -> frames`` (uint8 ``[T, H, W, 3]``).

    ``codec`` is a video codec (``media == "video"``: ``encode(params, frames, fps=None)``,
    ``decode(params, data)``, see :class:`diffjax.codecs.base.VideoCodec`) or an image codec,
    which is wrapped intra-only (:func:`intra_codec`); ``params`` are the (image) codec's.
    """
    setting = dict(setting or {})
    if not _is_video_codec(codec):
        name = getattr(codec, "name", type(codec).__name__)
        codec = intra_codec(codec)
        setting.setdefault("intra", name)
        default_curve = f"diffjax {name} (intra)"
    else:
        default_curve = f"diffjax {getattr(codec, 'name', type(codec).__name__)}"
    for attr in ("encode", "decode"):
        if not callable(getattr(codec, attr, None)):
            raise InputError(f"{codec!r} does not follow the video codec protocol (no {attr})")
    name = getattr(codec, "name", type(codec).__name__)
    return RatePoint(curve=curve or default_curve, label=label or name,
                     encode=lambda frames: codec.encode(params, frames),
                     decode=lambda data: codec.decode(params, data), parallel=False,
                     setting={**setting, "codec": name, "media": "video"},
                     codec=codec, params=params)


def as_video_point(point: RatePoint) -> RatePoint:
    """The video rate point of a diffjax codec point (:func:`~diffjax.eval.points.
    codec_point` / ``checkpoint_point``): same label and setting; an image codec's curve
    gets `` (intra)`` appended, since it is wrapped intra-only."""
    if point.codec is None:
        raise InputError(f"{point.curve} [{point.label}]: not a diffjax codec rate point")
    setting = {k: v for k, v in point.setting.items() if k != "codec"}
    curve = point.curve if _is_video_codec(point.codec) else f"{point.curve} (intra)"
    return video_codec_point(point.codec, point.params, curve=curve, label=point.label,
                             setting=setting)


def baseline_video_points(name: str, values: Sequence[int] | None = None) -> list[RatePoint]:
    """Rate points of ``x264`` / ``x265`` over CRF ``values`` (default sweep if None)."""
    if name not in baselines.video_baselines():
        raise InputError(f"video baselines are {', '.join(baselines.video_baselines())}, "
                         f"got {name!r}")
    return [RatePoint(curve=baselines.PRETTY[name], label=f"crf={crf}", encode=coder.encode,
                      decode=coder.decode, parallel=True,
                      setting={"baseline": name, "crf": crf})
            for crf, coder in baselines.sweep(name, values)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "x"


def _code(point: RatePoint, frames: np.ndarray, path: pathlib.Path) -> dict:
    """Encode -> file -> read back -> decode, timed (a worker thread or inline)."""
    t0 = time.perf_counter()
    data = point.encode(frames)
    enc_s = time.perf_counter() - t0
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InputError(f"{point.curve} [{point.label}]: encode returned no bytes")
    path.write_bytes(bytes(data))
    stored = path.read_bytes()
    t0 = time.perf_counter()
    decoded = np.asarray(point.decode(stored))
    dec_s = time.perf_counter() - t0
    if decoded.dtype != np.uint8 or decoded.shape != frames.shape:
        raise InputError(f"{point.curve} [{point.label}]: decoded {decoded.dtype} "
                         f"{decoded.shape} for a clip of {frames.shape}")
    return {"bytes": len(stored), "enc_s": enc_s, "dec_s": dec_s, "decoded": decoded}


def evaluate_video_rd(clips: Sequence[tuple[str, np.ndarray]],
                      codecs: Sequence[str] = ("x264", "x265"),
                      sweeps: dict | None = None, lpips_net: str = "alex", workers: int = 2,
                      anchor: str | None = None, progress: bool = True,
                      dataset: str = "", points: Sequence[RatePoint] = (),
                      bitstream_dir: str | pathlib.Path | None = None) -> dict:
    """Code every clip at every rate point; returns the RD result dict.

    Args:
      clips: ``[(name, uint8 [T, H, W, 3])]``, e.g. from :func:`load_clip`; T >= 2.
      codecs: video baselines (``x264``, ``x265``) swept over ``sweeps[name]`` CRFs.
      points: diffjax video rate points (:func:`video_codec_point`, :func:`as_video_point`).
      anchor: curve for the BD-rate table (default: the first curve, i.e. the first
        baseline when there is one).
      bitstream_dir: keep the streams there (a temporary directory otherwise).
    """
    if not clips:
        raise InputError("no clips to evaluate")
    for name, frames in clips:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"{name}: expected uint8 [T, H, W, 3], got {frames.dtype} "
                             f"{frames.shape}")
        if frames.shape[0] < 2:
            raise InputError(f"{name}: the temporal metrics need at least 2 frames")
    sweeps = sweeps or {}
    if not codecs and not points:
        raise InputError("nothing to evaluate: give video baselines and/or diffjax codecs")
    jobs = [p for name in codecs for p in baseline_video_points(name, sweeps.get(name))]
    jobs += list(points)
    fns = jitted_metrics(lpips_net)
    lp_params = load_lpips_params(lpips_net)
    tmp = None
    if bitstream_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffjax-video-rd-")
        bitstream_dir = tmp.name
    paths = {}
    for j, point in enumerate(jobs):
        folder = pathlib.Path(bitstream_dir) / _slug(point.curve) / _slug(point.label)
        folder.mkdir(parents=True, exist_ok=True)
        for c, (name, _) in enumerate(clips):
            paths[j, c] = folder / f"{c:03d}_{_slug(pathlib.Path(name).stem)}.bin"
    # the reference's flows and occlusion masks, once per clip for every rate point
    flows = [reference_flows(frames) for _, frames in clips]
    records: dict = {}
    bar = tqdm(total=len(jobs) * len(clips), desc="video RD", unit="clip", disable=not progress)

    def consume(j: int, c: int, out: dict) -> None:
        name, frames = clips[c]
        t, h, w = frames.shape[:3]
        use = METRICS if min(h, w) > _MS_SSIM_MIN_SIDE else tuple(
            m for m in METRICS if m != "ms_ssim")
        rec = {"clip": name, "frames": t, "bytes": out["bytes"],
               "bpp": 8.0 * out["bytes"] / (t * h * w), "enc_s": out["enc_s"],
               "dec_s": out["dec_s"], "ms_ssim": None}
        rec.update(video_metrics(frames, out["decoded"], metrics=use, lpips_params=lp_params,
                                 lpips_fn=fns["lpips"], ms_ssim_fn=fns["ms_ssim"],
                                 warp_flows=flows[c]))
        records[j, c] = rec
        bar.set_postfix_str(f"{jobs[j].curve} {jobs[j].label}", refresh=False)
        bar.update(1)

    try:
        # diffjax codecs first, alone on the machine, after an untimed warm-up per shape
        for j, point in enumerate(jobs):
            if point.parallel:
                continue
            seen = set()
            for c, (_, frames) in enumerate(clips):
                if frames.shape not in seen:
                    seen.add(frames.shape)
                    _code(point, frames, paths[j, c])
                consume(j, c, _code(point, frames, paths[j, c]))
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(_code, point, frames, paths[j, c]): (j, c)
                       for j, point in enumerate(jobs) if point.parallel
                       for c, (_, frames) in enumerate(clips)}
            for fut in cf.as_completed(futures):
                consume(*futures[fut], fut.result())
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()
    curves: dict = {}
    for j, point in enumerate(jobs):
        per_clip = [records[j, c] for c in range(len(clips))]
        agg = {k: _mean(r.get(k) for r in per_clip)
               for k in ("bpp", "enc_s", "dec_s") + METRICS}
        agg["ms_ssim_db"] = (float(-10 * np.log10(1 - agg["ms_ssim"]))
                             if agg["ms_ssim"] is not None and agg["ms_ssim"] < 1 else None)
        curves.setdefault(point.curve, []).append(
            {"label": point.label, "setting": point.setting, **agg, "per_clip": per_clip})
    for pts in curves.values():
        pts.sort(key=lambda p: p["bpp"])
    result = {"format": "diffjax-video-rd/1",
              "dataset": {"name": dataset, "clips": [
                  {"name": n, "frames": int(f.shape[0]), "height": int(f.shape[1]),
                   "width": int(f.shape[2]),
                   # E_warp of the source itself: what a perfect codec would score
                   "warping_error": warping_error(f, f, flows=flows[c])}
                  for c, (n, f) in enumerate(clips)]},
              "settings": {"lpips_net": lpips_net, "metrics": list(METRICS),
                           "rate": "8 * stream file bytes / (frames * height * width)",
                           "warping_error": {"flow": "OpenCV calcOpticalFlowFarneback on the "
                                                     "reference", "farneback": FARNEBACK,
                                             "occlusion": OCCLUSION}},
              "environment": environment(), "curves": curves, "references": {}}
    result["bd_rate"] = bd_rate_table(result, anchor, metrics=("psnr", "ms_ssim", "lpips"))
    return result


def plot_video_rd(result: dict, out_dir: str | pathlib.Path, title: str = ""
                  ) -> list[pathlib.Path]:
    """:func:`diffjax.eval.plots.plot_rd` plus ``rd_tlp.png`` and ``rd_warping_error.png``
    (with the source video's own warping error as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffjax.eval.plots import plot_rd

    written = plot_rd(result, out_dir, title=title)
    for stem, (key, ylabel) in TEMPORAL_PLOTS.items():
        measured = {c: [p for p in pts if p.get(key) is not None]
                    for c, pts in result["curves"].items()}
        measured = {c: pts for c, pts in measured.items() if pts}
        if not measured:
            continue
        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        for curve, pts in measured.items():
            ax.plot([p["bpp"] for p in pts], [p[key] for p in pts], "o-", ms=4, label=curve)
        source = _mean(c.get(key) for c in result["dataset"].get("clips", []))
        if source is not None:  # the source's own E_warp: a perfect codec's value
            ax.axhline(source, color="k", ls="--", lw=1.2, label="source video")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{title} {key}".strip())
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = pathlib.Path(out_dir) / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
