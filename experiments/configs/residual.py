"""Residual diffusion codec (Brenig & Timofte): gained mean-scale hyperprior + residual UNet.

One lambda-conditioned model covers all rate points (gain units, Cui et al. 2021): every
step trains every quality, so on a small compute budget each rate point sees all the data,
the shared transforms are learned once, and one small file ships. Arguments (comma
separated):

* ``cpu`` (default): the shipped CPU design, N=64/M=96 base (about a quarter of the
  CompressAI q1-5 cost), refiner UNet (32, 64) running at 1/4 resolution behind a
  space-to-depth stem, 128 px crops, batch 8, Adam 5e-4 with warmup and cosine decay;
* ``base``: the first stage of the staged CPU schedule: the gained hyperprior alone
  (``λ·bits + MSE``), the refiner frozen and not run (0.43 s/step on a 2-core CPU,
  against 0.8 s/step for the ``enhance`` stage with its refiner and LPIPS);
* ``enhance``: the poster's enhancement mode, base frozen, only the refiner trains
  (``optimizer.train_only``), started from a trained run's parameters with
  ``--config.init_from=WORKDIR`` (a ``base`` or joint run); mostly perceptual (ρ = 0.9)
  and trained on the decoder's own 4-step DDIM trajectory (``sampler_steps=4``, see
  :mod:`diffjax.codecs.residual_train`): with the uniform-timestep loss and ρ = 0.9 the
  refiner's LPIPS got worse with every extra decoding step;
* ``gpu``: the design for an accelerator (combine with ``base`` / ``enhance`` for the same
  staging): CompressAI's q1-5 widths N=128/M=192, a refiner UNet (64, 128) with two
  blocks per level, 256 px crops, batch 16, Adam 1e-4 (base 300k steps, enhance 50k). Not
  trained here (no accelerator was available); the shipped CPU model's top rate point is
  limited by its N=64/M=96 base (see its model card), which this config widens. BSDS500
  is small for this model: point ``--config.data.path`` at a larger non-Kodak folder;
* ``shipped`` (with ``gpu``): the accelerator's training settings at the shipped model's
  widths, so a run can start from the shipped weights (``--config.init_from=
  diffjax/weights/residual``); ``experiments/device/residual.sh`` runs it on a lent GPU;
* ``smoke``: a few steps of a tiny model on 64 px crops (CPU, seconds).

The shipped model was trained in stages on a 2-core CPU, each started from the previous
one's parameters (every command is in its model card, ``diffjax/weights/residual``)::

    python -m experiments.train --config=experiments/configs/residual.py:cpu,base \
        --workdir=runs/residual-base                           # 4.5k steps, ~0.43 s/step
    python -m experiments.train --config=experiments/configs/residual.py:cpu,enhance \
        --config.init_from=runs/residual-base --workdir=runs/residual-enhance   # 1.5k steps

then more ``base`` and ``enhance`` stages with ``--config.init_from``. The fifth (lowest)
rate point was added to a four-point model with
``diffjax.codecs.residual_train.add_rate_point`` (its gains extrapolated from the two lowest).

Data: BSDS500 train + val (``runs/bsds500_trainval``, a folder of links that
``experiments.configs.base.trainval_dir()`` creates; never Kodak). BSDS500 is licensed for
non-commercial research.

    python -m experiments.train --config=experiments/configs/residual.py:cpu \
        --workdir=runs/residual-cpu
"""
from __future__ import annotations

import ml_collections

from experiments.configs.base import apply_cpu_stretch, apply_smoke, get_base_config, parse_arg

# CompressAI-style lambda per quality (ascending rate): q1..q5 of the shipped model. q1
# (0.0007, below CompressAI's table, for the ~0.1 bpp end) was added to the four-point
# model with diffjax.codecs.residual_train.add_rate_point.
LMBDAS = (0.0007, 0.0018, 0.0050, 0.0130, 0.0483)


def get_config(arg: str = ""):
    args = parse_arg(arg)
    for a in args:
        if a not in ("cpu", "gpu", "shipped", "base", "enhance", "smoke"):
            raise ValueError(f"unknown config argument {a!r}; use cpu, gpu, shipped, base, "
                             "enhance, smoke")
    if {"cpu", "gpu"} <= args:
        raise ValueError("choose one of cpu and gpu")
    if "shipped" in args and "gpu" not in args:
        raise ValueError("'shipped' goes with 'gpu' (the GPU settings at the shipped widths)")
    c = get_base_config()
    c.task.name = "residual"
    k = c.task.kwargs
    k.N, k.M = 64, 96
    k.refiner_channels = (32, 64)
    k.refiner_layers = 1
    k.refiner_groups = 8
    k.patch = 4
    k.residual_scale = 5.0
    k.lmbdas = LMBDAS
    k.rho = 0.5
    k.lpips_net = "alex"
    k.sampler_steps = 0
    # relative sampling weight per quality, e.g. (1, 1, 2, 3, 3); None = uniform
    k.quality_weights = ml_collections.config_dict.placeholder(tuple)
    apply_cpu_stretch(c, crop=128, steps=20_000, learning_rate=5e-4, warmup_steps=100,
                      log_every=10, checkpoint_every=100)
    c.optimizer.groups = {"aux": {"learning_rate": 1e-3, "grad_clip_norm": 0.0}}
    if "base" in args:
        c.num_train_steps = 4_500
        k.refine = False
        c.optimizer.freeze = ["^refiner/"]
    if "enhance" in args:
        c.num_train_steps = 1_500
        c.optimizer.warmup_steps = 50
        c.optimizer.train_only = ["^refiner/"]
        c.optimizer.groups = {}
        k.rho = 0.9
        k.sampler_steps = 4  # the decoder's default (diffjax.codecs.residual.DEFAULT_STEPS)
    if "gpu" in args:
        if "shipped" not in args:
            k.N, k.M = 128, 192
            k.refiner_channels = (64, 128)
            k.refiner_layers = 2
        c.data.crop = 256
        c.data.num_threads = 8
        c.batch_size = 16
        c.log_every = 100
        c.checkpoint_every = 5_000
        c.keep_checkpoints = 3
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 1_000
        c.num_train_steps = 50_000 if "enhance" in args else 300_000
    if "smoke" in args:
        apply_smoke(c)
        k.N, k.M = 8, 12
        k.refiner_channels = (8, 16)
        k.refiner_groups = 4
    return c
