"""Conversion of the video UNets: ModelScope originals, and SD UNet + AnimateDiff motion adapter.

* **diffusers folders** of ``UNet3DConditionModel`` / ``UNetMotionModel`` go through the
  generic path (:func:`diffjax.convert.convert`): their keys are diffusers names; the
  fixed sinusoidal tables ``*.pos_embed.pe`` of motion modules are buffers, not
  parameters: their shapes are checked (:func:`drop_position_buffers`) and they are not
  stored (diffjax recomputes them).
* **Original ModelScope** ``text2video_pytorch_model.pth`` (keys ``input_blocks.*``,
  ``middle_block.*``, ``output_blocks.*``, optionally under ``model.diffusion_model.``):
  :func:`modelscope_renamer` maps them to diffusers names, as diffusers'
  ``scripts/convert_ms_text_to_video_to_diffusers.py`` does: ``input_blocks.{1 + b(L+1) +
  l}.{0, 0.temopral_conv, 1, 2}`` -> ``down_blocks.b.{resnets, temp_convs, attentions,
  temp_attentions}.l`` (the downsampler at ``l = L``, ``.op``); ``input_blocks.0.{0,1}`` ->
  ``conv_in`` / ``transformer_in``; ``middle_block.{0,1,2,3}`` -> resnet 0 (+ temp conv 0),
  attention, temporal attention, resnet 1 (+ temp conv 1); ``output_blocks.{b(L+1) +
  l}.*`` likewise with the upsampler at ``.3.conv`` (``.1.conv`` without attention).
  Temporal ``proj_in``/``proj_out`` may be stored as 1-D convs and are squeezed.
* **SD UNet + motion adapter** (``diffjax convert UNET_SRC DST --motion-adapter ADAPTER``):
  :func:`convert_with_motion_adapter` builds the :class:`UNetMotionModel` config as
  diffusers' ``UNetMotionModel.from_unet2d`` does, checks the UNet's keys against the
  spatial part of the model and the adapter's against the motion modules (both strictly),
  then writes one diffjax model. The spatial weights are the 2-D checkpoint's.
"""
from __future__ import annotations

import pathlib
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from diffjax.convert import core, mapping
from diffjax.convert.sources import DictSource, TensorSource
from diffjax.errors import InputError

# ---------------------------------------------------------------------- real-model configs
# damo-vilab/text-to-video-ms-1.7b, unet/config.json (scheduler: DDIM, epsilon).
MODELSCOPE_T2V_UNET = {
    "_class_name": "UNet3DConditionModel", "act_fn": "silu", "attention_head_dim": 64,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"], "downsample_padding": 1,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 32,
    "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3,
}
# guoyww/animatediff-motion-adapter-v1-5 (AnimateDiff v1: 24 frames, no mid motion module)
ANIMATEDIFF_V1_5_ADAPTER = {
    "_class_name": "MotionAdapter", "block_out_channels": [320, 640, 1280, 1280],
    "motion_layers_per_block": 2, "motion_mid_block_layers_per_block": 1,
    "motion_norm_num_groups": 32, "motion_num_attention_heads": 8, "motion_max_seq_length": 24,
    "use_motion_mid_block": False,
}
# guoyww/animatediff-motion-adapter-v1-5-2 (AnimateDiff v2: 32 frames, mid motion module)
ANIMATEDIFF_V1_5_2_ADAPTER = {**ANIMATEDIFF_V1_5_ADAPTER, "motion_max_seq_length": 32,
                              "use_motion_mid_block": True}
ADAPTERS = {"animatediff-v1-5": ANIMATEDIFF_V1_5_ADAPTER,
            "animatediff-v1-5-2": ANIMATEDIFF_V1_5_2_ADAPTER}
# Single-file presets (``--config``) for original ModelScope checkpoints.
VIDEO_PRESETS = {"modelscope-t2v": {"unet": MODELSCOPE_T2V_UNET, "prediction_type": "epsilon"}}

MODELSCOPE_PREFIX = "model.diffusion_model."
_PE = re.compile(r"^(.*\.transformer_blocks\.\d+)\.pos_embed\.pe$")


