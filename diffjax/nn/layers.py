"""Small layer helpers shared by every diffjax network.

* :func:`dense` / :func:`conv2d` return Flax ``nn.Dense`` / ``nn.Conv`` whose kernels carry
  *logical* axis names (see ``diffjax.train.sharding``), so a caller can derive shardings
  with ``nn.get_partition_spec(jax.eval_shape(module.init, ...))``. Applying a module with
  plain (unboxed) arrays, e.g. converted checkpoints, works unchanged. ``name`` may be
  left out inside ``setup`` (Flax names attributes itself).
  On the CPU backend, convolutions over small feature maps run as one GEMM over gathered
  patches (:func:`patch_matmul_conv`), which XLA:CPU executes much faster than its
  convolution kernel there.
* :func:`group_norm` (:class:`GroupNorm`) / :func:`layer_norm` always compute in float32
  (statistics and normalisation) whatever the compute dtype; callers cast the result back.
  This is what keeps bf16 compute within 2e-2 of fp32.
* :func:`activation` maps the activation names used in diffusers configs to JAX functions.
* :func:`maybe_remat` wraps a module class in ``nn.remat`` (gradient checkpointing).

NHWC layout everywhere. Parameter names follow Flax (``kernel``, ``bias``, ``scale``); the
converter (``diffjax.convert``) maps PyTorch ``weight`` tensors onto them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import InputError

Dtype = Any

# Logical axis names of 2-D (dense) and 4-D (conv) kernels; the mesh rules live in config.
DENSE_AXES = ("embed", "mlp")
CONV_AXES = (None, None, "conv_in", "conv_out")


def dense(features: int, *, name: str | None = None, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = True, axes: tuple = DENSE_AXES) -> nn.Dense:
    """A ``nn.Dense`` with a logically partitioned kernel (PyTorch ``nn.Linear`` equivalent)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, axes),
    )


# XLA:CPU's convolution is slow on small feature maps with many channels; gathering the
# k*k shifted copies of the input ("im2col", Chellapilla et al. 2006) and doing one GEMM is
# 1.4-3.7x faster there (SD 2.1 UNet levels, 2-core CPU: 8x8 1280->1280 78 -> 21 ms,
# 16x16 1920->640 102 -> 56 ms, 16x16 640->640 21 -> 15 ms), but 2-5x slower on large maps
# (64x64 320->320 57 -> 135 ms), where XLA's kernel is within 1.1-1.4x of PyTorch.
CPU_PATCH_CONV_MAX_PIXELS = 16 * 16   # output H * W up to which the GEMM path is used
# ``lax.conv_dimension_numbers`` of ("NHWC", "HWIO", "NHWC"), what ``nn.Conv`` passes
NHWC_DIMS = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                         out_spec=(0, 3, 1, 2))


def patch_matmul_conv(lhs, rhs, window_strides, padding, precision=None):
    """NHWC x HWIO convolution with explicit ``((top, bottom), (left, right))`` padding as
    one matmul over gathered patches (exactly the sum ``lax.conv_general_dilated`` computes,
    in a different summation order)."""
    kh, kw, cin, cout = rhs.shape
    sh, sw = window_strides
    x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    patches = jnp.concatenate(
        [x[:, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw]
         for dy in range(kh) for dx in range(kw)], axis=-1)  # (dy, dx, cin): HWIO order
    return jnp.einsum("bhwk,kc->bhwc", patches, rhs.reshape(kh * kw * cin, cout),
                      precision=precision)


