"""Measure a latent diffusion model in a TAESD-family latent space (``ldm_taef2``, issue 25).

Three measurements, each reported as it is (a small model):

(a) **Denoising gain vs t** on Kodak latents: ``y = E(x)``, ``y_t = alpha(t) y + sigma(t) eps``
    (SD 2.1 schedule, continuous ``t``, one fixed ``eps`` per image); the naive clean
    estimate ``y_t / alpha`` against the model's x0 estimate (v-prediction converted,
    Salimans & Ho 2022). Reported per ``t``: the latent MSE of both, the gain
    ``10 log10(MSE_naive / MSE_model)`` dB, and the 8-bit PSNR against the original image
    of both estimates decoded by the frozen TAEF2 decoder (and of ``D(y)``, the ceiling the
    autoencoder sets). This is the part of the model the foundation codec (Relic et al.,
    ECCV 2024) uses: it decodes from ``alpha(t) y_hat`` at a predicted ``t``.
(b) **Sample grid** (PNG) from pure noise with 25 deterministic DDIM steps (Song et al.
    2021) through :func:`diffjax.diffusion.sample`, the zeros context.
(c) **FID and KID** of ``N`` unconditional samples against BSDS500 *test* 256 px crops
    (the HiFiC grid patches of :func:`diffjax.metrics.extract_patches`, one per 481x321
    image), with the TF-FID InceptionV3 of :mod:`diffjax.metrics` (Heusel et al. 2017;
    Binkowski et al. 2018). BSDS500 test is never trained on.

    python -m experiments.eval_ldm diffjax/weights/ldm_taef2 --out results/ldm_taef2
    python -m experiments.eval_ldm runs/ldm_taef2 --out /tmp/ldm-eval --fid-samples 64

``MODEL`` is a model folder (``diffjax.convert.load_pretrained``, as exported by
``experiments/export_ldm.py``) or a training workdir (its EMA parameters). Outputs in
``--out``: ``eval.json``, ``eval.md`` (tables), ``samples.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def load_model(path: str):
    """``(backbone, unet_params, info)`` of a model folder or a training workdir."""
    import jax.numpy as jnp

    from diffjax.codecs.foundation import Backbone
    from diffjax.codecs.latent_denoiser import denoiser_unet_config, read_workdir
    from diffjax.convert.core import load_pretrained, read_model_config
    from diffjax.errors import CheckpointError, InputError

    folder = pathlib.Path(path)
    if (folder / "config").is_dir() and (folder / "params").is_dir():
        doc = read_model_config(folder)
        meta = doc.get("metadata", {})
        if "vae_config" not in meta or "scheduler_config" not in meta:
            raise InputError(f"{path}: no vae_config / scheduler_config in its metadata "
                             "(not a latent denoiser export)")
        module, params = load_pretrained(folder, param_dtype=jnp.float32)
        unet_config = module.to_config()
        info = {"step": meta.get("step"), "ema": meta.get("ema"), "source": str(folder)}
    else:
        try:
            cfg, params, winfo = read_workdir(folder)
        except CheckpointError as err:
            raise InputError(f"{path}: neither a model folder nor a training workdir ({err})")
        meta = dict(cfg["task"]["kwargs"])
        unet_config = denoiser_unet_config(meta["unet_config"], meta["scheduler_config"])
        info = {"step": winfo["step"], "ema": winfo["ema"], "source": str(folder)}
    bb = Backbone("taesd", meta["vae_config"], unet_config, meta["scheduler_config"])
    return bb, params, info


def load_taesd_pair(bb, taesd_dir: str) -> dict:
    """The frozen TAEF2 ``{"encoder", "decoder"}`` params (``*_encoder.pth`` / ``_decoder.pth``)."""
    from diffjax.errors import InputError
    from diffjax.models.taesd import load_taesd

    folder = pathlib.Path(taesd_dir)
    out = {}
    for kind in ("encoder", "decoder"):
        files = sorted(folder.glob(f"taef2_{kind}.pth")) or sorted(folder.glob(f"*_{kind}.pth"))
        if not files:
            raise InputError(f"no *_{kind}.pth in {taesd_dir}")
        module, out[kind] = load_taesd(files[0], kind=kind)
        if module.latent_channels != bb.latent_channels:
            raise InputError(f"{files[0]} has {module.latent_channels} latent channels, the "
                             f"model {bb.latent_channels}")
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """8-bit PSNR of float images in [0, 1] (both quantised as a saved PNG would be)."""
    qa = np.round(np.clip(a, 0, 1) * 255).astype(np.float64)
    qb = np.round(np.clip(b, 0, 1) * 255).astype(np.float64)
    mse = np.mean((qa - qb) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def denoising_gain(bb, vae_params, unet_params, images: Sequence[np.ndarray],
                   ts: Sequence[float], seed: int = 0, progress: bool = True) -> list[dict]:
    """Rows per ``t``: means over ``images`` (uint8 ``[H, W, 3]``, H and W multiples of 8)."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from diffjax import compile as dc
    from diffjax.diffusion.parameterization import to_x0
    from diffjax.errors import InputError

    @dc.jit
    def at_t(x, t, key):
        y = bb.encode(vae_params, x)
        a, s = bb.schedule.alpha_sigma(jnp.full((1,), t, jnp.float32))
        a4, s4 = a[:, None, None, None], s[:, None, None, None]
        y_t = a4 * y + s4 * jax.random.normal(key, y.shape, jnp.float32)
        naive = y_t / a4
        out = bb.unet_apply(unet_params, y_t, bb.schedule.model_time(jnp.full((1,), t)),
                            bb.context({}, 1))
        x0 = to_x0(out.astype(jnp.float32), y_t, a4, s4, bb.prediction_type)
        decoded = bb.decode(vae_params, jnp.concatenate([naive, x0, y]))  # one decoder call
        return (jnp.mean(jnp.square(naive - y)), jnp.mean(jnp.square(x0 - y)),
                decoded[0:1], decoded[1:2], decoded[2:3])

    rows = {float(t): {"t": float(t), "mse_naive": [], "mse_model": [], "psnr_naive": [],
                       "psnr_model": [], "psnr_autoencoder": []} for t in ts}
    bar = tqdm(total=len(images) * len(ts), desc="denoising gain", disable=not progress)
    for i, img in enumerate(images):
        if img.shape[0] % bb.vae_factor or img.shape[1] % bb.vae_factor:
            raise InputError(f"image {i} is {img.shape[:2]}; sides must be multiples of "
                             f"{bb.vae_factor}")
        x = jnp.asarray(img[None].astype(np.float32) / 255.0)
        key = jax.random.fold_in(jax.random.key(seed), i)  # the same eps for every t
        for t in ts:
            m_naive, m_model, d_naive, d_model, d_ae = at_t(x, jnp.float32(t), key)
            r = rows[float(t)]
            r["mse_naive"].append(float(m_naive))
            r["mse_model"].append(float(m_model))
            r["psnr_naive"].append(_psnr(np.asarray(d_naive[0]), img / 255.0))
            r["psnr_model"].append(_psnr(np.asarray(d_model[0]), img / 255.0))
            r["psnr_autoencoder"].append(_psnr(np.asarray(d_ae[0]), img / 255.0))
            bar.update(1)
    bar.close()
    out = []
    for r in rows.values():
        row = {"t": r["t"]}
        for k in ("mse_naive", "mse_model", "psnr_naive", "psnr_model", "psnr_autoencoder"):
            row[k] = float(np.mean(r[k]))
        row["gain_db"] = float(10 * np.log10(row["mse_naive"] / row["mse_model"]))
        row["alpha"] = float(bb.schedule.alpha(np.float32(r["t"])))
        out.append(row)
    return out