# ---------------------------------------------------------------------- motion modules
def drop_position_buffers(module, keys: list[str], source: TensorSource, prefix: str = "",
                          what: str = "checkpoint") -> list[str]:
    """``keys`` without the motion modules' ``pos_embed.pe`` buffers, after checking that
    each belongs to a transformer block of ``module`` and has shape
    ``[1, motion_max_seq_length, dim]`` (a mismatch raises ``CheckpointMismatchError``)."""
    template = core.param_template(module)
    kept, bad = [], []
    for key in keys:
        m = _PE.match(key[len(prefix):])
        if m is None:
            kept.append(key)
            continue
        q_path, _ = mapping.diffusers_key_to_path(m.group(1) + ".attn1.to_q.weight", 2)
        shape = tuple(source.shape(key))
        if q_path not in template:
            bad.append(f"{key}: no such motion-module block")
            continue
        want = (1, module.motion_max_seq_length, template[q_path].shape[0])
        if shape != want:
            bad.append(f"{key}: checkpoint {shape}, model expects {want} "
                       "(motion_max_seq_length / width)")
    if bad:
        raise mapping.CheckpointMismatchError(what, unexpected=[b for b in bad if "no such" in b],
                                              mismatched=[b for b in bad if "no such" not in b])
    return kept


def is_motion_path(path: tuple[str, ...]) -> bool:
    return any(p.startswith("motion_modules_") for p in path)


def _split_template(module) -> tuple[dict, dict]:
    template = core.param_template(module)
    motion = {p: v for p, v in template.items() if is_motion_path(p)}
    spatial = {p: v for p, v in template.items() if not is_motion_path(p)}
    return spatial, motion


def _plan_motion(module, unet_source, adapter_source, what_unet, what_adapter):
    spatial, motion = _split_template(module)
    unet_entries = mapping.plan([(k, unet_source.shape(k)) for k in unet_source.keys()],
                                spatial, what=what_unet)
    keys = drop_position_buffers(module, list(adapter_source.keys()), adapter_source,
                                 what=what_adapter)
    adapter_entries = mapping.plan([(k, adapter_source.shape(k)) for k in keys], motion,
                                   what=what_adapter)
    return unet_entries, adapter_entries


def convert_motion_state_dicts(unet_config: Mapping[str, Any], unet_state_dict,
                               adapter_config: Mapping[str, Any], adapter_state_dict, *,
                               dtype=None, **overrides):
    """In memory: SD UNet state dict + ``MotionAdapter`` state dict -> ``(module, params)``
    of the :class:`~diffjax.models.unet3d.UNetMotionModel` (strict on both)."""
    from diffjax.models.unet3d import UNetMotionModel

    module = UNetMotionModel.from_unet2d(unet_config, adapter_config, **overrides)
    sources = [s if isinstance(s, TensorSource) else DictSource(s)
               for s in (unet_state_dict, adapter_state_dict)]
    entries = _plan_motion(module, *sources, "SD UNet state dict", "motion adapter state dict")
    trees = [mapping.build_tree(e, s.read, dtype=dtype) for e, s in zip(entries, sources)]
    from diffjax.models.unet3d import merge_motion_params

    return module, merge_motion_params(*trees)


def _open_unet(src: pathlib.Path, variant):
    from diffjax.convert.files import open_diffusers_model, scheduler_prediction_type

    folder = src / "unet" if (src / "model_index.json").exists() else src
    if not (folder / "config.json").exists():
        raise InputError(f"{src} is not a diffusers UNet folder (config.json) or pipeline folder")
    cfg, source = open_diffusers_model(folder, variant)
    if core.model_class_name(cfg) != "UNet2DConditionModel":
        source.close()
        raise InputError(f"{folder} holds a {cfg.get('_class_name')}; --motion-adapter needs "
                         "an SD UNet2DConditionModel")
    return cfg, source, scheduler_prediction_type(folder)


