"""Diffusion autoencoder image codec (Rampas 2024; ``diffjax.codecs.diffae``): training configs.

``config.task.kwargs.codec`` holds the :class:`~diffjax.codecs.diffae.DiffAECodec` keyword
arguments (``codec_kwargs(arg)`` returns them as a dict;
``diffjax.codecs.get("diffae", quality=q, **codec_kwargs(arg))``); the task is
:class:`diffjax.codecs.diffae_train.DiffAETask`. Data: BSDS500 train + val (never Kodak
or BSDS500 test; BSDS500 is licensed for non-commercial research).

Arguments (comma list):

* none / ``gpu``: EfficientNetV2-S at full width and depth (1280 channels at f32,
  16-channel latent), TAEF2 first stage (``../shared/data/taesd``), a 2-level SD-block UNet;
  256 px crops, batch 32, Adam 1e-4 with warmup + cosine (the device script's run:
  ``experiments/device/diffae.sh``);
* ``cpu``: a quarter-width, half-depth encoder and a smaller UNet on 128 px crops, batch 8,
  sized for a few 3-hour stretches on a 2-core CPU (``CPU_STEPS`` below: 6.2 s per step
  measured under load, 6,000 steps in 3-4 sessions of ``--stop_after_minutes=170``);
* ``smoke``: a tiny SD-compatible ``AutoencoderKL`` first stage (f4, random), a tiny UNet and
  encoder, 32 px crops, 4 steps (tests; seconds);
* the Table 1 ablation, one argument each: the target ``eps`` / ``x0`` (default) / ``v``
  and the weighting ``const`` / ``p2`` / ``minsnr`` (default) / ``sech``, e.g.
  ``diffae.py:cpu,eps,p2`` (equal-length runs: keep everything else fixed).

    python -m experiments.train --config=experiments/configs/diffae.py:smoke --workdir=/tmp/dae
    python -m experiments.train --config=experiments/configs/diffae.py:cpu --workdir=runs/diffae
    python -m experiments.export --workdir runs/diffae --out runs/diffae-model
    diffjax compress photo.png --codec diffae --model runs/diffae-model -o photo.djx
"""
import ml_collections

from experiments.configs.base import (apply_cpu_stretch, apply_smoke, data_root, get_base_config,
                                      parse_arg, trainval_dir)

TAEF2 = {"latent_channels": 32, "arch_variant": "flux_2", "scaling_factor": 1.2,
         "shift_factor": 0.0}
UNET = dict(layers_per_block=2, block_out_channels=(128, 256), norm_num_groups=32,
            cross_attention_dim=64, attention_head_dim=8, use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
CPU_UNET = dict(UNET, layers_per_block=1, block_out_channels=(64, 128))
SMOKE_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                 block_out_channels=(8, 16, 16), norm_num_groups=8, sample_size=32,
                 down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3)
SMOKE_UNET = dict(layers_per_block=1, block_out_channels=(16, 16), norm_num_groups=8,
                  cross_attention_dim=8, attention_head_dim=4,
                  down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None)
TARGETS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
WEIGHTINGS = {"const": "constant", "p2": "p2", "minsnr": "min_snr", "sech": "sech"}
# cpu: 6.2 s per step measured on the 2-core CPU while other jobs shared it (load 6.5; steps
# 3-5 of a fresh run, batch 8 at 128 px, TAEF2; compiling the step took ~4 min), so about
# 1,700 steps per 3-hour session (--stop_after_minutes=170; resume in the same workdir):
# 6,000 steps are 3-4 sessions (fewer on an idle machine)
CPU_STEPS = 6_000


def codec_kwargs(arg: str = "") -> dict:
    """The codec's constructor arguments of config ``arg`` (a plain dict)."""
    return get_config(arg).task.kwargs.codec.to_dict()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    unknown = args - {"cpu", "gpu", "smoke"} - set(TARGETS) - set(WEIGHTINGS)
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use cpu, gpu, smoke, "
                         f"{', '.join(TARGETS)}, {', '.join(WEIGHTINGS)}")
    for group in (TARGETS, WEIGHTINGS):
        if len(args & set(group)) > 1:
            raise ValueError(f"choose one of {sorted(group)}, got {sorted(args & set(group))}")
    taesd = data_root() / "taesd"
    codec = dict(vae="taesd", vae_config=dict(TAEF2, taesd_encoder=str(taesd / "taef2_encoder.pth"),
                                              taesd_decoder=str(taesd / "taef2_decoder.pth")),
                 unet_config=dict(UNET), latent_channels=16, encoder_width=1.0,
                 encoder_depth=1.0, quant_steps=(4.0, 2.0, 1.0, 0.5), num_steps=10,
                 guidance_scale=3.0, seed=0, prediction_type="sample")
    c = get_base_config()
    c.task.name = "diffae"
    kw = c.task.kwargs
    kw.rate_weight = 0.01       # bits per pixel weight (the thesis counts raw latents)
    kw.p_uncond = 0.1           # condition dropout for CFG (w = 3 at decode time)
    kw.weighting = "min_snr"    # Table 1's best with x0-prediction
    kw.min_snr_gamma = 5.0
    kw.p2_k = 1.0
    kw.p2_gamma = 1.0
    kw.aux_weight = 1.0
    c.data.path = trainval_dir()
    c.data.crop = 256
    c.batch_size = 32
    c.num_train_steps = 100_000
    c.log_every = 50
    c.checkpoint_every = 1_000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.schedule = "cosine"
    c.optimizer.end_learning_rate_factor = 0.1
    c.optimizer.groups = {"aux": {"learning_rate": 1e-3, "grad_clip_norm": 0.0}}
    if "cpu" in args:
        codec.update(unet_config=dict(CPU_UNET), encoder_width=0.25, encoder_depth=0.5)
        apply_cpu_stretch(c, crop=128, steps=CPU_STEPS, learning_rate=3e-4, warmup_steps=200,
                          log_every=20, checkpoint_every=200)
    if "smoke" in args:
        codec.update(vae="sd", vae_config=dict(SMOKE_VAE), unet_config=dict(SMOKE_UNET),
                     encoder_width=0.25, encoder_depth=0.1, num_steps=2)
        apply_smoke(c)
        c.data.path = str(data_root() / "bsds500" / "train")
        c.data.crop = 32
        c.optimizer.warmup_steps = 0
    for name, target in TARGETS.items():
        if name in args:
            codec["prediction_type"] = target
    for name, weighting in WEIGHTINGS.items():
        if name in args:
            kw.weighting = weighting
    kw.codec = codec
    return c
