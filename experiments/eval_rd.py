"""Rate-distortion evaluation script: the same as ``diffjax eval`` (see ``--help``).

The committed Kodak baselines in ``results/kodak/`` were produced with::

    python experiments/eval_rd.py ../shared/data/kodak \\
        --baselines jpeg,webp,avif,hevc,av1 --anchor jpeg \\
        --reference results/kodak/published/compressai-bmshj2018-hyperprior_mse_cpu.json \\
        --out results/kodak

Add ``--codec WORKDIR`` (one per trained rate point) to put a diffjax codec on the same
plots and in the BD-rate table, ``--fid`` for FID/KID on HiFiC patches, and ``--video``
for x264/x265 sweeps on clips.
"""
import sys

from diffjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
