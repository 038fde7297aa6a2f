"""Residual video codec (Brenig & Timofte, video): the refiner enhancing a frozen x265.

"Higher fidelity perceptual image and video compression with a latent conditioned residual
denoising diffusion model" fine-tunes the image codec's refiner on video, with the
previous frame in the UNet's input and a video codec as the backbone. Here the refiner
starts from the shipped image model (``init_from_image = diffjax/weights/residual``, the
new input rows at zero) and trains on windows of consecutive frames of the training clips
of ``DEVELOPERS.md`` (never an evaluation clip), x265-coded at random CRFs from the
codec's range and cached once (:mod:`diffjax.input.backbone_video`, under
``runs/backbone_cache``), with the decoder's 10-step sampler in the loop and the loss
``(1 − ρ) MSE + ρ κ LPIPS`` on the refined frames. Arguments (comma separated):

* ``cpu`` (default): the shipped image refiner's widths (32, 64) at 1/4 resolution,
  3-frame windows of 128 px crops, batch 4, CRFs 18..42 (step 4), clips downscaled to
  320 px, their first 32 frames; Adam 1e-4 with warmup and cosine decay;
* ``gpu``: the same network at batch 16 for a lent accelerator, with a small cache
  (first 8 frames of each clip at 256 px, CRFs 24 and 36: about 26 MB) that
  ``experiments/device/prepare.sh`` builds here, since the device has no ffmpeg or PyAV
  (``experiments/device/residual_video.sh``);
* ``noprev``: the ablation without previous-frame conditioning (frame by frame);
* ``x264``: x264 as the backbone instead of x265;
* ``smoke``: a tiny random refiner on 32 px crops of two clips (CPU, seconds).

    python -m diffjax.input.backbone_video experiments/configs/residual_video.py:cpu
    python -m experiments.train --config=experiments/configs/residual_video.py:cpu \
        --workdir=runs/residual-video
    python -m experiments.export --workdir runs/residual-video --out MODEL
    diffjax compress clip.mp4 --codec residual-video --crf 30 --model MODEL
"""
from __future__ import annotations

from experiments.configs.base import (REPO_ROOT, TRAINING_CLIPS, data_root, get_base_config,
                                      parse_arg)

SHIPPED_IMAGE_MODEL = str(REPO_ROOT / "diffjax" / "weights" / "residual")


def get_config(arg: str = ""):
    args = parse_arg(arg)
    for a in args:
        if a not in ("cpu", "gpu", "noprev", "x264", "smoke"):
            raise ValueError(f"unknown config argument {a!r}; use cpu, gpu, noprev, x264, smoke")
    if {"cpu", "gpu"} <= args:
        raise ValueError("choose one of cpu and gpu")
    c = get_base_config()
    c.task.name = "residual_video"
    k = c.task.kwargs
    k.backbone = "x264" if "x264" in args else "x265"
    k.prev_frame = "noprev" not in args
    k.refiner_channels = (32, 64)
    k.refiner_layers = 1
    k.refiner_groups = 8
    k.patch = 4
    k.residual_scale = 5.0
    k.rho = 0.9
    k.lpips_net = "alex"
    k.sampler_steps = 10  # the decoder's default (diffjax.codecs.residual_video.DEFAULT_STEPS)
    k.init_from_image = SHIPPED_IMAGE_MODEL

    root = data_root()
    d = c.data
    d.kind = "backbone_video"
    d.clips = tuple(str(root / p) for p in TRAINING_CLIPS)
    d.backbone = k.backbone
    d.crfs = tuple(range(18, 43, 4))
    d.max_frames = 32
    d.max_side = 320
    d.cache_dir = str(REPO_ROOT / "runs" / "backbone_cache")
    d.num_frames = 3
    d.crop = 128
    d.num_threads = 2
    d.progress = True

    c.batch_size = 4
    c.num_train_steps = 20_000
    c.log_every = 10
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.end_learning_rate_factor = 0.1
    c.optimizer.grad_clip_norm = 1.0
    if "gpu" in args:
        d.max_frames = 8
        d.max_side = 256
        d.crfs = (24, 36)
        d.num_threads = 8
        c.batch_size = 16
        c.log_every = 50
        c.checkpoint_every = 1_000
        c.num_train_steps = 50_000
    if "smoke" in args:
        d.clips = tuple(str(root / p) for p in TRAINING_CLIPS[-3::2])  # carphone, realshort
        d.crfs = (30, 40)
        d.max_frames = 4
        d.max_side = 64
        d.num_frames = 2
        d.crop = 32
        k.refiner_channels = (8, 16)
        k.refiner_groups = 4
        k.rho = 0.5
        k.sampler_steps = 2
        k.init_from_image = ""
        c.num_train_steps = 4
        c.batch_size = 8  # divisible by the test suite's 8 fake CPU devices
        c.log_every = 1
        c.checkpoint_every = 2
        c.optimizer.warmup_steps = 0
        d.progress = False
    return c
