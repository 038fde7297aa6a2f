"""ldm_taef2: diffjax's own foundation model, a latent diffusion model in the TAEF2 space.

The foundation latent codec (Relic et al., "Lossy Image Compression with Foundation
Diffusion Models", ECCV 2024) and the hint-guided video codec stand on a pretrained
text-to-image latent diffusion model (Stable Diffusion 2.1; Rombach et al., CVPR 2022).
Without SD weights, this config trains one of our own: an SD-compatible
``UNet2DConditionModel`` (so LoRA, ControlNet, motion modules, the converters and the
samplers apply unchanged) on the latents of the frozen real TAEF2 encoder
(``../shared/data/taesd``, FLUX.2 latent space, 32 ch, /8, MIT), trained over the **whole**
noise range, ``t ~ U(1/1000, 1)``, with the SD 2.1 schedule (scaled-linear betas
0.00085..0.012, 1000 steps) and v-prediction (Salimans & Ho, "Progressive Distillation for
Fast Sampling of Diffusion Models", ICLR 2022), min-SNR-5 weighting (Hang et al. 2023) and
the zeros cross-attention context (unconditional; the codecs use it so). It is the
``latent_denoiser`` task of ``taef2_denoiser.py`` (stage 1 of the TAEF2 foundation codec)
with ``t_max = 1``: :class:`diffjax.codecs.latent_denoiser.LatentDenoiserTask`.

Data (``DEVELOPERS.md``'s training split; never Kodak, never an evaluation clip): BSDS500
train + val (300 photos) and 24 evenly spaced frames of each training clip (``VIDEOS``),
frames downscaled to at most 640 px on the longer side. Everything is encoded once by the
frozen TAEF2 encoder into a latent cache (``runs/ldm_taef2_latents``, float16, each input
and its mirror image: :mod:`diffjax.input.latent_cache`), built at the start of the first
run; training reads random latent crops. BSDS500 is licensed for non-commercial research
only, so is the trained model; the clips' licences are in ``video_more/SOURCE.md`` and
``video_clips/SOURCE.md`` (research use).

Arguments:

* ``cpu`` (default): sized for a few 3-hour sessions on a 2-core CPU. UNet (64, 128, 192),
  one ResNet per level, cross-attention transformers at /2 and /4 of the latent and in the
  mid block, 8 heads, 10.75 M parameters (43 MB float32, so the export is float16: 21.5 MB);
  128 px crops (16x16 latents), batch 8, Adam 2e-4 with 500 warmup steps, cosine to 0.1x
  over 30k steps, EMA 0.9995 (what the export writes), a checkpoint every 500 steps (about
  10 minutes of CPU time). Measured on this 2-core machine (jitted train step, cached
  latents, median of 4-5 steps after compilation, while other jobs shared the CPU):
  the 3.95 M two-level denoiser of ``taef2_denoiser.py``: 1.16 s/step (load 2.5); this
  UNet: 1.20 s wall, 1.18 s process CPU per step (load 4-5; compile 80 s); the same with
  two ResNets per level (15.9 M): 2.0 s CPU per step (4.2 s wall at load 8). The step
  cost is set by the 16x16 level, so the third level's width is nearly free; the second
  ResNet is not, and at equal CPU time more steps were preferred. 30k steps are about
  10 h of CPU: three to four sessions; the run resumes exactly (the same ``--workdir``).
* ``gpu``: wider, at 256 px (32x32 latents): UNet (128, 128, 192), two ResNets per level
  as SD, attention at /2, /4 and mid, 8 heads, cross-attention width 128, 18.9 M parameters
  (37.7 MB float16), batch 32, Adam 2e-4, 1k warmup, cosine over 100k steps, EMA 0.999
  (an 8-minute device slot stops early with a checkpoint: ``experiments/device/ldm_taef2.sh``;
  inputs smaller than 256 px, the QCIF and 320x240 clips, are left out of its crops).
* ``smoke``: a tiny UNet, 64 px crops, a cache of a few BSDS500 images and one clip's
  frames (seconds; tests and ``ldm_taef2.sh smoke``).

Commands::

    nohup nice -n 19 python -m experiments.train --config=experiments/configs/ldm_taef2.py:cpu \\
        --workdir=runs/ldm_taef2 --progress=false > runs/ldm_taef2.log 2>&1 &
    python -m experiments.eval_ldm runs/ldm_taef2 --out results/ldm_taef2   # EMA of the run
    python -m experiments.export_ldm runs/ldm_taef2 diffjax/weights/ldm_taef2 \\
        --results results/ldm_taef2/eval.json
    python -m experiments.train --config=experiments/configs/ldm_taef2.py:smoke --workdir=/tmp/ldm
"""
from experiments.configs.base import (REPO_ROOT, TRAINING_CLIPS, apply_cpu_stretch, apply_smoke,
                                      data_root, get_base_config, parse_arg)
