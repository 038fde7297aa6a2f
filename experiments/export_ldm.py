"""Export an ``ldm_taef2`` training run as a shipped model folder with its model card.

    python -m experiments.export_ldm runs/ldm_taef2 diffjax/weights/ldm_taef2 \\
        --results results/ldm_taef2/eval.json --overwrite

writes ``FOLDER/config`` + ``FOLDER/params`` (a diffjax model directory: the EMA UNet, cast
to float16 when float32 would exceed ``--max-mb`` = 40 MB;
:func:`diffjax.codecs.latent_denoiser.export_denoiser`), ``FOLDER/MODEL_CARD.md`` from the
template ``experiments/model_cards/ldm_taef2.md`` filled with facts read from the run (the
config, the latent cache's inputs, the steps, the measured speed from ``metrics.jsonl``)
and, with ``--results``, the tables of ``experiments/eval_ldm.py``; and ``FOLDER/README.md``.
The folder loads with ``diffjax.convert.load_pretrained`` like a converted SD UNet.
``--stage "TEXT"`` (repeatable) adds a training stage line (dates, command, hardware).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEMPLATE = ROOT / "experiments" / "model_cards" / "ldm_taef2.md"

README = """# ldm_taef2: diffjax's own latent diffusion model (TAEF2 latent space)

* `config/`, `params/`: a diffjax model directory (Orbax): `UNet2DConditionModel` config and
  the EMA parameters ({param_dtype}); load with
  `diffjax.convert.load_pretrained("diffjax/weights/ldm_taef2", param_dtype=jnp.float32)`;
* `MODEL_CARD.md`: architecture, data, licence (non-commercial: BSDS500), training
  commands, measured results, what it is and is not good for.

Re-export after more training with
`python -m experiments.export_ldm WORKDIR diffjax/weights/ldm_taef2 --results EVAL.json --overwrite`
(and rerun `python -m experiments.eval_ldm` first for `EVAL.json`).
"""


def speed(workdir: pathlib.Path) -> str:
    """Median s/step of the logged intervals of ``metrics.jsonl`` (wall time)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return "not logged"
    rates = [json.loads(l).get("steps_per_sec") for l in path.read_text().splitlines() if l.strip()]
    rates = [r for r in rates if r]
    if not rates:
        return "not logged"
    return f"median {1.0 / float(np.median(rates)):.2f} s/step wall over {len(rates)} logged intervals"


def data_summary(cfg: dict) -> tuple[str, int]:
    """A sentence on what the run trained on, and the ``max_side`` of its cache."""
    data = cfg.get("data", {})
    spec = data.get("latent_cache") or {}
    if data.get("kind") != "latents":
        return f"images under `{data.get('path')}`", 0
    parts = []
    index = pathlib.Path(data["path"]) / "index.json"
    items = json.loads(index.read_text())["items"] if index.is_file() else []
    for folder in spec.get("images", []):
        name = pathlib.Path(folder).name
        n = sum(1 for it in items if it["name"].startswith(name + "/"))
        parts.append(f"`{pathlib.Path(folder).parent.name}/{name}` ({n} images)")
    for video in spec.get("videos", []):
        name = pathlib.Path(video).name
        n = sum(1 for it in items if it["name"].startswith(name + "#"))
        parts.append(f"`{name}` ({n} frames)")
    return "; ".join(parts), int(spec.get("max_side", 0))


def results_section(results: dict | None) -> str:
    if not results:
        return "Not measured yet (run `experiments/eval_ldm.py` and export with `--results`)."
    from experiments.eval_ldm import markdown

    text = markdown(results).split("\n", 2)[2]  # without its title line
    if results.get("grid"):
        text += (f"\nSample grid: `{results['grid']['count']}` samples at "
                 f"{results['grid']['size']} px, {results['steps']} DDIM steps, seed "
                 f"{results['seed']} (`samples.png` beside the results JSON).\n")
    return ("Denoising gain on Kodak latents (x0 estimates at continuous t, PSNR of the "
            "TAEF2-decoded estimates against the original images; `D(y)` is the "
            "autoencoder's own ceiling):\n\n" + text)


