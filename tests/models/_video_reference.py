"""diffusers (PyTorch CPU) references for the video UNet tests.

Tiny random-weight ``UNet3DConditionModel`` / ``UNetMotionModel`` (built from a tiny SD UNet
and ``MotionAdapter`` with ``from_unet2d``, as AnimateDiff pipelines do) with the real block
types and key layout. Every parameter is random, including the layers diffusers
zero-initialises (the last temporal conv), so the temporal layers really count; the output
is rescaled to unit standard deviation so a relative tolerance is meaningful.
"""
from __future__ import annotations

import re

import numpy as np
import torch

TINY_3D = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
)
TINY_SD = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_ADAPTER = dict(
    block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
    motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=True,
)
FRAMES = 3


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm scales ``1 + 0.2 N``, biases ``0.2 N``, all-zero weights (zero-initialised
    temporal layers) ``N(0, 1 / fan_in)``; other weights keep their seeded init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif not bool(p.abs().max() > 0):
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)


def video_inputs(config: dict, batch: int = 2, frames: int = FRAMES, size: int = 8,
                 seed: int = 0, per_frame_context: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    ctx_shape = (batch, frames, 5, config["cross_attention_dim"]) if per_frame_context else \
        (batch, 5, config["cross_attention_dim"])
    return {"sample": rng.standard_normal((batch, frames, size, size, config["in_channels"]),
                                          np.float32),
            "timesteps": np.array([999.0, 17.0][:batch], np.float32),
            "context": rng.standard_normal(ctx_shape, np.float32)}


def _ncthw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 4, 1, 2, 3)


def _folded_nchw(a):  # [B, F, H, W, C] -> [B*F, C, H, W]
    a = np.asarray(a)
    return torch.from_numpy(np.ascontiguousarray(
        a.reshape((-1,) + a.shape[2:]))).permute(0, 3, 1, 2)


@torch.no_grad()
def run_video(model, inputs: dict, repeat_context: bool, residuals=None) -> np.ndarray:
    """``[B, F, H, W, C]`` output of a diffusers video UNet. ``repeat_context``: the model
    wants ``[B * F, S, D]`` (``UNetMotionModel``); per-frame contexts are always folded."""
    b, f = inputs["sample"].shape[:2]
    ctx = inputs["context"]
    if ctx.ndim == 4:
        ctx = ctx.reshape((b * f,) + ctx.shape[2:])
    elif repeat_context:
        ctx = np.repeat(ctx, f, axis=0)
    kwargs = {}
    if residuals is not None:
        down, mid = residuals
        kwargs["down_block_additional_residuals"] = tuple(_folded_nchw(r) for r in down)
        kwargs["mid_block_additional_residual"] = _folded_nchw(mid)
    out = model(_ncthw(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                torch.from_numpy(np.ascontiguousarray(ctx)), **kwargs).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


@torch.no_grad()
def _unit_output(model, config, repeat_context):
    std = float(run_video(model, video_inputs(config), repeat_context).std())
    model.conv_out.weight.div_(std)
    model.conv_out.bias.div_(std)
    return model


@torch.no_grad()
def build_unet3d(config: dict = TINY_3D, seed: int = 0):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    model = UNet3DConditionModel(**config).eval()
    randomize_(model, seed)
    return _unit_output(model, config, repeat_context=False)


@torch.no_grad()
def build_motion(sd_config: dict = TINY_SD, adapter_config: dict = TINY_ADAPTER, seed: int = 0):
    """``(unet2d, adapter, motion_unet)``: the motion UNet is ``from_unet2d(unet2d, adapter)``."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd_config).eval()
    randomize_(unet, seed)
    adapter = MotionAdapter(**adapter_config).eval()
    randomize_(adapter, seed + 1)
    motion = UNetMotionModel.from_unet2d(unet, adapter).eval()
    std = float(run_video(motion, video_inputs(sd_config), True).std())
    for m in (unet, motion):  # the same spatial weights in both
        m.conv_out.weight.div_(std)
        m.conv_out.bias.div_(std)
    return unet, adapter, motion


def skip_shapes(config: dict, batch: int, frames: int, size: int):
    """``[B, F, h, w, c]`` shapes of the UNet's skips (= ControlNet down residuals)."""
    chans = config["block_out_channels"]
    lpb = config["layers_per_block"]
    shapes = [(batch, frames, size, size, chans[0])]
    for i, c in enumerate(chans):
        shapes += [(batch, frames, size, size, c)] * lpb
        if i < len(chans) - 1:
            size = (size + 1) // 2
            shapes.append((batch, frames, size, size, c))
    return shapes


# ------------------------------------------------------------ diffusers -> ModelScope keys
_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."),
           ("conv_shortcut.", "skip_connection.")]


def to_modelscope(state_dict: dict, config: dict, conv1d_proj: bool = True) -> dict:
    """diffusers ``UNet3DConditionModel`` state dict -> original ModelScope names (the inverse
    of diffusers' ``convert_ms_text_to_video_to_diffusers.py``); temporal ``proj_in`` /
    ``proj_out`` weights become Conv1d ``[O, I, 1]`` when ``conv1d_proj``."""
    lpb = config["layers_per_block"]
    per = lpb + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "transformer_in.": "input_blocks.0.1.",
             "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    out = {}
    for key, value in state_dict.items():
        new = None
        for hf, ms in fixed.items():
            if key.startswith(hf):
                new = ms + key[len(hf):]
        parts = key.split(".")
        if key.startswith("down_blocks."):
            b, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{1 + b * per + lpb}.op.{parts[-1]}"
            else:
                i = 1 + b * per + int(parts[3])
                new = _sub(kind, rest, f"input_blocks.{i}")
        elif key.startswith("mid_block."):
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            index = {("resnets", 0): 0, ("temp_convs", 0): 0, ("attentions", 0): 1,
                     ("temp_attentions", 0): 2, ("resnets", 1): 3, ("temp_convs", 1): 3}[(kind, j)]
            new = _sub(kind, rest, f"middle_block.{index}", sub_index=False)
        elif key.startswith("up_blocks."):
            b, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            if kind == "upsamplers":
                new = f"output_blocks.{b * per + lpb}.{3 if up_attn[b] else 1}.{rest}"
            else:
                new = _sub(kind, rest, f"output_blocks.{b * per + int(parts[3])}")
        if conv1d_proj and _TEMPORAL_PROJ.match(new):
            value = value[:, :, None]
        out[new] = value
    return out


_TEMPORAL_PROJ = re.compile(
    r"^(input_blocks\.0\.1|(input|output)_blocks\.\d+\.2|middle_block\.2)\.proj_(in|out)\.weight$")


def _sub(kind: str, rest: str, base: str, sub_index: bool = True) -> str:
    if kind == "resnets":
        for hf, ms in _RESNET:
            if rest.startswith(hf):
                rest = ms + rest[len(hf):]
        return f"{base}{'.0' if sub_index else ''}.{rest}"
    if kind == "temp_convs":
        return f"{base}{'.0' if sub_index else ''}.temopral_conv.{rest}"
    index = {"attentions": 1, "temp_attentions": 2}[kind]
    return f"{base}.{index}.{rest}" if sub_index else f"{base}.{rest}"
