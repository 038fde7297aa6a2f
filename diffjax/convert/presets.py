"""The diffusers configs of the released Stable Diffusion models (for single-file conversion).

Original single-file checkpoints do not record their architecture, so ``diffjax convert``
needs one of these names (or a ``config.json``). The dicts are exactly the
``unet/config.json`` and ``vae/config.json`` of the corresponding diffusers repositories
(keys left at their defaults omitted) plus the scheduler's ``prediction_type``.

==============  ==========================================  ===============
name            model                                       prediction
==============  ==========================================  ===============
``sd15``        Stable Diffusion 1.5 (also 1.4)             epsilon
``sd21``        Stable Diffusion 2.1 768 (also 2.0 768)     v_prediction
``sd21-base``   Stable Diffusion 2.1 base 512 (also 2.0)    epsilon
``sdxl``        Stable Diffusion XL 1.0 base                epsilon
==============  ==========================================  ===============
"""
from __future__ import annotations

import copy

from diffjax.errors import InputError

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "down_block_types": _SD_DOWN, "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64, "up_block_types": _SD_UP,
}

SD21_UNET = {
    **SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
    "sample_size": 96, "use_linear_projection": True, "upcast_attention": True,
}

SD21_BASE_UNET = {**SD21_UNET, "sample_size": 64, "upcast_attention": False}

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False, "use_linear_projection": True,
}

SD_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}

SD21_VAE = {**SD_VAE, "sample_size": 768}

SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

PRESETS = {
    "sd15": {"unet": SD15_UNET, "vae": SD_VAE, "prediction_type": "epsilon"},
    "sd21": {"unet": SD21_UNET, "vae": SD21_VAE, "prediction_type": "v_prediction"},
    "sd21-base": {"unet": SD21_BASE_UNET, "vae": SD_VAE, "prediction_type": "epsilon"},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "prediction_type": "epsilon"},
}


def get(name: str) -> dict:
    """A deep copy of preset ``name`` (``{"unet": cfg, "vae": cfg, "prediction_type": str}``)."""
    if name not in PRESETS:
        raise InputError(f"unknown config preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
