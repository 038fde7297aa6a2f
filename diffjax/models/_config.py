"""Plain-dict configs <-> Flax module fields, shared by the SD-compatible models.

Models are built from plain keyword arguments that mirror diffusers' ``config.json``
(``from_config(dict)``); lists become tuples so modules stay hashable (usable as jit
static arguments). Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are
metadata and ignored; any other unknown key is an error, so a config is never silently
half-applied.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax.numpy as jnp

from diffjax.errors import InputError

# Fields every diffjax model adds to the diffusers config (not saved as model config).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention_implementation")


def freeze(value: Any) -> Any:
    """Lists (also nested) -> tuples, so a config value can be a module field."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Tuples -> lists, for JSON."""
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def config_fields(cls) -> tuple[str, ...]:
    """The config (non-runtime) field names of a model class, in declaration order."""
    skip = set(RUNTIME_FIELDS) | {"parent", "name"}
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)


def from_config(cls, config: Mapping[str, Any], **overrides):
    """Instantiate model ``cls`` from a diffusers-style config dict (plus runtime overrides)."""
    known = set(config_fields(cls))
    cfg = {k: freeze(v) for k, v in dict(config).items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise InputError(f"{cls.__name__}: unknown config keys {unknown}")
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS) - known)
    if bad:
        raise InputError(f"{cls.__name__}: unknown arguments {bad}")
    for key in ("dtype", "param_dtype"):
        if isinstance(overrides.get(key), str):
            overrides[key] = jnp.dtype(overrides[key])
    cfg.update({k: freeze(v) for k, v in overrides.items()})
    return cls(**cfg)


def to_config(module, keys: Iterable[str] | None = None) -> dict:
    """The JSON-able config dict of a model instance (diffusers keys + diffjax extras)."""
    keys = config_fields(type(module)) if keys is None else keys
    return {k: thaw(getattr(module, k)) for k in keys}


def per_block(value: Any, n: int, name: str) -> tuple:
    """An int-or-sequence config value as a length-``n`` tuple (diffusers' broadcasting)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(f"`{name}` has {len(value)} entries, expected {n} (one per block)")
        return tuple(value)
    return (value,) * n