def convert_with_motion_adapter(src, adapter, dst, *, dtype: str | None = None,
                                prediction_type: str | None = None, variant: str | None = None,
                                overwrite: bool = False, progress: bool = True,
                                log: Callable[[str], Any] = print) -> list[pathlib.Path]:
    """``diffjax convert UNET_SRC DST --motion-adapter ADAPTER``: one ``UNetMotionModel``.

    ``src`` is an SD UNet folder (or a pipeline folder with ``unet/``); ``adapter`` a
    diffusers ``MotionAdapter`` folder. Nothing is written unless every key matches.
    """
    from diffjax.convert.files import open_diffusers_model
    from diffjax.models.unet3d import UNetMotionModel, merge_motion_params

    src, adapter, dst = pathlib.Path(src), pathlib.Path(adapter), pathlib.Path(dst)
    for p in (src, adapter):
        if not p.exists():
            raise InputError(f"{p} does not exist")
    if dst.exists() and not overwrite:
        raise InputError(f"{dst} already exists (pass --overwrite to replace it)")
    if dtype is not None and dtype not in core.DTYPES:
        raise InputError(f"--dtype must be one of {core.DTYPES}")
    unet_cfg, unet_source, found_pred = _open_unet(src, variant)
    try:
        adapter_cfg, adapter_source = open_diffusers_model(adapter, variant)
    except Exception:
        unet_source.close()
        raise
    try:
        if adapter_cfg.get("_class_name", "MotionAdapter") != "MotionAdapter":
            raise InputError(f"{adapter} holds a {adapter_cfg['_class_name']}, not a MotionAdapter")
        pred = prediction_type or found_pred
        if pred is None:
            pred = "epsilon"
            log("note: no scheduler config found; recording prediction_type=epsilon")
        module = UNetMotionModel.from_unet2d(unet_cfg, adapter_cfg, prediction_type=pred)
        entries = _plan_motion(module, unet_source, adapter_source, f"{src.name} unet",
                               f"{adapter.name} motion adapter")
        prog = core._progress("converting", progress)
        trees = [mapping.build_tree(e, s.read, dtype=dtype, progress=prog)
                 for e, s in zip(entries, (unet_source, adapter_source))]
        params = merge_motion_params(*trees)
        leaves = jax.tree.leaves(params)
        core.save_pretrained(dst, module, params, overwrite=overwrite, metadata={
            "source": str(src.absolute()), "motion_adapter": str(adapter.absolute()),
            "component": "unet", "layout": "diffusers+motion_adapter", "prediction_type": pred})
        log(f"unet (motion): {sum(int(np.prod(x.shape)) for x in leaves) / 1e6:.2f} M "
            f"parameters -> {dst}")
    finally:
        unet_source.close()
        adapter_source.close()
    return [dst]


# ---------------------------------------------------------------------- ModelScope originals
_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."),
           ("skip_connection.", "conv_shortcut."))


def _resnet(rest: str) -> str:
    for old, new in _RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def is_modelscope(keys) -> bool:
    """Whether a key list is an original ModelScope UNet (with or without the LDM prefix)."""
    return any("temopral_conv" in k for k in keys) and any(
        k.startswith(("input_blocks.", MODELSCOPE_PREFIX + "input_blocks.")) for k in keys)


