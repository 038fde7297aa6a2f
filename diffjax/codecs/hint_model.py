"""A hint-guided codec model (IKIN, "Diffusion-Based Compression") from its frozen parts.

The receiver of :mod:`diffjax.codecs.hint` needs a first-stage autoencoder, a base UNet, a
motion module (AnimateDiff, Guo et al. 2024) and one ControlNet per hint (Zhang et al.
2023). :func:`assemble` builds the codec's constructor arguments and parameter tree from

* directories written by ``diffjax convert`` / the project's exports (``load_pretrained``):
  ``unet`` (a ``UNet2DConditionModel``, e.g. ``diffjax/weights/ldm_taef2`` or a converted
  SD 1.5), ``controlnets`` ``{hint: ControlNetModel dir}``, ``motion`` (a
  ``UNetMotionModel`` dir: ``diffjax convert SD_UNET DST --motion-adapter ADAPTER``, or a
  motion fine-tune; only its temporal layers are kept), ``sd_vae`` (an ``AutoencoderKL``) or
  ``taesd_dir`` (``taef2_encoder.pth`` / ``taef2_decoder.pth``);
* or, for tests and smoke runs, the diffusers configs of random-weight networks
  (``unet_config``, ``controlnet_configs``, ``adapter_config``, ``vae_config``).

``save_model(DIR, "hint", kwargs, params)`` (:mod:`diffjax.codecs.pretrained`) then writes a
model folder for ``diffjax compress clip.mp4 --codec hint --model DIR``.
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from diffjax.errors import InputError


def adapter_config_of(motion) -> dict:
    """The ``MotionAdapter`` config a :class:`~diffjax.models.unet3d.UNetMotionModel` was
    built from (what :meth:`UNetMotionModel.from_unet2d` reads)."""
    return dict(block_out_channels=list(motion.block_out_channels),
                motion_layers_per_block=motion.layers_per_block,
                motion_num_attention_heads=motion.motion_num_attention_heads,
                motion_max_seq_length=motion.motion_max_seq_length,
                use_motion_mid_block=motion.use_motion_mid_block,
                motion_transformer_layers_per_block=motion.temporal_transformer_layers_per_block,
                motion_transformer_layers_per_mid_block=(
                    motion.temporal_transformer_layers_per_mid_block))


def _load(path: str, class_name: str):
    from diffjax.convert.core import load_pretrained

    if not pathlib.Path(path).exists():
        raise InputError(f"hint model part {path!r} does not exist (train or convert it first)")
    module, params = load_pretrained(path)
    if type(module).__name__ != class_name:
        raise InputError(f"{path} holds a {type(module).__name__}, expected {class_name}")
    return module, jax.tree.map(np.asarray, params)


def assemble(parts: Mapping[str, Any], **settings) -> tuple[dict, dict]:
    """``(kwargs, params)`` of a hint model (module docstring); ``settings``: codec
    settings (preset, LoRA, sampler, ...) added to ``kwargs``. Parts given as configs get
    random weights drawn from ``parts["seed"]``."""
    from diffjax.codecs.hint import HintCodec
    from diffjax.models.unet3d import is_temporal_path
    from diffjax.train.optim import path_string

    parts = dict(parts)
    loaded: dict = {"controlnets": {}}
    kwargs = dict(vae=parts.get("vae", "taesd"), vae_config=dict(parts.get("vae_config") or {}),
                  scheduler_config=dict(parts["scheduler_config"]))
    if parts.get("unet"):
        module, loaded["unet"] = _load(parts["unet"], "UNet2DConditionModel")
        kwargs["unet_config"] = module.to_config()
    else:
        kwargs["unet_config"] = dict(parts["unet_config"])
    if kwargs["vae"] == "taesd" and parts.get("taesd_dir"):
        from diffjax.models.taesd import load_taesd

        root = pathlib.Path(parts["taesd_dir"])
        enc = load_taesd(root / "taef2_encoder.pth")[1]
        dec = load_taesd(root / "taef2_decoder.pth")[1]
        loaded["vae"] = {"encoder": enc, "decoder": dec}
    elif kwargs["vae"] == "sd" and parts.get("sd_vae"):
        module, loaded["vae"] = _load(parts["sd_vae"], "AutoencoderKL")
        kwargs["vae_config"] = module.to_config()
    controlnets = dict(parts.get("controlnet_configs") or {})
    for name, path in dict(parts.get("controlnets") or {}).items():
        module, loaded["controlnets"][name] = _load(path, "ControlNetModel")
        controlnets[name] = module.to_config()
    kwargs["controlnet_configs"] = controlnets
    if parts.get("motion"):
        module, full = _load(parts["motion"], "UNetMotionModel")
        kwargs["adapter_config"] = adapter_config_of(module)
        import flax

        flat = flax.traverse_util.flatten_dict(full)
        loaded["motion"] = flax.traverse_util.unflatten_dict(
            {k: v for k, v in flat.items()
             if is_temporal_path(path_string([jax.tree_util.DictKey(p) for p in k]))})
    elif parts.get("adapter_config"):
        kwargs["adapter_config"] = dict(parts["adapter_config"])
    kwargs.update(settings)
    codec = HintCodec(**kwargs)
    missing = [k for k in ("vae", "unet", "motion") if k not in loaded and
               (k != "motion" or codec.motion is not None)]
    missing_nets = set(codec.controlnets) - set(loaded["controlnets"])
    params = {k: v for k, v in loaded.items() if k != "controlnets"}
    params["controlnets"] = dict(loaded["controlnets"])
    if missing or missing_nets:
        random = codec.random_params(int(parts.get("seed", 0)))
        for k in missing:
            params[k] = random[k]
        for k in missing_nets:
            params["controlnets"][k] = random["controlnets"][k]
    codec.fingerprint(params)  # the layout check (InputError if a part does not fit)
    return kwargs, params
