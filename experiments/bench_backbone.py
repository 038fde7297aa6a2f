"""Speed of the SD backbone: diffjax (jitted) vs diffusers (PyTorch, no_grad), side by side.

Rows (batch 1, fp32, random weights with the real SD 2.1 / SD VAE configs; both libraries
run the *same* weights, converted in memory, and outputs are checked to agree):

* ``unet32``  SD 2.1 UNet forward, 32x32 latent, 77x1024 context;
* ``unet64``  SD 2.1 UNet forward, 64x64 latent, 77x1024 context;
* ``vae256``  SD VAE encode + decode of a 256x256 image.

Each row reports the median of ``--repeats`` timed calls after one warm-up call (for
diffjax the warm-up includes compilation, reported separately), the two libraries
alternating call by call, and the ratio diffjax / diffusers (< 1 = diffjax faster). The
system load average is printed before and after, because other processes on a shared
machine make timings noisy.

    python experiments/bench_backbone.py                 # all rows, 5 repeats
    python experiments/bench_backbone.py --rows unet32 --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("unet32", "unet64", "vae256")


def _interleaved_medians(ours, theirs, repeats: int, desc: str) -> tuple[float, float, float]:
    """(diffjax first-call seconds, diffjax median, diffusers median).

    After one warm-up call of each, the two libraries alternate call by call, so load from
    other processes on a shared machine falls on both alike instead of on whichever ran
    during a busy minute.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    theirs()
    runs = {ours: [], theirs: []}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for fn in (ours, theirs):
            t0 = time.perf_counter()
            fn()
            runs[fn].append(time.perf_counter() - t0)
    return first, statistics.median(runs[ours]), statistics.median(runs[theirs])


def _unet_models():
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from diffjax.convert import build_model, convert_diffusers_state_dict, presets

    config = {k: v for k, v in presets.SD21_UNET.items() if not k.startswith("_")}
    torch.manual_seed(0)
    theirs = TorchUNet(**config).eval()
    params = convert_diffusers_state_dict(config, theirs.state_dict(), progress=True)
    return theirs, build_model(config), params


def bench_unet(size: int, models, repeats: int) -> dict:
    import jax
    import torch

    import diffjax.compile

    theirs, ours, params = models
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size, size, 4), np.float32)
    t = np.array([500.0], np.float32)
    ctx = rng.standard_normal((1, 77, 1024), np.float32)
    fn = diffjax.compile.jit(lambda p, x, t, c: ours.apply({"params": p}, x, t, c))
    xj, tj, cj = (jax.device_put(a) for a in (x, t, ctx))
    xt, tt, ct = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)
    with torch.no_grad():
        first, ours_s, theirs_s = _interleaved_medians(
            lambda: fn(params, xj, tj, cj).block_until_ready(),
            lambda: theirs(xt, tt, ct).sample, repeats, f"unet{size}")
        want = theirs(xt, tt, ct).sample.permute(0, 2, 3, 1).numpy()
    err = float(np.abs(np.asarray(fn(params, xj, tj, cj)) - want).max() / np.abs(want).max())
    return dict(row=f"SD2.1 UNet {size}x{size}", ours=ours_s, theirs=theirs_s, compile=first,
                rel_err=err)


def bench_vae(size: int, repeats: int) -> dict:
    import jax
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    import diffjax.compile
    from diffjax.convert import build_model, convert_diffusers_state_dict, presets

    config = {k: v for k, v in presets.SD_VAE.items() if not k.startswith("_")}
    torch.manual_seed(0)
    theirs = TorchVAE(**config).eval()
    params = jax.device_put(convert_diffusers_state_dict(config, theirs.state_dict()))
    ours = build_model(config)

    def roundtrip(p, x):
        z = ours.apply({"params": p}, x, method="encode").mean
        return ours.apply({"params": p}, z, method="decode")

    x = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    fn, xj = diffjax.compile.jit(roundtrip), jax.device_put(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        run = lambda: theirs.decode(theirs.encode(xt).latent_dist.mean).sample  # noqa: E731
        first, ours_s, theirs_s = _interleaved_medians(
            lambda: fn(params, xj).block_until_ready(), run, repeats, f"vae{size}")
        want = run().permute(0, 2, 3, 1).numpy()
    err = float(np.abs(np.asarray(fn(params, xj)) - want).max() / np.abs(want).max())
    return dict(row=f"SD VAE enc+dec {size}x{size}", ours=ours_s, theirs=theirs_s, compile=first,
                rel_err=err)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import torch

    load0 = os.getloadavg()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.1f}")
    results = []
    unet_rows = [r for r in args.rows if r.startswith("unet")]
    if unet_rows:
        models = _unet_models()
        models = (models[0], models[1], jax.device_put(models[2]))
        for row in unet_rows:
            results.append(bench_unet(int(row[4:]), models, args.repeats))
        del models
        gc.collect()
    if "vae256" in args.rows:
        results.append(bench_vae(256, args.repeats))

    load1 = os.getloadavg()
    print(f"\nmedian of {args.repeats} runs, batch 1, fp32 "
          f"(load average {load0[0]:.1f} -> {load1[0]:.1f})")
    print("| row | diffjax (s) | diffusers (s) | diffjax / diffusers | diffjax compile (s) "
          "| max rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['ours']:.3f} | {r['theirs']:.3f} | {r['ours'] / r['theirs']:.2f} "
              f"| {r['compile']:.1f} | {r['rel_err']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
