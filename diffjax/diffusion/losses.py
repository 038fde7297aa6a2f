"""Loss weightings and the weighted denoising loss.

A weighting returns the per-example multiplier of the squared error *in the target space of
the prediction type* (eps, x0 or v). Kingma & Gao 2023 ("Understanding Diffusion Objectives
as the ELBO with Simple Data Augmentation") write every weighting as a multiplier of the eps
error; the errors of the three parameterisations are related, at fixed ``x_t``, by

    ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR
    ||v - v_hat||^2   = ||eps - eps_hat||^2 * (1 + SNR) / SNR

so an eps-space weight ``w`` becomes ``w * SNR`` in x0 space and ``w * SNR / (1 + SNR)`` in v
space. Weightings (``SNR = exp(logsnr)``, logsnr clamped to ``[-20, 20]`` so every weight is
finite at ``t = 0`` and ``t = 1``):

* :func:`constant`: 1 in the target space (plain MSE on eps, x0 or v);
* :func:`min_snr`: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
  Strategy", eq. 9-10: ``min(SNR, gamma)`` in x0 space (``/SNR`` for eps, ``/(SNR+1)`` for v);
* :func:`p2`: Choi et al. 2022, "Perception Prioritized Training", eq. 8:
  ``1 / (k + SNR)^gamma`` in eps space;
* :func:`sech`: Kingma & Gao 2023, Table 1: ``w(lambda) = sech(lambda / 2)`` (eps-prediction
  with a cosine schedule), times ``-dlogsnr/dt`` when ``t`` is drawn uniformly;
* :func:`edm`: Karras et al. 2022, "EDM", Table 1: ``lambda(sigma) = (sigma^2 + sigma_d^2) /
  (sigma sigma_d)^2`` on the denoiser (x0) error, ``sigma^2 = 1 / SNR``, i.e.
  ``SNR + 1 / sigma_d^2`` in x0 space.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from diffjax.diffusion.noise import standard_normal
from diffjax.diffusion.parameterization import (
    add_noise,
    canonical_prediction_type,
    expand_to,
    training_target,
)
from diffjax.diffusion.schedules import ContinuousSchedule, DiscreteSchedule
from diffjax.errors import InputError

LOGSNR_CLAMP = 20.0
WEIGHTINGS = ("constant", "min_snr", "p2", "sech", "edm")


@dataclasses.dataclass(frozen=True)
class Weighting:
    """A loss weighting; call it as ``w(logsnr, prediction_type, dlogsnr_dt=None)``.

    ``dlogsnr_dt`` (the derivative of logSNR w.r.t. the sampled time variable) only matters
    for weightings defined per unit of logSNR (``sech``): with ``t ~ U(0, 1)`` the
    per-example weight is ``w(lambda) * |dlambda/dt|`` (Kingma & Gao 2023, eq. 7); ``None``
    means logSNR itself was drawn uniformly (density factor 1).
    """

    kind: str
    gamma: float = 5.0
    k: float = 1.0
    sigma_data: float = 0.5

    def __post_init__(self):
        if self.kind not in WEIGHTINGS:
            raise InputError(f"unknown weighting {self.kind!r}; expected one of {WEIGHTINGS}")

    @property
    def needs_dlogsnr_dt(self) -> bool:
        return self.kind == "sech"

    def __call__(self, logsnr, prediction_type: str, dlogsnr_dt=None) -> jax.Array:
        target = canonical_prediction_type(prediction_type)
        lam = jnp.clip(jnp.asarray(logsnr, jnp.float32), -LOGSNR_CLAMP, LOGSNR_CLAMP)
        snr = jnp.exp(lam)
        if self.kind == "constant":
            return jnp.ones_like(lam)
        if self.kind == "min_snr":
            clipped = jnp.minimum(snr, self.gamma)
            return {"epsilon": clipped / snr, "sample": clipped,
                    "v_prediction": clipped / (snr + 1)}[target]
        if self.kind == "edm":
            w_x0 = snr + 1.0 / self.sigma_data ** 2
            return _from_x0(w_x0, snr, target)
        if self.kind == "p2":
            w_eps = (self.k + snr) ** (-self.gamma)
        else:  # sech
            w_eps = 1.0 / jnp.cosh(lam / 2)
            if dlogsnr_dt is not None:
                w_eps = w_eps * jnp.abs(jnp.asarray(dlogsnr_dt, jnp.float32))
        return _from_eps(w_eps, snr, target)


def _from_eps(w_eps, snr, target):
    return {"epsilon": w_eps, "sample": w_eps * snr,
            "v_prediction": w_eps * snr / (1 + snr)}[target]


def _from_x0(w_x0, snr, target):
    return {"epsilon": w_x0 / snr, "sample": w_x0, "v_prediction": w_x0 / (1 + snr)}[target]


def constant() -> Weighting:
    """Plain MSE on the prediction target."""
    return Weighting("constant")


def min_snr(gamma: float = 5.0) -> Weighting:
    """Min-SNR-gamma (Hang et al. 2023); gamma = 5 as in the paper (and Rampas 2024)."""
    return Weighting("min_snr", gamma=gamma)


def p2(k: float = 1.0, gamma: float = 1.0) -> Weighting:
    """P2 weighting (Choi et al. 2022)."""
    return Weighting("p2", k=k, gamma=gamma)


def sech() -> Weighting:
    """``sech(logsnr / 2)`` (Kingma & Gao 2023)."""
    return Weighting("sech")


def edm(sigma_data: float = 0.5) -> Weighting:
    """EDM loss weighting (Karras et al. 2022), ``sigma_data = 0.5`` by default."""
    return Weighting("edm", sigma_data=sigma_data)


def denoising_loss(denoise_fn: Callable, x0, key, *, schedule, prediction_type="epsilon",
                   weighting: Weighting | None = None, cond=None, t=None, noise=None,
                   t_range=(0.0, 1.0)):
    """Weighted denoising loss ``mean_b w_b * mean((f(x_t, t) - target)^2)``.

    Args:
      denoise_fn: ``denoise_fn(x_t, time [B])`` (or ``(x_t, time, cond)``) -> ``[B, ...]``.
      x0: clean data ``[B, ...]``.
      key: PRNG key for ``t`` and the noise (unused for what is passed explicitly).
      schedule: a :class:`DiscreteSchedule` (integer timesteps ``~ U{0..N-1}``, the network
        gets the timestep) or a :class:`ContinuousSchedule` (``t ~ U(t_range)``, the network
        gets ``schedule.model_time(t)``; gradients reach ``t`` through ``alpha(t)``).
      prediction_type: what the network outputs (eps / x0 / v or diffusers' names).
      weighting: a :class:`Weighting` (default :func:`constant`).
      t: optional ``[B]`` timesteps (integers for discrete schedules, ``[0, 1]`` otherwise).
      noise: optional ``[B, ...]`` Gaussian noise.

    Returns:
      ``(loss, aux)`` with ``aux = {"per_example", "weight", "logsnr", "t"}``.
    """
    weighting = weighting or constant()
    kind = canonical_prediction_type(prediction_type)
    x0 = jnp.asarray(x0)
    batch = x0.shape[0]
    k_t, k_n = jax.random.split(key)
    if noise is None:
        noise = standard_normal(k_n, x0.shape)
    chex.assert_equal_shape([x0, noise])
    dlogsnr_dt = None
    if isinstance(schedule, DiscreteSchedule):
        if t is None:
            t = jax.random.randint(k_t, (batch,), 0, schedule.num_train_timesteps)
        t = jnp.asarray(t, jnp.int32)
        a_bar = schedule.alpha_bar(t)
        alpha, sigma = jnp.sqrt(a_bar), jnp.sqrt(1.0 - a_bar)
        logsnr = jnp.log(a_bar) - jnp.log1p(-a_bar)
        time = t.astype(jnp.float32)
        if weighting.needs_dlogsnr_dt:  # the continuous interpolant is exact at the grid
            tc = (time + 1.0) / schedule.num_train_timesteps
            dlogsnr_dt = jax.jvp(schedule.continuous().logsnr, (tc,), (jnp.ones_like(tc),))[1]
    elif isinstance(schedule, ContinuousSchedule):
        if t is None:
            t = jax.random.uniform(k_t, (batch,), jnp.float32, *t_range)
        t = jnp.asarray(t, jnp.float32)
        alpha, sigma = schedule.alpha_sigma(t)
        logsnr = schedule.logsnr(t)
        time = schedule.model_time(t)
        if weighting.needs_dlogsnr_dt:
            dlogsnr_dt = jax.jvp(schedule.logsnr, (t,), (jnp.ones_like(t),))[1]
    else:
        raise InputError(f"schedule must be a DiscreteSchedule or ContinuousSchedule, "
                         f"got {type(schedule).__name__}")
    chex.assert_shape(t, (batch,))
    a, s = expand_to(alpha, x0), expand_to(sigma, x0)
    x_t = add_noise(x0.astype(jnp.float32), noise, a, s)
    out = denoise_fn(x_t, time) if cond is None else denoise_fn(x_t, time, cond)
    chex.assert_equal_shape([out, x0])
    target = training_target(x0.astype(jnp.float32), noise, a, s, kind)
    err = jnp.square(out.astype(jnp.float32) - target)
    per_example = jnp.mean(err.reshape(batch, -1), axis=1)
    weight = jax.lax.stop_gradient(weighting(logsnr, kind, dlogsnr_dt))
    loss = jnp.mean(weight * per_example)
    return loss, {"per_example": per_example, "weight": weight, "logsnr": logsnr, "t": t}
