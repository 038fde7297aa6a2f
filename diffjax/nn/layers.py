"""Small layer helpers shared by every diffjax network.

* :func:`dense` / :func:`conv2d` return Flax ``nn.Dense`` / ``nn.Conv`` whose kernels carry
  *logical* axis names (see ``diffjax.train.sharding``), so a caller can derive shardings
  with ``nn.get_partition_spec(jax.eval_shape(module.init, ...))``. Applying a module with
  plain (unboxed) arrays, e.g. converted checkpoints, works unchanged. ``name`` may be
  left out inside ``setup`` (Flax names attributes itself).
  Their convolution is :class:`BackendConv`: on the CPU backend the kernels of
  :mod:`diffjax.nn.cpu_kernels` (1x1 convs as a channel matmul, small maps as one GEMM
  over gathered patches), elsewhere ``lax.conv_general_dilated``.
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
from diffjax.nn import cpu_kernels
# Re-exported: these lived here before the CPU kernels moved to ``diffjax.nn.cpu_kernels``.
from diffjax.nn.cpu_kernels import (CPU_PATCH_CONV_MAX_PIXELS, NHWC_DIMS,  # noqa: F401
                                    patch_matmul_conv)

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


class BackendConv:
    """``lax.conv_general_dilated`` stand-in for ``nn.Conv(conv_general_dilated_cls=...)``
    that picks the kernel per backend.

    With :func:`~diffjax.nn.cpu_kernels.use_cpu_kernels` (the CPU backend, by default) it
    is :func:`diffjax.nn.cpu_kernels.conv_general_dilated` (1x1 convs as a channel matmul,
    small-output k x k convs as a patch GEMM); otherwise (GPU/TPU) the plain
    ``lax.conv_general_dilated``. The switch is read at trace time. No parameters.
    """

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None):
        conv = (cpu_kernels.conv_general_dilated if cpu_kernels.use_cpu_kernels()
                else jax.lax.conv_general_dilated)
        return conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                    feature_group_count=feature_group_count, precision=precision)


# The former name, kept for code that imports it.
CpuFriendlyConv = BackendConv


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
        conv_general_dilated_cls=BackendConv,
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
