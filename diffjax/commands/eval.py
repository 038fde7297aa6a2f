"""``diffjax eval IMAGES --out DIR``: rate-distortion curves of diffjax codecs and
classical baselines on a folder of images (JSON + PNG plots + BD-rate table)."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

HELP = "rate-distortion evaluation of diffjax codecs and JPEG/WebP/AVIF/HEVC/AV1 baselines"

_EPILOG = """\
codec specs (--codec, repeatable; each spec is one rate point, specs with the same
codec form one curve):
  PATH              a diffjax training workdir / checkpoint: codec and its arguments
                    come from the saved config (e.g. task rate_distortion -> hyperprior)
  NAME=PATH         codec NAME (see diffjax.codecs.available()) with the params of PATH
  NAME              codec NAME with random parameters (needs --random-init; smoke tests)

baselines (--baselines, comma list): jpeg, webp, avif (Pillow), hevc (x265 intra),
av1 (libaom intra). --sweep NAME=v1,v2,... replaces a baseline's default sweep
(quality for Pillow formats, crf for hevc/av1).

video (--video): each positional argument is a clip (.y4m/.mp4/.mkv/.mov/.avi/.webm or
a folder of frames), --baselines x264,x265 (default both), --sweep x264=40,30,20 sets the
CRFs. --codec specs name diffjax video codecs, or image codecs, which then code every
frame on its own (intra-only). Metrics: frame-averaged PSNR, MS-SSIM (frames > 160 px),
LPIPS, tLP and the flow-warping error; rd_tlp.png and rd_warping_error.png are added.

outputs in --out: rd.json (every image, every rate point), rd_psnr.png, rd_ms_ssim.png,
rd_lpips.png (rd_fid.png with --fid), bd_rate.md (BD-rates vs --anchor).

