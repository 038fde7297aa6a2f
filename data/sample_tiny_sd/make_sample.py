"""Regenerate the tiny random Stable-Diffusion-2.1-like pipeline in this folder.

The folder is a diffusers pipeline layout (``model_index.json``, ``unet/``, ``vae/``,
``scheduler/``) with the SD 2.1 block types and key layout (linear transformer
projections, v-prediction scheduler) at toy widths and seeded random weights. It is the
sample for the README's main job (``diffjax convert data/sample_tiny_sd OUT``) and is
committed, so nothing needs a download. Needs torch + diffusers (``./install.sh --test``):

    python data/sample_tiny_sd/make_sample.py
"""
import json
import pathlib

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

HERE = pathlib.Path(__file__).resolve().parent

UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)


def main():
    torch.manual_seed(2024)
    UNet2DConditionModel(**UNET).save_pretrained(HERE / "unet")
    AutoencoderKL(**VAE).save_pretrained(HERE / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(HERE / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (HERE / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
