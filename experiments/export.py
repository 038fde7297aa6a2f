"""Export a training run as a model folder (``model.json`` + ``params.msgpack``).

    python -m experiments.export --workdir runs/residual --out diffjax/weights/residual
    python -m experiments.export --workdir runs/hp-q3 --out models/hp-q3 --step 20000 --ema

Works for the run of any task that trains a codec (the task names its codec:
:attr:`diffjax.train.task.Task.codec_name`); the folder loads with
``diffjax.codecs.load(DIR)`` and ``diffjax compress --model DIR``. ``--note KEY=VALUE``
adds provenance to ``model.json`` (e.g. ``--note licence="BSDS500: non-commercial"``).
"""
from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training workdir of experiments/train.py")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None,
                     help="export the EMA parameters")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false",
                     help="export the raw parameters (default: EMA when the run kept one)")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                        help="extra provenance for model.json (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    args = parser.parse_args(argv)

    from diffjax.codecs import pretrained
    from diffjax.errors import DiffjaxError

    notes = {}
    for item in args.note:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--note expects KEY=VALUE, got {item!r}")
        notes[key] = value
    out = pathlib.Path(args.out)
    if (out / "model.json").exists() and not args.overwrite:
        print(f"export: error: {out} already holds a model; pass --overwrite", file=sys.stderr)
        return 2
    try:
        model = pretrained.export_model(args.workdir, out, step=args.step, use_ema=args.use_ema,
                                        **notes)
    except DiffjaxError as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} (step {model.info.get('step')}) -> {out}: "
          f"{model.codec_name} codec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
