"""Issue 28's results table: the residual video codec (Brenig & Timofte, "Higher fidelity
perceptual image and video compression with a latent conditioned residual denoising
diffusion model", video) against its own backbone, at every CRF of a sweep.

For each CRF the clip is coded once by the codec (``crf=C``) and decoded twice: refined
(the file's steps, or ``--steps``) and backbone only (``steps=0``, ffmpeg's decode of the
same file); the x265 (or x264) baseline of :mod:`diffjax.eval.baselines` codes the same
frames at the same CRF (the same stream: the codec adds only its container, ~73 bytes).
Metrics: PSNR, MS-SSIM (frames > 160 px), LPIPS, tLP, warping error; BD-rates against the
baseline in PSNR, MS-SSIM and LPIPS (:func:`diffjax.eval.video.evaluate_video_rd`); the
issue's targets are checked per CRF and printed. Evaluation clips only (DEVELOPERS.md).

    python -m experiments.eval_residual_video --model MODEL --out results/residual_video \
        --frames 30 ../shared/data/basketballpass ../shared/data/video_more/vid4/calendar
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

DEFAULT_CRFS = (40, 35, 30, 25, 20)


def targets(result: dict, baseline: str, refined: str) -> list[str]:
    """Issue 28's targets, per CRF point (refined vs the baseline at the same CRF)."""
    base = {p["setting"]["crf"]: p for p in result["curves"][baseline]}
    lines = []
    for p in result["curves"][refined]:
        b = base.get(p["setting"]["crf"])
        if b is None:
            continue
        checks = {"LPIPS below": p["lpips"] < b["lpips"],
                  "PSNR within 0.5 dB": p["psnr"] >= b["psnr"] - 0.5,
                  "tLP no worse": p["tlp"] is None or p["tlp"] <= b["tlp"],
                  "warping error no worse": p["warping_error"] is None
                  or p["warping_error"] <= b["warping_error"]}
        lines.append(f"crf={p['setting']['crf']}: " + ", ".join(
            f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))
    bd = result["bd_rate"].get("lpips", {}).get(refined)
    lines.append(f"BD-rate LPIPS vs {baseline}: "
                 + ("n/a" if bd is None else f"{bd:+.1f} % ({'met' if bd <= -20 else 'NOT met'}"
                                             " (target <= -20 %))"))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="+", help="evaluation clips (files or frame folders)")
    ap.add_argument("--model", required=True, help="residual-video model folder or workdir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--crfs", default=",".join(map(str, DEFAULT_CRFS)))
    ap.add_argument("--backbone", choices=("x265", "x264"), default="x265")
    ap.add_argument("--steps", type=int, default=None, help="refinement steps (default: file's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from diffjax.codecs import pretrained
    from diffjax.eval import baselines
    from diffjax.eval.video import evaluate_video_rd, load_clip, plot_video_rd
    from diffjax.eval.runner import format_bd_table
    from diffjax.eval.points import RatePoint

    crfs = [int(c) for c in args.crfs.split(",")]
    model = pretrained.load_model(args.model, "residual-video")
    points = []
    for crf in crfs:
        codec = model.codec(backbone=args.backbone, crf=crf)
        steps = args.steps
        for curve, st in ((f"refined ({args.backbone} + diffusion)", steps),
                          (f"residual-video steps=0 ({args.backbone} decode)", 0)):
            points.append(RatePoint(
                curve=curve, label=f"crf={crf}",
                encode=lambda f, c=codec: c.encode(model.params, f),
                decode=lambda d, c=codec, s=st: c.decode(model.params, d, steps=s),
                setting={"codec": "residual-video", "crf": crf, "steps": st,
                         "model": str(args.model)}, codec=codec, params=model.params))
    clips = [(pathlib.Path(p).name, load_clip(p, args.frames)) for p in args.clips]
    baseline = baselines.PRETTY[args.backbone]
    result = evaluate_video_rd(clips, [args.backbone], {args.backbone: crfs}, anchor=baseline,
                               progress=not args.no_progress, points=points,
                               dataset=",".join(n for n, _ in clips))
    result["argv"] = list(sys.argv)
    result["model"] = {"source": model.source, "config": model.config, "info": model.info}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rd.json").write_text(json.dumps(result, indent=1, allow_nan=True, default=str) + "\n")
    plot_video_rd(result, out, title=result["dataset"]["name"])
    report = [format_bd_table(result["bd_rate"]), "", "targets (issue 28):"]
    report += targets(result, baseline, points[0].curve)
    (out / "bd_rate.md").write_text("\n".join(report) + "\n")
    for curve, pts in result["curves"].items():
        for p in pts:
            print(f"{curve[:40]:40s} {p['label']:7s} bpp {p['bpp']:.4f} PSNR {p['psnr']:.2f} "
                  f"LPIPS {p['lpips']:.4f} tLP {p['tlp']:.4f} warp {p['warping_error']:.5f} "
                  f"dec {p['dec_s']:.2f} s")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
