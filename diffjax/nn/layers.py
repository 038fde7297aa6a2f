"""Small layer helpers shared by every diffjax network.

* :func:`dense` / :func:`conv2d` return Flax ``nn.Dense`` / ``nn.Conv`` whose kernels carry
  *logical* axis names (see ``diffjax.train.sharding``), so a caller can derive shardings
  with ``nn.get_partition_spec(jax.eval_shape(module.init, ...))``. Applying a module with
  plain (unboxed) arrays, e.g. converted checkpoints, works unchanged. ``name`` may be
  left out inside ``setup`` (Flax names attributes itself).
* :func:`group_norm` / :func:`layer_norm` always compute in float32 (statistics and
  normalisation) whatever the compute dtype; callers cast the result back. This is what
  keeps bf16 compute within 2e-2 of fp32.
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
    )


def group_norm(num_groups: int, *, eps: float, name: str | None = None, param_dtype: Dtype) -> nn.GroupNorm:
    """``nn.GroupNorm`` computing in float32 with the exact (two-pass) variance.

    Channel groups are contiguous, as in ``torch.nn.GroupNorm`` (Wu & He, 2018, eq. 1).
    """
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=jnp.float32,
                        param_dtype=param_dtype, use_fast_variance=False, name=name)


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
