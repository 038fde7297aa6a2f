"""Foundation latent codec on TAEF2 (FLUX.2 latent space, 32 ch, /8): the instance that
can be trained and measured on machines without Stable Diffusion weights.

Frozen backbone = the real TAEF2 encoder/decoder (``../shared/data/taesd``, MIT) + a small
latent denoiser (``UNet2DConditionModel``, zeros context) trained on TAEF2 latents at low
noise levels (the codec only runs the end of the process). This config trains the second
stage, P(y, lambda) + the latent hyperprior, exactly like ``foundation_sd21.py``.

Stage 1, the denoiser, is trained by ``experiments/configs/taef2_denoiser.py`` (task
``latent_denoiser``) and exported as a diffjax model directory
(``diffjax.convert.core.save_pretrained``), which is ``task.kwargs.unet_path`` here::

    python -m experiments.train --config=experiments/configs/taef2_denoiser.py:cpu \\
        --workdir=runs/taef2-denoiser
    python -m diffjax.codecs.latent_denoiser runs/taef2-denoiser runs/taef2-denoiser-unet
    python -m experiments.train --config=experiments/configs/foundation_taef2.py:cpu \\
        --config.task.kwargs.unet_path=runs/taef2-denoiser-unet --workdir=runs/foundation-taef2
    python -m experiments.eval_foundation runs/foundation-taef2 ../shared/data/kodak \\
        --out results/kodak/foundation_taef2 --combine results/kodak/residual/rd.json
    python -m experiments.train --config=experiments/configs/foundation_taef2.py:smoke --workdir=/tmp/fd2

Arguments: none (the paper's setting: 256 px crops, batch 16, constant lr 1e-4, 100k
steps); ``cpu``: the instance measured here, sized for one stretch on a 2-core CPU (64 px
crops, batch 8, 1.2k steps, Adam 3e-4 with warmup + cosine, BSDS500 train + val). The
step is dominated by the backward pass through the frozen TAEF2 decoder: measured on the
2-core CPU, 1.3 s per step at 64 px and 4.6 s at 128 px (batch 8, after the backbone's
weight gradients were cut with ``stop_gradient``; before that > 10 s at 128 px);
``smoke``: a few steps with a random tiny denoiser (tests).

With ``unet_path`` set, the UNet config is read from it (``DENOISER`` below, the CPU
denoiser of stage 1, is only the default layout); without it only ``smoke`` (random
denoiser) makes sense. Keep ``scheduler_config`` equal to stage 1's (both SD 2.1's) and no
``context_path`` (stage 1 trains with the zeros context). TAEF2 latent statistics measured
on 16 BSDS500 train crops (256 px): mean 0.030, std 0.836, hence ``scaling_factor = 1.2``.
BSDS500 is licensed for non-commercial research only.
"""
from experiments.configs.base import (apply_cpu_stretch, apply_smoke, data_root, get_base_config,
                                      parse_arg)
from experiments.configs.foundation_sd21 import SD21_SCHEDULER
# The backbone is stage 1's: TAEF2 and the denoiser layouts it trained (CPU / smoke).
from experiments.configs.taef2_denoiser import DENOISER, TAEF2, TINY_DENOISER


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"cpu", "smoke"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use cpu, smoke")
    c = get_base_config()
    c.task.name = "foundation"
    kw = c.task.kwargs
    kw.vae = "taesd"
    kw.vae_config = dict(TAEF2)
    kw.taesd_encoder = str(data_root() / "taesd" / "taef2_encoder.pth")
    kw.taesd_decoder = str(data_root() / "taesd" / "taef2_decoder.pth")
    kw.unet_path = ""             # REQUIRED (except smoke): the trained latent denoiser
    kw.unet_config = dict(DENOISER)
    kw.scheduler_config = dict(SD21_SCHEDULER)
    kw.lambdas = [1.0, 5.0, 10.0, 20.0]
    kw.distortion_scale = 1.0     # MSE on [0, 1] images, as the paper's loss is written
    kw.estimator_features = [64, 128, 256]
    kw.hyper_channels = 96
    kw.init_t = 0.05
    kw.num_inference_steps = 50
    c.num_train_steps = 100_000
    c.batch_size = 16
    c.data.crop = 256
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.groups = {"aux": {"learning_rate": 1e-3, "grad_clip_norm": 0.0}}
    if "cpu" in args:  # the measured instance: one 2-core CPU stretch (see the module doc)
        apply_cpu_stretch(c, crop=64, steps=1_200, learning_rate=3e-4, warmup_steps=50,
                          log_every=20, checkpoint_every=200)
        # MSE on [0, 1] with lambda <= 20 let the rate term dominate (first CPU run: 0.3-0.46
        # bpp at 7-20 dB PSNR on Kodak, t predicted beyond the denoiser's range); x100 puts
        # lambda * s at 100..2000, the span of CompressAI's MSE models (lambda * 255^2 =
        # 117..3140 for its qualities 1..6).
        kw.distortion_scale = 100.0
    if "smoke" in args:
        apply_smoke(c)
        kw.unet_config = dict(TINY_DENOISER)
        kw.estimator_features = [16, 32]
        kw.hyper_channels = 16
    return c
