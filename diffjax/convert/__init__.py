"""diffjax.convert: diffusers / original Stable Diffusion checkpoints -> Flax params -> Orbax.

In memory::

    params = convert_diffusers_state_dict(dict(torch_unet.config), torch_unet.state_dict())
    module = build_model(dict(torch_unet.config))
    out = module.apply({"params": params}, sample_nhwc, t, context)

On disk (also ``diffjax convert SRC DST``)::

    convert("stable-diffusion-2-1", "sd21_flax")          # diffusers pipeline folder
    convert("v2-1_768-ema-pruned.safetensors", "sd21_flax", config="sd21")
    unet, params = load_pretrained("sd21_flax", "unet")

Every conversion is strict: a missing, unexpected or mis-shaped key raises
:class:`CheckpointMismatchError` (a :class:`diffjax.CheckpointError`) listing the keys.

Names are imported lazily so that ``diffjax --help`` (which imports the ``convert``
command module) does not import JAX.
"""
import importlib

_EXPORTS = {
    "build_model": "core", "components_of": "core", "convert_diffusers_state_dict": "core",
    "convert_original_state_dict": "core", "load_pretrained": "core", "param_template": "core",
    "read_model_config": "core", "save_pretrained": "core", "convert": "files",
    "CheckpointMismatchError": "mapping",
}
__all__ = sorted(_EXPORTS) + ["presets"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"diffjax.convert.{_EXPORTS[name]}"), name)
    if name == "presets":
        return importlib.import_module("diffjax.convert.presets")
    raise AttributeError(f"module 'diffjax.convert' has no attribute {name!r}")
