"""Diffusion autoencoder codec (Rampas 2024; ``diffjax.codecs.diffae``): codec configs.

``get_config(arg).codec`` holds the :class:`~diffjax.codecs.diffae.DiffAECodec` keyword
arguments (``diffjax.codecs.get("diffae", quality=q, **config.codec)``):

* default (GPU): EfficientNetV2-S at full width/depth (1280 channels at f32, 16-channel
  latent), TAEF2 first stage (``../shared/data/taesd``), a 2-level SD-block UNet;
* ``cpu``: a quarter-width encoder and a smaller UNet (CPU experiments);
* ``smoke``: a tiny SD-compatible ``AutoencoderKL`` first stage (f4, random), a tiny UNet
  and encoder, 2 DDPM steps (tests; seconds).

The training loss is :func:`diffjax.codecs.diffae.diffae_loss`; the training task for
``experiments/train.py`` (and its batch-statistics state) is not written yet (issue 27).
"""
import ml_collections

from experiments.configs.base import data_root, parse_arg

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


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    unknown = args - {"cpu", "gpu", "smoke"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use cpu, gpu, smoke")
    taesd = data_root() / "taesd"
    codec = dict(vae="taesd", vae_config=dict(TAEF2, taesd_encoder=str(taesd / "taef2_encoder.pth"),
                                              taesd_decoder=str(taesd / "taef2_decoder.pth")),
                 unet_config=dict(UNET), latent_channels=16, encoder_width=1.0,
                 encoder_depth=1.0, quant_steps=(4.0, 2.0, 1.0, 0.5), num_steps=10,
                 guidance_scale=3.0, seed=0)
    if "cpu" in args:
        codec.update(unet_config=dict(CPU_UNET), encoder_width=0.25, encoder_depth=0.5)
    if "smoke" in args:
        codec.update(vae="sd", vae_config=dict(SMOKE_VAE), unet_config=dict(SMOKE_UNET),
                     encoder_width=0.25, encoder_depth=0.1, num_steps=2)
    c = ml_collections.ConfigDict()
    c.codec = codec
    return c
