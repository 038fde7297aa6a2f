"""torchvision EfficientNet(V2) state dicts -> :class:`diffjax.models.encoders.EfficientNetV2`.

For users with torchvision's ImageNet weights (Tan & Le 2021; Rampas 2024, Table 2 compares
ImageNet-initialised and random-initialised encoders). Accepted key layouts:

* a whole model's ``state_dict()`` (``features.*``; the ``classifier.*`` head is not part of
  ``features`` and is skipped),
* ``model.features.state_dict()`` (keys start with the layer index, ``0.0.weight``).

torchvision names map one to one onto the Flax tree (see ``diffjax.models.encoders``)::

    features.0.0.weight                        -> features_0/conv/kernel       (OIHW -> HWIO)
    features.0.1.{weight,bias}                 -> features_0/bn/{scale,bias}
    features.0.1.running_{mean,var}            -> batch_stats features_0/bn/{mean,var}
    features.S.J.block.K.{0,1}.*               -> features_S_J/block_K/{conv,bn}/*
    features.S.J.block.K.fc{1,2}.{weight,bias} -> features_S_J/block_K/fc{1,2}/{kernel,bias}

``num_batches_tracked`` beside a converted BatchNorm is dropped. Conversion is strict,
with the project's shared planner (:func:`diffjax.convert.mapping.plan`): every key and
shape is checked against the model before any tensor is read, and any missing, unexpected
or mis-shaped key raises :class:`~diffjax.convert.mapping.CheckpointMismatchError` listing
them all. A ``fold_bn=True`` model gets its BatchNorms folded into the convs
(:func:`diffjax.models.encoders.fold_batchnorm`).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.convert import mapping
from diffjax.convert.sources import DictSource, TensorSource
from diffjax.errors import CheckpointError
from diffjax.models.encoders import EfficientNetV2, fold_batchnorm

_BLOCK_RE = re.compile(r"^features\.(\d+)\.(\d+)\.block\.(\d+)\.(0|1|fc1|fc2)\.([a-z_]+)$")
_PLAIN_RE = re.compile(r"^features\.(\d+)\.(0|1)\.([a-z_]+)$")
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def _rename(key: str, shape) -> tuple[str, str] | None:
    """torchvision key -> the dotted name :func:`mapping.diffusers_key_to_path` maps onto
    the Flax path (None: not an EfficientNet ``features`` key)."""
    m = _BLOCK_RE.match(key)
    if m:
        s, j, k, layer, leaf = m.groups()
        layer = {"0": "conv", "1": "bn"}.get(layer, layer)
        return f"features_{s}_{j}.block_{k}.{layer}.{leaf}", ""
    m = _PLAIN_RE.match(key)
    if m:
        i, layer, leaf = m.groups()
        return f"features_{i}.{'conv' if layer == '0' else 'bn'}.{leaf}", ""
    return None


def _template(model: EfficientNetV2) -> dict:
    """Flat ``{path: ShapeDtypeStruct}`` of params plus BatchNorm stats (leaves named like
    torch's ``running_mean``/``running_var``), from an abstract init (cached per config)."""
    return dict(_cached_template(model.clone(fold_bn=False, dtype=jnp.float32)))


@functools.lru_cache(maxsize=16)
def _cached_template(model: EfficientNetV2) -> dict:
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 64, 64, 3), jnp.float32)))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(variables["params"])))
    inverse = {v: k for k, v in _BN_STATS.items()}
    for path, leaf in flax.traverse_util.flatten_dict(
            flax.core.unfreeze(variables["batch_stats"])).items():
        flat[path[:-1] + (inverse[path[-1]],)] = leaf
    return flat


def _select_keys(source: TensorSource) -> tuple[list[str], str]:
    """The keys to plan (with the prefix to prepend), dropping the classifier head and
    ``num_batches_tracked`` of BatchNorms whose ``running_mean`` is present."""
    keys = list(source.keys())
    if not keys:
        raise CheckpointError("EfficientNet state dict has no tensors")
    prefix = "" if any(k.startswith("features.") for k in keys) else "features."
    keys = [k for k in keys if not k.startswith("classifier.")]
    full = {prefix + k: k for k in keys}
    out = []
    for name, key in full.items():
        if name.endswith(".num_batches_tracked"):
            if name[: -len("num_batches_tracked")] + "running_mean" in full:
                continue
        out.append(key)
    return out, prefix


def convert_efficientnet_state_dict(state_dict: Mapping[str, Any] | TensorSource,
                                    model: EfficientNetV2 | None = None, *,
                                    dtype=None) -> dict:
    """torchvision EfficientNet(V2) state dict -> Flax variables of ``model``.

    ``model`` defaults to ``EfficientNetV2()`` (V2-S). Returns ``{"params", "batch_stats"}``
    (numpy) for a ``fold_bn=False`` model and ``{"params"}`` with the BatchNorms folded for
    a ``fold_bn=True`` one; ``dtype`` casts the result. Raises
    :class:`~diffjax.convert.mapping.CheckpointMismatchError` on any missing, unexpected or
    mis-shaped key (all listed).
    """
    model = EfficientNetV2() if model is None else model
    source = state_dict if isinstance(state_dict, TensorSource) else DictSource(state_dict)
    keys, prefix = _select_keys(source)
    entries = mapping.plan([(prefix + k, source.shape(k)) for k in keys], _template(model),
                           rename=_rename, what="torchvision EfficientNet state dict")
    tree = mapping.build_tree(entries, lambda k: source.read(k[len(prefix):]))
    flat = flax.traverse_util.flatten_dict(tree)
    params = {p: v for p, v in flat.items() if p[-1] not in _BN_STATS}
    stats = {p[:-1] + (_BN_STATS[p[-1]],): v for p, v in flat.items() if p[-1] in _BN_STATS}
    variables = {"params": flax.traverse_util.unflatten_dict(params),
                 "batch_stats": flax.traverse_util.unflatten_dict(stats)}
    if model.fold_bn:
        variables = {"params": fold_batchnorm(variables, eps=model.bn_eps)}
    if dtype is not None:
        variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(dtype)), variables)
    return variables
