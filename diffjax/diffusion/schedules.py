"""Noise schedules: discrete (diffusers-exact) and continuous-time (differentiable in t).

Discrete schedules are built from a diffusers scheduler config (the ``scheduler_config.json``
of a Stable Diffusion checkpoint works as is) and reproduce diffusers' float32 ``betas`` and
``alphas_cumprod`` bit for bit (torch's ``linspace`` rounding and its double-accumulated
``cumprod`` are emulated on the host), so models trained with diffusers see exactly the noise
levels they were trained on.

Supported ``beta_schedule`` values:

* ``"linear"``: DDPM (Ho et al. 2020), ``beta_i`` linear in ``i``;
* ``"scaled_linear"``: Stable Diffusion / LDM (Rombach et al. 2022), ``sqrt(beta_i)`` linear;
* ``"squaredcos_cap_v2"``: iDDPM cosine (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999;
* ``"sigmoid"``: GeoDiff (DDPM scheduler only in diffusers);
* ``trained_betas``: an explicit list.

``rescale_betas_zero_snr`` applies Lin et al. 2024, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", Algorithm 1.

Continuous time: ``t`` in ``[0, 1]`` with ``t = 0`` clean data and ``t = 1`` the last training
step; discrete training timestep ``i`` sits at ``t = (i + 1) / N`` (the iDDPM convention, eq. 17,
where ``alpha_bar_i = f((i + 1) / N) / f(0)``). Every continuous schedule gives ``alpha_bar(t)``,
``alpha(t) = sqrt(alpha_bar)``, ``sigma(t) = sqrt(1 - alpha_bar)`` and
``logsnr(t) = log(alpha_bar / (1 - alpha_bar))`` as differentiable ``jnp`` functions, so a codec
can learn ``t`` by gradient (Relic et al. 2024 learn the denoising start ``t``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from diffjax.errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


# --------------------------------------------------------------------------- config


def load_scheduler_config(scheduler_config: Mapping[str, Any] | str | os.PathLike) -> dict:
    """A diffusers scheduler config as a plain dict (``_``-prefixed metadata dropped).

    Accepts a mapping (dict, ``ConfigDict``, ``FrozenDict``) or the path of a diffusers
    ``scheduler_config.json``.
    """
    if isinstance(scheduler_config, (str, os.PathLike)):
        try:
            with open(scheduler_config, encoding="utf-8") as f:
                scheduler_config = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read scheduler config {scheduler_config!s}: {err}") from err
    if not isinstance(scheduler_config, Mapping):
        try:
            scheduler_config = dict(scheduler_config)
        except (TypeError, ValueError) as err:
            raise InputError("scheduler_config must be a mapping or a path to a JSON file, "
                             f"got {type(scheduler_config).__name__}") from err
    return {k: v for k, v in dict(scheduler_config).items() if not str(k).startswith("_")}


# --------------------------------------------------------------------------- discrete


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit-exactly.

    torch's CPU kernel computes ``start + step * i`` for the first half and
    ``end - step * (steps - 1 - i)`` for the second, with a fused multiply-add in float32;
    an exact float64 product followed by one rounding to float32 reproduces it.
    """
    if steps == 1:
        return np.asarray([start], np.float32)
    st, en = np.float32(start), np.float32(end)
    step = np.float64((en - st) / np.float32(steps - 1))
    idx = np.arange(steps)
    first = (np.float64(st) + step * idx).astype(np.float32)
    second = (np.float64(en) - step * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, first, second)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 tensor (accumulates in double, rounds each output)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def cosine_alpha_bar_np(t: np.ndarray | float, s: float = 0.008) -> np.ndarray:
    """Unnormalised iDDPM ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)`` (Nichol & Dhariwal eq. 17)."""
    return np.cos((np.asarray(t, np.float64) + s) / (1 + s) * math.pi / 2) ** 2


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: shift/scale ``sqrt(alpha_bar)`` so the last step has SNR 0.

    float32 in and out, with the operation order of diffusers' implementation.
    """
    betas = np.asarray(betas, np.float32)
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    a0, a_t = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - a_t) * np.float32(a0 / (a0 - a_t))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """float32 betas ``[N]`` of a diffusers scheduler config (DDPM/DDIM/Euler/DPM agree)."""
    n = int(config.get("num_train_timesteps", 1000))
    if n < 2:
        raise InputError(f"num_train_timesteps must be >= 2, got {n}")
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = np.asarray(trained, np.float32)
        if betas.shape != (n,):
            raise InputError(f"trained_betas has shape {betas.shape}, expected ({n},)")
    elif schedule == "linear":
        betas = torch_linspace_f32(start, end, n)
    elif schedule == "scaled_linear":
        betas = torch_linspace_f32(start ** 0.5, end ** 0.5, n) ** 2
    elif schedule == "squaredcos_cap_v2":
        f = cosine_alpha_bar_np
        i = np.arange(n)
        betas = np.minimum(1 - f((i + 1) / n) / f(i / n), 0.999).astype(np.float32)
    elif schedule == "sigmoid":
        x = torch_linspace_f32(-6.0, 6.0, n)
        sig = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
        betas = (sig * np.float32(end - start) + np.float32(start)).astype(np.float32)
    else:
        raise InputError(f"unsupported beta_schedule {schedule!r}; expected one of {BETA_SCHEDULES}")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
        raise InputError("betas must lie in (0, 1]")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The training noise levels of a diffusers scheduler config.

    Attributes:
      betas: ``[N]`` float32.
      alphas_cumprod: ``[N]`` float32, ``alpha_bar_i = prod_{j<=i} (1 - beta_j)``; exactly what
        diffusers' schedulers hold (``x_i = sqrt(alpha_bar_i) x_0 + sqrt(1 - alpha_bar_i) eps``).
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @classmethod
    def from_config(cls, scheduler_config) -> "DiscreteSchedule":
        config = load_scheduler_config(scheduler_config)
        betas = make_betas(config)
        return cls(betas=betas, alphas_cumprod=_cumprod_f32(np.float32(1.0) - betas))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_bar(self, timesteps) -> jnp.ndarray:
        """``alpha_bar`` at integer training timesteps (any shape), float32."""
        return jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]

    def continuous(self) -> "InterpolatedSchedule":
        """The continuous-time version: equals this schedule at ``t = (i + 1) / N``."""
        return InterpolatedSchedule.from_alphas_cumprod(self.alphas_cumprod)


# --------------------------------------------------------------------------- continuous


class ContinuousSchedule:
    """Base class: a VP schedule as differentiable functions of ``t`` in ``[0, 1]``.

    Subclasses define :meth:`alpha` (= ``sqrt(alpha_bar)``); the rest follows. ``logsnr`` is
    ``lambda(t)`` of Kingma et al. 2021 (VDM).
    """

    def alpha(self, t) -> jnp.ndarray:
        raise NotImplementedError

    def alpha_bar(self, t) -> jnp.ndarray:
        return self.alpha(t) ** 2

    def sigma(self, t) -> jnp.ndarray:
        return jnp.sqrt(jnp.clip(1.0 - self.alpha_bar(t), 0.0, 1.0))

    def alpha_sigma(self, t) -> tuple[jnp.ndarray, jnp.ndarray]:
        a = self.alpha(t)
        return a, jnp.sqrt(jnp.clip(1.0 - a * a, 0.0, 1.0))

    def logsnr(self, t) -> jnp.ndarray:
        a_bar = self.alpha_bar(t)
        return jnp.log(a_bar) - jnp.log1p(-a_bar)

    def model_time(self, t) -> jnp.ndarray:
        """What the denoising network is fed as its time input at ``t``."""
        return jnp.asarray(t, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class CosineSchedule(ContinuousSchedule):
    """iDDPM cosine schedule in closed form (Nichol & Dhariwal 2021, eq. 17).

    ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)``. Equals the
    discrete ``"squaredcos_cap_v2"`` schedule at ``t = (i + 1) / N`` wherever its 0.999 beta
    cap is inactive (all steps but the last few). ``alpha_bar(1) = 0`` (zero terminal SNR).
    This is the schedule of the diffusion autoencoder (Rampas 2024), whose network takes
    ``t`` itself as time input.
    """

    s: float = 0.008

    def alpha(self, t) -> jnp.ndarray:
        t = jnp.asarray(t, jnp.float32)
        scale = 0.5 * math.pi / (1.0 + self.s)
        # cos is clipped at 0 so t slightly above 1 cannot flip the sign.
        return jnp.maximum(jnp.cos((t + self.s) * scale), 0.0) / math.cos(self.s * scale)


@dataclasses.dataclass(frozen=True, eq=False)
class InterpolatedSchedule(ContinuousSchedule):
    """A discrete schedule made continuous: monotone cubic (PCHIP) interpolation of
    ``sqrt(alpha_bar)`` through the knots ``(0, 1)`` and ``((i + 1) / N, sqrt(alpha_bar_i))``.

    Exact at the knots, continuously differentiable (so gradients w.r.t. ``t`` are finite and
    agree with finite differences), monotone (Fritsch & Carlson 1980), and it handles the
    zero-terminal-SNR rescale, where ``alpha_bar`` reaches 0. The network time input is the
    (fractional) training timestep ``t * N - 1``, as Stable Diffusion's UNet expects.
    """

    knots: np.ndarray   # [N + 1] float64: sqrt(alpha_bar) at t = j / N
    slopes: np.ndarray  # [N + 1] float64: d sqrt(alpha_bar) / d t at the knots

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "InterpolatedSchedule":
        ac = np.asarray(alphas_cumprod, np.float64)
        y = np.sqrt(np.concatenate([[1.0], ac]))
        n = ac.shape[0]
        return cls(knots=y, slopes=_pchip_slopes(y, 1.0 / n))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.knots.shape[0] - 1)

    def alpha(self, t) -> jnp.ndarray:
        n = self.num_train_timesteps
        u = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0) * n
        j = jnp.clip(jnp.floor(u), 0, n - 1).astype(jnp.int32)
        s = u - j  # in [0, 1]; the gradient w.r.t. t flows through s
        y = jnp.asarray(self.knots, jnp.float32)
        d = jnp.asarray(self.slopes / n, jnp.float32)  # slopes per unit of u
        s2, s3 = s * s, s * s * s
        h00, h10 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s
        h01, h11 = -2 * s3 + 3 * s2, s3 - s2
        out = h00 * y[j] + h10 * d[j] + h01 * y[j + 1] + h11 * d[j + 1]
        return jnp.maximum(out, 0.0)

    def model_time(self, t) -> jnp.ndarray:
        return t_to_timestep(t, self.num_train_timesteps)


def _pchip_slopes(y: np.ndarray, h: float) -> np.ndarray:
    """Fritsch-Carlson monotone slopes for uniformly spaced knots (as scipy's PCHIP)."""
    delta = np.diff(y) / h
    d = np.zeros_like(y)
    same_sign = delta[:-1] * delta[1:] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = 2.0 / (1.0 / delta[:-1] + 1.0 / delta[1:])
    d[1:-1] = np.where(same_sign, harmonic, 0.0)

    def end_slope(d0, d1):  # one-sided three-point estimate, kept shape-preserving
        m = (3 * d0 - d1) / 2
        if np.sign(m) != np.sign(d0):
            return 0.0
        if np.sign(d0) != np.sign(d1) and abs(m) > abs(3 * d0):
            return 3 * d0
        return m

    d[0] = end_slope(delta[0], delta[1])
    d[-1] = end_slope(delta[-1], delta[-2])
    return d


def t_to_timestep(t, num_train_timesteps: int) -> jnp.ndarray:
    """Continuous ``t`` in ``[0, 1]`` -> fractional training timestep ``t * N - 1``."""
    return jnp.asarray(t, jnp.float32) * num_train_timesteps - 1.0


def timestep_to_t(timestep, num_train_timesteps: int) -> jnp.ndarray:
    """Training timestep ``i`` -> continuous ``t = (i + 1) / N``."""
    return (jnp.asarray(timestep, jnp.float32) + 1.0) / num_train_timesteps


def continuous_schedule(scheduler_config) -> InterpolatedSchedule:
    """The continuous-time version of a diffusers scheduler config (exact at its grid)."""
    return DiscreteSchedule.from_config(scheduler_config).continuous()
