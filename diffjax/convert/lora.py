"""LoRA files (diffusers / peft, old attention processors, kohya / A1111) <-> diffjax LoRA trees.

Import (:func:`import_lora`) reads every layout users have files in, for the SD UNet:

* diffusers / peft: ``[unet.]<module>.lora_A.weight`` / ``.lora_B.weight`` and the older
  ``[unet.]<module>.lora.down.weight`` / ``.lora.up.weight``;
* old attention-processor keys: ``<...>.attn1.processor.to_q_lora.down.weight`` / ``up``
  (``to_out_lora`` is ``to_out.0``);
* kohya / A1111: ``lora_unet_<module with dots as underscores>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``.

``<module>`` is a diffusers module name (``down_blocks.0.attentions.0.transformer_blocks.0
.attn1.to_q``); :mod:`diffjax.nn.lora` maps it to the Flax path. Alpha comes from a
``.alpha`` key, else from the peft config diffusers writes into the safetensors header
(``__metadata__["lora_adapter_metadata"]``: ``lora_alpha``, ``r``, ``alpha_pattern``,
``rank_pattern``), else equals the rank (what diffusers does without either).

Import is strict: keys that map to no module of the model, wrong shapes, a down without
its up, unsupported LoRA variants (LoHa ``hada_``, Tucker ``lora_mid``) and non-finite
values each raise a :class:`LoraFileError` that lists every such key.

Export (:func:`export_diffusers`) writes the peft layout with the adapter metadata, which
diffusers' ``load_lora_weights`` loads. :func:`save_lora` / :func:`load_lora` keep a tree as
its own Orbax checkpoint (``diffjax convert --lora-only``).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Mapping

import numpy as np

from diffjax.convert.sources import DictSource, TensorSource, open_file
from diffjax.errors import CheckpointError, InputError
from diffjax.nn import lora as L

FORMAT = "diffjax.lora"
FORMAT_VERSION = 1
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")


class LoraFileError(CheckpointError):
    """A LoRA file does not fit the model; ``bad`` lists every offending key."""

    def __init__(self, what: str, bad: list[str], limit: int = 40):
        self.bad = list(bad)
        more = f" ... (+{len(bad) - limit} more)" if len(bad) > limit else ""
        super().__init__(f"{what}: {len(bad)} bad key(s): " + "; ".join(bad[:limit]) + more)


# ----------------------------------------------------------------------------- key parsing
_PEFT = re.compile(r"^(?P<m>.+)\.lora_(?P<w>A|B)(?:\.default)?\.weight$")
_OLD = re.compile(r"^(?P<m>.+)\.lora\.(?P<w>down|up)\.weight$")
_PROC = re.compile(r"^(?P<p>.+)\.processor\.(?P<t>to_q|to_k|to_v|to_out)_lora\.(?P<w>down|up)\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<m>.+)\.lora_(?P<w>down|up)\.weight$")
_KOHYA_ALPHA = re.compile(r"^lora_unet_(?P<m>.+)\.alpha$")
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")


def parse_key(key: str, kohya_names: Mapping[str, str] | None = None):
    """``(diffusers module name, "down" | "up" | "alpha")`` of a LoRA file key, or None.

    ``kohya_names`` maps underscored kohya names to diffusers names (kohya keys cannot be
    split at underscores without knowing the model's modules).
    """
    name = key[5:] if key.startswith("unet.") else key
    for rx in (_KOHYA, _KOHYA_ALPHA):
        m = rx.match(name)
        if m:
            module = (kohya_names or {}).get(m.group("m"))
            if module is None:
                return None
            return module, (m.group("w") if "w" in rx.groupindex else "alpha")
    m = _PROC.match(name)
    if m:
        target = "to_out.0" if m.group("t") == "to_out" else m.group("t")
        return f"{m.group('p')}.{target}", m.group("w")
    m = _PEFT.match(name)
    if m:
        return m.group("m"), "down" if m.group("w") == "A" else "up"
    m = _OLD.match(name)
    if m:
        return m.group("m"), m.group("w")
    m = _ALPHA.match(name)
    if m and not name.endswith(".lora.alpha"):
        return m.group("m"), "alpha"
    return None


def _torch_to_flax(array: np.ndarray, kind: str, kernel_ndim: int) -> np.ndarray:
    """PyTorch LoRA weight -> the diffjax layout of ``down``/``up`` for a kernel."""
    if array.ndim == 4 and kernel_ndim == 2 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]  # 1x1-conv LoRA on a module diffjax keeps as a dense
    if array.ndim == 2:
        return np.ascontiguousarray(array.T)  # [r, in] -> [in, r]; [out, r] -> [r, out]
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    return array


def _flax_to_torch(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))


def adapter_metadata(source: TensorSource) -> dict:
    """The peft config diffusers stores in a safetensors header (``{}`` if none)."""
    raw = (getattr(source, "metadata", None) or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"unreadable lora_adapter_metadata in the file header ({err})") from None
    return {k[5:] if k.startswith("unet.") else k: v for k, v in doc.items()}


def _pattern_value(patterns: Mapping[str, Any], name: str):
    for pattern, value in (patterns or {}).items():  # peft's get_pattern_key
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


# ----------------------------------------------------------------------------- import
def import_lora(source: TensorSource | Mapping[str, Any] | str | pathlib.Path, params: Any, *,
                skip_text_encoder: bool = False, metadata: Mapping[str, Any] | None = None,
                what: str | None = None) -> dict:
    """Read a LoRA file (any supported layout) into a LoRA tree for ``params``.

    ``source``: a path, a :class:`TensorSource` or an in-memory state dict. ``params``:
    the base parameters (or their ``ShapeDtypeStruct`` template) the adapter must fit.
    ``skip_text_encoder``: ignore text-encoder keys instead of failing on them.
    ``metadata``: a peft adapter config (``{"r", "lora_alpha", "alpha_pattern", ...}``)
    for in-memory state dicts, which carry no header (default: the file's header).
    Raises :class:`LoraFileError` listing every key that does not fit.
    """
    if isinstance(source, (str, pathlib.Path)):
        path = pathlib.Path(source)
        if not path.exists():
            raise InputError(f"{path} does not exist")
        with open_file(path) as src:
            return import_lora(src, params, skip_text_encoder=skip_text_encoder,
                               metadata=metadata, what=what or str(path))
    if not isinstance(source, TensorSource):
        source = DictSource(source)
    what = what or "LoRA file"
    kernels = L.adaptable_modules(params)
    by_name = {L.diffusers_name(p): p for p in kernels}
    kohya = {n.replace(".", "_"): n for n in by_name}
    meta = (adapter_metadata(source) if metadata is None
            else {k[5:] if k.startswith("unet.") else k: v for k, v in dict(metadata).items()})
    keys = source.keys()
    if not keys:
        raise LoraFileError(what, ["the file holds no tensors"])
    bad, parts = [], {}
    for key in keys:
        if key.startswith(_TEXT_PREFIXES):
            if not skip_text_encoder:
                bad.append(f"{key}: text-encoder LoRA (pass skip_text_encoder / "
                           "--lora-skip-text-encoder to ignore)")
            continue
        if "hada_" in key or "lora_mid" in key or ".lokr_" in key:
            bad.append(f"{key}: LoHa / LoKr / Tucker (lora_mid) adapters are not supported")
            continue
        parsed = parse_key(key, kohya)
        if parsed is None:
            bad.append(f"{key}: not a LoRA key of a known layout")
            continue
        module, kind = parsed
        if module not in by_name:
            bad.append(f"{key}: the model has no module {module!r} with a kernel")
            continue
        slot = parts.setdefault(module, {})
        if kind in slot:
            bad.append(f"{key}: duplicate {kind} for {module} (also {slot[kind]})")
            continue
        slot[kind] = key
    items = {}
    for module, slot in sorted(parts.items()):
        if "down" not in slot or "up" not in slot:
            have = ", ".join(slot.values())
            bad.append(f"{have}: {module} needs both down and up weights")
            continue
        path = by_name[module]
        kshape = tuple(kernels[path].shape)
        down_raw, up_raw = source.shape(slot["down"]), source.shape(slot["up"])
        rank = int(down_raw[0]) if len(down_raw) >= 2 else -1
        want = L.lora_shapes(kshape, max(rank, 1))
        got = (_flax_shape(down_raw, len(kshape)), _flax_shape(up_raw, len(kshape)))
        if got != want:
            bad.append(f"{slot['down']} / {slot['up']}: shapes {tuple(down_raw)} / "
                       f"{tuple(up_raw)} do not adapt the kernel {kshape} of {module}")
            continue
        items[path] = (module, slot, rank)
    if bad:
        raise LoraFileError(what, bad)
    tree = {}
    for path, (module, slot, rank) in items.items():
        kdim = len(kernels[path].shape)
        down = _torch_to_flax(np.asarray(source.read(slot["down"]), np.float32), "down", kdim)
        up = _torch_to_flax(np.asarray(source.read(slot["up"]), np.float32), "up", kdim)
        if "alpha" in slot:
            alpha = float(np.asarray(source.read(slot["alpha"]), np.float32).reshape(-1)[0])
        else:
            alpha = _pattern_value(meta.get("alpha_pattern"), module)
            if alpha is None:
                alpha = meta.get("lora_alpha")
                meta_rank = _pattern_value(meta.get("rank_pattern"), module) or meta.get("r")
                if alpha is not None and meta_rank is not None and int(meta_rank) != rank:
                    bad.append(f"{slot['down']}: rank {rank} but the header metadata says "
                               f"{meta_rank}")
            alpha = float(rank if alpha is None else alpha)
        for k, arr in (("down", down), ("up", up), ("alpha", np.float32(alpha))):
            if not np.all(np.isfinite(arr)):
                bad.append(f"{slot.get(k, slot['down'])}: non-finite values (NaN or inf)")
        tree[path] = {"down": down, "up": up, "alpha": np.asarray(alpha, np.float32)}
    if bad:
        raise LoraFileError(what, bad)
    return L.from_entries(tree)


def _flax_shape(shape, kernel_ndim: int) -> tuple:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 4 and kernel_ndim == 2 and shape[2:] == (1, 1):
        shape = shape[:2]
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) == 4:
        o, i, kh, kw = shape
        return (kh, kw, i, o)
    return shape


# ----------------------------------------------------------------------------- export
def export_state_dict(lora: Any) -> tuple[dict[str, np.ndarray], dict]:
    """``(state dict, metadata)`` in diffusers' peft layout (``unet.<module>.lora_A.weight``).

    With one rank and alpha for all modules the file states them in the metadata; else
    each module's ``alpha / r`` is folded into its ``up`` weight and the metadata gives
    ``lora_alpha = r`` per module (``rank_pattern`` / ``alpha_pattern``).
    """
    items = L.entries(lora)
    if not items:
        raise InputError("the LoRA tree is empty")
    ranks = {p: L.rank_of(e) for p, e in items.items()}
    alphas = {p: float(np.asarray(e["alpha"])) for p, e in items.items()}
    uniform = len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1
    sd = {}
    for path, entry in items.items():
        name = L.diffusers_name(path)
        up = np.asarray(entry["up"], np.float32)
        if not uniform:
            up = up * (alphas[path] / ranks[path])
        sd[f"unet.{name}.lora_A.weight"] = _flax_to_torch(np.asarray(entry["down"], np.float32))
        sd[f"unet.{name}.lora_B.weight"] = _flax_to_torch(up)
    names = sorted(L.diffusers_name(p) for p in items)
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    meta = {"unet.r": r0, "unet.lora_alpha": alphas[next(iter(items))] if uniform else r0,
            "unet.target_modules": names}
    if not uniform:
        meta["unet.rank_pattern"] = {re.escape(L.diffusers_name(p)): r
                                     for p, r in ranks.items() if r != r0}
        meta["unet.alpha_pattern"] = {re.escape(L.diffusers_name(p)): r
                                      for p, r in ranks.items() if r != r0}
    return sd, meta


def export_diffusers(lora: Any, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``lora`` as a diffusers LoRA safetensors file (loadable by ``load_lora_weights``)."""
    from safetensors.numpy import save_file

    sd, meta = export_state_dict(lora)
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt",
                                       "lora_adapter_metadata": json.dumps(meta, indent=2)})
    return path


