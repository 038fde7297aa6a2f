"""``diffjax demo``: compress sample images, print bpp / PSNR / MS-SSIM / LPIPS / times for
the base-only and refined decoders, and save a side-by-side PNG (original | base | refined).

The default images are photos that ship inside scikit-image (``astronaut``, ``coffee``,
``chelsea``; read from its data folder, nothing is downloaded); ``--images DIR`` uses your
own folder instead. Times are wall-clock on this machine and include the first call's
compilation for each new image size.
"""
from __future__ import annotations

import argparse
import os
import pathlib

from diffjax.commands import common as cc

HELP = "compress sample images and print a table of bpp, PSNR, MS-SSIM, LPIPS and times"
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png")
_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", metavar="DIR", default=None,
                        help="folder of images to use instead of scikit-image's sample photos")
    parser.add_argument("-q", "--quality", type=cc.positive_int, default=None, help=cc.quality_help())
    parser.add_argument("--steps", type=cc.positive_int, default=4,
                        help="refinement steps of the refined decoder; default %(default)s")
    parser.add_argument("--limit", type=_at_least_one, default=8,
                        help="at most this many images (1 or more); default %(default)s")
    parser.add_argument("-o", "--output", default="diffjax_demo.png",
                        help="side-by-side PNG (original | base | refined); default %(default)s")
    cc.add_model_argument(parser)


def _at_least_one(text: str) -> int:
    value = cc.positive_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _image_paths(folder: str | None, limit: int) -> list[pathlib.Path]:
    from diffjax.errors import InputError

    if folder is None:
        try:
            import skimage
        except ImportError as err:
            raise InputError("scikit-image is not installed; pass --images DIR") from err
        root = pathlib.Path(skimage.__file__).parent / "data"
        paths = [root / n for n in SKIMAGE_PHOTOS if (root / n).is_file()]
        if not paths:
            raise InputError(f"no sample photos in {root}; pass --images DIR")
        return paths[:limit]
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise InputError(f"--images {folder!r} is not a folder")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in _EXTENSIONS)
    if not paths:
        raise InputError(f"no images ({', '.join(_EXTENSIONS)}) in {folder!r}")
    return paths[:limit]


def _rgb(x):
    import numpy as np

    x = x[..., :3]
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-tap window: (11 - 1) * 2^4 + 1 pixels


def _metrics(ref, out, notes: set) -> dict:
    """PSNR, MS-SSIM and LPIPS; a metric that cannot be computed is ``None`` and the reason
    goes to ``notes`` (printed under the table), never a NaN."""
    from diffjax import metrics
    from diffjax.metrics.weights import WeightsNotFoundError

    a, b = _rgb(ref), _rgb(out)
    res = {"psnr": float(metrics.psnr(a, b)), "ms_ssim": None, "lpips": None}
    if min(a.shape[:2]) >= MS_SSIM_MIN_SIDE:
        res["ms_ssim"] = float(metrics.ms_ssim(a, b))
    else:
        notes.add(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px per side")
    try:
        res["lpips"] = float(metrics.lpips(a, b))
    except WeightsNotFoundError as err:
        notes.add(f"LPIPS not computed: {err}")
    return res


def _cell(value, width: int, digits: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _side_by_side(rows, height: int = 256):
    import numpy as np
    from PIL import Image

    tiles = []
    for row in rows:
        ims = []
        for x in row:
            x = _rgb(x)
            w = max(1, round(x.shape[1] * height / x.shape[0]))
            ims.append(np.asarray(Image.fromarray(x).resize((w, height), Image.LANCZOS)))
            ims.append(np.full((height, 4, 3), 255, np.uint8))
        tiles.append(np.concatenate(ims[:-1], axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 4), (0, width - t.shape[1]), (0, 0)), constant_values=255)
             for t in tiles]
    return np.concatenate(tiles, axis=0)


def run(args) -> int:
    import time

    paths = _image_paths(args.images, args.limit)
    from diffjax.codecs.pretrained import load_model

    model = load_model(args.model, None if args.model else "residual")
    if model.codec_name != "residual":
        from diffjax.errors import InputError

        raise InputError(f"diffjax demo shows the residual codec; {args.model!r} is a "
                         f"{model.codec_name} model")
    args.quality = cc.resolve_quality(args.quality, model.num_qualities)
    codec = model.codec(quality=args.quality, steps=args.steps)
    from tqdm.auto import tqdm

    rows, table, notes = [], [], set()
    for path in tqdm(paths, desc="demo", unit="image", leave=False,
                     disable=not os.isatty(2)):
        image = cc.read_image(str(path))
        t0 = time.perf_counter()
        data = codec.encode(model.params, image)
        t_enc = time.perf_counter() - t0
        bpp = 8 * len(data) / (image.shape[0] * image.shape[1])
        outs = []
        for name, steps in (("base", 0), (f"refined ({args.steps} steps)", args.steps)):
            t0 = time.perf_counter()
            out = codec.decode(model.params, data, steps=steps)
            t_dec = time.perf_counter() - t0
            outs.append(out)
            table.append((path.name, f"{image.shape[1]}x{image.shape[0]}", bpp, name,
                          _metrics(image, out, notes), t_enc, t_dec))
        rows.append([image] + outs)
    head = (f"{'image':<18} {'size':>9} {'bpp':>7} {'decoder':<20} {'PSNR':>6} {'MS-SSIM':>8} "
            f"{'LPIPS':>6} {'enc s':>6} {'dec s':>6}")
    print(f"diffjax demo: residual codec ({model.source}), quality {args.quality}")
    print(head)
    print("-" * len(head))
    for name, size, bpp, dec, m, te, td in table:
        print(f"{name[:18]:<18} {size:>9} {bpp:>7.4f} {dec:<20} {_cell(m['psnr'], 6, 2)} "
              f"{_cell(m['ms_ssim'], 8, 4)} {_cell(m['lpips'], 6, 4)} {te:>6.2f} {td:>6.2f}")
    for note in sorted(notes):
        print(f"n/a: {note}")
    cc.write_image(args.output, _side_by_side(rows))
    print(f"side-by-side (original | base | refined) saved to {args.output}")
    return 0
