"""Original (CompVis/Stability "LDM") single-file Stable Diffusion key names -> diffusers names.

An original checkpoint (``v1-5-pruned.safetensors``, ``v2-1_768-ema-pruned.ckpt``,
``sd_xl_base_1.0.safetensors``, ...) stores the UNet under ``model.diffusion_model.`` in
the ``openaimodel.UNetModel`` layout and the VAE under ``first_stage_model.`` in the
``AutoencoderKL`` (``Encoder``/``Decoder``) layout. The layout does not record the
architecture, so the matching diffusers config must be named (see
``diffjax.models.sd_configs``). The mapping follows diffusers' own single-file loader
(``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``):

UNet: ``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; ``label_emb.0.{0,2}`` ->
``add_embedding.linear_{1,2}`` (SDXL); ``input_blocks.0.0`` -> ``conv_in``;
``input_blocks.{1 + b(L+1) + l}.{0,1}`` -> ``down_blocks.b.{resnets,attentions}.l``, with the
block's downsampler at ``l = L`` (``.0.op``); ``middle_block.{0,1,2}`` -> mid resnet 0,
attention 0, resnet 1; ``output_blocks.{b(L+1) + l}.{0,1}`` -> ``up_blocks.b.{resnets,
attentions}.l`` and the upsampler at ``.1.conv`` / ``.2.conv``; ``out.{0,2}`` ->
``conv_norm_out``/``conv_out``. ResBlock internals: ``in_layers.0/2`` -> ``norm1/conv1``,
``emb_layers.1`` -> ``time_emb_proj``, ``out_layers.0/3`` -> ``norm2/conv2``,
``skip_connection`` -> ``conv_shortcut``. Transformer internals are already identical.

VAE: ``{en,de}coder.{down,up}.i.block.j`` -> ``{down,up}_blocks.i.resnets.j`` (decoder up
blocks in reverse order), ``.downsample``/``.upsample`` -> ``.{down,up}samplers.0``,
``mid.block_{1,2}`` -> ``mid_block.resnets.{0,1}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` ->
``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (1x1 convs -> linear),
``norm_out`` -> ``conv_norm_out``, ``nin_shortcut`` -> ``conv_shortcut``.
"""
from __future__ import annotations

import re
from typing import Callable

from diffjax.errors import InputError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")

_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."),
           ("skip_connection.", "conv_shortcut."))

Renamer = Callable[[str, tuple], "tuple[str, str] | None"]


def _resnet(rest: str) -> str:
    for old, new in _RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def unet_renamer(config: dict) -> Renamer:
    """``rename(ldm_key_without_prefix, shape) -> (diffusers_key, "") | None`` for a UNet config."""
    lpb = config.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise InputError("original-SD checkpoints need the same layers_per_block in every block")
        lpb = lpb[0]
    per = lpb + 1
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
             "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
             "middle_block.2.": "mid_block.resnets.1."}
    block_re = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")

    def rename(key: str, shape: tuple):
        for old, new in fixed.items():
            if key.startswith(old):
                rest = key[len(old):]
                return new + (_resnet(rest) if "resnets" in new else rest), ""
        m = block_re.match(key)
        if not m:
            return None
        kind, idx, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "input_blocks":
            b, l = divmod(idx - 1, per)
            if l == lpb:  # the downsampler slot
                if sub == 0 and rest.startswith("op."):
                    return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}", ""
                return None
            if sub == 0:
                return f"down_blocks.{b}.resnets.{l}.{_resnet(rest)}", ""
            if sub == 1:
                return f"down_blocks.{b}.attentions.{l}.{rest}", ""
            return None
        b, l = divmod(idx, per)
        if sub == 0:
            return f"up_blocks.{b}.resnets.{l}.{_resnet(rest)}", ""
        if sub in (1, 2) and rest.startswith("conv."):
            return f"up_blocks.{b}.upsamplers.0.conv.{rest[5:]}", ""
        if sub == 1:
            return f"up_blocks.{b}.attentions.{l}.{rest}", ""
        return None

    return rename


def vae_renamer(config: dict) -> Renamer:
    """``rename(ldm_key_without_prefix, shape)`` for an ``AutoencoderKL`` config."""
    n_up = len(config.get("up_block_types", ("UpDecoderBlock2D",)))
    fixed = {"encoder.norm_out.": "encoder.conv_norm_out.",
             "decoder.norm_out.": "decoder.conv_norm_out."}
    attn = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.",
            "proj_out.": "to_out.0."}
    res_re = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$")
    mid_re = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")

    def rename(key: str, shape: tuple):
        for old, new in fixed.items():
            if key.startswith(old):
                return new + key[len(old):], ""
        m = mid_re.match(key)
        if m:
            part, what, rest = m.groups()
            if what == "attn_1":
                for old, new in attn.items():
                    if rest.startswith(old):
                        hint = "squeeze_linear" if rest.endswith("weight") and old != "norm." else ""
                        return f"{part}.mid_block.attentions.0.{new}{rest[len(old):]}", hint
                return None
            idx = 0 if what == "block_1" else 1
            return f"{part}.mid_block.resnets.{idx}.{rest.replace('nin_shortcut.', 'conv_shortcut.')}", ""
        m = res_re.match(key)
        if m:
            part, direction, i, what, j, rest = m.groups()
            if (part == "encoder") != (direction == "down"):
                return None
            i = int(i)
            blocks = "down_blocks" if part == "encoder" else "up_blocks"
            if part == "decoder":
                i = n_up - 1 - i
            if j is not None:
                rest = rest.replace("nin_shortcut.", "conv_shortcut.")
                return f"{part}.{blocks}.{i}.resnets.{j}.{rest}", ""
            if what == ("downsample" if part == "encoder" else "upsample") and rest.startswith("conv."):
                return f"{part}.{blocks}.{i}.{what}rs.0.{rest}", ""
            return None
        if key.startswith(("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.",
                           "decoder.conv_out.", "quant_conv.", "post_quant_conv.")):
            return key, ""
        return None

    return rename
