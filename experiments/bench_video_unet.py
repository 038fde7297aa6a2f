"""Speed and memory of the video UNets: diffjax (jitted) vs diffusers (PyTorch, no_grad).

Rows (batch 1, fp32, 8 frames, 32x32 latent, 77-token context, random weights with the
real configs):

* ``modelscope``   ``UNet3DConditionModel`` with the ModelScope text-to-video 1.7B config;
* ``animatediff``  ``UNetMotionModel`` = SD 1.5 UNet + AnimateDiff v2 (``v1-5-2``) adapter.

Each library runs in its own child process, one after the other, so that the peak memory
of each is measured alone (``ru_maxrss`` of the child: weights + activations + for diffjax
the compiler) and the two copies of a 1.7B-parameter model never share the RAM. Timing:
median of ``--repeats`` calls after one warm-up call (for diffjax the warm-up includes the
compilation, reported separately). diffjax draws its weights on the host
(``host_random_params``) instead of converting diffusers' (same shapes; speed does not
depend on the values; numerical parity is what tests/models/test_unet3d.py checks).
A row is skipped when the machine has less free memory than it needs (``--min-free-gb``).

    python experiments/bench_video_unet.py                          # both rows
    python experiments/bench_video_unet.py --rows animatediff --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("modelscope", "animatediff")
FRAMES, SIZE, TOKENS = 8, 32, 77
NEED_GB = {"modelscope": 12.0, "animatediff": 9.0}  # weights (fp32) + working memory


def _configs(row: str, width_divisor: int = 1):
    """``(class, config(s), context width)``; ``width_divisor > 1`` divides every block width
    (and ModelScope's head width), keeping depth and head counts: NOT the target configs,
    for machines without the RAM for the full models."""
    from diffjax.convert import presets, video

    k = int(width_divisor)
    narrow = lambda cfg: {**cfg, "block_out_channels": [c // k for c in cfg["block_out_channels"]]}  # noqa: E731
    if row == "modelscope":
        cfg = {k_: v for k_, v in video.MODELSCOPE_T2V_UNET.items() if not k_.startswith("_")}
        if k > 1:
            cfg = {**narrow(cfg), "attention_head_dim": cfg["attention_head_dim"] // k}
        return "UNet3DConditionModel", cfg, 1024
    unet = {k_: v for k_, v in presets.SD15_UNET.items() if not k_.startswith("_")}
    adapter = {k_: v for k_, v in video.ANIMATEDIFF_V1_5_2_ADAPTER.items() if not k_.startswith("_")}
    if k > 1:
        unet, adapter = narrow(unet), narrow(adapter)
    return "UNetMotionModel", (unet, adapter), 768


def _inputs(ctx_dim: int):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, FRAMES, SIZE, SIZE, 4), np.float32),
            np.array([500.0], np.float32), rng.standard_normal((1, TOKENS, ctx_dim), np.float32))


def _time(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def worker_diffjax(row: str, repeats: int, width_divisor: int = 1) -> dict:
    import flax.linen as nn
    import jax

    import diffjax.compile
    from diffjax.models.unet3d import UNet3DConditionModel, UNetMotionModel
    from diffjax.nn.layers import host_random_params

    kind, cfg, ctx_dim = _configs(row, width_divisor)
    module = (UNet3DConditionModel.from_config(cfg) if kind == "UNet3DConditionModel"
              else UNetMotionModel.from_unet2d(*cfg))
    x, t, c = _inputs(ctx_dim)
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, c))["params"]
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    arrays = []  # one leaf at a time onto the device: the host never holds the whole model
    for i, (path, leaf) in enumerate(flat):
        name = str(getattr(path[-1], "key", path[-1]))
        arrays.append(jax.device_put(host_random_params({name: leaf}, seed=i)[name]))
    params = jax.tree.unflatten(tree, arrays)
    n_params = sum(int(np.prod(leaf.shape)) for _, leaf in flat)
    fn = diffjax.compile.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    xj, tj, cj = (jax.device_put(a) for a in (x, t, c))
    t0 = time.perf_counter()
    compiled = fn.lower(params, xj, tj, cj).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    first, median = _time(lambda: compiled(params, xj, tj, cj).block_until_ready(), repeats)
    return dict(seconds=median, first_call=first, compile=compile_s, params=n_params,
                xla_temp_gb=None if temp is None else temp / 2 ** 30)


def worker_diffusers(row: str, repeats: int, width_divisor: int = 1) -> dict:
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

    kind, cfg, ctx_dim = _configs(row, width_divisor)
    torch.manual_seed(0)
    with torch.no_grad():
        if kind == "UNet3DConditionModel":
            model = UNet3DConditionModel(**cfg).eval()
        else:  # from_unet2d on meta-device parts: only the motion UNet takes memory
            with torch.device("meta"):
                parts = UNet2DConditionModel(**cfg[0]), MotionAdapter(**cfg[1])
            model = UNetMotionModel.from_unet2d(*parts, load_weights=False).eval()
    x, t, c = _inputs(ctx_dim)
    xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    ct = torch.from_numpy(c)
    if kind == "UNetMotionModel":  # diffusers' motion UNet wants the context per frame
        ct = ct.repeat_interleave(FRAMES, dim=0)
    with torch.no_grad():
        first, median = _time(lambda: model(xt, torch.from_numpy(t), ct).sample, repeats)
    return dict(seconds=median, first_call=first, threads=torch.get_num_threads(),
                params=sum(p.numel() for p in model.parameters()))


def _free_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2 ** 20


def _child(lib: str, row: str, repeats: int, width_divisor: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", lib, "--rows", row,
                          "--repeats", str(repeats), "--width-divisor", str(width_divisor)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{lib} {row} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-free-gb", type=float, default=None,
                        help="skip a row when less memory is available (default: per row)")
    parser.add_argument("--width-divisor", type=int, default=1,
                        help="divide every block width by this (NOT the target configs; for "
                             "machines without the RAM for the full models)")
    parser.add_argument("--worker", choices=("diffjax", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        fn = worker_diffjax if args.worker == "diffjax" else worker_diffusers
        result = fn(args.rows[0], args.repeats, args.width_divisor)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(json.dumps(result))
        return 0

    import jax
    import torch

    load0 = os.getloadavg()
    print(f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.1f}, {_free_gb():.1f} GB available")
    results = []
    for row in args.rows:
        need = args.min_free_gb or NEED_GB[row] / args.width_divisor ** 2
        if _free_gb() < need:
            print(f"skipping {row}: {_free_gb():.1f} GB available, needs {need:.0f} GB")
            continue
        theirs = _child("diffusers", row, args.repeats, args.width_divisor)
        ours = _child("diffjax", row, args.repeats, args.width_divisor)
        results.append((row, ours, theirs))
        print(f"{row}: diffjax {ours}, diffusers {theirs}", flush=True)
    load1 = os.getloadavg()
    if args.width_divisor > 1:
        print(f"\nWIDTHS DIVIDED BY {args.width_divisor}: not the target configurations")
    print(f"\nmedian of {args.repeats} runs, batch 1, {FRAMES} frames, {SIZE}x{SIZE} latent, fp32 "
          f"(load average {load0[0]:.1f} -> {load1[0]:.1f})")
    print("| row | params | diffjax (s) | diffusers (s) | diffjax / diffusers | diffjax compile (s) "
          "| peak RSS diffjax / diffusers (GB) |")
    print("|---|---|---|---|---|---|---|")
    for row, o, t in results:
        print(f"| {row} | {o['params'] / 1e9:.2f} B | {o['seconds']:.2f} | {t['seconds']:.2f} | "
              f"{o['seconds'] / t['seconds']:.2f} | {o['compile']:.0f} | "
              f"{o['peak_rss_gb']:.1f} / {t['peak_rss_gb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
