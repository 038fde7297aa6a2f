"""Low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", eq. 3) for every diffjax backbone, as a parameter tree beside the frozen base.

**The LoRA tree** mirrors the base parameter tree down to each adapted module (a module
holding a ``kernel``) and holds there ``{"down", "up", "alpha"}``:

* dense kernel ``[in, out]``: ``down [in, r]``, ``up [r, out]``;
* conv kernel ``[kh, kw, in, out]`` (LoCon): ``down [kh, kw, in, r]`` (a k x k conv with the
  base conv's strides and padding), ``up [1, 1, r, out]`` (a 1 x 1 conv);
* ``alpha``: a float32 scalar. The update is ``x down up * alpha / r * scale`` -- the
  scaling of diffusers / peft (``lora_alpha / r``) times a user ``scale``. ``alpha`` is a
  leaf so per-module alphas (kohya files) survive Orbax; it never trains (the
  gradient is stopped and :func:`param_labels` freezes it).

**Targets** are selected by the peft-style names of the diffusers checkpoint
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``): a pattern selects a
module when it ``re.fullmatch``-es its full dotted name or a dotted suffix of it, so
``"to_q|to_k|to_v|to_out.0"``, ``"conv1"``, ``"proj_in"`` or a full regex all work, as
do lists of them (peft's ``target_modules``). A pattern that selects nothing is an
:class:`~diffjax.errors.InputError`.

**Use.** :func:`init` builds a tree (peft's init: ``down`` Kaiming-uniform, ``up`` zero,
so a fresh adapter is the identity); :func:`merge` / :func:`unmerge` are pure and
jittable; :func:`apply` (or the :func:`adapted` context manager around any
``module.apply``) runs the *unmerged* path, which keeps the base untouched and adds
``x down up * alpha / r`` on the fly by intercepting the adapted ``nn.Dense`` /
``nn.Conv`` calls (modules with another kernel use, e.g. the folded upsampling conv, get
their kernel plus the low-rank product for that call). :func:`logical_partitioning` and
:func:`shardings` give the LoRA leaves the sharding of their base kernels (``down`` its
input axis, ``up`` its output axis), for the mesh-sharded jit path; everything is plain
jax, so ``jax.jit`` and ``jax.pmap`` work unchanged. :func:`pack` / :func:`unpack` put a
tree into a bitstream (:mod:`diffjax.nn.lora_pack`).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import CheckpointError, InputError

Path = tuple[str, ...]
LEAVES = ("down", "up", "alpha")
# Flax names whose "_<digits>" is part of the diffusers attribute name (not a list index).
_LITERAL_NAMES = {"linear_1", "linear_2"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")


# ----------------------------------------------------------------------------- names
def diffusers_name(path: Path) -> str:
    """Flax module path -> diffusers module name (``("to_out_0",)`` -> ``"to_out.0"``)."""
    parts = []
    for part in path:
        m = _INDEXED.match(part)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m and part not in _LITERAL_NAMES else part)
    return ".".join(parts)


def flat_params(params: Any) -> dict[Path, Any]:
    """``{path: leaf}`` of a (possibly frozen or boxed) parameter tree."""
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(params)))


def adaptable_modules(params: Any) -> dict[Path, Any]:
    """``{module path: kernel}`` of every module with a 2-D or 4-D ``kernel``."""
    return {p[:-1]: v for p, v in flat_params(params).items()
            if p[-1] == "kernel" and len(v.shape) in (2, 4)}


def _patterns(targets: str | Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        return [targets]
    targets = list(targets)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise InputError(f"LoRA targets must be a regex or a list of them, got {targets!r}")
    return targets


def select(params: Any, targets: str | Sequence[str]) -> list[Path]:
    """Module paths whose diffusers name matches ``targets`` (see the module docstring).

    Raises :class:`InputError` for an invalid regex or one that selects no module.
    """
    names = {path: diffusers_name(path) for path in adaptable_modules(params)}
    chosen, empty = set(), []
    for pattern in _patterns(targets):
        try:
            rx = re.compile(rf"(?:.*\.)?(?:{pattern})")
        except re.error as err:
            raise InputError(f"LoRA target {pattern!r} is not a valid regex: {err}") from None
        hits = {p for p, name in names.items() if rx.fullmatch(name)}
        if not hits:
            empty.append(pattern)
        chosen |= hits
    if empty:
        raise InputError(f"LoRA target(s) {empty} match no module with a kernel "
                         f"(e.g. {', '.join(sorted(names.values())[:4])}, ...)")
    return sorted(chosen)


# ----------------------------------------------------------------------------- the tree
def entries(lora: Any) -> dict[Path, dict]:
    """``{module path: {"down", "up", "alpha"}}`` of a LoRA tree."""
    flat = flat_params(lora)
    out: dict[Path, dict] = {}
    for path, value in flat.items():
        if path[-1] not in LEAVES:
            raise CheckpointError(f"not a LoRA tree: leaf {'/'.join(path)} (expected "
                                  f"{'/'.join(LEAVES)} under each adapted module)")
        out.setdefault(path[:-1], {})[path[-1]] = value
    for path, entry in out.items():
        if set(entry) != set(LEAVES):
            raise CheckpointError(f"LoRA entry {'/'.join(path)} has {sorted(entry)}, "
                                  f"expected {list(LEAVES)}")
    return out


def from_entries(items: Mapping[Path, Mapping[str, Any]]) -> dict:
    """Nest ``{module path: {"down", "up", "alpha"}}`` into a LoRA tree."""
    return flax.traverse_util.unflatten_dict(
        {path + (k,): v for path, entry in items.items() for k, v in entry.items()})


def rank_of(entry: Mapping[str, Any]) -> int:
    return int(entry["down"].shape[-1])


def lora_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple, tuple]:
    """``(down shape, up shape)`` adapting a kernel of ``kernel_shape``."""
    kernel_shape = tuple(int(d) for d in kernel_shape)
    if len(kernel_shape) == 2:
        return (kernel_shape[0], rank), (rank, kernel_shape[1])
    if len(kernel_shape) == 4:
        kh, kw, i, o = kernel_shape
        return (kh, kw, i, rank), (1, 1, rank, o)
    raise InputError(f"LoRA adapts 2-D (dense) or 4-D (conv) kernels, not {kernel_shape}")


def init(key: jax.Array, params: Any, targets: str | Sequence[str], rank: int,
         alpha: float | None = None, *, dtype=jnp.float32) -> dict:
    """A fresh LoRA tree for the modules of ``params`` that ``targets`` selects.

    peft's default init: ``down`` ~ Kaiming-uniform (``a = sqrt(5)``, i.e.
    ``U(+-1/sqrt(fan_in))``), ``up = 0``, so the adapted model starts equal to the base.
    ``alpha`` defaults to ``rank`` (scale 1).
    """
    if int(rank) < 1:
        raise InputError(f"LoRA rank must be >= 1, got {rank}")
    rank = int(rank)
    alpha = float(rank if alpha is None else alpha)
    kernels = adaptable_modules(params)
    items = {}
    for i, path in enumerate(select(params, targets)):
        down_shape, up_shape = lora_shapes(kernels[path].shape, rank)
        fan_in = math.prod(down_shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        items[path] = {
            "down": jax.random.uniform(jax.random.fold_in(key, i), down_shape, dtype,
                                       -bound, bound),
            "up": jnp.zeros(up_shape, dtype),
            "alpha": jnp.asarray(alpha, jnp.float32)}
    return from_entries(items)


def check(params: Any, lora: Any, what: str = "LoRA tree") -> dict[Path, dict]:
    """Check that every LoRA entry adapts a kernel of ``params`` with matching shapes.

    Returns the entries; raises :class:`CheckpointError` listing every mismatch (a tree
    made for another model is refused).
    """
    kernels = adaptable_modules(params)
    items = entries(lora)
    bad = []
    for path, entry in items.items():
        name = "/".join(path)
        if path not in kernels:
            bad.append(f"{name}: the model has no kernel there")
            continue
        want = lora_shapes(kernels[path].shape, rank_of(entry))
        got = (tuple(entry["down"].shape), tuple(entry["up"].shape))
        if got != want:
            bad.append(f"{name}: down/up {got}, the kernel {tuple(kernels[path].shape)} "
                       f"needs {want}")
        if tuple(np.shape(entry["alpha"])) != ():
            bad.append(f"{name}: alpha must be a scalar, got shape {np.shape(entry['alpha'])}")
    if bad:
        raise CheckpointError(f"{what} does not fit the model ({len(bad)} bad): "
                              + "; ".join(bad[:40]) + (" ..." if len(bad) > 40 else ""))
    return items


def scaling(entry: Mapping[str, Any], scale: float | jax.Array = 1.0) -> jax.Array:
    """``alpha / rank * scale`` (diffusers / peft), float32, no gradient into alpha."""
    alpha = jax.lax.stop_gradient(jnp.asarray(entry["alpha"], jnp.float32))
    return alpha / rank_of(entry) * jnp.asarray(scale, jnp.float32)


def delta(entry: Mapping[str, Any], scale: float | jax.Array = 1.0) -> jax.Array:
    """The kernel update ``down @ up * alpha / r * scale`` in the base kernel's layout."""
    down = jnp.asarray(entry["down"], jnp.float32)
    up = jnp.asarray(entry["up"], jnp.float32)
    if down.ndim == 2:
        d = down @ up
    else:
        d = jnp.einsum("hwir,ro->hwio", down, up[0, 0])
    return d * scaling(entry, scale)


