"""Export a training run as a model folder: the same as ``diffjax export`` (see ``--help``).

    python -m experiments.export --workdir runs/residual --out diffjax/weights/residual
    python -m experiments.export --workdir runs/hp-q3 --out models/hp-q3 --step 20000 --ema
"""
import sys

from diffjax.cli import main as _cli


def main(argv: list[str] | None = None) -> int:
    return _cli(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
