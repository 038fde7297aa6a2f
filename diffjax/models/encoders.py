"""EfficientNetV2-S image encoder (Flax Linen, NHWC): torchvision's ``efficientnet_v2_s``.

Tan & Le, "EfficientNetV2: Smaller Models and Faster Training", ICML 2021 (Table 4: the
V2-S stages). Rampas, "On Neural Compression using Diffusion Autoencoders" (2024, sec. 3.2,
following Würstchen / StableCascade) uses its ``features`` as the compression encoder: an
RGB image ``[B, H, W, 3]`` becomes ``[B, H/32, W/32, 1280]`` (stride 32, ceil for sizes
that are not multiples of 32), which the diffusion autoencoder projects to 16 channels.

The network follows torchvision's ``EfficientNet`` layer for layer, so torchvision state
dicts convert key for key (:mod:`diffjax.convert.efficientnet`):

* ``features_0``: 3x3 stride-2 conv + BatchNorm + SiLU (the stem);
* ``features_{s}_{j}`` (stage ``s`` = 1..6, block ``j``): **fused-MBConv** (stages 1-3: a
  k x k expand conv + SiLU, then a 1x1 project conv; a single k x k conv when the expand
  ratio is 1) or **MBConv** (stages 4-6: 1x1 expand, k x k depthwise, squeeze-excitation
  with ``max(1, c_in // 4)`` squeeze channels and SiLU/sigmoid, 1x1 project). A block has
  a residual connection when its stride is 1 and ``c_in == c_out``, with stochastic depth
  ("row" mode, probability growing linearly with the block index up to
  ``stochastic_depth_prob``, as torchvision) in training; the first block of a stage takes
  the stage's stride, the others stride 1. Sub-layers are named ``block_{k}`` after their
  index in torchvision's ``nn.Sequential``.
* ``features_7``: 1x1 conv to ``last_channels`` (1280) + BatchNorm + SiLU.

Every conv is ``conv`` (no bias) + ``bn`` (BatchNorm, ``eps = 1e-3``, computed in float32)
with ``fold_bn=False``; torchvision's BatchNorm momentum 0.1 is Flax's ``momentum=0.9``.
Training (``train=True``, ``mutable=["batch_stats"]``, rng ``"dropout"`` for stochastic
depth when ``stochastic_depth_prob > 0``) normalises with batch statistics and updates the
running ones; the one documented difference from torch is that Flax keeps the *biased*
batch variance in ``var`` where torch keeps the unbiased one (a factor ``n / (n - 1)`` on a
running average; irrelevant at inference). With ``fold_bn=True`` every BatchNorm is folded
into its conv (``kernel * γ/sqrt(σ²+ε)``, bias ``β - μ γ/sqrt(σ²+ε)``): no
``batch_stats``, one fewer pass per layer; :func:`fold_batchnorm` turns trained variables into those params.

Width and depth scale like torchvision's ``MBConvConfig`` (:func:`efficientnet_v2_s_stages`:
channels ``make_divisible(c * width_mult, 8)``, layers ``ceil(n * depth_mult)``), which gives
the reduced-width networks of the tests.

Parity with torchvision 0.29.1 (torch 2.14.1, CPU, float32), error measured as
``max |flax - torch| / max |torch|`` (:func:`relative_error`):

* the reduced-width golden case (``tests/data/efficientnet/``, made by its
  ``make_golden.py``), every stage output, BatchNorm and folded: <= 1e-4 (default tier);
* full-size ``efficientnet_v2_s`` (random init, BatchNorm affines randomised and statistics
  accumulated on random inputs, one 1x3x224x224 input in [-1, 1], all 1x7x7x1280 outputs,
  max |torch| = 5.05): **1.22e-5** with BatchNorm (max abs 6.2e-5), **1.17e-5** folded;
  torch float32 itself differs from torch float64 by 7.9e-6 on this case. Measured once::

      /tmp/tv/bin/python tests/data/efficientnet/make_golden.py --full-size /tmp/effv2s_full.npz
      python tests/models/test_encoders_full_size.py /tmp/effv2s_full.npz

  (slow tier: ``tests/models/test_encoders_full_size.py``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import CheckpointError, InputError
from diffjax.nn.layers import CONV_AXES, BackendConv

Dtype = Any

@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of EfficientNetV2 (torchvision's ``FusedMBConvConfig`` / ``MBConvConfig``).

    ``block`` is ``"fused"`` (fused-MBConv) or ``"mbconv"``; channels are already scaled.
    """

    block: str
    expand_ratio: float
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    num_layers: int

    def __post_init__(self):
        if self.block not in ("fused", "mbconv"):
            raise InputError(f"stage block must be 'fused' or 'mbconv', got {self.block!r}")
        if self.stride not in (1, 2):
            raise InputError(f"stage stride must be 1 or 2, got {self.stride}")
        if min(self.kernel, self.in_channels, self.out_channels, self.num_layers) < 1:
            raise InputError(f"invalid stage {self}")


