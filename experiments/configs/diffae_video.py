"""Video diffusion autoencoder (Rampas 2024, sec. 3.4.1; ``diffjax.codecs.diffae_video``).

``config.task.kwargs.codec`` holds the
:class:`~diffjax.codecs.diffae_video.DiffAEVideoCodec` keyword arguments
(``codec_kwargs(arg)``; ``diffjax.codecs.get("diffae-video", **codec_kwargs(arg))``).
Data: the training clips of ``DEVELOPERS.md`` only (a folder of links,
:func:`training_clips_dir`; the three raw ``.264`` streams of ``openh264_cisco`` are left
out: the video pipeline reads container files and raw ``*_WxH_*.yuv``), clips of
``group_frames`` consecutive frames. Never an evaluation clip.

Arguments (comma list): none / ``gpu`` (full EfficientNetV2-S, TAEF2, a (64, 128, 256)
3-D UNet, 128 px crops of 8-frame groups, batch 8); ``cpu`` (quarter-width encoder,
(32, 64) UNet, 64 px crops, batch 2); ``smoke`` (tiny random f4 VAE and networks, 32 px,
4-frame groups; seconds); ``ft2`` / ``ft4`` (default) / ``ft8``: the temporal compression
factor f_t (8 needs 8-frame groups, the default group); the Table 1 target and weighting
arguments of ``diffae.py`` (``eps|x0|v``, ``const|p2|minsnr|sech``).

    python -m experiments.train --config=experiments/configs/diffae_video.py:smoke --workdir=/tmp/daev
    python -m experiments.export --workdir runs/diffae-video --out runs/diffae-video-model
    diffjax compress clip.mp4 --codec diffae-video --model runs/diffae-video-model -o clip.djx
"""
from __future__ import annotations

import os

import ml_collections

from experiments.configs import diffae
from experiments.configs.base import REPO_ROOT, data_root, parse_arg
from experiments.configs.base import TRAINING_CLIPS

FACTORS = {"ft2": 2, "ft4": 4, "ft8": 8}
UNET3D = dict(block_out_channels=(64, 128, 256), layers_per_block=1, norm_num_groups=32)
CPU_UNET3D = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
SMOKE_UNET3D = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def codec_kwargs(arg: str = "") -> dict:
    """The codec's constructor arguments of config ``arg`` (a plain dict)."""
    return get_config(arg).task.kwargs.codec.to_dict()


def training_clips_dir(root=None) -> str:
    """A folder of links to the readable training clips of ``DEVELOPERS.md``."""
    src = data_root() if root is None else root
    out = REPO_ROOT / "runs" / "diffae_video_clips"
    out.mkdir(parents=True, exist_ok=True)
    for rel in TRAINING_CLIPS:
        path = src / rel
        if path.suffix in (".mp4", ".yuv") and path.exists():
            link = out / path.name
            if not link.exists():
                os.symlink(path.resolve(), link)
    return str(out)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    factors = args & set(FACTORS)
    if len(factors) > 1:
        raise ValueError(f"choose one of {sorted(FACTORS)}, got {sorted(factors)}")
    c = diffae.get_config(",".join(sorted(args - set(FACTORS))))
    c.task.name = "diffae_video"
    codec = c.task.kwargs.codec.to_dict()
    codec.update(temporal_factor=FACTORS[factors.pop()] if factors else 4, group_frames=8,
                 unet_config=dict(UNET3D))
    d = c.data
    d.kind = "video"
    d.path = training_clips_dir()
    d.num_frames = 8
    d.crop = 128
    c.batch_size = 8
    if "cpu" in args:
        codec.update(unet_config=dict(CPU_UNET3D))
        d.crop = 64
        c.batch_size = 2
    if "smoke" in args:
        codec.update(unet_config=dict(SMOKE_UNET3D), group_frames=max(4, codec["temporal_factor"]))
        d.num_frames = codec["group_frames"]
        d.crop = 32
        c.batch_size = 8
    c.task.kwargs.codec = codec
    return c


def export_frames(out, *, max_frames: int = 24, short_side: int = 160, root=None) -> dict:
    """The training clips as folders of JPEG frames (``out/<clip>/0000.jpg ...``: the
    first ``max_frames``, the short side scaled down to ``short_side``) for machines
    without PyAV (``experiments/device/prepare.sh`` -> ``.device/diffae_frames``; read with
    ``--config.data.path=... --config.data.video_kind=frames``). Returns ``{clip: frames}``."""
    import pathlib

    from PIL import Image

    from diffjax.errors import InputError
    from diffjax.io.video import iter_video

    src, out, done = (data_root() if root is None else pathlib.Path(root)), pathlib.Path(out), {}
    for rel in TRAINING_CLIPS:
        folder = out / pathlib.Path(rel).stem
        try:
            _, frames = iter_video(src / rel, max_frames)
            folder.mkdir(parents=True, exist_ok=True)
            for i, frame in enumerate(frames):
                im = Image.fromarray(frame)
                scale = short_side / min(im.size)
                if scale < 1:
                    im = im.resize((round(im.width * scale), round(im.height * scale)),
                                   Image.Resampling.LANCZOS)
                im.save(folder / f"{i:04d}.jpg", quality=92)
            done[rel] = i + 1
        except InputError as err:  # a clip this machine cannot read: say so, go on
            print(f"skipped {rel}: {err}")
    return done


if __name__ == "__main__":
    import sys

    print(export_frames(sys.argv[1]))
