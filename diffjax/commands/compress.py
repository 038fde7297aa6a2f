"""``diffjax compress IN -o OUT.djx``: code an image with the residual diffusion codec.

Works offline on CPU with the shipped weights (or ``--model PATH``). The file records the
rate point and the number of refinement steps the decoder will run (``--steps``; 0 =
base-only decoding). See :mod:`diffjax.commands.common` for supported images (alpha
is kept losslessly, grayscale stays grayscale).
"""
from __future__ import annotations

import argparse
import os

from diffjax.commands import common as cc

HELP = "compress a PNG/JPEG image to a .djx file (residual diffusion codec)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffjax.codecs.residual import DEFAULT_STEPS, MAX_STEPS

    parser.description = (HELP + ". Grayscale stays grayscale; an alpha channel is stored "
                          "losslessly; 16-bit images are refused.")
    parser.add_argument("input", help="image file (PNG, JPEG, ... any size)")
    parser.add_argument("-o", "--output", help="output file (default: INPUT with .djx)")
    parser.add_argument("-q", "--quality", type=cc.positive_int, default=None,
                        help=cc.quality_help())
    parser.add_argument("--steps", type=cc.positive_int, default=DEFAULT_STEPS,
                        help=f"diffusion refinement steps the decoder runs, 0 to {MAX_STEPS} "
                             "(0 = base-only decoding: fastest, highest PSNR); default "
                             "%(default)s")
    cc.add_model_argument(parser)


def run(args) -> int:
    image = cc.read_image(args.input)
    out = args.output or os.path.splitext(args.input)[0] + ".djx"
    with cc.stages(["load model", "encode"]) as advance:
        from diffjax.codecs.pretrained import load_model

        model = load_model(args.model)
        args.quality = cc.resolve_quality(args.quality, model.num_qualities)
        codec = model.codec(args.quality, args.steps)
        advance()
        with cc.Timer() as t:
            data = codec.encode(model.params, image)
        advance()
    tmp = out + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except OSError as err:
        from diffjax.errors import InputError

        raise InputError(f"cannot write {out!r}: {err}") from err
    h, w = image.shape[:2]
    print(f"{args.input} ({w}x{h}, {image.shape[-1]} ch) -> {out}: {len(data)} bytes, "
          f"{8 * len(data) / (h * w):.4f} bpp, quality {args.quality}, steps {args.steps}, "
          f"encode {t.seconds:.2f} s")
    return 0