# Tan & Le 2021, Table 4 (torchvision ``_efficientnet_conf("efficientnet_v2_s")``).
V2_S_STAGES = (
    StageConfig("fused", 1, 3, 1, 24, 24, 2),
    StageConfig("fused", 4, 3, 2, 24, 48, 4),
    StageConfig("fused", 4, 3, 2, 48, 64, 4),
    StageConfig("mbconv", 4, 3, 2, 64, 128, 6),
    StageConfig("mbconv", 6, 3, 1, 128, 160, 9),
    StageConfig("mbconv", 6, 3, 2, 160, 256, 15),
)
V2_S_LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, >= 90 % of value."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


def expanded_channels(channels: int, ratio: float) -> int:
    """The expanded width of a block (torchvision ``adjust_channels(c, expand_ratio)``)."""
    return make_divisible(channels * ratio, 8)


def efficientnet_v2_s_stages(width_mult: float = 1.0, depth_mult: float = 1.0) -> tuple:
    """The V2-S stages with channels ``make_divisible(c * width_mult, 8)`` and
    ``ceil(n * depth_mult)`` layers (torchvision's ``MBConvConfig`` scaling rules)."""
    if width_mult <= 0 or depth_mult <= 0:
        raise InputError(f"width_mult and depth_mult must be > 0, got {width_mult}, {depth_mult}")
    return tuple(dataclasses.replace(
        s, in_channels=make_divisible(s.in_channels * width_mult),
        out_channels=make_divisible(s.out_channels * width_mult),
        num_layers=int(math.ceil(s.num_layers * depth_mult))) for s in V2_S_STAGES)


