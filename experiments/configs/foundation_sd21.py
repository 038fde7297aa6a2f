"""Foundation latent codec on a frozen Stable Diffusion 2.1 (Relic et al., ECCV 2024).

Trains the parameter estimator P(y, lambda) and the latent scale hyperprior; the SD 2.1
VAE and UNet stay frozen. ``loss = bpp + lambda * MSE`` with lambda drawn from
{1, 5, 10, 20} per step; one x0-prediction step at the predicted continuous t.
The paper: Vimeo-90k 256 px crops, 300k steps, lr 1e-4.

What you need (not available on the project's machines):

1. SD 2.1 converted to diffjax: ``diffjax convert <stable-diffusion-2-1 folder> sd21-diffjax``
   (a diffusers folder with ``unet/`` and ``vae/``).
2. The empty-prompt context: the OpenCLIP ViT-H text encoder of SD 2.1 applied to ``""``
   (``[1, 77, 1024]``), saved with ``numpy.save``. Without it the context is zeros.

Run::

    python -m experiments.train --config=experiments/configs/foundation_sd21.py \\
        --config.task.kwargs.pretrained=/path/sd21-diffjax \\
        --config.task.kwargs.context_path=/path/empty_prompt_sd21.npy \\
        --config.data.path=/path/vimeo90k/images --workdir=runs/foundation-sd21
    python -m experiments.train --config=experiments/configs/foundation_sd21.py:smoke --workdir=/tmp/fd

``smoke`` uses tiny random SD-layout networks (same code path, seconds of CPU work).
The default data (BSDS500) is licensed for non-commercial research only. Evaluate the
trained parameters with ``diffjax.codecs.get("foundation", quality=lmbda, **codec_kwargs(c))``.
"""
from experiments.configs.base import apply_smoke, get_base_config, parse_arg

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (768-v model).
SD21_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    trained_betas=None,
)

# Tiny networks with the SD key layout (VAE /8 like SD; 2-level UNet with cross-attention).
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(8, 8, 16, 16), norm_num_groups=8, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def codec_kwargs(c) -> dict:
    """``FoundationCodec`` keyword arguments matching a config (configs read from
    ``pretrained`` when set): :meth:`diffjax.codecs.foundation.FoundationTask.codec_kwargs`."""
    from diffjax.codecs.foundation import FoundationTask

    return FoundationTask(**c.task.kwargs.to_dict()).codec_kwargs()


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"smoke"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use 'smoke'")
    c = get_base_config()
    c.task.name = "foundation"
    kw = c.task.kwargs
    kw.vae = "sd"
    kw.pretrained = ""            # REQUIRED (except smoke): `diffjax convert` output of SD 2.1
    kw.context_path = ""          # empty-prompt context .npy [1, 77, 1024]; "" = zeros
    kw.scheduler_config = dict(SD21_SCHEDULER)
    kw.lambdas = [1.0, 5.0, 10.0, 20.0]
    kw.estimator_features = [64, 128, 256]
    kw.hyper_channels = 128
    kw.init_t = 0.05
    kw.num_inference_steps = 50   # decode runs ceil(t * 50) DDIM steps
    c.num_train_steps = 300_000
    c.batch_size = 8
    c.data.crop = 256
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.groups = {"aux": {"learning_rate": 1e-3, "grad_clip_norm": 0.0}}
    if "smoke" in args:
        apply_smoke(c)
        kw.vae_config = dict(TINY_VAE)
        kw.unet_config = dict(TINY_UNET)
        kw.estimator_features = [16, 32]
        kw.hyper_channels = 16
    return c
