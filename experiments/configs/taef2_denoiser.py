"""Stage 1 of the TAEF2 foundation codec: a small latent denoiser for the low noise levels.

The foundation codec (Relic et al., ECCV 2024) runs only the end of the denoising process
of a frozen diffusion prior. Without Stable Diffusion weights, this config trains that
prior: a ``UNet2DConditionModel`` on the latents of the frozen real TAEF2 encoder
(``../shared/data/taesd``, FLUX.2 latent space, 32 ch, /8, MIT), ``t ~ U(1/1000, t_max)``
of the SD 2.1 noise schedule (v-prediction, min-SNR-5 weighting), zeros context
(:class:`diffjax.codecs.latent_denoiser.LatentDenoiserTask`). Arguments:

* ``cpu`` (default): sized for a 2-core CPU in a few hours: UNet (64, 128), one layer per
  block, attention only at the lowest level (and the mid block), 3.95 M parameters;
  128 px crops (16 x 16 latents), batch 8, ``t_max = 0.25``, Adam 3e-4, warmup + cosine,
  EMA 0.999 (what the export writes), 10k steps. Measured on a shared 2-core CPU:
  ~0.9 s wall / ~1.3 s process CPU per step after a ~25 s compile, i.e. ~2.5 h;
* ``smoke``: a few steps of a tiny UNet on 64 px crops (seconds; tests).

Data: BSDS500 train + val (``runs/bsds500_trainval``, see
``experiments.configs.base.trainval_dir``; never Kodak). BSDS500 is licensed for
non-commercial research only: so is the trained denoiser (the export records it).

The two stages::

    # 1. train the denoiser, then export it as a diffjax model directory
    python -m experiments.train --config=experiments/configs/taef2_denoiser.py:cpu \\
        --workdir=runs/taef2-denoiser
    python -m diffjax.codecs.latent_denoiser runs/taef2-denoiser runs/taef2-denoiser-unet
    # 2. train the parameter estimator + entropy model on the frozen TAEF2 + denoiser
    python -m experiments.train --config=experiments/configs/foundation_taef2.py \\
        --config.task.kwargs.unet_path=runs/taef2-denoiser-unet --workdir=runs/foundation-taef2

Stage 2 must use the same ``scheduler_config`` (both default to SD 2.1's) and the zeros
context (no ``context_path``); its predicted ``t`` should stay below ``t_max``.
"""
from experiments.configs.base import (apply_cpu_stretch, apply_smoke, data_root, get_base_config,
                                      parse_arg)
from experiments.configs.foundation_sd21 import SD21_SCHEDULER

TAEF2 = {"latent_channels": 32, "arch_variant": "flux_2", "scaling_factor": 1.2,
         "shift_factor": 0.0}

# The CPU latent denoiser: 3.95 M parameters, attention at /2 of the latent (and in the
# mid block) only.
DENOISER = dict(
    in_channels=32, out_channels=32, layers_per_block=1, block_out_channels=(64, 128),
    norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8,
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
TINY_DENOISER = dict(DENOISER, block_out_channels=(32, 32), norm_num_groups=8,
                     cross_attention_dim=16, attention_head_dim=4)


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"cpu", "smoke"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use cpu, smoke")
    c = get_base_config()
    c.task.name = "latent_denoiser"
    kw = c.task.kwargs
    kw.vae_config = dict(TAEF2)
    kw.taesd_encoder = str(data_root() / "taesd" / "taef2_encoder.pth")
    kw.unet_config = dict(DENOISER)
    kw.scheduler_config = dict(SD21_SCHEDULER)
    kw.t_max = 0.25
    kw.weighting = "min_snr"
    kw.snr_gamma = 5.0
    apply_cpu_stretch(c, crop=128, steps=10_000, learning_rate=3e-4, warmup_steps=200,
                      log_every=20, checkpoint_every=250)
    c.ema_decay = 0.999
    if "smoke" in args:
        apply_smoke(c)
        c.ema_decay = 0.0
        kw.unet_config = dict(TINY_DENOISER)
    return c
