"""optax optimizer factory: Adam/AdamW (or SGD), warmup + cosine, clipping, frozen subtrees.

Every parameter carries a *label* (a string). The label ``"frozen"`` maps to
``optax.set_to_zero()`` (no update and no optimizer state: a frozen Stable Diffusion
backbone costs no Adam moments); every other label gets the base optimizer, optionally
with per-label overrides (``groups``), through ``optax.multi_transform``. Gradient
clipping is applied per label group, so it only sees the parameters that train.

Config (``config.optimizer``), all optional except ``learning_rate``::

    name: "adam" | "adamw" | "sgd"  b1, b2, eps, weight_decay (adamw), momentum (sgd)
    learning_rate                   warmup_steps, schedule: "cosine" | "constant" | "linear"
    decay_steps (default: num_train_steps), end_learning_rate_factor (default 0.0)
    grad_clip_norm (0 = off)
    train_only: [regex, ...]        parameters whose path matches train, the rest are frozen
    freeze: [regex, ...]            parameters whose path matches are frozen
    groups: {label: {learning_rate: ..., ...}}   overrides for task-defined labels

Cosine decay follows Loshchilov & Hutter (SGDR, 2017) after a linear warmup
(``optax.warmup_cosine_decay_schedule``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import optax

from diffjax.errors import InputError

FROZEN = "frozen"
TRAINABLE = "trainable"

_OPT_KEYS = {"name", "learning_rate", "b1", "b2", "eps", "weight_decay", "momentum", "warmup_steps",
             "schedule", "decay_steps", "end_learning_rate_factor", "grad_clip_norm",
             "train_only", "freeze", "groups"}


def _get(cfg: Mapping[str, Any], key: str, default):
    value = cfg.get(key, default)
    return default if value is None else value


def make_schedule(cfg: Mapping[str, Any], num_train_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warmup then cosine/linear decay or constant."""
    lr = float(cfg["learning_rate"])
    warmup = int(_get(cfg, "warmup_steps", 0))
    kind = _get(cfg, "schedule", "cosine")
    decay_steps = int(_get(cfg, "decay_steps", 0)) or max(num_train_steps, warmup + 1)
    end = lr * float(_get(cfg, "end_learning_rate_factor", 0.0))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, end)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)),
             optax.linear_schedule(lr, end, max(decay_steps - warmup, 1))], [warmup])
    if kind == "constant":
        if warmup:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
        return optax.constant_schedule(lr)
    raise InputError(f"unknown learning-rate schedule {kind!r}; use cosine, linear or constant")


def _base_optimizer(cfg: Mapping[str, Any], num_train_steps: int) -> optax.GradientTransformation:
    name = _get(cfg, "name", "adam").lower()
    schedule = make_schedule(cfg, num_train_steps)
    kwargs = dict(b1=float(_get(cfg, "b1", 0.9)), b2=float(_get(cfg, "b2", 0.999)),
                  eps=float(_get(cfg, "eps", 1e-8)))
    if name == "adam":
        opt = optax.adam(schedule, **kwargs)
    elif name == "adamw":
        opt = optax.adamw(schedule, weight_decay=float(_get(cfg, "weight_decay", 1e-4)), **kwargs)
    elif name == "sgd":
        momentum = float(_get(cfg, "momentum", 0.0))
        opt = optax.sgd(schedule, momentum=momentum or None)
    else:
        raise InputError(f"unknown optimizer {name!r}; use adam, adamw or sgd")
    clip = float(_get(cfg, "grad_clip_norm", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt


def path_string(path) -> str:
    """``"encoder/Conv_0/kernel"`` for a jax key path (what ``train_only``/``freeze`` match)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def path_labels(params: Any, *, train_only: Sequence[str] | None = None,
                freeze: Sequence[str] | None = None, base: Any = None) -> Any:
    """Label tree from path regexes (``re.search`` on :func:`path_string`).

    ``train_only``: matching parameters keep their label, all others become ``"frozen"``
    (LoRA: ``train_only=[r"lora_"]``). ``freeze``: matching parameters become
    ``"frozen"`` (frozen SD backbone: ``freeze=[r"^unet/", r"^vae/"]``). ``base`` is a
    label tree to start from (default: everything ``"trainable"``).
    """
    train_only = [re.compile(p) for p in (train_only or [])]
    freeze = [re.compile(p) for p in (freeze or [])]
    if base is None:
        base = jax.tree.map(lambda _: TRAINABLE, params)

    def label(path, current):
        name = path_string(path)
        if train_only and not any(p.search(name) for p in train_only):
            return FROZEN
        if any(p.search(name) for p in freeze):
            return FROZEN
        return current

    labels = jax.tree_util.tree_map_with_path(label, base)
    if all(l == FROZEN for l in jax.tree.leaves(labels)):
        raise InputError("the optimizer labels freeze every parameter; check train_only/freeze")
    return labels


def make_optimizer(cfg: Mapping[str, Any], num_train_steps: int,
                   labels: Any = None) -> optax.GradientTransformation:
    """Build the optimizer for a label tree (see the module docstring for ``cfg``).

    ``labels`` is a pytree of strings with the structure of the parameters (or ``None``:
    one group). Labels other than ``"frozen"`` get the base optimizer updated by
    ``cfg["groups"][label]`` when present.
    """
    unknown = set(cfg) - _OPT_KEYS
    if unknown:
        raise InputError(f"unknown optimizer option(s) {sorted(unknown)}; known: {sorted(_OPT_KEYS)}")
    groups = dict(_get(cfg, "groups", {}))
    if labels is None:
        if groups:  # would be silently ignored: the task labels no parameter
            raise InputError(f"optimizer groups {sorted(groups)} match no parameter label "
                             f"(this task gives all parameters one group)")
        return _base_optimizer(cfg, num_train_steps)
    transforms = {}
    for label in sorted(set(jax.tree.leaves(labels))):
        if label == FROZEN:
            transforms[label] = optax.set_to_zero()
        else:
            merged = {**{k: v for k, v in cfg.items() if k != "groups"},
                      **dict(groups.get(label, {}))}
            transforms[label] = _base_optimizer(merged, num_train_steps)
    unused = set(groups) - set(transforms)
    if unused:
        raise InputError(f"optimizer groups {sorted(unused)} match no parameter label")
    return optax.multi_transform(transforms, labels)