def card(workdir: pathlib.Path, out: pathlib.Path, results: dict | None,
         stages: Sequence[str], status: str, hardware: str) -> str:
    from diffjax.convert.core import read_model_config

    doc = read_model_config(out)
    meta, ucfg = doc["metadata"], doc["config"]
    cfg = json.loads((workdir / "config.json").read_text())
    opt, kw = cfg["optimizer"], cfg["task"]["kwargs"]
    data, max_side = data_summary(cfg)
    levels = ", ".join(str(c) for c in ucfg["block_out_channels"])
    n_params = meta.get("num_params", 0)
    size = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
    training = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(stages)) or (
        f"1. `python -m experiments.train --config=experiments/configs/ldm_taef2.py:cpu "
        f"--workdir={workdir}` (resumed in the same workdir across sessions).")
    fields = dict(
        status=status, hardware=hardware,
        unet_summary=(f"channels ({levels}), {ucfg['layers_per_block']} ResNet(s) per level, "
                      f"blocks {', '.join(ucfg['down_block_types'])}"),
        num_params=f"{n_params / 1e6:.2f} M", param_dtype=doc["param_dtypes"][0] if
        len(doc["param_dtypes"]) == 1 else "/".join(doc["param_dtypes"]),
        size_mb=f"{size / 1e6:.1f}", cross_attention_dim=ucfg["cross_attention_dim"],
        shift_factor=kw["vae_config"].get("shift_factor", 0.0),
        scaling_factor=kw["vae_config"].get("scaling_factor", 1.0),
        t_max=kw.get("t_max", 1.0), snr_gamma=kw.get("snr_gamma", 5.0), data=data,
        max_side=max_side or "(no limit)", crop=cfg["data"]["crop"],
        latent_crop=int(cfg["data"]["crop"]) // 8, training=training,
        steps=meta["step"], batch_size=cfg["batch_size"], learning_rate=opt["learning_rate"],
        schedule=opt.get("schedule", "constant"), warmup=opt.get("warmup_steps", 0),
        grad_clip=opt.get("grad_clip_norm", 0), ema_decay=cfg.get("ema_decay", 0),
        ema="the EMA parameters" if meta.get("ema") else "the raw parameters (no EMA)",
        speed=speed(workdir), results=results_section(results))
    return TEMPLATE.read_text().format(**fields)


def export(workdir: str, out: str, *, results: str | None = None, max_mb: float = 40.0,
           stages: Sequence[str] = (), status: str = "interim", hardware: str = "a 2-core CPU",
           overwrite: bool = False) -> pathlib.Path:
    import jax

    from diffjax.codecs.latent_denoiser import export_denoiser, read_workdir
    from diffjax.errors import InputError

    workdir_p = pathlib.Path(workdir)
    _, params, _ = read_workdir(workdir_p)
    leaves = [np.asarray(a) for a in jax.tree.leaves(params)]
    n_params = int(sum(a.size for a in leaves))
    fp32_mb = sum(a.size * 4 for a in leaves) / 1e6
    dtype = None if fp32_mb <= max_mb else "float16"
    if dtype and fp32_mb / 2 > max_mb:
        raise InputError(f"{n_params / 1e6:.1f} M parameters are {fp32_mb / 2:.1f} MB even in "
                         f"float16, over the {max_mb} MB limit")
    folder = export_denoiser(workdir_p, out, overwrite=overwrite, param_dtype=dtype,
                             metadata_extra={"num_params": n_params, "model": "ldm_taef2"})
    res = json.loads(pathlib.Path(results).read_text()) if results else None
    (folder / "MODEL_CARD.md").write_text(card(workdir_p, folder, res, stages, status, hardware))
    (folder / "README.md").write_text(README.format(param_dtype=dtype or "float32"))
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.export_ldm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("out")
    ap.add_argument("--results", help="eval.json of experiments/eval_ldm.py")
    ap.add_argument("--max-mb", type=float, default=40.0)
    ap.add_argument("--stage", action="append", default=[], help="a training stage line")
    ap.add_argument("--status", default="interim")
    ap.add_argument("--hardware", default="a 2-core CPU")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    from diffjax.errors import DiffjaxError

    try:
        folder = export(args.workdir, args.out, results=args.results, max_mb=args.max_mb,
                        stages=args.stage, status=args.status, hardware=args.hardware,
                        overwrite=args.overwrite)
    except (DiffjaxError, OSError, KeyError) as err:
        print(f"export_ldm: error: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