# ----------------------------------------------------------------------------- Orbax
def save_lora(path: str | pathlib.Path, lora: Any, *, metadata: Mapping[str, Any] | None = None,
              overwrite: bool = False) -> pathlib.Path:
    """Write a LoRA tree as an Orbax checkpoint (``lora`` tree + JSON ``config``)."""
    import orbax.checkpoint as ocp

    from diffjax.convert.core import _checkpointer  # same composite layout as a model

    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (use overwrite=True / --overwrite)")
    items = L.entries(lora)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "modules": sorted(L.diffusers_name(p) for p in items),
           "ranks": sorted({L.rank_of(e) for e in items.values()}),
           "metadata": dict(metadata or {})}
    tree = {"/".join(p): {k: np.asarray(v) for k, v in e.items()} for p, e in items.items()}
    with _checkpointer() as ckptr:
        ckptr.save(path, ocp.args.Composite(params=ocp.args.PyTreeSave(tree),
                                            config=ocp.args.JsonSave(doc)), force=overwrite)
    return path


def load_lora(path: str | pathlib.Path, params: Any = None) -> dict:
    """Read a LoRA tree written by :func:`save_lora` (checked against ``params`` if given)."""
    import orbax.checkpoint as ocp

    from diffjax.convert.core import _checkpointer

    path = pathlib.Path(path).absolute()
    if not (path / "config").is_dir() or not (path / "params").is_dir():
        raise CheckpointError(f"{path} is not a diffjax LoRA directory")
    with _checkpointer() as ckptr:
        out = ckptr.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                     params=ocp.args.PyTreeRestore()))
    if not isinstance(out.config, dict) or out.config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a diffjax LoRA (format {out.config.get('format')!r})")
    lora = L.from_entries({tuple(k.split("/")): {n: np.asarray(v) for n, v in e.items()}
                           for k, e in out.params.items()})
    if params is not None:
        L.check(params, lora, what=str(path))
    return lora


