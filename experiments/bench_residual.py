"""Evaluate and time the residual codec on an image folder (Kodak by default).

For every rate point: real bitstreams (bpp = 8 · file bytes / pixels), base-only and
refined decodes, PSNR / MS-SSIM / LPIPS-Alex (diffjax.metrics, real weights), and the
wall-clock encode / decode times per image on this machine (the first image of each size
also pays the compilation, so medians are reported). Optionally the classical baselines
(``--baselines jpeg,webp,avif,hevc``, real encoders from :mod:`diffjax.eval.baselines`)
are run on the same images and BD-rates (PSNR) are printed side by side.

    python -m experiments.bench_residual --model diffjax/weights/residual \
        --out results/kodak/residual.json [--images DIR] [--limit N] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import numpy as np


def _images(folder: str, limit: int | None):
    from diffjax.commands.common import read_image

    paths = sorted(p for p in pathlib.Path(folder).iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    return [(p.name, read_image(str(p))[..., :3]) for p in paths]


def _quality(ref, out) -> dict:
    from diffjax import metrics

    return {"psnr": float(metrics.psnr(ref, out)), "ms_ssim": float(metrics.ms_ssim(ref, out)),
            "lpips": float(metrics.lpips(ref, out))}


def timing(model, images, steps: int, repeats: int = 3) -> None:
    """Median wall-clock encode / base decode / refined decode per image (after one
    warm-up call per image size, so compilation is excluded), rate point 1."""
    codec = model.codec(quality=1, steps=steps)
    for name, img in images:
        data = codec.encode(model.params, img)
        codec.decode(model.params, data, steps=0)
        codec.decode(model.params, data, steps=steps)
        t = {"encode": [], "decode_base": [], "decode_refined": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = codec.encode(model.params, img)
            t1 = time.perf_counter()
            codec.decode(model.params, data, steps=0)
            t2 = time.perf_counter()
            codec.decode(model.params, data, steps=steps)
            t3 = time.perf_counter()
            t["encode"].append(t1 - t0)
            t["decode_base"].append(t2 - t1)
            t["decode_refined"].append(t3 - t2)
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"{name} {img.shape[1]}x{img.shape[0]}: encode {med['encode']:.3f} s, decode "
              f"base {med['decode_base']:.3f} s, decode refined ({steps} steps) "
              f"{med['decode_refined']:.3f} s; encode + base decode "
              f"{med['encode'] + med['decode_base']:.3f} s (median of {repeats})")


def evaluate(model, images, steps: int, progress: bool = True) -> dict:
    """Per-image and mean results of every rate point of ``model`` (a LoadedModel)."""
    from tqdm.auto import tqdm

    out = {"source": model.source, "steps": steps, "info": model.info, "points": []}
    for q in range(1, model.num_qualities + 1):
        codec = model.codec(quality=q, steps=steps)
        rows = []
        for name, img in tqdm(images, desc=f"quality {q}", disable=not progress, leave=False):
            t0 = time.perf_counter()
            data = codec.encode(model.params, img)
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            base = codec.decode(model.params, data, steps=0)
            t_base = time.perf_counter() - t0
            t0 = time.perf_counter()
            refined = codec.decode(model.params, data, steps=steps)
            t_ref = time.perf_counter() - t0
            rows.append({"image": name, "bytes": len(data),
                         "bpp": 8 * len(data) / (img.shape[0] * img.shape[1]),
                         "base": _quality(img, base), "refined": _quality(img, refined),
                         "encode_s": t_enc, "decode_base_s": t_base, "decode_refined_s": t_ref})
        mean = lambda f: float(np.mean([f(r) for r in rows]))  # noqa: E731
        median = lambda k: float(statistics.median(r[k] for r in rows))  # noqa: E731
        out["points"].append({
            "quality": q, "bpp": mean(lambda r: r["bpp"]),
            "base": {k: mean(lambda r, k=k: r["base"][k]) for k in ("psnr", "ms_ssim", "lpips")},
            "refined": {k: mean(lambda r, k=k: r["refined"][k])
                        for k in ("psnr", "ms_ssim", "lpips")},
            "median_encode_s": median("encode_s"), "median_decode_base_s": median("decode_base_s"),
            "median_decode_refined_s": median("decode_refined_s"), "images": rows})
    return out


def baselines(images, names) -> dict:
    from diffjax.eval.baselines import sweep

    res = {}
    for name in names:
        pts = []
        for value, coder in sweep(name):
            bpps, psnrs, lps = [], [], []
            for _, img in images:
                data = coder.encode(img)
                dec = coder.decode(data)
                q = _quality(img, dec)
                bpps.append(8 * len(data) / (img.shape[0] * img.shape[1]))
                psnrs.append(q["psnr"])
                lps.append(q["lpips"])
            pts.append({"value": value, "bpp": float(np.mean(bpps)),
                        "psnr": float(np.mean(psnrs)), "lpips": float(np.mean(lps))})
        res[name] = pts
    return res


def lpips_at_bpp(curve: list[dict], bpp: float) -> float:
    """A baseline's LPIPS at ``bpp``, interpolated linearly in log-bpp between the points
    of ``curve`` (an ``rd.json`` curve: dicts with ``bpp`` and ``lpips``)."""
    points = sorted(curve, key=lambda c: c["bpp"])
    return float(np.interp(np.log(bpp), np.log([c["bpp"] for c in points]),
                           [c["lpips"] for c in points]))


def combine(res: dict, committed: str, out_dir: str, anchor: str = "JPEG") -> dict:
    """Add the base-only and refined curves of ``res`` to the committed baseline results
    (``results/kodak/rd.json`` of ``experiments/eval_rd.py``, same images), write
    ``rd.json``-style JSON, the RD plots and the BD-rate table to ``out_dir``, and compare
    LPIPS with AVIF at equal bpp (AVIF's LPIPS interpolated linearly in log-bpp)."""
    from diffjax.eval.plots import plot_rd
    from diffjax.eval.runner import bd_rate_table, format_bd_table

    doc = json.loads(pathlib.Path(committed).read_text())
    names = [img["name"] for img in doc["dataset"]["images"]]
    ours = [r["image"] for r in res["points"][0]["images"]]
    if sorted(ours) != sorted(names):
        raise SystemExit(f"--combine: {committed} holds other images than the ones evaluated")
    db = lambda m: float(-10 * np.log10(max(1 - m, 1e-12)))  # noqa: E731
    for which, label in (("base", "diffjax residual (base only)"),
                         ("refined", f"diffjax residual (refined, {res['steps']} steps)")):
        doc["curves"][label] = [
            {"label": f"quality={p['quality']}", "setting": {"quality": p["quality"],
                                                             "steps": 0 if which == "base" else res["steps"]},
             "bpp": p["bpp"], "psnr": p[which]["psnr"], "ms_ssim": p[which]["ms_ssim"],
             "ms_ssim_db": float(np.mean([db(r[which]["ms_ssim"]) for r in p["images"]])),
             "lpips": p[which]["lpips"],
             "enc_s": p["median_encode_s"],
             "dec_s": p["median_decode_base_s" if which == "base" else "median_decode_refined_s"]}
            for p in res["points"]]
    doc["bd_rate"] = bd_rate_table(doc, anchor)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rd.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot_rd(doc, out, title="Kodak")
    table = format_bd_table(doc["bd_rate"])
    (out / "bd_rate.md").write_text(table + "\n")
    print(table)
    for p in res["points"]:
        avif_lpips = lpips_at_bpp(doc["curves"]["AVIF"], p["bpp"])
        print(f"q{p['quality']} {p['bpp']:.3f} bpp: LPIPS base {p['base']['lpips']:.4f}, "
              f"refined {p['refined']['lpips']:.4f}, AVIF at this bpp {avif_lpips:.4f}")
    return doc


def main(argv=None) -> int:
    from experiments.configs.base import data_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder / workdir (default: shipped)")
    ap.add_argument("--images", default=str(data_root() / "kodak"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--baselines", default="", help="comma list: jpeg,webp,avif,hevc")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--timing-only", action="store_true",
                    help="only time encode/decode (no metrics); with --random-init CONFIG "
                         "times an untrained model of that training config")
    ap.add_argument("--random-init", default=None, metavar="CONFIG_ARG",
                    help="use random weights of experiments/configs/residual.py:CONFIG_ARG")
    ap.add_argument("--combine", default=None, metavar="RD_JSON",
                    help="committed baseline results (results/kodak/rd.json) to merge with")
    ap.add_argument("--combine-out", default=None, metavar="DIR",
                    help="where --combine writes rd.json, RD plots and bd_rate.md")
    args = ap.parse_args(argv)
    from diffjax.codecs.pretrained import load_model
    from diffjax.metrics import bd_rate

    images = _images(args.images, args.limit)
    if args.random_init is not None:
        import jax

        from diffjax.codecs.pretrained import LoadedModel
        from diffjax.codecs.residual import ResidualCodec
        from diffjax.train.task import build_task
        from experiments.configs import residual as residual_config

        task = build_task(residual_config.get_config(args.random_init).to_dict()["task"])
        config = {**task.codec_kwargs(), "steps": args.steps}
        params = ResidualCodec(**config).init(jax.random.PRNGKey(0))
        model = LoadedModel("residual", config, params, task.provenance(),
                            f"random init of residual.py:{args.random_init}")
    else:
        model = load_model(args.model)
    if args.timing_only:
        timing(model, images, args.steps)
        return 0
    res = evaluate(model, images, args.steps)
    res["images_folder"] = args.images
    names = [n for n in args.baselines.split(",") if n]
    if names:
        res["baselines"] = baselines(images, names)
    print(f"{'q':>2} {'bpp':>7} {'PSNR base':>9} {'PSNR ref':>8} {'LPIPS base':>10} "
          f"{'LPIPS ref':>9} {'enc s':>6} {'dec base s':>10} {'dec ref s':>9}")
    for p in res["points"]:
        print(f"{p['quality']:>2} {p['bpp']:>7.4f} {p['base']['psnr']:>9.2f} "
              f"{p['refined']['psnr']:>8.2f} {p['base']['lpips']:>10.4f} "
              f"{p['refined']['lpips']:>9.4f} {p['median_encode_s']:>6.2f} "
              f"{p['median_decode_base_s']:>10.2f} {p['median_decode_refined_s']:>9.2f}")
    for name, pts in res.get("baselines", {}).items():
        r = [p["bpp"] for p in res["points"]]
        try:
            bd = bd_rate([p["bpp"] for p in pts], [p["psnr"] for p in pts], r,
                         [p["base"]["psnr"] for p in res["points"]])
            print(f"BD-rate (PSNR) of the base decoder vs {name}: {bd:+.1f} %")
        except Exception as err:  # no overlap of the curves
            print(f"BD-rate vs {name}: not computable ({err})")
    if args.combine:
        combine(res, args.combine, args.combine_out or str(pathlib.Path(args.out).parent))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