def _merge(params, lora, scale, sign):
    items = check(params, lora)
    flat = flat_params(params)
    for path, entry in items.items():
        k = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = (jnp.asarray(k, jnp.float32)
                                    + sign * delta(entry, scale)).astype(k.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def merge(params: Any, lora: Any, scale: float | jax.Array = 1.0) -> dict:
    """``params`` with every adapted kernel replaced by ``kernel + delta`` (pure, jittable)."""
    return _merge(params, lora, scale, 1.0)


def unmerge(params: Any, lora: Any, scale: float | jax.Array = 1.0) -> dict:
    """Undo :func:`merge` (exact up to float rounding)."""
    return _merge(params, lora, scale, -1.0)


# ----------------------------------------------------------------------------- unmerged apply
def _lookup(items: Mapping[Path, dict], path: Path):
    return items.get(tuple(path))


def _conv_padding(padding, ndim: int):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding),) * ndim
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _lora_branch(mod: nn.Module, x, entry, scale):
    """``x down up * s`` for an ``nn.Dense`` / plain ``nn.Conv``; None if not applicable."""
    s = scaling(entry, scale)
    dtype = mod.dtype or x.dtype
    x = jnp.asarray(x, dtype)
    down, up = (jnp.asarray(entry[k], dtype) for k in ("down", "up"))
    if isinstance(mod, nn.Dense) and down.ndim == 2:
        return ((x @ down) @ up) * s.astype(dtype)
    if (isinstance(mod, nn.Conv) and down.ndim == 4 and x.ndim == 4
            and mod.feature_group_count == 1 and mod.input_dilation in (None, 1, (1, 1))):
        strides = mod.strides or 1
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        dil = mod.kernel_dilation or 1
        dil = (dil,) * 2 if isinstance(dil, int) else tuple(dil)
        h = jax.lax.conv_general_dilated(x, down, strides, _conv_padding(mod.padding, 2),
                                         rhs_dilation=dil,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.einsum("bhwr,ro->bhwo", h, up[0, 0]) * s.astype(dtype)
    return None


def interceptor(lora: Any, scale: float | jax.Array = 1.0):
    """A Flax method interceptor adding the LoRA branch to every adapted module call."""
    items = entries(lora)

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not items:
            return next_fun(*args, **kwargs)
        entry = _lookup(items, mod.path)
        if entry is None or not mod.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)
        branch = _lora_branch(mod, args[0], entry, scale) if args else None
        if branch is not None:
            return next_fun(*args, **kwargs) + branch.astype(
                jnp.result_type(mod.dtype or args[0].dtype))
        # Another kernel use (e.g. a folded upsampling conv): run this one call with
        # kernel + delta; the stored base is untouched.
        own = dict(flax.core.unfreeze(mod.variables["params"]))
        own["kernel"] = (jnp.asarray(own["kernel"], jnp.float32)
                         + delta(entry, scale)).astype(own["kernel"].dtype)
        fn = getattr(type(mod), context.method_name)
        return mod.clone(parent=None).apply({"params": own}, *args, **kwargs,
                                            method=fn)

    return intercept


