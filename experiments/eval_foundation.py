"""Kodak rate-distortion of a trained foundation latent codec (Relic et al., ECCV 2024).

One model covers every rate: each ``lambda`` of ``--lambdas`` (the codec's ``quality``) is
one rate point. Every image is encoded to a real bitstream, written to disk, read back and
decoded (:func:`diffjax.eval.runner.evaluate_rd`), so bpp is the file size. Besides the RD
results this records what the parameter estimator chose per image -- the denoising
timestep ``t`` and the number of DDIM steps the decoder ran (read back from the
bitstreams' side information) -- and plots how ``t``, bpp and quality move with lambda.

    python -m experiments.eval_foundation runs/foundation-taef2 ../shared/data/kodak \\
        --out results/kodak/foundation_taef2 --combine results/kodak/residual/rd.json

``--combine`` adds the curves of a committed ``rd.json`` of the same images (the classical
baselines and the residual codec) to the plots and the BD-rate table. ``--reuse DIR`` takes
the foundation curve, its per-image rows and ``lambda.json`` from a previous output folder
instead of evaluating a model (no workdir or images needed), so the combination can be
redone when the other curves change without the foundation weights:

    python -m experiments.eval_foundation --reuse results/kodak/foundation_taef2 \
        --out results/kodak/foundation_taef2 --combine results/kodak/residual/rd.json

Outputs in ``--out``:
``rd.json``, ``rd_psnr.png``, ``rd_ms_ssim.png``, ``rd_lpips.png``, ``bd_rate.md``,
``lambda.json`` and ``lambda.png`` (t, steps, bpp, PSNR and LPIPS against lambda).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CURVE = "diffjax foundation (TAEF2)"


def load_model(workdir: str, step: int | None = None, use_ema: bool = False):
    """(codec kwargs, params, step) of a foundation model folder or training workdir."""
    from diffjax.codecs.pretrained import load_model as load

    model = load(workdir, "foundation", step=step, use_ema=use_ema)
    return model.config, model.params, model.info.get("step")


def lambda_table(result: dict, codecs: dict, params, bitstream_dir: pathlib.Path) -> list:
    """Per lambda: mean bpp/PSNR/MS-SSIM/LPIPS and the predicted t / step counts."""
    from diffjax.eval.runner import _slug

    rows = []
    for p in result["curves"][CURVE]:
        lam = p["setting"]["quality"]
        codec = codecs[lam]
        folder = bitstream_dir / _slug(CURVE) / _slug(p["label"])
        sides = [codec.side_info(params, (folder / (pathlib.Path(r["image"]).stem + ".bin"))
                                 .read_bytes()) for r in p["per_image"]]
        ts = np.array([s["t"] for s in sides])
        steps = np.array([s["steps"] for s in sides])
        rows.append({"lambda": lam, "bpp": p["bpp"], "psnr": p["psnr"], "ms_ssim": p["ms_ssim"],
                     "lpips": p["lpips"], "t_mean": float(ts.mean()), "t_min": float(ts.min()),
                     "t_max": float(ts.max()), "steps_mean": float(steps.mean()),
                     "steps_min": int(steps.min()), "steps_max": int(steps.max()),
                     "dec_s": p["dec_s"], "enc_s": p["enc_s"]})
    return sorted(rows, key=lambda r: r["lambda"])


def plot_lambda(rows: list, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lambda"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].errorbar(lam, [r["t_mean"] for r in rows], capsize=3, marker="o",
                     yerr=[[r["t_mean"] - r["t_min"] for r in rows],
                           [r["t_max"] - r["t_mean"] for r in rows]])
    axes[0].set_ylabel("predicted t (mean, min-max)")
    axes[1].plot(lam, [r["bpp"] for r in rows], marker="o")
    axes[1].set_ylabel("bpp")
    axes[2].plot(lam, [r["psnr"] for r in rows], marker="o")
    axes[2].set_ylabel("PSNR (dB)")
    axes[3].plot(lam, [r["lpips"] for r in rows], marker="o")
    axes[3].set_ylabel("LPIPS (alex)")
    for ax in axes:
        ax.set_xlabel("lambda")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("foundation codec (TAEF2) on Kodak: what the estimator picks per lambda")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reuse(folder: str) -> tuple[dict, list]:
    """``(rd.json document, lambda.json rows)`` of a previous output folder, with only the
    foundation curve kept (the other curves come from ``--combine`` again)."""
    folder = pathlib.Path(folder)
    try:
        doc = json.loads((folder / "rd.json").read_text())
        rows = json.loads((folder / "lambda.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--reuse: {folder} is not an output of this script ({err})") from err
    if CURVE not in doc.get("curves", {}):
        raise SystemExit(f"--reuse: {folder / 'rd.json'} has no {CURVE!r} curve")
    previous = doc.get("reused_from") or {"folder": str(folder), "argv": doc.get("argv")}
    doc = {**doc, "curves": {CURVE: doc["curves"][CURVE]},
           "references": {}, "reused_from": previous}
    return doc, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?",
                        help="foundation training workdir or model folder (not with --reuse)")
    parser.add_argument("images", nargs="?",
                        help="folder of evaluation images (Kodak; not with --reuse)")
    parser.add_argument("--reuse", metavar="DIR", default=None,
                        help="take the foundation curve and lambda.json from this previous "
                             "output folder instead of evaluating a model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lambdas", default="1,5,10,20", help="comma list (the codec quality)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--ema", action="store_true", help="use the EMA parameters")
    parser.add_argument("--combine", default=None,
                        help="rd.json of the same images whose curves join the plots/BD table")
    parser.add_argument("--anchor", default="JPEG", help="BD-rate anchor curve (with --combine)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    args = parser.parse_args(argv)
    if args.reuse is not None and (args.workdir or args.images):
        parser.error("--reuse takes the foundation curve from DIR: give no workdir or images")
    if args.reuse is None and not (args.workdir and args.images):
        parser.error("give a workdir and an images folder (or --reuse DIR)")

    from diffjax.eval.plots import plot_rd
    from diffjax.eval.runner import bd_rate_table, format_bd_table

    if args.reuse is not None:  # read before --out (possibly the same folder) is written
        result, rows = reuse(args.reuse)
        evaluated = [im["name"] for im in result["dataset"]["images"]]
    else:
        result, rows, evaluated = _evaluate(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.combine:
        other = json.loads(pathlib.Path(args.combine).read_text())
        names = sorted(im["name"] for im in other["dataset"]["images"])
        if names != sorted(evaluated):
            raise SystemExit(f"--combine: {args.combine} holds other images than the ones "
                             "evaluated")
        result["curves"] = {**other["curves"], **result["curves"]}
        result["references"] = {**other.get("references", {}), **result["references"]}
    result["argv"] = ["python", "-m", "experiments.eval_foundation",
                      *(sys.argv[1:] if argv is None else argv)]
    # the anchor (a baseline) comes with --combine; alone, the table is relative to lambda's curve
    anchor = args.anchor if args.anchor in result["curves"] else None
    result["bd_rate"] = bd_rate_table(result, anchor)
    (out / "rd.json").write_text(json.dumps(result, indent=1))
    (out / "lambda.json").write_text(json.dumps(rows, indent=1))
    (out / "bd_rate.md").write_text(format_bd_table(result["bd_rate"]))
    plot_rd(result, out, title="Kodak: foundation codec (TAEF2) vs residual codec and baselines")
    plot_lambda(rows, out / "lambda.png")

    print("| lambda | bpp | PSNR | MS-SSIM | LPIPS | t (mean, min-max) | DDIM steps | decode s |")
    print("|---:|---:|---:|---:|---:|---|---|---:|")
    for r in rows:  # MS-SSIM is None for images under 161 px a side (5 scales)
        ms = "n/a" if r["ms_ssim"] is None else f"{r['ms_ssim']:.4f}"
        print(f"| {r['lambda']} | {r['bpp']:.3f} | {r['psnr']:.2f} | {ms} | "
              f"{r['lpips']:.3f} | {r['t_mean']:.3f} ({r['t_min']:.3f}-{r['t_max']:.3f}) | "
              f"{r['steps_min']}-{r['steps_max']} | {r['dec_s']:.2f} |")
    print()
    print(format_bd_table(result["bd_rate"]))
    return 0


def _evaluate(args) -> tuple[dict, list, list]:
    """Evaluate the model of ``args.workdir`` on ``args.images``: ``(rd document, lambda
    rows, image names)``."""
    from diffjax.codecs.foundation import FoundationCodec
    from diffjax.eval.points import codec_point
    from diffjax.eval.runner import evaluate_rd, load_images

    kwargs, params, step = load_model(args.workdir, args.step, args.ema)
    images = load_images(args.images, args.limit)
    codecs = {int(v): FoundationCodec(int(v), **kwargs) for v in args.lambdas.split(",")}
    points = [codec_point(c, params, curve=CURVE, label=f"lambda={lam}",
                          setting={"quality": lam, "checkpoint": args.workdir, "step": step})
              for lam, c in codecs.items()]
    with tempfile.TemporaryDirectory(prefix="diffjax-foundation-") as tmp:  # read back, then gone
        result = evaluate_rd(points, images, bitstream_dir=tmp, dataset="kodak")
        rows = lambda_table(result, codecs, params, pathlib.Path(tmp))
    return result, rows, [n for n, _ in images]


if __name__ == "__main__":
    sys.exit(main())