class CpuFriendlyConv:
    """``lax.conv_general_dilated`` stand-in for ``nn.Conv(conv_general_dilated_cls=...)``.

    On the CPU backend, for NHWC maps: a 1x1 convolution with stride 1 and no padding runs
    as a matmul over the channels (XLA:CPU's convolution kernel is 1.3-2x slower for it,
    e.g. 64x64 640->320: 25 vs 12 ms), a k x k one with a small output as
    :func:`patch_matmul_conv`; everything else (and every other backend) uses XLA's kernel.
    """

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None):
        dense_conv = (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
                      and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
                      and dimension_numbers == NHWC_DIMS and jax.default_backend() == "cpu")
        pointwise = (rhs.shape[:2] == (1, 1) and tuple(window_strides) == (1, 1)
                     and all(p == 0 for pair in (padding if dense_conv else ()) for p in pair))
        if dense_conv and pointwise:
            return jnp.einsum("bhwc,cd->bhwd", lhs, rhs[0, 0], precision=precision)
        if dense_conv and rhs.shape[0] * rhs.shape[1] > 1:
            out_pixels = np.prod([(lhs.shape[1 + i] + sum(padding[i]) - rhs.shape[i])
                                  // window_strides[i] + 1 for i in range(2)])
            if out_pixels <= CPU_PATCH_CONV_MAX_PIXELS:
                return patch_matmul_conv(lhs, rhs, window_strides, padding, precision)
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision)


def conv2d(features: int, *, name: str | None = None, dtype: Dtype, param_dtype: Dtype,
           kernel_size: int = 3, stride: int = 1, padding: int | Sequence = None,
           use_bias: bool = True) -> nn.Conv:
    """A ``nn.Conv`` matching PyTorch ``nn.Conv2d`` (symmetric zero padding by default).

    ``padding`` defaults to ``(kernel_size - 1) // 2`` on every side; pass an explicit
    ``((top, bottom), (left, right))`` for asymmetric padding.
    """
    if padding is None:
        padding = (kernel_size - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features, kernel_size=(kernel_size, kernel_size), strides=(stride, stride),
        padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, CONV_AXES),
        conv_general_dilated_cls=CpuFriendlyConv,
    )


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He, 2018, eq. 1) over ``[B, ..., C]``, computed in float32.

    Statistics over all axes but the batch and, per group of contiguous channels (as in
    ``torch.nn.GroupNorm``), the exact two-pass variance. Same parameters (``scale``,
    ``bias``) and values as ``flax.linen.GroupNorm(use_fast_variance=False)``; the sums run
    over the spatial axes first and then over the channels of a group, which XLA:CPU
    computes 1.2-3x faster than Flax's single grouped reduction (measured on the 2-core
    CPU: 55 -> 31 ms at 256x256x128, 1.9 -> 0.6 ms at 32x32x320).
    """

    num_groups: int
    epsilon: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise InputError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x = x.astype(jnp.float32)
        axes = tuple(range(1, x.ndim - 1))
        per_group = c // self.num_groups
        count = per_group * int(np.prod([x.shape[a] for a in axes]))
        keep = (x.shape[0],) + (1,) * len(axes) + (c,)

        def group_mean(values):  # [B, ..., C] -> group means broadcast back to [B, 1.., C]
            sums = jnp.sum(values, axis=axes).reshape(x.shape[0], self.num_groups, per_group)
            return jnp.repeat(jnp.sum(sums, axis=-1) / count, per_group, axis=-1).reshape(keep)

        centred = x - group_mean(x)
        inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.epsilon)
        return centred * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)


def group_norm(num_groups: int, *, eps: float, name: str | None = None,
               param_dtype: Dtype) -> GroupNorm:
    """:class:`GroupNorm` (float32, exact two-pass variance, ``torch.nn.GroupNorm`` groups)."""
    return GroupNorm(num_groups=num_groups, epsilon=eps, param_dtype=param_dtype, name=name)


def layer_norm(*, eps: float, name: str | None = None, param_dtype: Dtype,
               elementwise_affine: bool = True) -> nn.LayerNorm:
    """``nn.LayerNorm`` over the last axis, computing in float32."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_bias=elementwise_affine, use_scale=elementwise_affine,
                        use_fast_variance=False, name=name)


def _mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


_ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": _mish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's default GELU is exact
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
    """The activation called ``name`` in diffusers configs (``silu``/``swish``, ``gelu``, ...)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise InputError(f"unsupported activation {name!r}; "
                         f"supported: {', '.join(sorted(_ACTIVATIONS))}") from None


def maybe_remat(module_cls: type, remat: bool, static_argnums: tuple[int, ...] = ()):
    """``nn.remat(module_cls)`` when ``remat`` is set, else ``module_cls`` unchanged.

    Rematerialisation (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")
    recomputes the block's activations in the backward pass; parameter names and values
    are identical either way. ``static_argnums`` count ``self`` as argument 0.
    """
    return nn.remat(module_cls, static_argnums=static_argnums) if remat else module_cls


def host_random_params(shapes: Any, seed: int, jitter: float = 0.0) -> Any:
    """Parameters for a ``ShapeDtypeStruct`` tree drawn with numpy on the host: kernels
    ``N(0, 1 / fan_in)`` (LeCun normal), ``scale`` leaves ``1``, everything else ``0``, plus
    ``jitter · N(0, 1)`` on the non-kernel leaves when ``jitter > 0``.

    Much cheaper than tracing Flax initialisers of a large network (a jitted SD 2.1
    ``init`` compiles for minutes on CPU); deterministic in ``seed``.
    """
    import math

    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(path, spec):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(spec.shape)
        if name == "kernel":
            std = 1.0 / math.sqrt(max(1, int(np.prod(shape[:-1]))))
            return (rng.standard_normal(shape, np.float32) * std).astype(spec.dtype)
        base = 1.0 if name == "scale" else 0.0
        if jitter > 0:
            return (base + jitter * rng.standard_normal(shape, np.float32)).astype(spec.dtype)
        return np.full(shape, base, spec.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