# ----------------------------------------------------------------------------- CLI helpers
def unet_template(config: str | None) -> dict | None:
    """``{path: ShapeDtypeStruct}`` of the UNet of a preset or a config.json (None: none)."""
    if config is None:
        return None
    from diffjax.convert import core, presets
    from diffjax.convert.files import read_json

    cfg = (presets.get(config)["unet"] if config in presets.PRESETS
           else read_json(pathlib.Path(config)))
    module = core.build_model(cfg, "UNet2DConditionModel")
    return _nest(core.param_template(module))


def _nest(flat: Mapping) -> dict:
    import flax

    return flax.traverse_util.unflatten_dict(dict(flat))


def lora_only(src: str | pathlib.Path, dst: str | pathlib.Path, *, config: str | None = None,
              skip_text_encoder: bool = False, overwrite: bool = False,
              log: Callable[[str], Any] = print) -> pathlib.Path:
    """``diffjax convert --lora-only FILE DST``: a LoRA file -> its own Orbax checkpoint.

    With ``config`` (a preset or a UNet config.json) every key is checked against that
    UNet; without, module names are taken as they are (kohya files then need ``config``).
    """
    src = pathlib.Path(src)
    template = unet_template(config)
    if template is None:
        template = _template_from_names(src)
    lora = import_lora(src, template, skip_text_encoder=skip_text_encoder)
    out = save_lora(dst, lora, overwrite=overwrite,
                    metadata={"source": str(src.absolute()), "config": config})
    log(f"lora: {len(L.entries(lora))} modules, {L.num_params(lora) / 1e6:.3f} M parameters "
        f"-> {out}")
    return out


