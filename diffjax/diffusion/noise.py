"""Gaussian noise for the diffusion loop and losses.

:func:`standard_normal` returns exactly ``jax.random.normal(key, shape)`` (with JAX's
partitionable threefry, the default, the bits of element ``i`` depend only on its flat
index, so generating the flat vector and reshaping gives the same values) but compiles much
faster: measured on this project's CPU machine with jax 0.10.2, a ``(2, 8, 8, 4)`` draw took
12 s to compile directly and 1.8 s flat. The test ``test_standard_normal_equals_jax`` pins
the equality.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def standard_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, generated flat and reshaped."""
    shape = tuple(int(s) for s in shape)
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def step_noise(key: jax.Array, step, shape, dtype=jnp.float32) -> jax.Array:
    """The fresh Gaussian noise a stochastic sampler draws at inference step ``step``.

    ``normal(fold_in(key, step))``: independent of sharding and of the start step, so a run
    can be reproduced step by step (and fed to a reference implementation).
    """
    return standard_normal(jax.random.fold_in(key, step), shape, dtype)
