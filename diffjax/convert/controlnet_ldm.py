"""Original (lllyasviel) ControlNet checkpoint names -> diffusers ``ControlNetModel`` names.

The original ControlNet code (Zhang et al. 2023, github.com/lllyasviel/ControlNet,
``cldm/cldm.py``) stores the network under ``control_model.`` (v1.0 files that also hold the
SD model) or without a prefix (the standalone v1.1 / SD 2.1 files), in the
``openaimodel.UNetModel`` layout of the encoder plus three ControlNet parts. The key map,
the same as diffusers' single-file loader (``convert_controlnet_checkpoint``):

================================================  =============================================
original                                          diffusers
================================================  =============================================
``input_hint_block.0``                            ``controlnet_cond_embedding.conv_in``
``input_hint_block.{2 (j + 1)}``, j < 2 (L - 1)   ``controlnet_cond_embedding.blocks.{j}``
``input_hint_block.{2 (2 (L - 1) + 1)}``          ``controlnet_cond_embedding.conv_out``
``zero_convs.{i}.0``                              ``controlnet_down_blocks.{i}``
``middle_block_out.0``                            ``controlnet_mid_block``
``time_embed``, ``input_blocks``, ``middle_block``  as the SD UNet (:mod:`diffjax.convert.ldm`)
================================================  =============================================

``L = len(conditioning_embedding_out_channels)`` (4 in every released model: hint block
indices 0, 2, ..., 14; the odd indices are the SiLUs). The layout does not record the
architecture, so the config comes from a diffusers ``config.json`` or from the SD preset
the ControlNet was trained on (:func:`controlnet_config_from_unet`).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from diffjax.convert import ldm
from diffjax.errors import InputError

CONTROLNET_PREFIX = "control_model."
# Keys only an original ControlNet has (used to recognise a file, with or without prefix).
MARKERS = ("input_hint_block.", "zero_convs.", "middle_block_out.")

_HINT_RE = re.compile(r"^input_hint_block\.(\d+)\.(.+)$")
_ZERO_RE = re.compile(r"^zero_convs\.(\d+)\.0\.(.+)$")


def controlnet_prefix(keys: Iterable[str]) -> str | None:
    """``"control_model."``, ``""`` (a standalone file) or None (no ControlNet in ``keys``)."""
    keys = list(keys)
    if any(k.startswith(CONTROLNET_PREFIX + m) for k in keys for m in MARKERS):
        return CONTROLNET_PREFIX
    if any(k.startswith(m) for k in keys for m in MARKERS):
        return ""
    return None


def controlnet_renamer(config: Mapping) -> ldm.Renamer:
    """``rename(original_key_without_prefix, shape) -> (diffusers_key, "") | None``."""
    levels = len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    n_blocks = 2 * (levels - 1)
    conv_out = 2 * (n_blocks + 1)
    unet_rename = ldm.unet_renamer(dict(config))

    def rename(key: str, shape: tuple):
        m = _HINT_RE.match(key)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx == 0:
                return f"controlnet_cond_embedding.conv_in.{rest}", ""
            if idx == conv_out:
                return f"controlnet_cond_embedding.conv_out.{rest}", ""
            if idx % 2 == 0 and 2 <= idx <= 2 * n_blocks:
                return f"controlnet_cond_embedding.blocks.{idx // 2 - 1}.{rest}", ""
            return None
        m = _ZERO_RE.match(key)
        if m:
            return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}", ""
        if key.startswith("middle_block_out.0."):
            return "controlnet_mid_block." + key[len("middle_block_out.0."):], ""
        if key.startswith(("output_blocks.", "out.")):
            return None  # decoder half: not part of a ControlNet
        return unet_rename(key, shape)

    return rename


# diffusers' ControlNetModel.from_unet copies these UNet config entries.
_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
              "block_out_channels", "layers_per_block", "downsample_padding",
              "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
              "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
              "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "class_embed_type", "num_class_embeds",
              "upcast_attention", "resnet_time_scale_shift", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim",
              "mid_block_type")


def controlnet_config_from_unet(unet_config: Mapping, **extra) -> dict:
    """The ControlNet config of a UNet config (as ``ControlNetModel.from_unet``); ``extra``
    sets ``conditioning_embedding_out_channels``, ``conditioning_channels``, ..."""
    if "conditioning_embedding_out_channels" in unet_config:
        raise InputError("this is already a ControlNet config")
    cfg = {k: unet_config[k] for k in _FROM_UNET if k in unet_config}
    cfg["_class_name"] = "ControlNetModel"
    cfg.update(extra)
    return cfg
