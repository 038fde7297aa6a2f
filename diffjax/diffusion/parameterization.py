"""Model-output parameterisations: noise (eps), clean data (x0) and velocity (v).

For ``x_t = alpha x_0 + sigma eps`` (variance preserving: ``alpha^2 + sigma^2 = 1``):

* eps-prediction (Ho et al. 2020): ``x_0 = (x_t - sigma eps) / alpha``;
* x0-prediction ("sample" in diffusers): the output is ``x_0``;
* v-prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D):
  ``v = alpha eps - sigma x_0``, hence ``x_0 = alpha x_t - sigma v`` and
  ``eps = sigma x_t + alpha v``.

The eps <-> x0 conversions hold for any ``(alpha, sigma)``; the v conversions assume the
variance-preserving form (callers working in the Karras "sigma" space rescale first, see
:mod:`diffjax.diffusion.samplers`). ``alpha`` and ``sigma`` broadcast against the sample
(scalars, or ``[B, 1, 1, 1]`` per-example values).
"""
from __future__ import annotations

import jax.numpy as jnp

from diffjax.errors import InputError

# Canonical names are diffusers' ``prediction_type`` values; short aliases are accepted.
_ALIASES = {
    "epsilon": "epsilon", "eps": "epsilon",
    "sample": "sample", "x0": "sample", "original_sample": "sample",
    "v_prediction": "v_prediction", "v": "v_prediction",
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def canonical_prediction_type(prediction_type: str) -> str:
    """``"eps"``/``"x0"``/``"v"`` (or diffusers' names) -> diffusers' name; else InputError."""
    try:
        return _ALIASES[prediction_type]
    except (KeyError, TypeError):
        raise InputError(f"unknown prediction_type {prediction_type!r}; expected one of "
                         f"{sorted(_ALIASES)}") from None


def to_x0(output, x_t, alpha, sigma, prediction_type: str):
    """The clean-data estimate ``x_0`` implied by a model output."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return (x_t - sigma * output) / alpha
    if kind == "sample":
        return output
    return alpha * x_t - sigma * output


def to_eps(output, x_t, alpha, sigma, prediction_type: str):
    """The noise estimate ``eps`` implied by a model output."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return output
    if kind == "sample":
        return (x_t - alpha * output) / sigma
    return alpha * output + sigma * x_t


def to_v(output, x_t, alpha, sigma, prediction_type: str):
    """The velocity estimate ``v = alpha eps - sigma x_0`` implied by a model output."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "v_prediction":
        return output
    x0 = to_x0(output, x_t, alpha, sigma, kind)
    eps = to_eps(output, x_t, alpha, sigma, kind)
    return alpha * eps - sigma * x0


def convert(output, x_t, alpha, sigma, *, source: str, target: str):
    """Convert a model output from one parameterisation to another."""
    target = canonical_prediction_type(target)
    fn = {"epsilon": to_eps, "sample": to_x0, "v_prediction": to_v}[target]
    return fn(output, x_t, alpha, sigma, source)


def training_target(x0, noise, alpha, sigma, prediction_type: str):
    """What a network of the given parameterisation is trained to output at ``x_t``."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    return alpha * noise - sigma * x0


def add_noise(x0, noise, alpha, sigma):
    """The forward process ``x_t = alpha x_0 + sigma eps`` (Ho et al. 2020, eq. 4)."""
    return alpha * x0 + sigma * noise


def expand_to(values, x):
    """Reshape per-example values ``[B]`` (or a scalar) to broadcast against ``x [B, ...]``."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))
