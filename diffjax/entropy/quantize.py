"""Quantisation for learned compression, and the gradient tricks that go with it.

Training a transform codec needs a differentiable stand-in for rounding. The options here
are the ones the literature uses:

* ``"noise"``: additive uniform noise ``x + u, u ~ U(-1/2, 1/2)`` (Ballé, Laparra &
  Simoncelli, "End-to-end optimized image compression", ICLR 2017, sec. 3.1). The density
  of the noisy latent is the continuous density convolved with a unit box, so its value at
  ``x + u`` is exactly the probability mass the entropy coder assigns to the bin.
* ``"ste"``: rounding with the straight-through estimator (Theis et al., "Lossy image
  compression with compressive autoencoders", ICLR 2017): forward ``round``, backward
  identity.
* ``"mixed"``: noise for the rate term and straight-through rounding for the
  reconstruction (Minnen & Singh, "Channel-wise autoregressive entropy models", ICIP 2020,
  sec. 2); the decoder then trains on the same values it sees at test time.
* ``"round"``: hard rounding (evaluation; CompressAI calls it ``"dequantize"``).

Rounding is done around an offset (the mean of a Gaussian conditional, the median of a
factorized density): ``round(x - m) + m`` (Minnen et al., "Joint autoregressive and
hierarchical priors", NeurIPS 2018, sec. 3). The integer ``round(x - m)`` is what the
entropy coder writes (:func:`symbols`).

:func:`lower_bound` is ``max(x, bound)`` with the gradient of Ballé's ``LowerBound``:
gradients pass where ``x >= bound`` or where they push ``x`` up towards the bound, so a
parameter stuck under the bound can still recover.

Everything is pure and jittable; nothing here jits.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

MODES = ("noise", "ste", "mixed", "round")


def uniform_noise(x: jax.Array, rng: jax.Array) -> jax.Array:
    """``x + u`` with ``u ~ U(-1/2, 1/2)`` i.i.d. (Ballé et al. 2017, eq. 5)."""
    return x + jax.random.uniform(rng, x.shape, x.dtype, -0.5, 0.5)


def ste_round(x: jax.Array) -> jax.Array:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def round_offset(x: jax.Array, offset: Optional[jax.Array] = None, *, ste: bool = False):
    """``round(x - offset) + offset`` (mean-offset rounding, Minnen et al. 2018).

    ``offset`` is treated as a constant (no gradient flows into it through the rounding),
    as in CompressAI and tensorflow-compression. With ``ste=True`` the rounding passes
    gradients straight through to ``x``.
    """
    if offset is None:
        return ste_round(x) if ste else jnp.round(x)
    offset = jax.lax.stop_gradient(offset)
    r = ste_round(x - offset) if ste else jnp.round(x - offset)
    return r + offset


def symbols(x: jax.Array, offset: Optional[jax.Array] = None) -> jax.Array:
    """The integers the entropy coder writes: ``round(x - offset)`` as int32."""
    if offset is not None:
        x = x - offset
    return jnp.round(x).astype(jnp.int32)


def quantize(
    x: jax.Array,
    mode: str,
    *,
    rng: Optional[jax.Array] = None,
    offset: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """Quantise ``x`` for an entropy model; returns ``(x_rate, x_decoder)``.

    ``x_rate`` is where the likelihood (rate term) is evaluated, ``x_decoder`` is what the
    synthesis transform receives. They differ only in ``"mixed"`` mode. ``rng`` is needed
    by the noise-based modes.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {MODES}")
    if mode in ("noise", "mixed") and rng is None:
        raise ValueError(f"quantization mode {mode!r} needs an rng")
    if mode == "noise":
        noisy = uniform_noise(x, rng)
        return noisy, noisy
    if mode == "mixed":
        return uniform_noise(x, rng), round_offset(x, offset, ste=True)
    if mode == "ste":
        q = round_offset(x, offset, ste=True)
        return q, q
    q = round_offset(x, offset)
    return q, q


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def lower_bound(x: jax.Array, bound: float) -> jax.Array:
    """``max(x, bound)`` with Ballé's pass-through gradient (see the module docstring)."""
    return jnp.maximum(x, jnp.asarray(bound, x.dtype))


def _lower_bound_fwd(x, bound):
    return lower_bound(x, bound), x


def _lower_bound_bwd(bound, x, g):
    pass_through = (x >= bound) | (g < 0)
    return (jnp.where(pass_through, g, jnp.zeros_like(g)),)


lower_bound.defvjp(_lower_bound_fwd, _lower_bound_bwd)
