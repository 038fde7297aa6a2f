"""Entropy coder benchmark: diffjax (constriction ANS) vs CompressAI's rANS, same data.

The latents of a 768x512 image under a hyperprior (Ballé 2018): ``y`` 32x48x192 with
Gaussian scales (the 64-entry scale table, indexes as ``build_indexes``) and ``z``
8x12x128 under a factorized entropy bottleneck (random density, quantiles fitted by
CompressAI's bisection and ported across). Both coders get the same symbols and indexes;
CompressAI is driven through ``GaussianConditional.compress/decompress`` and
``EntropyBottleneck.compress/decompress``, i.e. what a CompressAI codec pays per image.

Printed per part: median encode/decode time (wall clock and process CPU time; the repeats
of both coders are interleaved so they share the machine's load), symbols/s, coded bits
vs the estimate
(``-sum log2 p`` of the continuous model at the coded scales: what a rate-distortion
loss reports), and the diffjax/CompressAI speed ratios. Decoded symbols are checked.

    python experiments/bench_entropy.py [--repeats 9] [--seed 0]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _timed(fn):
    """(wall seconds, CPU seconds of this process, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def make_data(seed: int):
    """Symbols, indexes and estimates for y (Gaussian) and z (factorized)."""
    import torch

    from diffjax.entropy import models as E

    rng = np.random.default_rng(seed)
    # y: scales log-uniform over the useful part of the table, zero means.
    scales = np.exp(rng.uniform(np.log(0.11), np.log(20.0), (1, 32, 48, 192))).astype(np.float32)
    y = (rng.standard_normal(scales.shape) * scales).astype(np.float32)
    y_idx = E.scale_indexes(scales, E.DEFAULT_SCALE_TABLE, 0.11, E.NP)
    y_sym = np.rint(y).astype(np.int32)
    table_scales = np.asarray(E.DEFAULT_SCALE_TABLE, np.float64)[y_idx]
    y_lik = E.conditional_likelihood(y_sym.astype(np.float64), table_scales, "gaussian", E.NP)
    y_est = float(-np.log2(np.maximum(y_lik, 1e-9)).sum())

    # z: a CompressAI bottleneck with a random density, quantiles fitted to it.
    sys.path.insert(0, str(ROOT / "tests" / "entropy"))
    from entropy_helpers import import_compressai

    cai = import_compressai()
    torch.manual_seed(seed)
    eb = cai.entropy_models.EntropyBottleneck(128)
    with torch.no_grad():
        for p in list(eb.matrices) + list(eb.biases) + list(eb.factors):
            p.add_(0.3 * torch.randn_like(p))
    eb.update(force=True, update_quantiles=True)
    n = len(eb.matrices)
    fparams = {"quantiles": eb.quantiles.detach().numpy()[:, 0, :]}
    for i in range(n):
        fparams[f"matrix{i}"] = eb.matrices[i].detach().numpy()
        fparams[f"bias{i}"] = eb.biases[i].detach().numpy()[..., 0]
        if i < n - 1:
            fparams[f"factor{i}"] = eb.factors[i].detach().numpy()[..., 0]
    medians = E.factorized_medians(fparams)
    # Sample z from the density by inverting the CDF on a fine grid per channel.
    grid = np.linspace(-40, 40, 8001)
    cdf = E.NP.sigmoid(E.factorized_logits_cumulative(
        {k: np.asarray(v, np.float64) for k, v in fparams.items()},
        np.broadcast_to(grid, (128, grid.size)), E.NP))
    u = rng.uniform(size=(8 * 12, 128))
    z = np.stack([np.interp(u[:, c], cdf[c], grid) for c in range(128)], 1).reshape(1, 8, 12, 128)
    z_sym = np.rint(z - medians).astype(np.int32)
    z_lik, _, _ = E.factorized_likelihood(
        {k: np.asarray(v, np.float64) for k, v in fparams.items()},
        (z_sym + medians).reshape(-1, 128).T.astype(np.float64), E.NP)
    z_est = float(-np.log2(np.maximum(z_lik, 1e-9)).sum())
    return cai, eb, fparams, (y_sym, y_idx, y_est), (z_sym, medians, z_est)


def run(repeats: int, seed: int) -> None:
    import torch

    from diffjax.entropy import coder
    from diffjax.entropy import models as E

    cai, eb, fparams, (y_sym, y_idx, y_est), (z_sym, medians, z_est) = make_data(seed)
    t0 = time.perf_counter()
    y_table, z_table = E.gaussian_table(), E.factorized_table(fparams)
    y_table._models, z_table._models  # noqa: B018  (build the coder models once)
    t_tables = time.perf_counter() - t0
    gc = cai.entropy_models.GaussianConditional(list(E.DEFAULT_SCALE_TABLE))
    t0 = time.perf_counter()
    gc.update()
    t_cai_tables = time.perf_counter() - t0
    print(f"tables built once: diffjax {t_tables * 1e3:.0f} ms, CompressAI (y) "
          f"{t_cai_tables * 1e3:.0f} ms (not in the timings below)")

    y_t = torch.from_numpy(np.moveaxis(y_sym, -1, 1).astype(np.float32).copy())
    yi_t = torch.from_numpy(np.moveaxis(y_idx, -1, 1).astype(np.int32).copy())
    z_t = torch.from_numpy(np.moveaxis(z_sym + medians, -1, 1).astype(np.float32).copy())
    z_idx = np.broadcast_to(np.arange(128, dtype=np.int32), z_sym.shape)

    rows = []
    for part, est, ours_enc, ours_dec, cai_enc, cai_dec, n in (
        ("y", y_est,
         lambda: coder.encode(y_sym, y_idx, y_table),
         lambda d: coder.decode(d, y_idx, y_table),
         lambda: gc.compress(y_t, yi_t),
         lambda s: gc.decompress(s, yi_t),
         y_sym.size),
        ("z", z_est,
         lambda: coder.encode(z_sym, z_idx, z_table),
         lambda d: coder.decode(d, z_idx, z_table),
         lambda: eb.compress(z_t),
         lambda s: eb.decompress(s, (8, 12)),
         z_sym.size),
    ):
        # Interleaved repeats, so both coders see the same machine load.
        times = {k: ([], []) for k in ("te", "td", "ce", "cd")}
        for _ in range(repeats):
            for key, fn in (("te", ours_enc), ("ce", cai_enc)):
                wall, cpu, res = _timed(fn)
                times[key][0].append(wall)
                times[key][1].append(cpu)
                if key == "te":
                    data = res
                else:
                    strings = res
            for key, fn in (("td", lambda: ours_dec(data)), ("cd", lambda: cai_dec(strings))):
                wall, cpu, res = _timed(fn)
                times[key][0].append(wall)
                times[key][1].append(cpu)
                if key == "td":
                    assert np.array_equal(res, y_sym if part == "y" else z_sym), "diffjax decode"
                else:
                    want = y_t if part == "y" else z_t
                    assert torch.equal(res.float(), want), "CompressAI decode mismatch"
        med = {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in times.items()}
        ours_bits, cai_bits = len(data) * 8, len(strings[0]) * 8
        rows.append((part, n, est, med, ours_bits, cai_bits))

    for clock, c in (("wall-clock", 0), ("CPU time", 1)):
        print(f"\nmedian {clock} over {repeats} interleaved repeats")
        print(f"{'part':<5}{'coder':<12}{'symbols':>9}{'encode ms':>11}{'decode ms':>11}"
              f"{'enc Msym/s':>12}{'dec Msym/s':>12}{'bits':>10}{'vs estimate':>13}")
        for part, n, est, med, ob, cb in rows:
            te, td, ce, cd = (med[k][c] for k in ("te", "td", "ce", "cd"))
            for name, e, d, b in (("diffjax", te, td, ob), ("CompressAI", ce, cd, cb)):
                print(f"{part:<5}{name:<12}{n:>9}{e * 1e3:>11.2f}{d * 1e3:>11.2f}"
                      f"{n / e / 1e6:>12.2f}{n / d / 1e6:>12.2f}{b:>10}"
                      f"{(b / est - 1) * 100:>+12.3f}%")
            print(f"{part:<5}{'ratio':<12}{'':>9}{'':>11}{'':>11}{ce / te:>11.2f}x"
                  f"{cd / td:>11.2f}x   (diffjax speed / CompressAI speed; "
                  f"estimate {est:.0f} bits)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.repeats, args.seed)


if __name__ == "__main__":
    main()