def generate(bb, vae_params, unet_params, n: int, size: int, *, steps: int = 25,
             batch: int = 8, seed: int = 0, progress: bool = True) -> np.ndarray:
    """``n`` unconditional samples, uint8 ``[n, size, size, 3]``: DDIM from pure noise."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from diffjax import compile as dc
    from diffjax.diffusion import sample
    from diffjax.errors import InputError

    if size % bb.vae_factor or (size // bb.vae_factor) % (2 ** bb.unet.num_upsamplers):
        raise InputError(f"sample size {size} must be a multiple of "
                         f"{bb.vae_factor * 2 ** bb.unet.num_upsamplers}")
    h = size // bb.vae_factor

    def denoise(x_t, t, ctx):
        return bb.unet_apply(unet_params, x_t, jnp.broadcast_to(t, x_t.shape[:1]), ctx)

    @dc.jit
    def run(key):
        x = jax.random.normal(key, (batch, h, h, bb.latent_channels), jnp.float32)
        y0 = sample(denoise, x, cond=bb.context({}, batch), sampler="ddim",
                    num_inference_steps=steps, scheduler_config=bb.scheduler_config)
        return jnp.round(jnp.clip(bb.decode(vae_params, y0), 0, 1) * 255).astype(jnp.uint8)

    out = []
    for i in tqdm(range(math.ceil(n / batch)), desc="samples", disable=not progress):
        out.append(np.asarray(run(jax.random.fold_in(jax.random.key(seed), i))))
    return np.concatenate(out)[:n]


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 ``[N, H, W, 3]`` into one image with ``pad`` white pixels between."""
    n, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return out


