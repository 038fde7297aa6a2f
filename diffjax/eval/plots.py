"""RD plots and published reference curves.

:func:`plot_rd` draws one PNG per metric (bpp vs PSNR, MS-SSIM in dB, LPIPS, and FID when
measured), one curve per codec, measured curves solid with markers and published
reference curves dashed with "(published)" in the legend.

Published curves are read from CompressAI-style JSON files
(``{"name": ..., "results": {"bpp": [...], "psnr" | "psnr-rgb": [...],
"ms-ssim" | "ms-ssim-rgb": [...]}}``) by :func:`load_reference`.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from diffjax.errors import InputError

PLOTS = {  # file stem -> (result key, y label, higher is better)
    "rd_psnr": ("psnr", "PSNR (RGB) [dB]"),
    "rd_ms_ssim": ("ms_ssim_db", "MS-SSIM (RGB) [dB] = -10 log10(1 - MS-SSIM)"),
    "rd_lpips": ("lpips", "LPIPS (lower is better)"),
    "rd_fid": ("fid", "FID (lower is better)"),
}


def load_reference(path: str | pathlib.Path) -> tuple[str, dict]:
    """``(name, {"bpp", "psnr", "ms_ssim", "source"})`` from a CompressAI results JSON."""
    path = pathlib.Path(path)
    try:
        doc = json.loads(path.read_text())
        res = doc["results"]
        bpp = [float(v) for v in res["bpp"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a CompressAI-style results file ({err})") from err

    def pick(*keys):
        for k in keys:
            if k in res:
                vals = [float(v) for v in res[k]]
                if len(vals) != len(bpp):
                    raise InputError(f"{path}: {k} has {len(vals)} values for {len(bpp)} rates")
                return vals
        return None

    ref = {"bpp": bpp, "psnr": pick("psnr-rgb", "psnr"),
           "ms_ssim": pick("ms-ssim-rgb", "ms-ssim", "msssim"),
           "source": doc.get("source", str(path))}
    return doc.get("name", path.stem), ref


def plot_rd(result: dict, out_dir: str | pathlib.Path, title: str = "") -> list[pathlib.Path]:
    """Write ``rd_psnr.png``, ``rd_ms_ssim.png``, ``rd_lpips.png`` (and ``rd_fid.png`` if
    FID was measured) to ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (key, ylabel) in PLOTS.items():
        measured = {c: [p for p in pts if p.get(key) is not None]
                    for c, pts in result["curves"].items()}
        measured = {c: pts for c, pts in measured.items() if pts}
        if not measured:
            continue
        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        for curve, pts in measured.items():
            ax.plot([p["bpp"] for p in pts], [p[key] for p in pts], "o-", ms=4, label=curve)
        for name, ref in result.get("references", {}).items():
            ys = _reference_values(ref, key)
            if ys is not None:
                ax.plot(ref["bpp"], ys, "k--", marker="x", ms=4, lw=1.2,
                        label=f"{name} (published)")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{title} {key.replace('_db', '').upper()}".strip())
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _reference_values(ref: dict, key: str):
    if key == "psnr":
        return ref.get("psnr")
    if key == "ms_ssim_db" and ref.get("ms_ssim"):
        return list(-10 * np.log10(1 - np.asarray(ref["ms_ssim"])))
    return None
