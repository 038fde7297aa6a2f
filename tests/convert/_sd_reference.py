"""Reference (diffusers, PyTorch CPU) helpers shared by the SD UNet/VAE parity tests.

* tiny configs of each family (SD 1.5-like, SD 2.1-like, SDXL-like, VAE) with the real
  block types and key layout;
* :func:`build_unet` / :func:`build_vae`: seeded diffusers models whose *every* parameter
  is random (norm scales and biases too, so a swapped scale/bias cannot hide) and whose
  output is rescaled to unit standard deviation, so ``max|diff| <= 1e-4`` is meaningful;
* :func:`to_original_unet` / :func:`to_original_vae`: the standard diffusers -> original
  (LDM) key mapping of diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``,
  generalised from the hard-coded SD 1.x shape to any block/attention pattern.
"""
from __future__ import annotations

import numpy as np
import torch

TINY_SD15 = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_SD21 = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_SDXL = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
UNET_CONFIGS = {"sd15": TINY_SD15, "sd21": TINY_SD21, "sdxl": TINY_SDXL}


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Make every parameter random: norm scales ``1 + 0.2 N``, biases ``0.2 N``, weights
    keep their (seeded) default init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)


def skip_shapes(config: dict, batch: int, size: int) -> list[tuple[int, ...]]:
    """NHWC shapes of the UNet's skip tensors (= ControlNet down residuals)."""
    chans = config["block_out_channels"]
    shapes = [(batch, size, size, chans[0])]
    for i, c in enumerate(chans):
        shapes += [(batch, size, size, c)] * config["layers_per_block"]
        if i < len(chans) - 1:
            size = (size + 1) // 2
            shapes.append((batch, size, size, c))
    return shapes


def unet_inputs(config: dict, batch: int = 2, size: int = 16, seed: int = 0,
                extras: bool = False) -> dict:
    """Random NHWC inputs for a UNet config (numpy). ``extras`` adds an encoder attention
    mask and ControlNet-style down/mid residuals."""
    rng = np.random.default_rng(seed)
    cross = config["cross_attention_dim"]
    out = {
        "sample": rng.standard_normal((batch, size, size, config["in_channels"]), np.float32),
        "timesteps": np.array([999.0, 17.0][:batch], np.float32),
        "context": rng.standard_normal((batch, 7, cross), np.float32),
    }
    if extras:
        mask = np.ones((batch, 7), np.float32)
        mask[0, 4:] = 0
        mask[-1, :2] = 0
        shapes = skip_shapes(config, batch, size)
        out["encoder_attention_mask"] = mask
        out["down_block_additional_residuals"] = [
            rng.standard_normal(s).astype(np.float32) for s in shapes]
        out["mid_block_additional_residual"] = rng.standard_normal(shapes[-1]).astype(np.float32)
    if config.get("addition_embed_type") == "text_time":
        text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        out["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((batch, text), np.float32),
            "time_ids": rng.uniform(0, 1024, (batch, 6)).astype(np.float32),
        }
    return out


@torch.no_grad()
def run_unet(model, inputs: dict, **extra) -> np.ndarray:
    kwargs = {}
    if "added_cond_kwargs" in inputs:
        kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v)
                                       for k, v in inputs["added_cond_kwargs"].items()}
    if "encoder_attention_mask" in inputs:
        kwargs["encoder_attention_mask"] = torch.from_numpy(inputs["encoder_attention_mask"])
        kwargs["down_block_additional_residuals"] = tuple(
            nchw(r) for r in inputs["down_block_additional_residuals"])
        kwargs["mid_block_additional_residual"] = nchw(inputs["mid_block_additional_residual"])
    out = model(nchw(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                torch.from_numpy(inputs["context"]), **kwargs, **extra).sample
    return nhwc(out)


@torch.no_grad()
def build_unet(config: dict, seed: int = 0):
    """Seeded random diffusers UNet whose output on :func:`unet_inputs` has unit std."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    randomize_(model, seed)
    std = float(run_unet(model, unet_inputs(config)).std())
    model.conv_out.weight.div_(std)
    model.conv_out.bias.div_(std)
    return model


@torch.no_grad()
def build_vae(config: dict, seed: int = 0, size: int = 32):
    """Seeded random diffusers AutoencoderKL; posterior mean and decoded image have unit std."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    randomize_(model, seed)
    x = nchw(vae_input(config, size))
    lat = config["latent_channels"]
    mean = model.encode(x).latent_dist.mean
    std = float(mean.std())
    model.quant_conv.weight[:lat].div_(std)
    model.quant_conv.bias[:lat].div_(std)
    std = float(model.decode(mean / std).sample.std())
    model.decoder.conv_out.weight.div_(std)
    model.decoder.conv_out.bias.div_(std)
    return model


def vae_input(config: dict, size: int = 32, batch: int = 2, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, size, size, config["in_channels"])).astype(np.float32)


# ------------------------------------------------------------ diffusers -> original keys
_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
           ("skip_connection", "conv_shortcut")]


def to_original_unet(state_dict: dict, config: dict) -> dict:
    """diffusers UNet state dict -> original ``model.diffusion_model.*`` keys."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    layer_map = []  # (sd prefix, hf prefix)
    for i in range(n):
        for j in range(lpb):
            layer_map.append((f"input_blocks.{(lpb + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                layer_map.append((f"input_blocks.{(lpb + 1) * i + j + 1}.1.",
                                  f"down_blocks.{i}.attentions.{j}."))
        for j in range(lpb + 1):
            layer_map.append((f"output_blocks.{(lpb + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                layer_map.append((f"output_blocks.{(lpb + 1) * i + j}.1.",
                                  f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            layer_map.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.",
                              f"down_blocks.{i}.downsamplers.0.conv."))
            layer_map.append((f"output_blocks.{(lpb + 1) * i + lpb}.{2 if up_attn[i] else 1}.",
                              f"up_blocks.{i}.upsamplers.0."))
    layer_map.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer_map.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    out = {}
    for key, value in state_dict.items():
        new = key
        for hf, sd in fixed.items():
            if key.startswith(hf):
                new = sd + key[len(hf):]
        if "resnets" in key:
            for sd_part, hf_part in _RESNET:
                new = new.replace(hf_part, sd_part)
        for sd_part, hf_part in layer_map:
            new = new.replace(hf_part, sd_part)
        out["model.diffusion_model." + new] = value
    return out


def to_original_vae(state_dict: dict, config: dict) -> dict:
    """diffusers AutoencoderKL state dict -> original ``first_stage_model.*`` keys."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    vae_map = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
               ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(lpb):
            vae_map.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            vae_map.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            vae_map.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(lpb + 1):
            vae_map.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        vae_map.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn_map = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in state_dict.items():
        new = key
        for sd_part, hf_part in vae_map:
            new = new.replace(hf_part, sd_part)
        if "attentions" in key:
            for sd_part, hf_part in attn_map:
                new = new.replace(hf_part, sd_part)
            if value.ndim == 2:  # the original stores these as 1x1 convs
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out