@contextlib.contextmanager
def adapted(lora: Any, scale: float | jax.Array = 1.0):
    """Context manager: every ``module.apply`` inside runs with the LoRA added, unmerged.

    Works inside ``jax.jit`` / ``pmap`` traces (the interception happens while tracing).
    """
    with nn.intercept_methods(interceptor(lora, scale)):
        yield


def apply(module: nn.Module, params: Any, lora: Any, *args, scale: float | jax.Array = 1.0,
          method=None, **kwargs):
    """``module.apply({"params": params}, *args, **kwargs)`` with the LoRA added unmerged."""
    check(params, lora)
    with adapted(lora, scale):
        return module.apply({"params": params}, *args, method=method, **kwargs)


# ----------------------------------------------------------------------------- sharding, training
def _split_names(names: Sequence, ndim: int):
    names = tuple(names) if names is not None else (None,) * ndim
    if ndim == 2:
        return (names[0], None), (None, names[1])
    return (None, None, names[2], None), (None, None, None, names[3])


def logical_partitioning(lora: Any, boxed_params: Any) -> dict:
    """Box the LoRA leaves with the logical axis names of their base kernels
    (``down`` keeps the kernel's input axis, ``up`` its output axis; ``alpha`` replicated),
    so :func:`diffjax.train.sharding.logical_param_shardings` shards them like the base."""
    boxed = flax.traverse_util.flatten_dict(flax.core.unfreeze(boxed_params))
    out = {}
    for path, entry in entries(lora).items():
        kernel = boxed.get(path + ("kernel",))
        names = getattr(kernel, "names", None)
        d_names, u_names = _split_names(names, entry["down"].ndim)
        out[path] = {"down": nn.LogicallyPartitioned(entry["down"], d_names),
                     "up": nn.LogicallyPartitioned(entry["up"], u_names),
                     "alpha": nn.LogicallyPartitioned(entry["alpha"], ())}
    return from_entries(out)


