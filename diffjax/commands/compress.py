"""``diffjax compress IN -o OUT.djx``: code an image or a video with any diffjax codec.

Works offline on CPU with the shipped weights of the codec (``--codec``, default the
residual diffusion codec) or a model folder / training workdir (``--model``). Inputs:

* images (PNG, JPEG, ...; see :mod:`diffjax.io.images`: grayscale stays grayscale, alpha is
  kept losslessly by codecs that support it);
* video: ``.y4m``, ``.mp4/.mkv/.mov/.avi/.webm`` (PyAV) or a folder of frames
  (:mod:`diffjax.io.video`); ``--frames N`` keeps the first N frames. A video given to an
  image codec is coded intra-only (every frame on its own, :mod:`diffjax.codecs.intra`).
"""
from __future__ import annotations

import argparse

from diffjax.commands import common as cc

HELP = "compress an image or a video to a .djx file (default: residual diffusion codec)"

_EPILOG = """\
examples:
  diffjax compress photo.png -o photo.djx --quality 3
  diffjax compress photo.png --steps 0            # the decoder runs base-only by default
  diffjax compress clip.mp4 --frames 6 -o clip.djx   # intra-only with the default codec
  diffjax compress frames/ -o clip.djx --model runs/residual   # a folder of frames
  diffjax compress photo.png --codec hyperprior --model my_hyperprior_model/
  diffjax compress clip.mp4 --codec residual-video --crf 30 --model MODEL   # x265 + refiner
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (HELP + ". Grayscale stays grayscale; an alpha channel is stored "
                          "losslessly; 16-bit images keep their high byte.")
    parser.epilog = _EPILOG
    parser.add_argument("input", help="image file (PNG, JPEG, ...), video file (.y4m, .mp4, "
                                      ".mkv, .mov, ...) or a folder of frames")
    parser.add_argument("-o", "--output", help="output file (default: INPUT with .djx; an "
                                               "existing folder: INPUT's name inside it)")
    parser.add_argument("--codec", metavar="NAME", default=None,
                        help="codec name (diffjax.codecs.available()); default: the codec of "
                             "--model, else the residual codec (intra-only for video)")
    parser.add_argument("-q", "--quality", type=cc.positive_int, default=None,
                        help=cc.quality_help())
    parser.add_argument("--steps", type=cc.positive_int, default=None,
                        help="diffusion refinement steps the decoder runs, 0 to 100 "
                             "(0 = base-only decoding: fastest, highest PSNR); default: the "
                             "model's (4 for the shipped residual model); codecs with steps only")
    parser.add_argument("--crf", type=cc.positive_int, default=None,
                        help="constant rate factor of codecs with a video-codec backbone "
                             "(0 to 51, lower = larger files; e.g. residual-video's x265); "
                             "default: the model's")
    parser.add_argument("--frames", type=cc.positive_int, default=None, metavar="N",
                        help="video input: code only the first N frames")
    cc.add_model_argument(parser)


def _codec_for(args, video: bool):
    """``(codec, params, quality)`` for the arguments (see the module docstring)."""
    from diffjax.codecs.base import codec_class
    from diffjax.codecs.intra import IntraCodec
    from diffjax.errors import InputError

    wanted = args.codec
    model_codec = None if wanted == "intra" else wanted
    if wanted is not None:
        codec_class(wanted)  # unknown names fail here, with the list of codecs
    model = cc.load_model(args.model, model_codec if args.model is None else None)
    if model_codec is not None and model.codec_name != model_codec:
        raise InputError(f"--model {args.model!r} holds a {model.codec_name} model, not a "
                         f"{model_codec} model")
    cls = codec_class(model.codec_name)
    overrides = {}
    if model.qualities:
        q = args.quality if args.quality is not None else model.default_quality()
        if q not in model.qualities:
            raise InputError(f"--quality {q}: the {model.codec_name} model has rate points "
                             f"{', '.join(map(str, model.qualities))}")
        overrides["quality"] = q
    elif args.quality is not None:
        raise InputError(f"the {model.codec_name} codec has no --quality (one model per rate)")
    if args.steps is not None:
        if not (cc.accepts(cls, "steps") or "steps" in model.config):
            raise InputError(f"the {model.codec_name} codec has no refinement --steps")
        overrides["steps"] = args.steps
    if args.crf is not None:
        if not (cc.accepts(cls, "crf") or "crf" in model.config):
            raise InputError(f"the {model.codec_name} codec has no --crf")
        overrides["crf"] = args.crf
    codec = model.codec(**overrides)
    if video and codec.media == "image":
        codec = IntraCodec(codec)
    elif not video and (codec.media == "video" or wanted == "intra"):
        raise InputError(f"the {wanted or codec.name} codec codes video; {args.input!r} is "
                         "an image")
    return codec, model.params, overrides.get("quality")


def run(args) -> int:
    video = cc.is_video_input(args.input)
    if video:
        from diffjax.io.video import read_video

        frames, fps = read_video(args.input, max_frames=args.frames)
    else:
        if args.frames is not None:
            from diffjax.errors import InputError

            raise InputError("--frames applies to video input only")
        image = cc.read_image(args.input)
    out = cc.output_path(args.output, args.input, ".djx")
    with cc.stages(["load model", "encode"]) as advance:
        codec, params, quality = _codec_for(args, video)
        advance()
        with cc.Timer() as t:
            data = codec.encode(params, frames, fps=fps) if video else \
                codec.encode(params, image)
        advance()
    cc.write_bytes(out, data)
    steps = getattr(getattr(codec, "image_codec", codec), "steps", None)
    crf = getattr(codec, "crf", None)
    extra = "".join([f", quality {quality}" if quality is not None else "",
                     f", crf {crf}" if crf is not None else "",
                     f", steps {steps}" if steps is not None else ""])
    if video:
        n, h, w = frames.shape[:3]
        print(f"{args.input} ({n} frames, {w}x{h}) -> {out}: {len(data)} bytes, "
              f"{8 * len(data) / (n * h * w):.4f} bpp, {codec.name}{extra}, "
              f"encode {t.seconds:.2f} s")
    else:
        h, w = image.shape[:2]
        print(f"{args.input} ({w}x{h}, {image.shape[-1]} ch) -> {out}: {len(data)} bytes, "
              f"{8 * len(data) / (h * w):.4f} bpp{extra}, encode {t.seconds:.2f} s")
    return 0
