"""``diffjax decompress IN.djx -o OUT``: decode a file of any diffjax codec.

The codec is read from the file's header (codec id); its shipped weights are used unless
``--model`` names a model folder or training workdir. Images are written as PNG (or any
format Pillow writes, by suffix); video as ``.y4m``, lossless ``.mkv`` (FFV1), ``.mp4``
(H.264, for viewing) or a folder of PNG frames (a path without suffix), decoded group by
group. Codecs with refinement steps run the number stored in the file unless ``--steps``
overrides it (``--steps 0``: base-only decoding). The output is the same every time.
"""
from __future__ import annotations

import argparse

from diffjax.commands import common as cc

HELP = "decompress a .djx file to an image (PNG by default) or a video (.y4m by default)"

_EPILOG = """\
examples:
  diffjax decompress photo.djx -o photo.png
  diffjax decompress photo.djx --steps 0          # base-only decoding
  diffjax decompress clip.djx -o clip.y4m         # or clip.mkv (lossless), clip.mp4, frames/
  diffjax decompress photo.djx --model runs/residual   # the model that wrote the file
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.add_argument("input", help=".djx file written by `diffjax compress`")
    parser.add_argument("-o", "--output",
                        help="output image or video (default: INPUT with .png for images, "
                             ".y4m for video)")
    parser.add_argument("--steps", type=cc.positive_int, default=None,
                        help="override the refinement steps stored in the file (0 to 100; "
                             "0 = base only); codecs with steps only")
    cc.add_model_argument(parser)


def _describe(header) -> str:
    from diffjax.codecs.base import codec_name

    name = codec_name(header.codec_id) or f"an unknown codec (id {header.codec_id})"
    quality = f", quality {header.quality}" if header.quality else ""
    return f"{name} (model {header.fingerprint.hex()}{quality})"


def codec_for_file(data: bytes, model_path: str | None):
    """``(codec, params)`` that decode ``data``: the codec of its header, with the shipped
    weights or ``model_path``; a clear error when they cannot have written it."""
    from diffjax.codecs.base import codec_name
    from diffjax.codecs.intra import IntraCodec
    from diffjax.entropy import bitstream
    from diffjax.entropy.bitstream import WrongCodecError, WrongModelError

    header = bitstream.read_header(data)
    name = codec_name(header.codec_id)
    if name is None:
        raise WrongCodecError(f"the file was written by codec id {header.codec_id}, which this "
                              "diffjax does not have")
    intra = name == IntraCodec.name
    model_codec = codec_name(IntraCodec.image_codec_id(data)) if intra else name
    model = cc.load_model(model_path, None if model_path else model_codec)
    if model.codec_name != model_codec:
        raise WrongCodecError(f"the file was written by {_describe(header)}; --model "
                              f"{model_path!r} is a {model.codec_name} model")
    codec = model.codec()
    if intra:
        codec = IntraCodec(codec)
    if codec.fingerprint(model.params) != header.fingerprint:
        where = f"the model in {model.source}"
        raise WrongModelError(
            f"the file was written by {_describe(header)}, but {where} is "
            f"{codec.fingerprint(model.params).hex()}: pass the model that wrote it with "
            "--model PATH (a model folder or training workdir)")
    return codec, model.params, header


def run(args) -> int:
    from diffjax.errors import InputError

    try:
        with open(args.input, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise InputError(f"cannot read {args.input!r}: it is a directory, not a .djx file")
    except OSError as err:
        raise InputError(f"cannot read {args.input!r}: {err.strerror or err}") from err
    with cc.stages(["load model", "decode"]) as advance:
        codec, params, header = codec_for_file(data, args.model)
        options = {}
        if args.steps is not None:
            decode = codec.image_codec.decode if codec.media == "video" and hasattr(
                codec, "image_codec") else codec.decode
            if not cc.accepts(decode, "steps"):
                raise InputError(f"the {codec.name} codec has no refinement --steps")
            options["steps"] = args.steps
        advance()
        with cc.Timer() as t:
            if codec.media == "video":
                from diffjax.io.video import write_video

                out = cc.output_path(args.output, args.input, ".y4m", into_folder=False)
                # the container is verified before the first frame: nothing is written
                # for a damaged file; frames stream from the decoder into the writer
                count = write_video(out, codec.decode_frames(params, data, **options),
                                    fps=header.fps)
                shape = f"{count} frames, {header.width}x{header.height}"
            else:
                out = cc.output_path(args.output, args.input, ".png")
                image = codec.decode(params, data, **options)
                cc.write_image(out, image)
                shape = f"{header.width}x{header.height}, {image.shape[-1]} ch"
        advance()
    quality = f", quality {header.quality}" if header.quality else ""
    print(f"{args.input} -> {out} ({shape}{quality}), decode {t.seconds:.2f} s")
    return 0
