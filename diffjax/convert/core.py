"""In-memory conversion (state dict -> Flax params) and the Orbax model directory format.

A converted model directory is one Orbax checkpoint with two items:

* ``params`` - the Flax parameter tree (``StandardCheckpointHandler``, OCDBT/Zarr);
* ``config`` - JSON ``{"format": "diffjax.model", "format_version": 1, "class_name": ...,
  "config": {diffusers config + diffjax fields}, "metadata": {source, ...}}``.

:func:`load_pretrained` rebuilds the module from the JSON and restores the params (on the
default device, or with the shardings you pass), checking them against the module first.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Mapping

import flax
import jax
import numpy as np

from diffjax.convert import ldm, mapping
from diffjax.convert.sources import DictSource, TensorSource
from diffjax.errors import CheckpointError, InputError
from diffjax.models.controlnet import ControlNetModel
from diffjax.models.unet import UNet2DConditionModel
from diffjax.models.unet3d import UNet3DConditionModel, UNetMotionModel
from diffjax.models.vae import AutoencoderKL

FORMAT = "diffjax.model"
FORMAT_VERSION = 1
MODEL_CLASSES = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL,
                 "UNet3DConditionModel": UNet3DConditionModel, "UNetMotionModel": UNetMotionModel}
MODEL_CLASSES["ControlNetModel"] = ControlNetModel
COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
              "controlnet": "ControlNetModel"}
DTYPES = ("float32", "bfloat16", "float16")


def model_class_name(config: Mapping[str, Any], class_name: str | None = None) -> str:
    """``UNet2DConditionModel`` or ``AutoencoderKL``, from ``class_name``/``_class_name``/keys."""
    name = class_name or config.get("_class_name")
    if name is None:
        if "latent_channels" in config:
            name = "AutoencoderKL"
        elif "conditioning_embedding_out_channels" in config:
            name = "ControlNetModel"
        elif "cross_attention_dim" in config or "attention_head_dim" in config:
            name = "UNet2DConditionModel"
        else:
            raise InputError("cannot tell the model class from the config; pass class_name")
    if name not in MODEL_CLASSES:
        raise InputError(f"unsupported model class {name!r}; supported: {', '.join(MODEL_CLASSES)}")
    return name


def build_model(config: Mapping[str, Any], class_name: str | None = None, **overrides):
    """The diffjax module for a diffusers config dict (``overrides``: dtype, remat, ...)."""
    cls = MODEL_CLASSES[model_class_name(config, class_name)]
    return cls.from_config(config, **overrides)


def param_template(module) -> dict:
    """Flat ``{path: ShapeDtypeStruct}`` of a diffjax model's parameters (no memory).

    Tracing ``init`` costs seconds for a big UNet, so results are cached per module
    config (modules are hashable); a copy is returned.
    """
    return dict(_cached_template(module))


@functools.lru_cache(maxsize=32)
def _cached_template(module) -> dict:
    args, kwargs = module.dummy_inputs()
    return mapping.param_template(module, *args, **kwargs)


def _progress(desc: str, enabled: bool) -> Callable | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, unit="tensor", leave=False)


def plan_source(module, source: TensorSource, *, layout: str = "diffusers", prefix: str = "",
                what: str = "checkpoint") -> list[mapping.Entry]:
    """Check every key and shape of ``source`` against ``module`` without reading any data.

    ``layout="ldm"`` reads original-SD names under ``prefix`` (other keys are ignored: they
    belong to other components, e.g. the text encoder). Raises
    :class:`~diffjax.convert.mapping.CheckpointMismatchError` listing every bad key.
    """
    keys = [k for k in source.keys() if k.startswith(prefix)]
    if isinstance(module, UNetMotionModel):  # drop the fixed sinusoidal tables (checked)
        from diffjax.convert import video

        keys = video.drop_position_buffers(module, keys, source, prefix, what)
    rename = None
    if layout == "modelscope":  # original ModelScope text-to-video UNet names
        from diffjax.convert import video

        rename = video.modelscope_renamer(module.to_config())
    elif layout == "ldm":
        config = module.to_config()
        if isinstance(module, ControlNetModel):  # original lllyasviel names
            from diffjax.convert.controlnet_ldm import controlnet_renamer

            rename = controlnet_renamer(config)
        else:
            rename = (ldm.unet_renamer(config) if isinstance(module, UNet2DConditionModel)
                      else ldm.vae_renamer(config))
    elif layout != "diffusers":
        raise InputError(f"unknown checkpoint layout {layout!r}")
    if not keys:
        raise CheckpointError(f"{what} has no tensors" + (f" under {prefix!r}" if prefix else ""))
    return mapping.plan([(k[len(prefix):], source.shape(k)) for k in keys],
                        param_template(module), rename=rename, what=what)


def read_source(entries: list[mapping.Entry], source: TensorSource, *, prefix: str = "",
                dtype=None, progress: bool = False, what: str = "checkpoint") -> dict:
    """Read the planned tensors one by one into a nested dict of numpy arrays."""
    return mapping.build_tree(entries, lambda k: source.read(prefix + k), dtype=dtype,
                              progress=_progress(f"converting {what}", progress))


def convert_source(module, source: TensorSource, *, layout: str = "diffusers", prefix: str = "",
                   dtype=None, progress: bool = False, what: str = "checkpoint") -> dict:
    """:func:`plan_source` then :func:`read_source`: strict conversion to numpy params."""
    entries = plan_source(module, source, layout=layout, prefix=prefix, what=what)
    return read_source(entries, source, prefix=prefix, dtype=dtype, progress=progress, what=what)


def convert_diffusers_state_dict(config: Mapping[str, Any], state_dict, *,
                                 class_name: str | None = None, dtype=None,
                                 progress: bool = False, **overrides) -> dict:
    """diffusers ``state_dict`` (torch tensors or arrays, in memory) -> diffjax params.

    ``config`` is the model's diffusers config (``dict(model.config)``); the returned
    nested dict of numpy arrays is ready for ``build_model(config).apply({"params": p}, ...)``.
    ``dtype`` casts the parameters (default: keep). Raises
    :class:`~diffjax.convert.mapping.CheckpointMismatchError` on any key/shape mismatch.
    """
    module = build_model(config, class_name, **overrides)
    source = state_dict if isinstance(state_dict, TensorSource) else DictSource(state_dict)
    return convert_source(module, source, dtype=dtype, progress=progress,
                          what=f"{type(module).__name__} state dict")


def convert_original_state_dict(config: Mapping[str, Any], state_dict, *, component: str = "unet",
                                dtype=None, progress: bool = False, **overrides) -> dict:
    """Original single-file SD ``state_dict`` (``model.diffusion_model.*`` /
    ``first_stage_model.*`` keys) -> diffjax params of ``component`` ("unet" or "vae"), or
    an original lllyasviel ControlNet (``control_model.*`` or unprefixed) for
    ``component="controlnet"`` with a ControlNet ``config``."""
    if component not in COMPONENTS:
        raise InputError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    module = build_model(config, COMPONENTS[component], **overrides)
    source = state_dict if isinstance(state_dict, TensorSource) else DictSource(state_dict)
    if component == "controlnet":
        from diffjax.convert.controlnet_ldm import controlnet_prefix

        prefix = controlnet_prefix(source.keys()) or ""
    else:
        prefix = ldm.UNET_PREFIX if component == "unet" else _vae_prefix(source.keys())
    return convert_source(module, source, layout="ldm", prefix=prefix, dtype=dtype,
                          progress=progress, what=f"original-SD {component}")


def _vae_prefix(keys) -> str:
    for prefix in ldm.VAE_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ldm.VAE_PREFIXES[0]


# ---------------------------------------------------------------------- Orbax directory
def _checkpointer():
    """Composite Orbax checkpointer: ``params`` (PyTree, OCDBT) + ``config`` (JSON).

    Compression is off: Orbax's compressed path holds almost two extra copies of the tree
    while saving (measured: +1.8x vs +1.0x uncompressed), which would break the conversion
    memory budget, and float weights barely compress.
    """
    import orbax.checkpoint as ocp

    handler = ocp.CompositeCheckpointHandler(
        params=ocp.PyTreeCheckpointHandler(use_compression=False),
        config=ocp.JsonCheckpointHandler())
    return ocp.Checkpointer(handler)


def save_pretrained(path: str | pathlib.Path, module, params, *,
                    metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write ``module``'s config and ``params`` as a diffjax model directory (Orbax)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (use overwrite=True / --overwrite)")
    dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree.leaves(params)})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "class_name": type(module).__name__, "config": module.to_config(),
           "param_dtypes": dtypes, "metadata": dict(metadata or {})}
    with _checkpointer() as ckptr:
        ckptr.save(path, ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                            config=ocp.args.JsonSave(doc)), force=overwrite)
    return path


def read_model_config(path: str | pathlib.Path) -> dict:
    """The JSON document of a diffjax model directory (raises ``CheckpointError`` if not one)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()  # Orbax refuses relative paths
    if not (path / "config").is_dir() or not (path / "params").is_dir():
        raise CheckpointError(f"{path} is not a diffjax model directory (no config/ and params/)")
    with _checkpointer() as ckptr:
        doc = ckptr.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore())).config
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a diffjax model (format {doc.get('format')!r})")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {doc['format_version']} is newer than "
                              f"this diffjax ({FORMAT_VERSION}); upgrade diffjax")
    return doc