def reference_patches(folder: str, size: int) -> list[np.ndarray]:
    """HiFiC grid patches (``size`` px) of every image in ``folder``."""
    from diffjax.io.images import list_images, read_image
    from diffjax.metrics import extract_patches

    out = []
    for p in list_images(folder):
        out.extend(extract_patches(read_image(p), size, shifted=True))
    return out


def fid_kid(samples: np.ndarray, references: Sequence[np.ndarray],
            feature_fn: Callable | None = None, params: Any = None) -> dict:
    """FID and KID (mean, std) between ``references`` and ``samples``."""
    import jax

    from diffjax.metrics import compute_features, frechet_distance, inception_features
    from diffjax.metrics import kernel_inception_distance

    fn = feature_fn or jax.jit(inception_features)
    fr = compute_features(list(references), params, feature_fn=fn, name="references")
    fs = compute_features(samples, params, feature_fn=fn, name="samples")
    kid_mean, kid_std = kernel_inception_distance(fr, fs, subset_size=min(1000, len(fr), len(fs)))
    return {"fid": frechet_distance(fr, fs), "kid": kid_mean, "kid_std": kid_std,
            "num_samples": int(len(fs)), "num_references": int(len(fr))}


def markdown(result: dict) -> str:
    lines = [f"# {result['model']} (step {result['info'].get('step')})", ""]
    if result.get("gain"):
        lines += ["| t | alpha | latent MSE y_t/alpha | latent MSE model | gain dB | "
                  "PSNR y_t/alpha | PSNR model | PSNR D(y) |", "|" + " ---: |" * 8]
        for r in result["gain"]:
            lines.append(f"| {r['t']:.2f} | {r['alpha']:.3f} | {r['mse_naive']:.4f} | "
                         f"{r['mse_model']:.4f} | {r['gain_db']:.2f} | {r['psnr_naive']:.2f} | "
                         f"{r['psnr_model']:.2f} | {r['psnr_autoencoder']:.2f} |")
        lines.append("")
    if result.get("fid"):
        f = result["fid"]
        lines.append(f"FID {f['fid']:.2f}, KID {f['kid']:.4f} +- {f['kid_std']:.4f} "
                     f"({f['num_samples']} samples vs {f['num_references']} reference patches)")
    return "\n".join(lines) + "\n"


