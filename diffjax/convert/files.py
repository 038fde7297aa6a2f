"""File-level conversion: diffusers folders and original single-file checkpoints -> Orbax.

Accepted sources (see :func:`convert`):

* a diffusers **model folder** (``config.json`` + ``diffusion_pytorch_model.safetensors``,
  a sharded ``diffusion_pytorch_model.safetensors.index.json``, or a ``.bin``);
* a diffusers **pipeline folder** (``model_index.json`` with ``unet/`` and ``vae/``): both
  are converted, and the scheduler's ``prediction_type`` is recorded with the UNet;
* an original **single-file** SD checkpoint (``.safetensors`` / ``.ckpt`` with
  ``model.diffusion_model.*`` and ``first_stage_model.*`` keys) plus a config: a preset
  name from :mod:`diffjax.convert.presets` (converts UNet and VAE) or a diffusers
  ``config.json`` (converts that one model);
* a diffusers **ControlNet folder** (``ControlNetModel`` config) or an original lllyasviel
  **ControlNet** file (``control_model.*`` or bare ``input_hint_block.*`` /
  ``zero_convs.*`` keys, :mod:`diffjax.convert.controlnet_ldm`) with the preset of the SD
  model it guides (``--config sd15``) or its ``config.json``.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from diffjax.convert import controlnet_ldm, core, ldm, presets
from diffjax.convert.sources import TensorSource, open_file
from diffjax.errors import CheckpointError, InputError

WEIGHT_NAMES = ("diffusion_pytorch_model{v}.safetensors",
                "diffusion_pytorch_model{v}.safetensors.index.json",
                "diffusion_pytorch_model{v}.bin")


def read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err})") from None


def open_diffusers_model(folder: str | pathlib.Path, variant: str | None = None) -> tuple[dict, TensorSource]:
    """``(config, tensor source)`` of a diffusers model folder."""
    folder = pathlib.Path(folder)
    config = read_json(folder / "config.json")
    suffix = f".{variant}" if variant else ""
    for name in WEIGHT_NAMES:
        candidate = folder / name.format(v=suffix)
        if candidate.exists():
            return config, open_file(candidate)
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model{suffix}.safetensors / "
                          f".safetensors.index.json / .bin (found: {', '.join(found)})")


def scheduler_prediction_type(folder: pathlib.Path) -> str | None:
    """``prediction_type`` of the pipeline's scheduler config, if one is next to ``folder``."""
    for cand in (folder / "scheduler" / "scheduler_config.json",
                 folder.parent / "scheduler" / "scheduler_config.json"):
        if cand.exists():
            return read_json(cand).get("prediction_type")
    return None


def _jobs_for_folder(src: pathlib.Path, dst: pathlib.Path, component, variant):
    if (src / "config.json").exists():
        cfg, source = open_diffusers_model(src, variant)
        comp = _component_of(cfg)
        if component and component != comp:
            raise InputError(f"{src} holds a {comp}, not a {component}")
        return [(comp, cfg, source, "diffusers", "", dst, scheduler_prediction_type(src))]
    if (src / "model_index.json").exists():
        comps = [component] if component else [c for c in core.COMPONENTS
                                               if (src / c / "config.json").exists()]
        if not comps:
            raise InputError(f"{src}: pipeline folder without unet/ or vae/")
        jobs = []
        for comp in comps:
            cfg, source = open_diffusers_model(src / comp, variant)
            out = dst if component else dst / comp
            jobs.append((comp, cfg, source, "diffusers", "", out, scheduler_prediction_type(src)))
        return jobs
    raise InputError(f"{src} is neither a diffusers model folder (config.json) nor a pipeline "
                     "folder (model_index.json)")


def _component_of(cfg: dict) -> str:
    """``unet`` / ``vae`` / ``controlnet`` for a diffusers model config."""
    name = core.model_class_name(cfg)
    return {v: k for k, v in core.COMPONENTS.items()}.get(name, "unet")


