"""Inference timestep grids and Karras-style sigma ladders, exactly as diffusers builds them.

Host-side numpy only (static per ``num_inference_steps``); the samplers turn these into
per-step coefficient tables. ``sigma`` here is the Karras et al. 2022 (EDM) noise level
``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, i.e. ``x = x_0 + sigma eps`` after dividing the
VP sample by ``alpha``.
"""
from __future__ import annotations

import math

import numpy as np

from diffjax.errors import InputError


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int = 0,
                     *, dtype=np.int64) -> np.ndarray:
    """DDPM/DDIM/Euler inference timesteps, descending (Lin et al. 2024, Table 2 spacings).

    ``"linspace"``: ``linspace(0, N - 1, n)`` (rounded for integer dtypes); ``"leading"``:
    ``arange(n) * (N // n) + steps_offset``; ``"trailing"``: ``round(arange(N, 0, -N / n)) - 1``.
    """
    if spacing == "linspace":
        if np.issubdtype(dtype, np.integer):
            return np.linspace(0, num_train - 1, n).round()[::-1].copy().astype(dtype)
        return np.linspace(0, num_train - 1, n, dtype=dtype)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(dtype) + dtype(steps_offset)
    if spacing == "trailing":
        ratio = num_train / n
        return np.round(np.arange(num_train, 0, -ratio)).astype(dtype) - dtype(1)
    raise InputError(f"unsupported timestep_spacing {spacing!r}; expected 'linspace', "
                     "'leading' or 'trailing'")


def dpm_timesteps(spacing: str, num_train: int, last_timestep: int, n: int,
                  steps_offset: int = 0) -> np.ndarray:
    """DPMSolverMultistepScheduler's grid: ``n + 1`` points with the last (0) dropped."""
    if spacing == "linspace":
        return (np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
                .copy().astype(np.int64))
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        out = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return out + steps_offset
    if spacing == "trailing":
        ratio = num_train / n
        return np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1
    raise InputError(f"unsupported timestep_spacing {spacing!r}; expected 'linspace', "
                     "'leading' or 'trailing'")


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 Karras sigmas of the training grid, ``sqrt((1 - a) / a)`` (ascending in t)."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in ``log sigma``."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def sigma_ladder(kind: str, in_sigmas: np.ndarray, n: int, sigma_min=None,
                 sigma_max=None) -> np.ndarray:
    """Re-space ``n`` sigmas between ``in_sigmas[-1]`` and ``in_sigmas[0]``.

    ``"karras"``: Karras et al. 2022 eq. 5 with ``rho = 7``; ``"exponential"``: uniform in
    ``log sigma``; ``"beta"``: Lee et al. 2024 "Beta sampling", Beta(0.6, 0.6) quantiles.
    """
    lo = float(sigma_min) if sigma_min is not None else float(in_sigmas[-1])
    hi = float(sigma_max) if sigma_max is not None else float(in_sigmas[0])
    if kind == "karras":
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    if kind == "beta":
        import scipy.stats

        ppf = [scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1 - np.linspace(0, 1, n)]
        return np.array([lo + p * (hi - lo) for p in ppf])
    raise InputError(f"unknown sigma ladder {kind!r}")


def ladder_kind(config) -> str | None:
    """Which of ``use_karras_sigmas``/``use_exponential_sigmas``/``use_beta_sigmas`` is on."""
    on = [k for k in ("karras", "exponential", "beta") if config.get(f"use_{k}_sigmas")]
    if len(on) > 1:
        raise InputError("only one of use_karras_sigmas, use_exponential_sigmas and "
                         "use_beta_sigmas can be set")
    return on[0] if on else None


def final_sigma(config, alphas_cumprod: np.ndarray) -> float:
    """The sigma after the last step: 0 (``"zero"``) or the smallest training sigma."""
    kind = config.get("final_sigmas_type", "zero")
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(train_sigmas(alphas_cumprod[:1])[0])
    raise InputError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {kind!r}")
