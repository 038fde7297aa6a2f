"""Entropy models: the factorized entropy bottleneck and the Gaussian/Laplace conditional.

* :class:`EntropyBottleneck`: the learned non-parametric, per-channel density of Ballé,
  Minnen, Singh, Hwang & Johnston, "Variational image compression with a scale
  hyperprior", ICLR 2018, appendix 6.1. The cumulative ``c(x)`` is a tiny monotone
  network per channel, ``f_K ∘ ... ∘ f_1`` with
  ``f_k(x) = g_k(softplus(H_k) x + b_k)``, ``g_k(x) = x + tanh(a_k) ⊙ tanh(x)`` (eq. 29-31);
  the likelihood of an integer bin is ``c(x + 1/2) - c(x - 1/2)`` with the sign trick for
  numerical range. Learned tail quantiles (``quantiles[:, 0/2]`` reach ``c = ±log(2/τ - 1)``,
  ``quantiles[:, 1]`` is the median) are fitted by :meth:`EntropyBottleneck.aux_loss`
  and bound the CDF tables.
* :class:`GaussianConditional`: ``y ~ N(μ, σ²) * U(-1/2, 1/2)`` (Ballé 2018, eq. 11;
  Minnen, Ballé & Toderici, NeurIPS 2018, eq. 3 for the mean), optionally a Laplace
  conditional. Scales live on a log-spaced *scale table*; the coder uses one CDF per table
  entry, and an index picks the smallest table scale ``>= σ`` (as CompressAI does).

**One definition for rate and coder.** The likelihood functions below take an array
namespace (``NP`` for numpy float64 on the host, ``JNP`` for jittable float32). The jitted
models call them with ``JNP``; :func:`factorized_table` and :func:`gaussian_table` call the
*same functions* with ``NP`` to build the coder's CDF tables from trained parameters, once.
In evaluation mode the Gaussian conditional also snaps its scales to the table
(``eval_table_scales=True``), so the eval-mode rate is the ideal code length of the coder
(up to the coder's fixed-point precision); the size test measures the difference.

Rates: :func:`bits` sums ``-log2`` of a likelihood pytree, so ``bpp = bits / num_pixels``.
Parameter layout matches CompressAI's ``EntropyBottleneck`` (``matrix{i}`` ``[C, out,
in]``; ``bias{i}``/``factor{i}`` ``[C, out]``; ``quantiles`` ``[C, 3]``).
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from diffjax.entropy.coder import PRECISION, CdfTable
from diffjax.entropy.quantize import lower_bound, quantize
from diffjax.errors import InputError

Dtype = Any

# Ballé's scale table (tensorflow-compression examples, CompressAI ``get_scale_table``):
# 64 log-spaced scales in [0.11, 256], stored as float32 values.
SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64
DEFAULT_SCALE_TABLE: tuple = tuple(
    float(s)
    for s in np.exp(np.linspace(np.log(SCALES_MIN), np.log(SCALES_MAX), SCALES_LEVELS)).astype(
        np.float32
    )
)
FAMILIES = ("gaussian", "laplace")
# Longest CDF row the coder accepts; learned quantiles wider than this are a broken model.
MAX_TABLE_LENGTH = 1 << 16

NP = SimpleNamespace(
    xp=np,
    erfc=scipy.special.erfc,
    softplus=lambda x: np.logaddexp(0.0, x),
    sigmoid=scipy.special.expit,
    lower_bound=np.maximum,
    stop_gradient=lambda x: x,
    einsum=np.einsum,
)
JNP = SimpleNamespace(
    xp=jnp,
    erfc=jax.scipy.special.erfc,
    softplus=jax.nn.softplus,
    sigmoid=jax.nn.sigmoid,
    lower_bound=lower_bound,
    stop_gradient=jax.lax.stop_gradient,
    einsum=lambda spec, *a: jnp.einsum(spec, *a, precision="highest"),
)


# --------------------------------------------------------------------------- densities
def _num_layers(fparams) -> int:
    return sum(1 for k in fparams if k.startswith("matrix"))


def factorized_logits_cumulative(fparams, v, ops=JNP, stop_gradient: bool = False):
    """Logit of the cumulative ``c(v)`` of the factorized density (Ballé 2018, eq. 29-31).

    ``fparams``: the bottleneck's parameter dict; ``v``: ``[C, N]``. Returns ``[C, N]``.
    """
    sg = ops.stop_gradient if stop_gradient else (lambda a: a)
    n = _num_layers(fparams)
    logits = v[:, None, :]
    for i in range(n):
        matrix = ops.softplus(sg(fparams[f"matrix{i}"]))
        logits = ops.einsum("coi,cin->con", matrix, logits) + sg(fparams[f"bias{i}"])[..., None]
        if i < n - 1:
            factor = ops.xp.tanh(sg(fparams[f"factor{i}"]))[..., None]
            logits = logits + factor * ops.xp.tanh(logits)
    return logits[:, 0, :]


def factorized_likelihood(fparams, v, ops=JNP):
    """Mass of the unit bin around ``v`` (``[C, N]``); returns ``(likelihood, lower, upper)``.

    Uses ``|σ(s·u) - σ(s·l)|`` with ``s = -sign(l + u)`` so both sigmoids are evaluated on
    their accurate side (tensorflow-compression); CompressAI computes ``σ(u) - σ(l)``,
    equal up to float rounding.
    """
    lower = factorized_logits_cumulative(fparams, v - 0.5, ops)
    upper = factorized_logits_cumulative(fparams, v + 0.5, ops)
    sign = ops.stop_gradient(-ops.xp.sign(lower + upper))
    likelihood = ops.xp.abs(ops.sigmoid(sign * upper) - ops.sigmoid(sign * lower))
    return likelihood, lower, upper


def standardized_cumulative(x, family: str, ops=JNP):
    """CDF of the unit Gaussian (via ``erfc``, accurate in the tails) or unit Laplace."""
    if family == "gaussian":
        return 0.5 * ops.erfc(-(2.0**-0.5) * x)
    if family == "laplace":
        return 0.5 - 0.5 * ops.xp.sign(x) * ops.xp.expm1(-ops.xp.abs(x))
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def conditional_likelihood(values, scales, family: str = "gaussian", ops=JNP):
    """Bin mass ``P(|v| ± 1/2)`` of a zero-mean Gaussian/Laplace; ``values = y - mean``.

    Evaluated on ``-|v|`` (the lower tail) for precision, as Ballé 2018 and CompressAI do.
    ``scales`` must already be bounded away from zero.
    """
    values = ops.xp.abs(values)
    upper = standardized_cumulative((0.5 - values) / scales, family, ops)
    lower = standardized_cumulative((-0.5 - values) / scales, family, ops)
    return upper - lower


def tail_multiplier(tail_mass: float, family: str) -> float:
    """``t`` with ``P(|X| > t·σ) = tail_mass`` for the unit distribution."""
    if family == "gaussian":
        return float(-scipy.special.ndtri(tail_mass / 2))
    if family == "laplace":
        return float(-math.log(tail_mass))
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def scale_indexes(scales, scale_table: Sequence[float], scale_bound: float, ops=JNP):
    """Index of the smallest table scale ``>= max(scales, scale_bound)`` (int32).

    Equal to CompressAI's ``GaussianConditional.build_indexes``; scales above the table
    map to the last entry. Shared by the eval-mode rate and by the coder.
    """
    xp = ops.xp
    table = xp.asarray(np.asarray(scale_table, np.float32))
    scales = xp.maximum(scales.astype(xp.float32), xp.float32(scale_bound))
    if xp is np:
        return np.searchsorted(table[:-1], scales, side="left").astype(np.int32)
    # The same integer result by counting the table entries below each scale: a short table
    # traces ~10x faster than jnp.searchsorted's loop (the CLI's warm start is tracing-bound).
    return jnp.sum(scales[..., None] > table[:-1], axis=-1, dtype=jnp.int32)


def bits(likelihoods, *, per_example: bool = False):
    """Total rate ``sum -log2(p)`` of a likelihood pytree, in bits (float32).

    With ``per_example=True`` returns ``[B]`` (every leaf has the batch on axis 0).
    ``bpp = bits(out["likelihoods"]) / (B * H * W)``.
    """
    total = 0.0
    for leaf in jax.tree_util.tree_leaves(likelihoods):
        logs = jnp.log2(leaf.astype(jnp.float32))
        axes = tuple(range(1, logs.ndim)) if per_example else None
        total = total - jnp.sum(logs, axis=axes)
    return total


# --------------------------------------------------------------------------- modules
class EntropyBottleneck(nn.Module):
    """Factorized learned density over the last axis of ``[..., C]`` latents.

    ``__call__(z, *, train, mode=None) -> (z_hat, likelihoods)``: ``mode`` defaults to
    ``"noise"`` when training and ``"round"`` (around the medians) otherwise; noise comes
    from the ``"noise"`` RNG stream. Likelihoods are float32, bounded below by
    ``likelihood_bound``.
    """

    channels: int
    filters: tuple = (3, 3, 3, 3)
    init_scale: float = 10.0
    tail_mass: float = 1e-9
    likelihood_bound: float = 1e-9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        filters = (1, *self.filters, 1)
        scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
        c = self.channels
        p = {}
        for i in range(len(self.filters) + 1):
            init = float(np.log(np.expm1(1.0 / scale / filters[i + 1])))
            p[f"matrix{i}"] = self.param(
                f"matrix{i}", nn.initializers.constant(init), (c, filters[i + 1], filters[i]),
                self.param_dtype,
            )
            p[f"bias{i}"] = self.param(
                f"bias{i}", lambda k, s, d: jax.random.uniform(k, s, d, -0.5, 0.5),
                (c, filters[i + 1]), self.param_dtype,
            )
            if i < len(self.filters):
                p[f"factor{i}"] = self.param(
                    f"factor{i}", nn.initializers.zeros, (c, filters[i + 1]), self.param_dtype
                )
        s = self.init_scale
        p["quantiles"] = self.param(
            "quantiles",
            lambda k, shape, d: jnp.tile(jnp.asarray([-s, 0.0, s], d), (shape[0], 1)),
            (c, 3), self.param_dtype,
        )
        self._p = p

    def _params32(self):
        return {k: v.astype(jnp.float32) for k, v in self._p.items()}

    def medians(self) -> jax.Array:
        """Per-channel medians ``[C]`` (the rounding offsets)."""
        return self._p["quantiles"][:, 1].astype(jnp.float32)

    def __call__(self, z: jax.Array, *, train: bool, mode: Optional[str] = None):
        chex.assert_axis_dimension(z, -1, self.channels)
        mode = mode or ("noise" if train else "round")
        shape = z.shape
        v = z.astype(jnp.float32).reshape(-1, self.channels).T
        medians = jax.lax.stop_gradient(self.medians())[:, None]
        rng = self.make_rng("noise") if mode in ("noise", "mixed") else None
        v_rate, v_dec = quantize(v, mode, rng=rng, offset=medians)
        likelihood, _, _ = factorized_likelihood(self._params32(), v_rate)
        likelihood = lower_bound(likelihood, self.likelihood_bound)
        z_hat = v_dec.T.reshape(shape).astype(self.dtype)
        return z_hat, likelihood.T.reshape(shape)

    def aux_loss(self) -> jax.Array:
        """``sum |c(quantiles) - [-t, 0, t]|``, ``t = log(2/τ - 1)`` (density frozen).

        Only the quantiles receive gradient (the density is stop-gradiented), so it can be
        added to the main loss or optimised separately as CompressAI does.
        """
        target = math.log(2.0 / self.tail_mass - 1.0)
        p = self._params32()
        logits = factorized_logits_cumulative(p, p["quantiles"], stop_gradient=True)
        return jnp.sum(jnp.abs(logits - jnp.asarray([-target, 0.0, target], jnp.float32)))


def escape_likelihood(symbols, idx, centers, escape_prob, likelihood):
    """Coder-consistent likelihood: escaped symbols get the escape code's probability.

    A symbol ``v`` outside row ``k`` (``|v| > centers[k]``) costs the escape entry
    (``escape_prob[k]``, the integer table's frequency / 2^precision), a uniform exponent
    ``n`` over 33 values and ``n`` raw bits (``diffjax.entropy.coder``):
    ``p = escape_prob[k] / 33 / 2^n``. In-range entries keep ``likelihood``, floored at
    the table's smallest probability ``2^-precision`` (every entry has frequency >= 1).
    """
    likelihood = jnp.maximum(likelihood, 2.0**-PRECISION)
    a = jnp.abs(symbols)
    c = centers[idx].astype(jnp.float32)
    w = jnp.where(symbols < 0, 2.0 * (a - c) - 1.0, 2.0 * (a - c - 1.0))
    _, e = jnp.frexp(jnp.maximum(w, 0.0) + 1.0)  # w + 1 = m 2^e, m in [0.5, 1): n = e - 1
    p = escape_prob[idx] / 33.0 * jnp.exp2(-(e - 1).astype(jnp.float32))
    return jnp.where(a > c, p, likelihood)


@functools.lru_cache(maxsize=16)
def _escape_tables(scale_table: tuple, tail_mass: float, family: str):
    """(row half-widths [K] int32, escape probabilities [K] float32) of the coder table."""
    t = gaussian_table(scale_table, tail_mass, family)
    esc = t.freqs[np.arange(t.num_indexes), t.lengths] / float(1 << t.precision)
    return (-t.offsets).astype(np.int32), esc.astype(np.float32)


class GaussianConditional(nn.Module):
    """Conditional Gaussian (or Laplace) model of ``y`` given scales (and means).

    ``__call__(y, scales, means=None, *, train, mode=None) -> (y_hat, likelihoods)``.
    Training: noise/ste/mixed quantisation (``"noise"`` RNG stream), continuous scales.
    Evaluation: mean-offset rounding; with ``eval_table_scales`` (default) the scales are
    snapped to the scale table exactly as the coder does and escaped symbols get the
    escape code's probability (:func:`escape_likelihood`), so the evaluation rate is the
    coder's ideal code length; ``eval_table_scales=False`` is CompressAI's evaluation
    (continuous scales). Has no parameters.
    """

    scale_table: tuple = DEFAULT_SCALE_TABLE
    scale_bound: float = 0.11
    tail_mass: float = 1e-9
    likelihood_bound: float = 1e-9
    family: str = "gaussian"
    eval_table_scales: bool = True
    dtype: Dtype = jnp.float32

    def table_indexes(self, scales: jax.Array) -> jax.Array:
        return scale_indexes(scales, self.scale_table, self.scale_bound)

    def _coded_likelihood(self, symbols, idx, likelihood):
        """Replace the likelihood of escaped symbols by the coder's escape cost."""
        centers, esc = _escape_tables(tuple(self.scale_table), self.tail_mass, self.family)
        return escape_likelihood(symbols, idx, jnp.asarray(centers), jnp.asarray(esc),
                                 likelihood)

    def __call__(self, y, scales, means=None, *, train: bool, mode: Optional[str] = None):
        chex.assert_equal_shape([y, scales] + ([means] if means is not None else []))
        mode = mode or ("noise" if train else "round")
        y32 = y.astype(jnp.float32)
        means32 = None if means is None else means.astype(jnp.float32)
        rng = self.make_rng("noise") if mode in ("noise", "mixed") else None
        y_rate, y_dec = quantize(y32, mode, rng=rng, offset=means32)
        scales = scales.astype(jnp.float32)
        coded = not train and self.eval_table_scales
        if coded:
            idx = self.table_indexes(scales)
            scales = jnp.asarray(np.asarray(self.scale_table, np.float32))[idx]
        scales = lower_bound(scales, self.scale_bound)
        values = y_rate if means32 is None else y_rate - means32
        likelihood = conditional_likelihood(values, scales, self.family)
        likelihood = lower_bound(likelihood, self.likelihood_bound)
        if coded:
            likelihood = self._coded_likelihood(jnp.round(values), idx, likelihood)
        return y_dec.astype(self.dtype), likelihood


# --------------------------------------------------------------------------- CDF tables
def factorized_medians(fparams) -> np.ndarray:
    """Host-side medians ``[C]`` float32 (what the bottleneck rounds around)."""
    return np.asarray(fparams["quantiles"], np.float32)[:, 1]


def factorized_table(fparams) -> CdfTable:
    """CDF table of a trained :class:`EntropyBottleneck` (one row per channel).

    Rows span the learned quantiles, ``[ceil(median - q_low), ceil(q_high - median)]``
    around the median (CompressAI ``EntropyBottleneck.update``), plus an escape entry
    carrying the tail mass. Computed in float64 numpy with :func:`factorized_likelihood`.
    """
    p = {k: np.asarray(v, np.float64) for k, v in fparams.items()}
    q = p["quantiles"]
    if not np.all(np.isfinite(q)):
        raise InputError("entropy bottleneck quantiles are not finite")
    medians = np.asarray(factorized_medians(fparams), np.float64)
    minima = np.maximum(np.ceil(medians - q[:, 0]), 0)
    maxima = np.maximum(np.ceil(q[:, 2] - medians), 0)
    lengths = (minima + maxima + 1).astype(np.int64)
    if lengths.max() > MAX_TABLE_LENGTH:
        raise InputError(
            f"entropy bottleneck quantiles span {lengths.max()} symbols "
            f"(> {MAX_TABLE_LENGTH}); the aux loss has not been trained?"
        )
    width = int(lengths.max())
    samples = np.arange(width, dtype=np.float64)[None, :] + (medians - minima)[:, None]
    pmf, lower, upper = factorized_likelihood(p, samples, NP)
    rows = np.arange(len(lengths))
    tail = NP.sigmoid(lower[:, 0]) + NP.sigmoid(-upper[rows, lengths - 1])
    return CdfTable.from_pmf(pmf, lengths, (-minima).astype(np.int64), tail)


def gaussian_table(
    scale_table: Sequence[float] = DEFAULT_SCALE_TABLE,
    tail_mass: float = 1e-9,
    family: str = "gaussian",
) -> CdfTable:
    """CDF table of the conditional: one zero-centred row per scale-table entry.

    Row ``k`` covers ``|v| <= ceil(t·σ_k)`` with ``t`` from :func:`tail_multiplier`
    (CompressAI ``GaussianConditional.update``), plus the escape entry.
    """
    s = np.asarray(np.asarray(scale_table, np.float32), np.float64)
    if s.ndim != 1 or s.size < 1 or np.any(s <= 0) or np.any(np.diff(s) <= 0):
        raise InputError("scale_table must be a non-empty, increasing list of positive scales")
    center = np.ceil(s * tail_multiplier(tail_mass, family)).astype(np.int64)
    lengths = 2 * center + 1
    if lengths.max() > MAX_TABLE_LENGTH:
        raise InputError(f"scale table too wide: {lengths.max()} symbols > {MAX_TABLE_LENGTH}")
    width = int(lengths.max())
    samples = np.abs(np.arange(width)[None, :] - center[:, None]).astype(np.float64)
    pmf = conditional_likelihood(samples, s[:, None], family, NP)
    tail = 2.0 * standardized_cumulative((-0.5 - center) / s, family, NP)
    return CdfTable.from_pmf(pmf, lengths, -center, tail)
