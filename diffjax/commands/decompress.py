"""``diffjax decompress IN.djx -o OUT.png``: decode a residual-codec file.

Runs the number of refinement steps stored in the file unless ``--steps`` overrides it
(``--steps 0``: base-only decoding). The decoder's noise is derived from the file, so the
output is the same every time.
"""
from __future__ import annotations

import argparse
import os

from diffjax.commands import common as cc

HELP = "decompress a .djx file to an image (PNG by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffjax.codecs.residual import MAX_STEPS

    parser.add_argument("input", help=".djx file written by `diffjax compress`")
    parser.add_argument("-o", "--output", help="output image (default: INPUT with .png)")
    parser.add_argument("--steps", type=cc.positive_int, default=None,
                        help=f"override the refinement steps stored in the file (0 to "
                             f"{MAX_STEPS}; 0 = base only)")
    cc.add_model_argument(parser)


def run(args) -> int:
    from diffjax.errors import InputError

    try:
        with open(args.input, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InputError(f"cannot read {args.input!r}: {err.strerror or err}") from err
    out = args.output or os.path.splitext(args.input)[0] + ".png"
    with cc.stages(["load model", "decode"]) as advance:
        from diffjax.codecs.pretrained import load_model
        from diffjax.entropy import bitstream

        header = bitstream.read_header(data)
        model = load_model(args.model)
        codec = model.codec(1, 0)
        advance()
        with cc.Timer() as t:
            image = codec.decode(model.params, data, steps=args.steps)
        advance()
    cc.write_image(out, image)
    print(f"{args.input} -> {out} ({header.width}x{header.height}, {image.shape[-1]} ch, "
          f"quality {header.quality}), decode {t.seconds:.2f} s")
    return 0