def evaluate(model: str, out: str, *, taesd: str, kodak: str | None, bsds_test: str | None,
             ts: Sequence[float] = DEFAULT_TS, gain_images: int = 24, gain_crop: int = 0,
             grid_samples: int = 16, grid_size: int = 256, fid_samples: int = 500,
             fid_size: int = 256, steps: int = 25, batch: int = 8, seed: int = 0,
             feature_fn: Callable | None = None, progress: bool = True) -> dict:
    """Run (a), (b), (c) (each skipped when its count or folder is 0 / None)."""
    import jax

    from diffjax.io.images import list_images, read_image, write_image

    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bb, unet_params, info = load_model(model)
    vae = jax.tree.map(np.asarray, load_taesd_pair(bb, taesd))
    result = {"model": str(model), "info": info, "steps": steps, "seed": seed,
              "scheduler_config": bb.scheduler_config, "timings_s": {}}
    if kodak and gain_images:
        images = []
        for p in list_images(kodak, limit=gain_images):
            img = read_image(p)
            if gain_crop:
                top, left = (img.shape[0] - gain_crop) // 2, (img.shape[1] - gain_crop) // 2
                img = img[top:top + gain_crop, left:left + gain_crop]
            f = bb.vae_factor
            images.append(img[:img.shape[0] // f * f, :img.shape[1] // f * f])
        t0 = time.perf_counter()
        result["gain"] = denoising_gain(bb, vae, unet_params, images, ts, seed, progress)
        result["gain_images"] = {"folder": str(kodak), "count": len(images), "crop": gain_crop}
        result["timings_s"]["gain"] = time.perf_counter() - t0
    if grid_samples:
        t0 = time.perf_counter()
        samples = generate(bb, vae, unet_params, grid_samples, grid_size, steps=steps,
                           batch=min(batch, grid_samples), seed=seed, progress=progress)
        write_image(out_dir / "samples.png", grid(samples))
        result["grid"] = {"file": "samples.png", "count": grid_samples, "size": grid_size}
        result["timings_s"]["grid"] = time.perf_counter() - t0
    if bsds_test and fid_samples:
        t0 = time.perf_counter()
        samples = generate(bb, vae, unet_params, fid_samples, fid_size, steps=steps,
                           batch=batch, seed=seed + 1, progress=progress)
        result["fid"] = fid_kid(samples, reference_patches(bsds_test, fid_size), feature_fn)
        result["fid"].update(reference=str(bsds_test), size=fid_size)
        result["timings_s"]["fid"] = time.perf_counter() - t0
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "eval.md").write_text(markdown(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from experiments.configs.base import data_root

    root = data_root()
    ap = argparse.ArgumentParser(prog="python -m experiments.eval_ldm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder (export_ldm) or training workdir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--taesd", default=str(root / "taesd"), help="folder of taef2_*.pth")
    ap.add_argument("--kodak", default=str(root / "kodak"), help="'' skips (a)")
    ap.add_argument("--bsds-test", default=str(root / "bsds500" / "test"), help="'' skips (c)")
    ap.add_argument("--ts", default=",".join(str(t) for t in DEFAULT_TS))
    ap.add_argument("--gain-images", type=int, default=24)
    ap.add_argument("--gain-crop", type=int, default=0, help="centre crop (0: whole image)")
    ap.add_argument("--grid", type=int, default=16, help="samples in samples.png (0 skips)")
    ap.add_argument("--grid-size", type=int, default=256)
    ap.add_argument("--fid-samples", type=int, default=500, help="0 skips (c)")
    ap.add_argument("--fid-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from diffjax.errors import DiffjaxError

    try:
        result = evaluate(args.model, args.out, taesd=args.taesd, kodak=args.kodak or None,
                          bsds_test=args.bsds_test or None,
                          ts=[float(t) for t in args.ts.split(",") if t.strip()],
                          gain_images=args.gain_images, gain_crop=args.gain_crop,
                          grid_samples=args.grid, grid_size=args.grid_size,
                          fid_samples=args.fid_samples, fid_size=args.fid_size,
                          steps=args.steps, batch=args.batch, seed=args.seed)
    except (DiffjaxError, ValueError) as err:
        print(f"eval_ldm: error: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
