"""diffusers ControlNet references shared by the ControlNet parity / conversion / sampling tests.

* tiny ControlNet configs of the SD 1.5-like and SD 2.1-like UNets of :mod:`_sd_reference`
  (real block types and key layout; four condition-encoder levels, so the condition is 8x
  the latent as in the released models);
* :func:`build_controlnet`: a seeded diffusers ``ControlNetModel`` with *every* parameter
  random -- the zero convolutions and the condition encoder's ``conv_out`` too (they are
  zero at init, which would hide any error behind them);
* :func:`to_original_controlnet`: diffusers -> original lllyasviel key map (the inverse of
  the table in :mod:`diffjax.convert.controlnet_ldm`, written independently here), the
  encoder part through :func:`_sd_reference.to_original_unet`.
"""
from __future__ import annotations

import numpy as np
import torch

import _sd_reference as ref

COND_CHANNELS = (4, 8, 8, 16)  # four levels: condition = 8 x latent


def controlnet_config(unet_config: dict, **extra) -> dict:
    keys = ("in_channels", "layers_per_block", "block_out_channels", "norm_num_groups",
            "cross_attention_dim", "attention_head_dim", "down_block_types",
            "use_linear_projection", "upcast_attention")
    cfg = {k: unet_config[k] for k in keys if k in unet_config}
    cfg["conditioning_embedding_out_channels"] = COND_CHANNELS
    cfg.update(extra)
    return cfg


CN_CONFIGS = {"sd15": controlnet_config(ref.TINY_SD15), "sd21": controlnet_config(ref.TINY_SD21)}


@torch.no_grad()
def build_controlnet(config: dict, seed: int = 0, weight_std: float = 0.3):
    """Seeded diffusers ControlNetModel; zero convs and ``conv_out`` made random."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel(**config).eval()
    ref.randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        if name.startswith("controlnet_cond_embedding.") and p.ndim == 4:
            # variance-preserving weights: the default init and 0.2 N biases would make the
            # 7-conv encoder's output nearly independent of the condition image
            p.copy_(torch.randn(p.shape, generator=gen) * 1.6 / np.sqrt(p[0].numel()))
        elif name.startswith("controlnet_cond_embedding."):
            p.mul_(0.2)
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * weight_std / np.sqrt(fan_in))
    # The condition embedding enters beside conv_in(x): give it unit scale too, so a wrong
    # condition path cannot hide behind a small contribution.
    emb = model.controlnet_cond_embedding
    probe = ref.nchw(cond_image(config, 8, seed=seed + 7))
    std = float(emb(probe).std())
    emb.conv_out.weight.div_(std)
    emb.conv_out.bias.div_(std)
    return model


def cond_image(config: dict, size: int, batch: int = 2, seed: int = 3) -> np.ndarray:
    """A random condition image ``[B, 8 size, 8 size, C]`` in [0, 1] (NHWC)."""
    f = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (batch, size * f, size * f, config.get("conditioning_channels", 3))
                       ).astype(np.float32)


@torch.no_grad()
def run_controlnet(model, inputs: dict, cond: np.ndarray, scale: float = 1.0,
                   guess_mode: bool = False):
    down, mid = model(ref.nchw(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                      torch.from_numpy(inputs["context"]), ref.nchw(cond),
                      conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
    return [ref.nhwc(d) for d in down], ref.nhwc(mid)


def rel_error(out: np.ndarray, want: np.ndarray) -> float:
    """``max |out - want| / max |want|`` (relative to the residual's scale)."""
    return float(np.max(np.abs(np.asarray(out, np.float64) - want)) / np.max(np.abs(want)))


# ------------------------------------------------------------ diffusers -> original keys
def to_original_controlnet(state_dict: dict, config: dict, prefix: str = "control_model.") -> dict:
    """diffusers ControlNet state dict -> original lllyasviel keys (under ``prefix``)."""
    levels = len(config["conditioning_embedding_out_channels"])
    n_blocks = 2 * (levels - 1)
    down = config["down_block_types"]
    unet_cfg = dict(config, up_block_types=tuple(
        "CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(down)))
    encoder = {}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            part, leaf = rest.rsplit(".", 1)
            if part == "conv_in":
                idx = 0
            elif part == "conv_out":
                idx = 2 * (n_blocks + 1)
            else:
                idx = 2 * (int(part.split(".")[1]) + 1)
            out[f"{prefix}input_hint_block.{idx}.{leaf}"] = value
        elif key.startswith("controlnet_down_blocks."):
            _, i, leaf = key.split(".")
            out[f"{prefix}zero_convs.{i}.0.{leaf}"] = value
        elif key.startswith("controlnet_mid_block."):
            out[f"{prefix}middle_block_out.0.{key.rsplit('.', 1)[1]}"] = value
        else:
            encoder[key] = value
    for key, value in ref.to_original_unet(encoder, unet_cfg).items():
        out[prefix + key[len("model.diffusion_model."):]] = value
    return out