def shardings(lora: Any, param_shardings: Any) -> dict:
    """``NamedSharding`` tree for ``lora`` from the shardings of the base parameters."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(param_shardings))
    out = {}
    for path, entry in entries(lora).items():
        base = flat[path + ("kernel",)]
        spec = tuple(base.spec) + (None,) * (entry["down"].ndim - len(base.spec))
        d_spec, u_spec = _split_names(spec, entry["down"].ndim)
        out[path] = {"down": NamedSharding(base.mesh, P(*d_spec)),
                     "up": NamedSharding(base.mesh, P(*u_spec)),
                     "alpha": NamedSharding(base.mesh, P())}
    return from_entries(out)


def param_labels(lora: Any, prefix: Path = ()) -> dict:
    """Optimizer labels: ``down``/``up`` ``"trainable"``, ``alpha`` ``"frozen"``."""
    from diffjax.train.optim import FROZEN, TRAINABLE

    return jax.tree_util.tree_map_with_path(
        lambda p, _: FROZEN if getattr(p[-1], "key", None) == "alpha" else TRAINABLE, lora)


def num_params(lora: Any) -> int:
    """Number of trainable LoRA numbers (``down`` + ``up``)."""
    return sum(int(np.prod(e["down"].shape)) + int(np.prod(e["up"].shape))
               for e in entries(lora).values())


def pack(lora: Any, bits: int = 8) -> bytes:
    """Quantise and entropy-code a LoRA tree (see :func:`diffjax.nn.lora_pack.pack`)."""
    from diffjax.nn import lora_pack

    return lora_pack.pack(lora, bits=bits)


def unpack(data: bytes, like: Any = None) -> dict:
    """Inverse of :func:`pack` (see :func:`diffjax.nn.lora_pack.unpack`)."""
    from diffjax.nn import lora_pack

    return lora_pack.unpack(data, like=like)


def names_of(lora: Any) -> Iterable[str]:
    """diffusers names of the adapted modules."""
    return [diffusers_name(p) for p in entries(lora)]