examples:
  diffjax eval ../shared/data/kodak --baselines jpeg,webp,avif,hevc,av1 --out results/kodak \\
      --reference results/kodak/published/compressai-bmshj2018-hyperprior_mse_cpu.json
  diffjax eval ../shared/data/kodak --codec runs/hp-q1 --codec runs/hp-q3 \\
      --baselines jpeg --anchor jpeg --fid --out /tmp/rd
  diffjax eval --video ../shared/data/basketballpass --frames 30 --out /tmp/vrd
  diffjax eval --video clip.mp4 --frames 8 --codec residual=runs/res --baselines x264 \\
      --out /tmp/vrd
  diffjax eval --video clip.mp4 --frames 8 --codec residual-video=MODEL --crf 40,30,20 \\
      --baselines x265 --sweep x265=40,30,20 --anchor x265 --out /tmp/vrd  # same bytes
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.add_argument("images", nargs="+",
                        help="folder of images (png/jpg/...); with --video: clips (video "
                             "files or folders of frames)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--baselines", default="", help="comma list: jpeg,webp,avif,hevc,av1")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                        help="override the sweep of one baseline")
    parser.add_argument("--codec", action="append", default=[], metavar="SPEC",
                        help="diffjax codec rate point (see below)")
    parser.add_argument("--codec-kwargs", default="{}", metavar="JSON",
                        help="constructor arguments for --codec NAME / NAME=PATH")
    parser.add_argument("--crf", metavar="C1,C2,...",
                        help="codecs with a video-codec backbone (residual-video): one rate "
                             "point per CRF for each --codec NAME=PATH / PATH")
    parser.add_argument("--random-init", action="store_true",
                        help="allow --codec NAME with random parameters (smoke tests only)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument("--ema", action="store_true", help="use the EMA parameters")
    parser.add_argument("--anchor", help="BD-rate anchor: a curve name or baseline name")
    parser.add_argument("--reference", action="append", default=[], metavar="JSON",
                        help="published curve (CompressAI results format), plotted dashed")
    parser.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex")
    parser.add_argument("--fid", action="store_true", help="also FID/KID per rate point")
    parser.add_argument("--fid-patch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="threads for baselines")
    parser.add_argument("--limit", type=int, help="only the first N images (sorted)")
    parser.add_argument("--keep-bitstreams", action="store_true",
                        help="keep the bitstreams in OUT/bitstreams")
    parser.add_argument("--video", action="store_true",
                        help="video mode: diffjax codecs (--codec) and x264/x265 CRF sweeps "
                             "(--baselines x264,x265) with frame-averaged metrics, tLP and "
                             "the warping error")
    parser.add_argument("--frames", type=int, help="video mode: first N frames of each clip")
    parser.add_argument("--no-progress", action="store_true")


def _parse_sweeps(items: list[str]) -> dict:
    from diffjax.errors import InputError

    out = {}
    for item in items:
        name, _, values = item.partition("=")
        try:
            out[name.strip()] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError as err:
            raise InputError(f"--sweep {item!r}: expected NAME=v1,v2,...") from err
        if not out[name.strip()]:
            raise InputError(f"--sweep {item!r}: no values")
    return out


def _parse_crfs(text: str | None) -> list:
    from diffjax.errors import InputError

    if not text:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise InputError(f"--crf {text!r}: expected a comma list of integers") from err


def _codec_points(args) -> list:
    from diffjax import codecs
    from diffjax.errors import InputError
    from diffjax.eval.points import checkpoint_point, codec_point

    try:
        kwargs = json.loads(args.codec_kwargs)
    except json.JSONDecodeError as err:
        raise InputError(f"--codec-kwargs is not JSON: {err}") from err
    crfs = _parse_crfs(args.crf)
    points = []
    for spec in args.codec:
        name, sep, path = spec.partition("=")
        if sep or pathlib.Path(spec).exists():
            # one point per --crf value for codecs with a video-codec backbone
            for crf in crfs or [None]:
                extra = {} if crf is None else {"crf": crf}
                point = checkpoint_point(path if sep else spec, codec=name if sep else None,
                                         codec_kwargs={**kwargs, **extra} or None,
                                         step=args.step, use_ema=args.ema)
                if crf is not None:
                    if getattr(point.codec, "crf", None) != crf:
                        raise InputError(f"--crf: the {point.codec.name} codec has no crf")
                    point.label, point.setting["crf"] = f"crf={crf}", crf
                points.append(point)
        elif spec in codecs.available():
            if not args.random_init:
                raise InputError(f"--codec {spec}: no parameters given (use NAME=CHECKPOINT, "
                                 f"or --random-init for a smoke test)")
            import jax

            codec = codecs.get(spec, **kwargs)
            key = jax.random.key(0)
            # a one-off smoke-test init: XLA's cheap optimisation level compiles ~10x faster
            params = jax.jit(codec.init).lower(key).compile(compiler_options={
                "xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True})(key)
            points.append(codec_point(codec, params, curve=f"diffjax {spec} (random init)",
                                      label="random", setting={"random_init": True, **kwargs}))
        else:
            raise InputError(f"--codec {spec!r}: not a checkpoint path nor a codec name "
                             f"({', '.join(codecs.available())})")
    return points


def run(args: argparse.Namespace) -> int:
    from diffjax.errors import InputError
    from diffjax.eval import baselines as bl
    from diffjax.eval.plots import load_reference, plot_rd
    from diffjax.eval.points import baseline_points
    from diffjax.eval.runner import evaluate_rd, format_bd_table, load_images, summary_rows

    sweeps = _parse_sweeps(args.sweep)
    names = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if args.video and not names:
        names = bl.video_baselines()
    unknown = set(sweeps) - set(names)
    if unknown:
        raise InputError(f"--sweep for baselines not selected: {', '.join(sorted(unknown))}")
    anchor = bl.PRETTY.get(args.anchor, args.anchor) if args.anchor else None
    out = pathlib.Path(args.out)
    if args.video:
        from diffjax.eval.video import as_video_point, evaluate_video_rd, load_clip

        clips = [(pathlib.Path(p).name, load_clip(p, args.frames)) for p in args.images]
        points = [as_video_point(p) for p in _codec_points(args)]
        out.mkdir(parents=True, exist_ok=True)
        result = evaluate_video_rd(clips, names, sweeps, lpips_net=args.lpips_net,
                                   workers=args.workers, anchor=anchor,
                                   progress=not args.no_progress,
                                   dataset=",".join(n for n, _ in clips), points=points,
                                   bitstream_dir=(out / "bitstreams" if args.keep_bitstreams
                                                  else None))
    else:
        if len(args.images) != 1:
            raise InputError("give one folder of images (or use --video for clips)")
        images = load_images(args.images[0], args.limit)
        points = _codec_points(args)
        for name in names:
            points += baseline_points(name, sweeps.get(name))
        if not points:
            raise InputError("nothing to evaluate: give --codec and/or --baselines")
        references = dict(load_reference(p) for p in args.reference)
        out.mkdir(parents=True, exist_ok=True)
        result = evaluate_rd(
            points, images, lpips_net=args.lpips_net, fid=args.fid, fid_patch=args.fid_patch,
            workers=args.workers, anchor=anchor, references=references,
            bitstream_dir=out / "bitstreams" if args.keep_bitstreams else None,
            progress=not args.no_progress, dataset=pathlib.Path(args.images[0]).name)
    result["argv"] = list(sys.argv)
    (out / "rd.json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    if args.video:
        from diffjax.eval.video import plot_video_rd

        plot_video_rd(result, out, title=result["dataset"]["name"])
    else:
        plot_rd(result, out, title=result["dataset"]["name"])
    table = format_bd_table(result["bd_rate"])
    (out / "bd_rate.md").write_text(table + "\n")
    print(f"{'curve':28s} {'setting':14s} {'bpp':>7s} {'PSNR':>7s} {'MS-SSIM':>8s} "
          f"{'LPIPS':>7s} {'enc s':>7s} {'dec s':>7s}")
    warping = {(c, p["label"]): p.get("warping_error")
               for c, pts in result["curves"].items() for p in pts}
    for r in summary_rows(result):
        ms = "   n/a" if r["ms_ssim"] is None else f"{r['ms_ssim']:.4f}"
        extra = f"  FID {r['fid']:.2f} KID {r['kid']:.4f}" if r["fid"] is not None else ""
        extra += f"  tLP {r['tlp']:.4f}" if r.get("tlp") is not None else ""
        warp = warping.get((r["curve"], r["label"]))
        extra += f"  warp {warp:.5f}" if warp is not None else ""
        print(f"{r['curve'][:28]:28s} {r['label'][:14]:14s} {r['bpp']:7.3f} {r['psnr']:7.2f} "
              f"{ms:>8s} {r['lpips']:7.4f} {r['enc_s']:7.3f} {r['dec_s']:7.3f}{extra}")
    print()
    print(table)
    print(f"\nwrote {out}/rd.json, plots and bd_rate.md")
    return 0
