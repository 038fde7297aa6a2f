"""Cold vs warm ``diffjax`` processes: what JAX's persistent compilation cache buys.

For ``compress``, base-only ``decompress`` (``--steps 0``) and refined ``decompress`` (the
file's 4 steps) of one 768x512 image with the shipped model, each command runs as a fresh
process twice per repeat: *cold* with an empty compilation cache folder, then *warm* with
the folder the cold run filled (``DIFFJAX_CACHE_DIR``). Prints wall seconds (median over
``--repeats``) and the cold / warm ratio (target: >= 2 for each command), and checks that
the warm run's output bytes equal the cold run's.

    python -m experiments.bench_cli                      # kodim01 (768x512)
    python -m experiments.bench_cli --image photo.png --repeats 3
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "kodak" / "kodim01.png"


def _run(argv: list[str], cache: pathlib.Path) -> float:
    env = {**os.environ, "DIFFJAX_CACHE_DIR": str(cache), "DIFFJAX_COMPILATION_CACHE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffjax", *argv], env=env,
                          capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"diffjax {' '.join(argv)} failed:\n{proc.stderr}")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image to code (768x512)")
    parser.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per command")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="diffjax-bench-cli-") as tmp:
        tmp = pathlib.Path(tmp)
        djx = tmp / "image.djx"
        commands = {
            "compress": ["compress", args.image, "-o", str(djx)],
            "decompress --steps 0": ["decompress", str(djx), "-o", str(tmp / "base.png"),
                                     "--steps", "0"],
            "decompress (4 steps)": ["decompress", str(djx), "-o", str(tmp / "refined.png")],
        }
        outputs = {"compress": djx, "decompress --steps 0": tmp / "base.png",
                   "decompress (4 steps)": tmp / "refined.png"}
        print(f"{'command':<22} {'cold s':>8} {'warm s':>8} {'cold/warm':>10}  same output")
        ok = True
        for name, cmd in commands.items():
            cold, warm, same = [], [], True
            for _ in range(args.repeats):
                cache = tmp / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                cold.append(_run(cmd, cache))
                first = outputs[name].read_bytes()
                warm.append(_run(cmd, cache))
                same &= outputs[name].read_bytes() == first
            c, w = statistics.median(cold), statistics.median(warm)
            ok &= same and c / w >= 2.0
            print(f"{name:<22} {c:>8.2f} {w:>8.2f} {c / w:>9.2f}x  {'yes' if same else 'NO'}")
        print("target (cold/warm >= 2 for each command, same output):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