def components_of(path: str | pathlib.Path) -> list[str]:
    """Sub-model directories (``unet``, ``vae``) of a converted pipeline directory."""
    path = pathlib.Path(path)
    return [c for c in COMPONENTS if (path / c / "config").is_dir()]


def load_pretrained(path: str | pathlib.Path, component: str | None = None, *,
                    dtype=None, param_dtype=None, sharding=None, **overrides):
    """Load a converted model: returns ``(module, params)`` for ``module.apply({"params": params}, ...)``.

    Args:
      path: a diffjax model directory, or a pipeline directory holding ``unet/``/``vae/``
        (then pass ``component``).
      dtype: compute dtype of the module (e.g. ``jnp.bfloat16``); default float32.
      param_dtype: cast the parameters on restore (default: as stored).
      sharding: a ``jax.sharding.Sharding`` for every parameter, or a pytree of them
        matching the params (default: the first local device).
      overrides: other module fields (``remat=True``, ``attention_implementation=...``).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()  # Orbax refuses relative paths
    if component is not None:
        path = path / component
    elif not (path / "config").is_dir() and components_of(path):
        raise InputError(f"{path} holds several models ({', '.join(components_of(path))}); "
                         "pass component=")
    doc = read_model_config(path)
    kwargs = dict(overrides)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if param_dtype is not None:
        kwargs["param_dtype"] = param_dtype
    module = build_model(doc["config"], doc["class_name"], **kwargs)
    template = param_template(module)
    with _checkpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata["params"].tree
        flat = flax.traverse_util.flatten_dict(stored)
        mismatch = [f"{'/'.join(p)}: stored {tuple(m.shape)}, model expects {tuple(template[p].shape)}"
                    for p, m in flat.items() if p in template and tuple(m.shape) != tuple(template[p].shape)]
        missing = ["/".join(p) for p in template if p not in flat]
        unexpected = ["/".join(p) for p in flat if p not in template]
        if missing or unexpected or mismatch:
            raise mapping.CheckpointMismatchError(str(path), missing, unexpected, mismatch)
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target_dtype = None if param_dtype is None else np.dtype(param_dtype)
        abstract = flax.traverse_util.unflatten_dict({
            p: jax.ShapeDtypeStruct(tuple(m.shape), target_dtype or m.dtype, sharding=default)
            for p, m in flat.items()})
        if sharding is not None:
            shardings = (jax.tree.map(lambda _: sharding, abstract)
                         if isinstance(sharding, jax.sharding.Sharding) else sharding)
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        params = ckptr.restore(path, ocp.args.Composite(params=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args))).params
    return module, params
