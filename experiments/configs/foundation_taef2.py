"""Foundation latent codec on TAEF2 (FLUX.2 latent space, 32 ch, /8): the instance that
can be trained and measured on machines without Stable Diffusion weights.

Frozen backbone = the real TAEF2 encoder/decoder (``../shared/data/taesd``, MIT) + a small
latent denoiser (``UNet2DConditionModel``, zeros context) trained on TAEF2 latents at low
noise levels (the codec only runs the end of the process). This config trains the second
stage, P(y, lambda) + the latent hyperprior, exactly like ``foundation_sd21.py``.

    python -m experiments.train --config=experiments/configs/foundation_taef2.py \\
        --config.task.kwargs.unet_path=/path/taef2-denoiser --workdir=runs/foundation-taef2
    python -m experiments.train --config=experiments/configs/foundation_taef2.py:smoke --workdir=/tmp/fd2

``unet_path`` is a diffjax model directory (``diffjax.convert.core.save_pretrained``) of
the denoiser; diffjax has no task yet that trains that denoiser (first stage), so without
it only ``smoke`` (random denoiser) runs. TAEF2 latent statistics measured on 16 BSDS500
train crops (256 px): mean 0.030, std 0.836, hence ``scaling_factor = 1.2``.
BSDS500 is licensed for non-commercial research only.
"""
from experiments.configs.base import apply_smoke, data_root, get_base_config, parse_arg
from experiments.configs.foundation_sd21 import SD21_SCHEDULER

TAEF2 = {"latent_channels": 32, "arch_variant": "flux_2", "scaling_factor": 1.2,
         "shift_factor": 0.0}

# The latent denoiser (first stage): ~20 M parameters, attention at /16 and /32 only.
DENOISER = dict(
    in_channels=32, out_channels=32, layers_per_block=2, block_out_channels=(128, 256, 256),
    norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8,
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
TINY_DENOISER = dict(DENOISER, layers_per_block=1, block_out_channels=(32, 32),
                     norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"smoke"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use 'smoke'")
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
    if "smoke" in args:
        apply_smoke(c)
        kw.unet_config = dict(TINY_DENOISER)
        kw.estimator_features = [16, 32]
        kw.hyper_channels = 16
    return c
