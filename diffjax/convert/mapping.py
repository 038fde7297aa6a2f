"""diffusers (PyTorch) parameter names and layouts -> diffjax Flax parameter trees.

The diffjax SD modules use diffusers' names, so the mapping is mechanical:

* a key is split on dots and every numeric index is glued to the name before it
  (``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1``;
  ``to_out.0`` -> ``to_out_0``; ``ff.net.2`` -> ``ff/net_2``);
* ``weight`` becomes ``kernel`` (4-D conv ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``, 2-D linear
  ``[O, I]`` -> ``[I, O]``) or ``scale`` (1-D norm weight); ``bias`` stays ``bias``.

Old diffusers VAE files name the mid-block attention ``query/key/value/proj_attn``; those
are renamed to ``to_q/to_k/to_v/to_out.0``.

Conversion is strict: the full key list is compared with the module's parameter tree
(from ``jax.eval_shape`` of ``init``, no memory) *before* any tensor is read, and any
missing, unexpected or mis-shaped key raises a :class:`CheckpointMismatchError` that lists
them all (and keeps them on the exception).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import CheckpointError

Path = tuple[str, ...]

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


class CheckpointMismatchError(CheckpointError):
    """Keys of a checkpoint and a model disagree; ``missing``/``unexpected``/``mismatched``."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=(), limit: int = 40):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("wrong shape", self.mismatched)):
            if items:
                shown = [str(i) for i in items[:limit]]
                more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {label}: " + "; ".join(shown) + more)
        super().__init__(f"{what} does not match the model: " + " | ".join(parts))


@dataclasses.dataclass(frozen=True)
class Entry:
    """How one source tensor lands in the Flax tree."""

    source_key: str
    path: Path
    layout: str  # "conv", "conv3d", "linear", "squeeze_linear" (1x1 conv -> linear), "none"


def normalize_legacy_key(key: str) -> str:
    """Old diffusers VAE attention names -> current ones (identity for other keys)."""
    m = _LEGACY_RE.match(key)
    if not m:
        return key
    return f"{m.group(1)}{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"


def diffusers_key_to_path(key: str, ndim: int) -> tuple[Path, str]:
    """``(flax path, layout)`` of diffusers key ``key`` holding an ``ndim``-D tensor."""
    tokens = key.split(".")
    parts: list[str] = []
    for tok in tokens[:-1]:
        if tok.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{tok}"
        else:
            parts.append(tok)
    leaf = tokens[-1]
    if leaf == "bias":
        return tuple(parts) + ("bias",), "none"
    if leaf != "weight":
        return tuple(parts) + (leaf,), "none"
    if ndim == 4:
        return tuple(parts) + ("kernel",), "conv"
    if ndim == 5:  # Conv3d (video UNets' temporal convs)
        return tuple(parts) + ("kernel",), "conv3d"
    if ndim == 3:  # Conv1d: only loadable with a "squeeze_linear" hint (ModelScope proj_in)
        return tuple(parts) + ("kernel",), "conv1d"
    if ndim == 2:
        return tuple(parts) + ("kernel",), "linear"
    if ndim == 1:
        return tuple(parts) + ("scale",), "none"
    return tuple(parts) + ("weight",), "none"


def target_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "conv":
        o, i, kh, kw = shape
        return (kh, kw, i, o)
    if layout == "conv3d":
        o, i, kt, kh, kw = shape
        return (kt, kh, kw, i, o)
    if layout == "linear":
        return (shape[1], shape[0])
    if layout == "squeeze_linear":
        if len(shape) in (3, 4) and all(d == 1 for d in shape[2:]):  # 1x1 conv / Conv1d
            return (shape[1], shape[0])
        return (shape[1], shape[0]) if len(shape) == 2 else tuple(shape)
    return tuple(shape)


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """PyTorch tensor -> Flax layout (a contiguous copy for transposed layouts)."""
    if layout == "conv":
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if layout == "conv3d":
        return np.ascontiguousarray(array.transpose(2, 3, 4, 1, 0))
    if layout == "squeeze_linear" and array.ndim in (3, 4):
        array = array.reshape(array.shape[:2])
    if layout in ("linear", "squeeze_linear"):
        return np.ascontiguousarray(array.T)
    return array


def param_template(module: nn.Module, *example_args, **example_kwargs) -> dict[Path, Any]:
    """Flat ``{path: ShapeDtypeStruct}`` of ``module``'s params (abstract init, no FLOPs)."""
    variables = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), *example_args, **example_kwargs))
    params = nn.meta.unbox(variables["params"])
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(params))


def plan(keys_and_shapes: Iterable[tuple[str, tuple[int, ...]]], template: dict[Path, Any],
         rename: Callable[[str, tuple[int, ...]], tuple[str, str] | None] | None = None,
         what: str = "checkpoint") -> list[Entry]:
    """Match source keys to template paths; raise :class:`CheckpointMismatchError` on any gap.

    ``rename(key, shape)`` may turn a source key into ``(diffusers_key, layout_hint)``
    (``layout_hint`` "" = infer) or return None to mark the key unexpected.
    """
    entries, unexpected, mismatched, seen, bad_paths = [], [], [], {}, set()
    for key, shape in keys_and_shapes:
        shape = tuple(int(d) for d in shape)
        hint = ""
        name = key
        if rename is not None:
            renamed = rename(key, shape)
            if renamed is None:
                unexpected.append(key)
                continue
            name, hint = renamed
        name = normalize_legacy_key(name)
        path, layout = diffusers_key_to_path(name, len(shape))
        if hint:
            layout = hint
        label = key if name == key else f"{key} (-> {name})"
        if path not in template:
            unexpected.append(label)
            continue
        if path in seen:
            unexpected.append(f"{label} (duplicate of {seen[path]})")
            continue
        want = tuple(template[path].shape)
        got = target_shape(shape, layout)
        if got != want:
            mismatched.append(f"{label}: checkpoint {shape} -> {got}, model expects {want} "
                              f"at {'/'.join(path)}")
            bad_paths.add(path)
            continue
        seen[path] = key
        entries.append(Entry(key, path, layout))
    missing = ["/".join(p) for p in template if p not in seen and p not in bad_paths]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched)
    return entries


def build_tree(entries: list[Entry], read: Callable[[str], np.ndarray], dtype=None,
               progress: Callable[[Iterable], Iterable] | None = None) -> dict:
    """Read every entry (in order), convert layout and dtype, and nest into a params dict.

    Arrays stay numpy (host memory); ``module.apply`` accepts them as they are.
    """
    flat = {}
    target = None if dtype is None else jnp.dtype(dtype)
    for entry in (progress(entries) if progress else entries):
        array = to_flax_layout(read(entry.source_key), entry.layout)
        if target is not None and array.dtype != target:
            array = array.astype(target)
        flat[entry.path] = array
    return flax.traverse_util.unflatten_dict(flat)
