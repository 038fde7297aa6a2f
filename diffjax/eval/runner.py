"""The rate-distortion runner: real bitstreams, decoded, measured, aggregated.

For every :class:`~diffjax.eval.points.RatePoint` and every image the runner encodes,
writes the bitstream to disk, reads it back, decodes it and records the rate (8 x file
size / pixels, in bpp), PSNR, MS-SSIM, LPIPS and the encode / decode wall time; it then
averages per rate point (MS-SSIM in dB is computed from the mean MS-SSIM, as CompressAI
does), optionally computes FID/KID per rate point, and computes BD-rates against an
anchor curve.

Work split: diffjax codecs run first, in the main thread, one image at a time (they use
every core through XLA); then the classical encoders (external libraries / processes)
run in ``workers`` threads. Metrics run in the main thread with functions jitted once per image shape
(the runner is an entry point, so it jits; see DESIGN.md). Timings of a diffjax codec
exclude jit compilation: the first image of each new shape is encoded and decoded once
untimed. Timings of threaded baselines are wall times measured while ``workers`` jobs
share the machine.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import pathlib
import re
import tempfile
import time
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from diffjax.errors import InputError
from diffjax.eval.points import RatePoint
from diffjax.io.images import IMAGE_SUFFIXES  # noqa: F401  (re-exported)
from diffjax.metrics import (
    bd_rate,
    extract_patches,
    frechet_distance,
    inception_features,
    kernel_inception_distance,
    load_inception_params,
    load_lpips_params,
    lpips_distance,
    ms_ssim,
)
from diffjax.metrics.structural import MS_SSIM_WEIGHTS

RESULT_FORMAT = "diffjax-rd/1"
_MS_SSIM_MIN_SIDE = 10 * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # (win - 1) * 2^4 = 160


def load_images(folder: str | pathlib.Path, limit: int | None = None
                ) -> list[tuple[str, np.ndarray]]:
    """``[(file name, uint8 [H, W, 3])]`` of the images in ``folder`` (sorted by name),
    read by :func:`diffjax.io.images.read_image`."""
    from diffjax.io.images import list_images, read_image

    files = list_images(folder, limit)
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(p.name, read_image(p, mode="rgb")) for p in files]


@functools.lru_cache(maxsize=None)
def jitted_metrics(lpips_net: str) -> dict:
    """Compiled metric functions, shared by every runner in the process (compiled once per
    input shape)."""
    return {"ms_ssim": jax.jit(functools.partial(ms_ssim, reduction="none")),
            "lpips": jax.jit(functools.partial(lpips_distance, net=lpips_net)),
            "features": jax.jit(inception_features)}


class MetricSuite:
    """PSNR / MS-SSIM / LPIPS per image, and Inception features for FID/KID."""

    def __init__(self, lpips_net: str = "alex", fid: bool = False, fid_patch: int = 256):
        self.lpips_net = lpips_net
        fns = jitted_metrics(lpips_net)
        self._ms_ssim, self._lpips, self._features = fns["ms_ssim"], fns["lpips"], fns["features"]
        self._lpips_params = load_lpips_params(lpips_net)
        self.fid = fid
        self.fid_patch = fid_patch
        if fid:
            self._inception_params = load_inception_params()

    def image(self, ref: np.ndarray, dec: np.ndarray) -> dict[str, float | None]:
        err = np.mean((ref.astype(np.float64) - dec.astype(np.float64)) ** 2)
        psnr = float(10 * np.log10(255.0 ** 2 / err)) if err > 0 else float("inf")
        a = ref[None].astype(np.float32) / 255.0
        b = dec[None].astype(np.float32) / 255.0
        msssim = (float(self._ms_ssim(a, b)[0])
                  if min(ref.shape[:2]) > _MS_SSIM_MIN_SIDE else None)
        lp = float(self._lpips(self._lpips_params, a, b)[0])
        return {"psnr": psnr, "ms_ssim": msssim, "lpips": lp}

    def features(self, image: np.ndarray, use_patches: bool) -> np.ndarray:
        crops = extract_patches(image, self.fid_patch) if use_patches else [image]
        batch = np.stack(crops).astype(np.float32) / 255.0
        return np.asarray(self._features(self._inception_params, batch), np.float64)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "x"


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _code(point: RatePoint, image: np.ndarray, path: pathlib.Path) -> dict:
    """Encode -> file -> read back -> decode, timed. Runs in a worker thread or inline."""
    t0 = time.perf_counter()
    data = point.encode(image)
    enc_s = time.perf_counter() - t0
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InputError(f"{point.curve} [{point.label}]: encode returned no bytes")
    path.write_bytes(bytes(data))
    stored = path.read_bytes()
    t0 = time.perf_counter()
    decoded = np.asarray(point.decode(stored))
    dec_s = time.perf_counter() - t0
    if decoded.dtype != np.uint8 or decoded.shape != image.shape:
        raise InputError(f"{point.curve} [{point.label}]: decoded {decoded.dtype} "
                         f"{decoded.shape} for an input of {image.shape}")
    return {"bytes": len(stored), "enc_s": enc_s, "dec_s": dec_s, "decoded": decoded}


def evaluate_rd(points: Sequence[RatePoint], images: Sequence[tuple[str, np.ndarray]], *,
                metrics: MetricSuite | None = None, lpips_net: str = "alex",
                fid: bool = False, fid_patch: int = 256, workers: int = 2,
                bitstream_dir: str | pathlib.Path | None = None, anchor: str | None = None,
                references: dict | None = None, progress: bool = True,
                dataset: str = "") -> dict:
    """Run every rate point on every image; returns the result dict (see module doc).

    Args:
      points: rate points (baselines and/or diffjax codecs).
      images: ``[(name, uint8 [H, W, 3])]``, e.g. from :func:`load_images`.
      fid: also compute FID/KID per rate point (HiFiC 256-px patches when every image is
        at least ``fid_patch`` a side, else whole images).
      workers: threads for the classical encoders.
      bitstream_dir: keep the bitstreams there (a temporary directory otherwise).
      anchor: curve for the BD-rate table (default: the first curve).
      references: published curves ``{name: {"bpp": [...], "psnr": [...], ...}}`` stored
        in the result for plots and BD-rates (never mixed with measured curves).
    """
    if not points:
        raise InputError("no rate points to evaluate")
    if not images:
        raise InputError("no images to evaluate")
    for name, img in images:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise InputError(f"{name}: expected uint8 [H, W, 3], got {img.dtype} {img.shape}")
    suite = metrics or MetricSuite(lpips_net=lpips_net, fid=fid, fid_patch=fid_patch)
    use_patches = fid and all(min(im.shape[:2]) >= suite.fid_patch for _, im in images)

    tmp = None
    if bitstream_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffjax-rd-")
        bitstream_dir = tmp.name
    root = pathlib.Path(bitstream_dir)
    paths = {}
    for p_idx, point in enumerate(points):
        d = root / _slug(point.curve) / _slug(point.label)
        d.mkdir(parents=True, exist_ok=True)
        for i_idx, (name, _) in enumerate(images):
            paths[p_idx, i_idx] = d / (pathlib.Path(name).stem + ".bin")

    records: dict = {}
    feats: dict = {}
    ref_feats = None
    bar = tqdm(total=len(points) * len(images), desc="RD eval", unit="img", disable=not progress)
    try:
        if fid:
            ref_feats = np.concatenate([suite.features(im, use_patches) for _, im in images])

        def consume(p_idx, i_idx, out):
            point, (name, img) = points[p_idx], images[i_idx]
            h, w = img.shape[:2]
            rec = {"image": name, "bytes": out["bytes"], "bpp": 8.0 * out["bytes"] / (h * w),
                   "enc_s": out["enc_s"], "dec_s": out["dec_s"]}
            rec.update(suite.image(img, out["decoded"]))
            records[p_idx, i_idx] = rec
            if fid:
                feats.setdefault(p_idx, {})[i_idx] = suite.features(out["decoded"], use_patches)
            bar.set_postfix_str(f"{point.curve} {point.label}", refresh=False)
            bar.update(1)

        # diffjax codecs first, alone on the machine (timings are not shared), warmed up
        for pi, point in enumerate(points):
            if point.parallel:
                continue
            seen = set()
            for ii, (_, img) in enumerate(images):
                if img.shape not in seen:
                    seen.add(img.shape)
                    _code(point, img, paths[pi, ii])  # jit compilation, untimed
                consume(pi, ii, _code(point, img, paths[pi, ii]))
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(_code, p, img, paths[pi, ii]): (pi, ii)
                       for pi, p in enumerate(points) if p.parallel
                       for ii, (_, img) in enumerate(images)}
            for fut in cf.as_completed(futures):
                consume(*futures[fut], fut.result())
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()

    curves: dict = {}
    for pi, point in enumerate(points):
        per_image = [records[pi, ii] for ii in range(len(images))]
        agg = {k: _mean(r[k] for r in per_image)
               for k in ("bpp", "psnr", "ms_ssim", "lpips", "enc_s", "dec_s")}
        agg["ms_ssim_db"] = (float(-10 * np.log10(1 - agg["ms_ssim"]))
                             if agg["ms_ssim"] is not None and agg["ms_ssim"] < 1 else None)
        if fid:
            fake = np.concatenate([feats[pi][ii] for ii in range(len(images))])
            agg["fid"] = frechet_distance(ref_feats, fake)
            agg["kid"], agg["kid_std"] = kernel_inception_distance(ref_feats, fake)
        curves.setdefault(point.curve, []).append(
            {"label": point.label, "setting": point.setting, **agg, "per_image": per_image})
    for pts in curves.values():
        pts.sort(key=lambda p: p["bpp"])

    result = {
        "format": RESULT_FORMAT,
        "dataset": {"name": dataset, "images": [
            {"name": n, "height": int(im.shape[0]), "width": int(im.shape[1])}
            for n, im in images]},
        "settings": {"lpips_net": suite.lpips_net, "fid": bool(fid),
                     "fid_mode": (f"{suite.fid_patch}px HiFiC patches" if use_patches
                                  else "whole images") if fid else None,
                     "workers": workers},
        "environment": environment(),
        "curves": curves,
        "references": references or {},
    }
    result["bd_rate"] = bd_rate_table(result, anchor)
    return result


def environment() -> dict:
    import platform

    import diffjax
    from diffjax.eval.baselines import tool_versions

    return {"diffjax": diffjax.__version__, "jax": jax.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(), **tool_versions()}


def _curve_arrays(points: list, key: str) -> tuple[list, list]:
    pairs = [(p["bpp"], p[key]) for p in points if p.get(key) is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def bd_rate_table(result: dict, anchor: str | None = None,
                  metrics: tuple = ("psnr", "ms_ssim")) -> dict:
    """BD-rate (%) of every measured and reference curve against ``anchor`` for PSNR and
    MS-SSIM (dB), and LPIPS when ``metrics`` names it (as the quality ``-10 log10 LPIPS``,
    so lower LPIPS is higher quality). Curves that do not overlap the anchor get ``None``."""
    import math

    curves = dict(result["curves"])
    refs = {f"{k} (published)": _reference_points(v) for k, v in result["references"].items()}
    if anchor is None:
        anchor = next(iter(curves))
    if anchor not in curves:
        raise InputError(f"anchor {anchor!r} is not one of the curves: {', '.join(curves)}")
    table: dict = {"anchor": anchor, **{m: {} for m in metrics}}
    kind = {"psnr": "psnr", "ms_ssim": "ms-ssim", "lpips": "db"}

    def arrays(pts, metric):
        r, q = _curve_arrays(pts, metric)
        if metric == "lpips":
            q = [-10.0 * math.log10(max(v, 1e-10)) for v in q]
        return r, q

    for metric in metrics:
        ar, aq = arrays(curves[anchor], metric)
        for name, pts in {**curves, **refs}.items():
            if name == anchor:
                continue
            tr, tq = arrays(pts, metric)
            try:
                table[metric][name] = bd_rate(ar, aq, tr, tq, metric=kind[metric])
            except InputError:
                table[metric][name] = None
    return table


def _reference_points(ref: dict) -> list:
    n = len(ref["bpp"])
    return [{"bpp": ref["bpp"][i], "psnr": (ref.get("psnr") or [None] * n)[i],
             "ms_ssim": (ref.get("ms_ssim") or [None] * n)[i]} for i in range(n)]


def format_bd_table(table: dict) -> str:
    """Markdown table of :func:`bd_rate_table` output."""
    titles = {"psnr": "BD-rate PSNR", "ms_ssim": "BD-rate MS-SSIM (dB)", "lpips": "BD-rate LPIPS"}
    metrics = [m for m in titles if m in table]
    lines = [f"BD-rate vs {table['anchor']} (negative = fewer bits for the same quality)", "",
             "| curve | " + " | ".join(titles[m] for m in metrics) + " |",
             "| --- |" + " ---: |" * len(metrics)]
    names = list(dict.fromkeys(n for m in metrics for n in table[m]))
    fmt = lambda v: "n/a" if v is None else f"{v:+.1f} %"  # noqa: E731
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(table[m].get(n)) for m in metrics) + " |")
    return "\n".join(lines)


def summary_rows(result: dict) -> list[dict]:
    """One flat row per rate point (for printing / markdown)."""
    rows = []
    for curve, pts in result["curves"].items():
        for p in pts:
            rows.append({"curve": curve, "label": p["label"], "bpp": p["bpp"], "psnr": p["psnr"],
                         "ms_ssim": p["ms_ssim"], "lpips": p["lpips"], "enc_s": p["enc_s"],
                         "dec_s": p["dec_s"], "fid": p.get("fid"), "kid": p.get("kid"),
                         "tlp": p.get("tlp")})
    return rows