def _conv(features: int, kernel: int, stride: int, groups: int, use_bias: bool, name: str,
          dtype, param_dtype) -> nn.Conv:
    p = (kernel - 1) // 2  # torchvision Conv2dNormActivation: symmetric (k - 1) // 2
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal fan_out
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
                   feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(init, CONV_AXES),
                   conv_general_dilated_cls=BackendConv)


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm (+ SiLU): torchvision ``Conv2dNormActivation``.

    ``fold_bn=True``: the conv carries a bias and there is no BatchNorm (folded weights).
    """

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: bool = True
    fold_bn: bool = False
    bn_eps: float = 1e-3
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = _conv(self.features, self.kernel, self.stride, self.groups, self.fold_bn, "conv",
                  self.dtype, self.param_dtype)(x)
        if not self.fold_bn:
            y = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                             epsilon=self.bn_eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                             use_fast_variance=False, name="bn")(y.astype(jnp.float32))
            y = y.astype(self.dtype)
        return nn.silu(y) if self.act else y


class SqueezeExcitation(nn.Module):
    """Hu, Shen & Sun 2018 squeeze-excitation (torchvision ``SqueezeExcitation`` with SiLU)."""

    squeeze: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = nn.silu(_conv(self.squeeze, 1, 1, 1, True, "fc1", self.dtype, self.param_dtype)(s))
        s = jax.nn.sigmoid(_conv(c, 1, 1, 1, True, "fc2", self.dtype, self.param_dtype)(s))
        return x * s


def _stochastic_depth(module: nn.Module, x, residual, prob: float, train: bool):
    """torchvision ``StochasticDepth(prob, "row")`` on the branch ``x``, then ``+ residual``."""
    if train and prob > 0.0:
        keep = 1.0 - prob
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
        x = x * mask.astype(x.dtype) / keep
    return x + residual


class MBConvBlock(nn.Module):
    """One fused-MBConv (``fused=True``) or MBConv block (Tan & Le 2021, Fig. 2)."""

    fused: bool
    in_channels: int
    out_channels: int
    expand_ratio: float
    kernel: int
    stride: int
    drop_prob: float = 0.0
    fold_bn: bool = False
    bn_eps: float = 1e-3
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(fold_bn=self.fold_bn, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = expanded_channels(self.in_channels, self.expand_ratio)
        specs = []  # (features, kernel, stride, groups, act) of each ConvBNAct, "se" for SE
        if self.fused:
            if hidden != self.in_channels:
                specs += [(hidden, self.kernel, self.stride, 1, True),
                          (self.out_channels, 1, 1, 1, False)]
            else:
                specs += [(self.out_channels, self.kernel, self.stride, 1, True)]
        else:
            if hidden != self.in_channels:
                specs += [(hidden, 1, 1, 1, True)]
            specs += [(hidden, self.kernel, self.stride, hidden, True), "se",
                      (self.out_channels, 1, 1, 1, False)]
        y = x
        for k, spec in enumerate(specs):
            if spec == "se":
                y = SqueezeExcitation(max(1, self.in_channels // 4), dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=f"block_{k}")(y)
            else:
                features, kernel, stride, groups, act = spec
                y = ConvBNAct(features, kernel, stride, groups, act, name=f"block_{k}",
                              **kw)(y, train)
        if self.stride == 1 and self.in_channels == self.out_channels:
            y = _stochastic_depth(self, y, x, self.drop_prob, train)
        return y


class EfficientNetV2(nn.Module):
    """torchvision ``EfficientNet(...).features`` (default: ``efficientnet_v2_s``), NHWC.

    ``__call__(x [B, H, W, 3], train=False, return_stages=False)`` returns
    ``[B, ceil(H/32), ceil(W/32), last_channels]`` (with the default V2-S stages), and with
    ``return_stages`` also the list of outputs of ``features_0`` .. ``features_7``.
    Input normalisation (ImageNet mean/std for torchvision weights) is the caller's.
    """

    stages: tuple = V2_S_STAGES
    last_channels: int = V2_S_LAST_CHANNELS
    stochastic_depth_prob: float = 0.2
    fold_bn: bool = False
    bn_eps: float = 1e-3
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def reduction(self) -> int:
        """The total stride (32 for V2-S)."""
        return 2 * int(np.prod([s.stride for s in self.stages]))

    @classmethod
    def v2_s(cls, width_mult: float = 1.0, depth_mult: float = 1.0, **kwargs) -> "EfficientNetV2":
        """V2-S scaled like torchvision (``last_channels`` scales with ``width_mult``)."""
        kwargs.setdefault("last_channels", make_divisible(V2_S_LAST_CHANNELS * width_mult))
        return cls(stages=efficientnet_v2_s_stages(width_mult, depth_mult), **kwargs)

    @nn.compact
    def __call__(self, x, train: bool = False, return_stages: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise InputError(f"EfficientNetV2 expects images [B, H, W, 3], got shape {x.shape}")
        if not self.stages:
            raise InputError("EfficientNetV2 needs at least one stage")
        if train and self.fold_bn:
            raise InputError("a BatchNorm-folded EfficientNetV2 cannot train; build it with "
                             "fold_bn=False (and fold the trained variables with fold_batchnorm)")
        kw = dict(fold_bn=self.fold_bn, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        x = ConvBNAct(self.stages[0].in_channels, 3, 2, name="features_0", **kw)(x, train)
        outputs = [x]
        total = sum(s.num_layers for s in self.stages)
        index = 0
        for s, stage in enumerate(self.stages, start=1):
            for j in range(stage.num_layers):
                x = MBConvBlock(stage.block == "fused",
                                stage.in_channels if j == 0 else stage.out_channels,
                                stage.out_channels, stage.expand_ratio, stage.kernel,
                                stage.stride if j == 0 else 1,
                                drop_prob=self.stochastic_depth_prob * index / total,
                                name=f"features_{s}_{j}", **kw)(x, train)
                index += 1
            outputs.append(x)
        head = f"features_{len(self.stages) + 1}"
        x = ConvBNAct(self.last_channels, 1, name=head, **kw)(x, train)
        outputs.append(x)
        return (x, outputs) if return_stages else x


def _fold_one(conv: dict, bn: dict, stats: dict, eps: float) -> dict:
    """``{"kernel", "bias"}`` of ``conv`` with BatchNorm ``bn`` / ``stats`` folded in."""
    s = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
    kernel = np.asarray(conv["kernel"], np.float64) * s  # output channels are the last axis
    bias = np.asarray(bn["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * s
    dtype = np.asarray(conv["kernel"]).dtype
    return {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}


def fold_batchnorm(variables: dict, eps: float = 1e-3) -> dict:
    """``{"params", "batch_stats"}`` of an ``fold_bn=False`` model -> params of the
    ``fold_bn=True`` model (numpy, float64 arithmetic, cast back to the kernel dtype)."""
    if "params" not in variables or "batch_stats" not in variables:
        raise InputError("fold_batchnorm needs {'params': ..., 'batch_stats': ...}")
    params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
    stats = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["batch_stats"]))
    out, done = {}, set()
    for path in params:
        module = path[:-2] if len(path) >= 2 and path[-2] in ("conv", "bn") else None
        if module is None or module in done:
            if module is None:
                out[path] = np.asarray(params[path])
            continue
        if module + ("bn", "scale") not in params:  # a conv without BatchNorm: keep as is
            out[path] = np.asarray(params[path])
            continue
        try:
            folded = _fold_one({"kernel": params[module + ("conv", "kernel")]},
                               {"scale": params[module + ("bn", "scale")],
                                "bias": params[module + ("bn", "bias")]},
                               {"mean": stats[module + ("bn", "mean")],
                                "var": stats[module + ("bn", "var")]}, eps)
        except KeyError as err:
            raise CheckpointError(f"cannot fold {'/'.join(module)}: missing {err}") from None
        out[module + ("conv", "kernel")] = folded["kernel"]
        out[module + ("conv", "bias")] = folded["bias"]
        done.add(module)
    return flax.traverse_util.unflatten_dict(out)


def relative_error(actual, reference) -> float:
    """``max |actual - reference| / max |reference|`` (the parity measure of the tests)."""
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    chex.assert_equal_shape([a, r])
    return float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))