def _template_from_names(src: pathlib.Path) -> dict:
    """A kernel template inferred from the file's own (non-kohya) key names and shapes."""
    import jax

    from diffjax.convert.mapping import diffusers_key_to_path

    with open_file(src) as source:
        flat, kohya = {}, []
        for key in source.keys():
            parsed = parse_key(key)
            if parsed is None:
                if key.startswith("lora_unet_"):
                    kohya.append(key)
                continue
            module, kind = parsed
            if kind == "alpha":
                continue
            shape = source.shape(key)
            path, _ = diffusers_key_to_path(module + ".weight", len(shape))
            prev = flat.get(path)
            ks = list(prev.shape) if prev is not None else [0] * len(shape)
            fs = _flax_shape(shape, len(shape))
            if len(shape) == 2:
                ks[0 if kind == "down" else 1] = fs[0 if kind == "down" else 1]
            elif len(shape) == 4:
                if kind == "down":
                    ks[0], ks[1], ks[2] = fs[0], fs[1], fs[2]
                else:
                    ks[3] = fs[3]
            flat[path] = jax.ShapeDtypeStruct(tuple(ks), np.float32)
        if kohya:
            raise InputError(f"{src} is a kohya file ({kohya[0]}, ...): name the UNet with "
                             "--config (a preset or a config.json) to resolve its module names")
    return _nest(flat)


