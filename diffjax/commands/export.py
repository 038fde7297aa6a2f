"""``diffjax export --workdir RUN --out MODEL``: a training run as a model folder.

Works for the run of any task that trains a codec (the task names its codec:
:attr:`diffjax.train.task.Task.codec_name`). The folder (``model.json`` + ``params.msgpack``,
see :mod:`diffjax.codecs.pretrained`) loads with ``diffjax.codecs.load(MODEL)`` and
``diffjax compress --model MODEL``. ``python -m experiments.export`` is the same command.
"""
from __future__ import annotations

import argparse
import pathlib

HELP = "export a training run (any codec's task) as a model folder for --model"

_EPILOG = """\
examples:
  diffjax export --workdir runs/residual --out diffjax/weights/residual --overwrite
  diffjax export --workdir runs/hp-q3 --out models/hp-q3 --step 20000 --ema \\
      --note licence="BSDS500: non-commercial research"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.add_argument("--workdir", required=True,
                        help="training workdir of experiments/train.py (or its checkpoints/ "
                             "folder, or one step folder)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None,
                     help="export the EMA parameters")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false",
                     help="export the raw parameters (default: EMA when the run kept one)")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                        help="extra provenance for model.json (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model folder that exists")


def run(args: argparse.Namespace) -> int:
    from diffjax.codecs import pretrained
    from diffjax.errors import InputError

    notes = {}
    for item in args.note:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--note expects KEY=VALUE, got {item!r}")
        notes[key] = value
    out = pathlib.Path(args.out)
    if (out / "model.json").exists() and not args.overwrite:
        raise InputError(f"{out} already holds a model; pass --overwrite to replace it")
    model = pretrained.export_model(args.workdir, out, step=args.step, use_ema=args.use_ema,
                                    **notes)
    print(f"exported {args.workdir} (step {model.info.get('step')}) -> {out}: "
          f"{model.codec_name} codec, {', '.join(f'{k}={v}' for k, v in model.config.items())}")
    return 0