def modelscope_renamer(config: Mapping[str, Any]):
    """``rename(original_key, shape) -> (diffusers_key, layout_hint) | None`` for a
    ``UNet3DConditionModel`` config (see the module docstring)."""
    lpb = config.get("layers_per_block", 2)
    per = lpb + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "input_blocks.0.1.": "transformer_in.",
             "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    mid = {"0": "resnets.0", "1": "attentions.0", "2": "temp_attentions.0", "3": "resnets.1"}

    def sub(kind: str, index: str, rest: str, base: str) -> str | None:
        """``kind`` in resnets/attentions/temp_attentions, ``rest`` after the sub-layer index."""
        if kind.startswith("resnets"):
            if rest.startswith("temopral_conv."):
                return f"{base}.temp_convs.{index}.{rest[len('temopral_conv.'):]}"
            return f"{base}.resnets.{index}.{_resnet(rest)}"
        return f"{base}.{kind}.{index}.{rest}"

    def name(key: str) -> str | None:
        if key.startswith(MODELSCOPE_PREFIX):
            key = key[len(MODELSCOPE_PREFIX):]
        for old, new in fixed.items():
            if key.startswith(old):
                return new + key[len(old):]
        m = re.match(r"^input_blocks\.(\d+)\.(.*)$", key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            block, layer = (i - 1) // per, (i - 1) % per
            if layer == lpb:  # the downsampler
                op = re.match(r"^(?:0\.)?op\.(weight|bias)$", rest)
                return f"down_blocks.{block}.downsamplers.0.conv.{op.group(1)}" if op else None
            s = re.match(r"^([012])\.(.*)$", rest)
            if not s:
                return None
            kind = {"0": "resnets", "1": "attentions", "2": "temp_attentions"}[s.group(1)]
            return sub(kind, str(layer), s.group(2), f"down_blocks.{block}")
        m = re.match(r"^middle_block\.([0-3])\.(.*)$", key)
        if m:
            kind, index = mid[m.group(1)].split(".")
            if kind == "resnets" and m.group(2).startswith("temopral_conv."):
                return f"mid_block.temp_convs.{index}.{m.group(2)[len('temopral_conv.'):]}"
            return sub(kind, index, m.group(2), "mid_block")
        m = re.match(r"^output_blocks\.(\d+)\.(\d)\.(.*)$", key)
        if m:
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            block, layer = i // per, i % per
            if block >= len(up_attn):
                return None
            up_index = "3" if up_attn[block] else "1"
            if part == up_index and rest.startswith("conv."):
                return f"up_blocks.{block}.upsamplers.0.{rest}"
            kinds = {"0": "resnets"}
            if up_attn[block]:
                kinds.update({"1": "attentions", "2": "temp_attentions"})
            if part not in kinds:
                return None
            return sub(kinds[part], str(layer), rest, f"up_blocks.{block}")
        return None

    def rename(key: str, shape: tuple) -> tuple[str, str] | None:
        new = name(key)
        if new is None:
            return None
        hint = "squeeze_linear" if new.endswith(("proj_in.weight", "proj_out.weight")) else ""
        return new, hint

    return rename


def modelscope_prefix(keys) -> str:
    """``model.diffusion_model.`` when the original keys carry the LDM prefix, else ``""``."""
    return MODELSCOPE_PREFIX if any(k.startswith(MODELSCOPE_PREFIX) for k in keys) else ""


def jobs_for_file(src: pathlib.Path, dst: pathlib.Path, config, component, source):
    """The conversion job (as :mod:`diffjax.convert.files` plans them) for an original
    ModelScope ``text2video_pytorch_model.pth``: UNet only, ``--config`` defaulting to
    ``modelscope-t2v`` (or a ``UNet3DConditionModel`` ``config.json``)."""
    from diffjax.convert.files import read_json

    if component not in (None, "unet"):
        source.close()
        raise InputError(f"{src} holds only a video UNet, not a {component}")
    config = config or "modelscope-t2v"
    if config in VIDEO_PRESETS:
        cfg, prediction = VIDEO_PRESETS[config]["unet"], VIDEO_PRESETS[config]["prediction_type"]
    elif pathlib.Path(config).is_file():
        cfg, prediction = read_json(pathlib.Path(config)), None
    else:
        source.close()
        raise InputError(f"--config {config!r} is neither a video preset "
                         f"({', '.join(VIDEO_PRESETS)}) nor a config.json file")
    if cfg.get("_class_name", "UNet3DConditionModel") != "UNet3DConditionModel":
        source.close()
        raise InputError(f"{src} is a ModelScope checkpoint: its config must describe a "
                         "UNet3DConditionModel")
    cfg = {**cfg, "_class_name": "UNet3DConditionModel"}
    return [("unet", cfg, source, "modelscope", modelscope_prefix(source.keys()), dst, prediction)]
