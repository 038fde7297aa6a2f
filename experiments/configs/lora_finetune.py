"""LoRA fine-tune of a frozen Stable Diffusion UNet on one clip's frames (task ``lora_finetune``).

The transmitter side of the hint-guided video codec (IKIN): a rank-4 LoRA on the
attention projections of SD 2.1, trained with the denoising loss on the frames of a clip
(here BasketballPass, 100 lossless frames); the adapter is then sent with
``diffjax.nn.lora.pack``. Only the LoRA trains; the UNet and the VAE stay frozen.

What you need (SD weights are not available on the project's machines):

1. SD 2.1 converted: ``diffjax convert <stable-diffusion-2-1 folder> sd21-diffjax``
   (gives ``sd21-diffjax/unet`` and ``sd21-diffjax/vae``).
2. Optionally the empty-prompt text embedding ``[77, 1024]`` as ``.npy`` (else a seeded
   random stand-in context).

Run::

    python -m experiments.train --config=experiments/configs/lora_finetune.py \\
        --config.task.kwargs.unet=/path/sd21-diffjax/unet \\
        --config.task.kwargs.vae=/path/sd21-diffjax/vae --workdir=runs/lora-basketball
    python -m experiments.train --config=experiments/configs/lora_finetune.py:smoke --workdir=/tmp/lora

``smoke`` uses tiny random SD-layout networks (same code path, seconds of CPU work).
"""
from experiments.configs.base import apply_smoke, data_root, get_base_config, parse_arg

# A tiny UNet / VAE with the SD key layout (cross-attention, linear projections).
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=(2, 4), use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(8, 16), norm_num_groups=8, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"smoke"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use 'smoke'")
    c = get_base_config()
    c.task.name = "lora_finetune"
    kw = c.task.kwargs
    smoke = "smoke" in args
    # REQUIRED (except smoke): the converted SD 2.1 unet/ and vae/ directories
    kw.unet = dict(TINY_UNET) if smoke else ""
    kw.vae = dict(TINY_VAE) if smoke else ""
    kw.targets = ["to_q", "to_k", "to_v", "to_out.0"]   # peft-style names / regexes
    kw.rank = 4
    kw.alpha = 4.0
    kw.prediction_type = "v_prediction"   # SD 2.1 768-v
    c.data.kind = "images"
    c.data.path = str(data_root() / "basketballpass")
    c.data.crop = 256
    c.batch_size = 4
    c.num_train_steps = 1_000
    c.log_every = 50
    c.checkpoint_every = 250
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.grad_clip_norm = 1.0
    if smoke:
        apply_smoke(c)
        kw.prediction_type = "epsilon"
        c.data.crop = 32
        c.optimizer.learning_rate = 1e-3
    return c