def _jobs_for_file(src: pathlib.Path, dst: pathlib.Path, config, component):
    if config is None:
        raise InputError(f"{src} is a single-file checkpoint: name its architecture with "
                         f"--config ({', '.join(presets.PRESETS)} or a diffusers config.json)")
    source = open_file(src)
    keys = source.keys()
    from diffjax.convert import video

    if video.is_modelscope(keys):  # an original ModelScope text-to-video UNet
        return video.jobs_for_file(src, dst, config, component, source)
    # An original lllyasviel ControlNet: control_model.* (v1.0, beside the SD model) or bare.
    control_prefix = controlnet_ldm.controlnet_prefix(keys)
    is_ldm = (control_prefix is not None
              or any(k.startswith((ldm.UNET_PREFIX,) + ldm.VAE_PREFIXES) for k in keys))
    if config in presets.PRESETS:
        preset = presets.get(config)
        if component:
            comps = [component]
        elif control_prefix == "" or (control_prefix is not None and not any(
                k.startswith(ldm.UNET_PREFIX) for k in keys)):
            comps = ["controlnet"]
        else:
            comps = ["unet", "vae"] + (["controlnet"] if control_prefix is not None else [])
        preset["controlnet"] = controlnet_ldm.controlnet_config_from_unet(preset["unet"])
        configs = {c: preset[c] for c in comps}
        prediction = preset["prediction_type"]
    else:
        if not pathlib.Path(config).is_file():
            raise InputError(f"--config {config!r} is neither a preset "
                             f"({', '.join(presets.PRESETS)}) nor a config.json file")
        cfg = read_json(pathlib.Path(config))
        comp = _component_of(cfg)
        if component and component != comp:
            raise InputError(f"{config} describes a {comp}, not a {component}")
        comps, configs, prediction = [comp], {comp: cfg}, None
    if not is_ldm and len(comps) > 1:
        raise InputError(f"{src} has diffusers-layout keys (one model); pass --component")
    jobs = []
    for comp in comps:
        prefix = "" if not is_ldm else (ldm.UNET_PREFIX if comp == "unet" else
                                        (control_prefix or "") if comp == "controlnet" else
                                        core._vae_prefix(keys))
        out = dst if len(comps) == 1 else dst / comp
        jobs.append((comp, configs[comp], source, "ldm" if is_ldm else "diffusers", prefix, out,
                     prediction))
    return jobs


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, *, config: str | None = None,
            component: str | None = None, dtype: str | None = None,
            prediction_type: str | None = None, variant: str | None = None,
            overwrite: bool = False, progress: bool = True, motion_adapter: str | None = None,
            log: Callable[[str], Any] = print) -> list[pathlib.Path]:
    """Convert ``src`` to diffjax model directory(ies) under ``dst``; returns what was written.

    One model -> ``dst`` is the model directory; a pipeline or a single file with UNet and
    VAE -> ``dst/unet`` and ``dst/vae``. ``dtype`` casts the parameters (default: keep the
    stored dtype). Nothing is written unless every key of a model matches.
    ``motion_adapter``: a diffusers ``MotionAdapter`` folder; ``src`` (an SD UNet) and the
    adapter then become one ``UNetMotionModel`` (:mod:`diffjax.convert.video`).
    """
    if motion_adapter is not None:
        from diffjax.convert import video

        return video.convert_with_motion_adapter(
            src, motion_adapter, dst, dtype=dtype, prediction_type=prediction_type,
            variant=variant, overwrite=overwrite, progress=progress, log=log)
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not src.exists():
        raise InputError(f"{src} does not exist")
    if component is not None and component not in core.COMPONENTS:
        raise InputError(f"--component must be one of {list(core.COMPONENTS)}")
    if dtype is not None and dtype not in core.DTYPES:
        raise InputError(f"--dtype must be one of {core.DTYPES}")
    if dst.exists() and not overwrite:
        raise InputError(f"{dst} already exists (pass --overwrite to replace it)")
    jobs = (_jobs_for_folder(src, dst, component, variant) if src.is_dir()
            else _jobs_for_file(src, dst, config, component))
    written = []
    try:
        # Check every model completely before reading or writing anything.
        planned = []
        for comp, cfg, source, layout, prefix, out, prediction in jobs:
            overrides = {}
            if comp == "unet":
                pred = prediction_type or prediction
                if pred is None:
                    pred = "epsilon"
                    log("note: no scheduler config found; recording prediction_type=epsilon "
                        "(pass --prediction-type v_prediction for v-models such as SD 2.1 768)")
                overrides["prediction_type"] = pred
            cls = core.COMPONENTS[comp]
            if comp == "unet" and cfg.get("_class_name") in core.MODEL_CLASSES:
                cls = cfg["_class_name"]  # a 2-D, 3-D or motion UNet
            module = core.build_model(cfg, cls, **overrides)
            what = f"{src.name} {comp}"
            entries = core.plan_source(module, source, layout=layout, prefix=prefix, what=what)
            planned.append((comp, module, entries, source, layout, prefix, out, what))
        for comp, module, entries, source, layout, prefix, out, what in planned:
            params = core.read_source(entries, source, prefix=prefix, dtype=dtype,
                                      progress=progress, what=what)
            leaves = jax.tree.leaves(params)
            n = sum(int(np.prod(x.shape)) for x in leaves)
            size = sum(x.nbytes for x in leaves)
            core.save_pretrained(out, module, params, overwrite=overwrite, metadata={
                "source": str(src.absolute()), "component": comp, "layout": layout,
                "prediction_type": getattr(module, "prediction_type", None)})
            del params, leaves
            log(f"{comp}: {n / 1e6:.2f} M parameters, {size / 2**20:.1f} MiB -> {out}")
            written.append(out)
    finally:
        for source in {id(j[2]): j[2] for j in jobs}.values():
            source.close()
    return written