from experiments.configs.foundation_sd21 import SD21_SCHEDULER
from experiments.configs.taef2_denoiser import TAEF2

VIDEOS = TRAINING_CLIPS  # DEVELOPERS.md

_ATTN3 = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
# SD-2.x style: linear projections in the transformers, ``attention_head_dim`` = the number
# of heads per level (diffusers' naming), zeros context of width ``cross_attention_dim``.
CPU_UNET = dict(in_channels=32, out_channels=32, layers_per_block=1,
                block_out_channels=(64, 128, 192), norm_num_groups=32, cross_attention_dim=64,
                attention_head_dim=8, use_linear_projection=True, **_ATTN3)
GPU_UNET = dict(CPU_UNET, layers_per_block=2, block_out_channels=(128, 128, 192),
                cross_attention_dim=128)
# smoke / tests: two levels (compiles in seconds), the same block kinds
TINY_UNET = dict(CPU_UNET, block_out_channels=(16, 32), norm_num_groups=8,
                 cross_attention_dim=16, attention_head_dim=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def latent_cache_spec(smoke: bool = False) -> dict:
    """The :class:`~diffjax.input.latent_cache.CacheSpec` fields of the training data."""
    root = data_root()
    spec = dict(images=[str(root / "bsds500" / "train"), str(root / "bsds500" / "val")],
                videos=[str(root / v) for v in VIDEOS], frames_per_clip=24, max_side=640,
                encoder=str(root / "taesd" / "taef2_encoder.pth"), vae_config=dict(TAEF2))
    if smoke:  # a few images and frames, at most 128 px: seconds to build
        spec.update(images=[str(root / "bsds500" / "val")], videos=[str(root / VIDEOS[-1])],
                    images_per_folder=6, frames_per_clip=2, max_side=128)
    return spec


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"cpu", "gpu", "smoke"}
    if unknown or {"cpu", "gpu"} <= args:
        raise ValueError(f"unknown config argument(s) {sorted(unknown or args)}; "
                         "use one of cpu, gpu, smoke")
    c = get_base_config()
    c.task.name = "latent_denoiser"
    kw = c.task.kwargs
    kw.vae_config = dict(TAEF2)
    kw.taesd_encoder = str(data_root() / "taesd" / "taef2_encoder.pth")
    kw.unet_config = dict(CPU_UNET)
    kw.scheduler_config = dict(SD21_SCHEDULER)
    kw.t_max = 1.0                  # the whole noise range: a generative model
    kw.weighting = "min_snr"
    kw.snr_gamma = 5.0
    apply_cpu_stretch(c, crop=128, steps=30_000, learning_rate=2e-4, warmup_steps=500,
                      log_every=50, checkpoint_every=500)
    c.keep_checkpoints = 3
    c.data.kind = "latents"
    c.data.path = str(REPO_ROOT / "runs" / "ldm_taef2_latents")
    c.data.latent_cache = latent_cache_spec()
    c.ema_decay = 0.9995
    if "gpu" in args:
        kw.unet_config = dict(GPU_UNET)
        c.data.crop = 256
        c.data.num_threads = 8
        c.batch_size = 32
        c.num_train_steps = 100_000
        c.optimizer.warmup_steps = 1_000
        c.log_every = 100
        c.checkpoint_every = 2_000
        c.ema_decay = 0.999  # a first 8-minute slot runs a few thousand steps
    if "smoke" in args:
        apply_smoke(c)
        c.ema_decay = 0.9
        kw.unet_config = dict(TINY_UNET)
        c.data.path = str(REPO_ROOT / "runs" / "ldm_taef2_latents_smoke")
        c.data.latent_cache = latent_cache_spec(smoke=True)
    return c