def convert_merged(src: str | pathlib.Path, dst: str | pathlib.Path, lora_file: str | pathlib.Path,
                   *, scale: float = 1.0, config: str | None = None, dtype: str | None = None,
                   prediction_type: str | None = None, variant: str | None = None,
                   skip_text_encoder: bool = False, overwrite: bool = False,
                   progress: bool = True, log: Callable[[str], Any] = print) -> pathlib.Path:
    """``diffjax convert UNET_SRC DST --lora FILE [--lora-scale S]``: the UNet of ``src``
    with the LoRA merged in (``kernel + scale * alpha / r * down up``), as one model dir.

    ``src`` is anything :func:`diffjax.convert.files.convert` reads that holds a UNet; the
    UNet and the LoRA file are both checked completely before anything is written.
    """
    import jax

    from diffjax.convert import core, files

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not src.exists():
        raise InputError(f"{src} does not exist")
    if dst.exists() and not overwrite:
        raise InputError(f"{dst} already exists (pass --overwrite to replace it)")
    if dtype is not None and dtype not in core.DTYPES:
        raise InputError(f"--dtype must be one of {core.DTYPES}")
    jobs = (files._jobs_for_folder(src, dst, "unet", variant) if src.is_dir()
            else files._jobs_for_file(src, dst, config, "unet"))
    (comp, cfg, source, layout, prefix, _, prediction), = jobs
    try:
        pred = prediction_type or prediction or "epsilon"
        module = core.build_model(cfg, "UNet2DConditionModel", prediction_type=pred)
        what = f"{src.name} unet"
        entries = core.plan_source(module, source, layout=layout, prefix=prefix, what=what)
        lora = import_lora(lora_file, _nest(core.param_template(module)),
                           skip_text_encoder=skip_text_encoder)
        params = core.read_source(entries, source, prefix=prefix, dtype=None,
                                  progress=progress, what=what)
    finally:
        source.close()
    merged = jax.tree.map(np.asarray, L.merge(params, lora, scale))
    if dtype is not None:
        merged = jax.tree.map(lambda a: a.astype(dtype), merged)
    out = core.save_pretrained(dst, module, merged, overwrite=overwrite, metadata={
        "source": str(src.absolute()), "component": "unet", "layout": layout,
        "prediction_type": pred, "lora": str(pathlib.Path(lora_file).absolute()),
        "lora_scale": float(scale), "lora_modules": len(L.entries(lora))})
    log(f"unet + LoRA ({len(L.entries(lora))} modules, scale {scale}) -> {out}")
    return out
