"""ControlNet training on a frozen Stable Diffusion (Zhang et al. 2023, ICCV).

Trains a ControlNet (:mod:`diffjax.models.controlnet`) initialised from the frozen SD
UNet's encoder (zero convolutions at zero) on (image, condition) pairs; the conditions come
from a pluggable extractor (:mod:`diffjax.input.conditions`), picked by the argument:

* ``canny`` (default): OpenCV canny edges (100, 200), 3-channel;
* ``lowres``: 1/8-resolution colour coded with real H.264 at CRF 40 (the hint-guided
  codec's colour guidance; ``lowres_h265`` for H.265);
* ``depth``: depth maps read from ``config.data.condition.root`` (same relative paths as
  the images, ``.png``); no depth estimator ships here.

Loss: the frozen UNet's denoising loss with the ControlNet's residuals (paper eq. 5), in
the scheduler's prediction type. The paper: AdamW lr 1e-5, batch 256 on SD 1.5, 512 px;
sudden convergence after a few thousand steps.

What you need (not available on the project's machines): SD converted to diffjax
(``diffjax convert <stable-diffusion-v1-5 folder> sd15-diffjax``) and, ideally, the empty
prompt's CLIP embedding (``[1, 77, 768]``, ``numpy.save``)::

    python -m experiments.train --config=experiments/configs/controlnet.py:canny \\
        --config.task.kwargs.pretrained=/path/sd15-diffjax \\
        --config.task.kwargs.context_path=/path/empty_prompt_sd15.npy \\
        --config.data.path=/path/images --workdir=runs/controlnet-canny
    python -m experiments.train --config=experiments/configs/controlnet.py:smoke --workdir=/tmp/cn

``smoke`` trains a tiny ControlNet on tiny random SD-layout networks (VAE /8, 2-level UNet)
for a few steps on 64 px BSDS500 crops (canny; combine ``smoke,lowres`` for the ffmpeg
path). The default data (BSDS500) is licensed for non-commercial research only.
"""
from experiments.configs.base import apply_smoke, get_base_config, parse_arg
from experiments.configs.foundation_sd21 import TINY_VAE

# stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM's training schedule).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    trained_betas=None,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
CONDITIONS = {
    "canny": {"name": "canny", "low": 100, "high": 200},
    "lowres": {"name": "lowres", "factor": 8, "codec": "h264", "crf": 40},
    "lowres_h265": {"name": "lowres", "factor": 8, "codec": "h265", "crf": 40},
    "depth": {"name": "depth", "root": "", "suffix": ".png"},
}


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"smoke"} - set(CONDITIONS)
    if unknown or len(args & set(CONDITIONS)) > 1:
        raise ValueError(f"bad config argument(s) {sorted(args)}; use one of "
                         f"{sorted(CONDITIONS)} and/or 'smoke'")
    kind = next(iter(args & set(CONDITIONS)), "canny")
    c = get_base_config()
    c.task.name = "controlnet"
    kw = c.task.kwargs
    kw.vae = "sd"
    kw.pretrained = ""            # REQUIRED (except smoke): `diffjax convert` output of SD 1.5
    kw.context_path = ""          # empty-prompt context .npy [1, 77, 768]; "" = zeros
    kw.scheduler_config = dict(SD15_SCHEDULER)
    kw.conditioning_embedding_out_channels = [16, 32, 96, 256]
    kw.conditioning_channels = 3
    c.data.kind = "conditioned_images"
    c.data.condition = dict(CONDITIONS[kind])
    c.data.crop = 512
    c.num_train_steps = 50_000
    c.batch_size = 8
    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 1e-2
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "constant"
    c.checkpoint_every = 1000
    if "smoke" in args:
        apply_smoke(c)
        kw.vae_config = dict(TINY_VAE)
        kw.unet_config = dict(TINY_UNET)
        kw.conditioning_embedding_out_channels = [4, 8, 8, 16]
        c.batch_size = 4
        c.optimizer.learning_rate = 1e-3
    return c
