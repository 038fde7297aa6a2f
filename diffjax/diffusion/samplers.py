"""Samplers as pure step functions: DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++(2M).

Each sampler has two halves:

* ``plan(config, n)`` (host, numpy, static): the inference timesteps and every per-step
  constant, built exactly as the matching diffusers scheduler builds them (same spacing
  rules, same float32 tables), so a diffusers ``scheduler_config.json`` behaves identically;
* ``step(plan, tab, i, x, model_output, carry, noise, first, eta)`` (jittable): one update of
  the working sample ``x``, with ``tab = plan.arrays()`` (the tables as arrays), ``i`` a
  (traced) step index, ``first`` whether ``i`` is the first step run (multistep solvers
  restart at order 1) and ``noise`` the step's fresh noise (``None`` for deterministic
  samplers). It returns the next sample, the ``x_0`` estimate and the multistep carry.

Working spaces: DDPM, DDIM and DPM-Solver++ work on the variance-preserving sample
``x_t = alpha x_0 + sigma eps``; the Euler samplers work in Karras et al. (2022) space
``x = x_t / alpha = x_0 + sigma_k eps``. Every plan stores the factor ``scale[i] = 1 / alpha``
between the two (1 for VP samplers), so :func:`diffjax.diffusion.sample` always takes and
returns VP samples.

References: DDPM, Ho et al. 2020 (eq. 6-7, "fixed_small" variance); DDIM, Song et al. 2021
(eq. 12, ``eta``); Euler / Euler ancestral, Karras et al. 2022 (Alg. 1) and k-diffusion;
DPM-Solver++(2M), Lu et al. 2022 (Alg. 2), SDE variant eq. in sec. 4.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import timesteps as ts
from diffjax.diffusion.parameterization import PREDICTION_TYPES, to_eps, to_x0
from diffjax.diffusion.schedules import (DiscreteSchedule, load_scheduler_config,
                                         torch_linspace_f32)
from diffjax.errors import InputError

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
               beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
               steps_offset=0, rescale_betas_zero_snr=False)
_THRESH = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_LADDERS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Static constants of one sampling run (host numpy arrays).

    Attributes:
      sampler: the sampler's name.
      config: the resolved diffusers config (class defaults + the given keys).
      timesteps: ``[S]`` float32, the model's time input at each step.
      alpha, sigma: ``[S]`` float32, VP noise level of the sample entering step ``i``.
      scale: ``[S + 1]`` float32, working-space factor (``x_work = scale * x_vp``) of the
        sample entering step ``i`` (index ``S``: the final sample).
      tables: sampler-specific ``[S]``/``[S + 1]`` arrays used by ``step``.
    """

    sampler: str
    config: dict
    timesteps: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    scale: np.ndarray
    tables: dict

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def arrays(self) -> dict:
        """All tables as jnp arrays (call inside the traced function: they become constants)."""
        out = {k: jnp.asarray(v) for k, v in self.tables.items()}
        out.update(timesteps=jnp.asarray(self.timesteps), alpha=jnp.asarray(self.alpha),
                   sigma=jnp.asarray(self.sigma), scale=jnp.asarray(self.scale))
        return out


def dynamic_threshold(x0, ratio: float, max_value: float):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3) of ``x0 [B, ...]``."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


class Sampler:
    """Base class. Subclasses set ``name``, ``diffusers_class``, ``defaults`` and implement
    ``_plan`` and ``step``."""

    name = ""
    diffusers_class = ""
    defaults: dict = {}
    unsupported: dict = {}  # config key -> allowed values

    def resolve(self, scheduler_config) -> dict:
        """Class defaults updated with the given keys the class knows (as ``from_config``)."""
        given = load_scheduler_config(scheduler_config)
        config = dict(self.defaults)
        config.update({k: v for k, v in given.items() if k in self.defaults})
        if config["prediction_type"] not in self.prediction_types():
            raise InputError(f"{self.name}: unsupported prediction_type "
                             f"{config['prediction_type']!r}; expected one of "
                             f"{self.prediction_types()}")
        for key, allowed in self.unsupported.items():
            if config.get(key) not in allowed:
                raise InputError(f"{self.name}: {key}={config.get(key)!r} is not supported "
                                 f"(supported: {allowed})")
        return config

    def prediction_types(self) -> tuple:
        return PREDICTION_TYPES

    def plan(self, scheduler_config, num_inference_steps: int) -> Plan:
        config = self.resolve(scheduler_config)
        n = int(num_inference_steps)
        if n < 1 or n > config["num_train_timesteps"]:
            raise InputError(f"num_inference_steps must be in [1, "
                             f"{config['num_train_timesteps']}], got {num_inference_steps}")
        return self._plan(config, DiscreteSchedule.from_config(config), n)

    def _plan(self, config: dict, schedule: DiscreteSchedule, n: int) -> Plan:
        raise NotImplementedError

    def stochastic(self, config: dict, eta: Any) -> bool:
        return False

    def init_carry(self, x):
        return ()

    def model_input(self, plan, tab, i, x):
        return x

    def step(self, plan, tab, i, x, out, carry, noise, first, eta):
        raise NotImplementedError

    def _clip(self, config, x0):
        if config.get("thresholding"):
            return dynamic_threshold(x0, config["dynamic_thresholding_ratio"],
                                     config["sample_max_value"])
        if config.get("clip_sample"):
            r = config["clip_sample_range"]
            return jnp.clip(x0, -r, r)
        return x0


# ----------------------------------------------------------------------------- DDPM / DDIM


class DDPM(Sampler):
    """Ancestral sampling of Ho et al. 2020: posterior mean (eq. 7) plus posterior noise."""

    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    defaults = dict(_COMMON, variance_type="fixed_small", clip_sample=True,
                    clip_sample_range=1.0, timestep_spacing="leading", **_THRESH)
    unsupported = dict(variance_type=("fixed_small", "fixed_small_log", "fixed_large"))

    def _plan(self, config, schedule, n):
        ac = schedule.alphas_cumprod
        t = ts.spaced_timesteps(config["timestep_spacing"], schedule.num_train_timesteps, n,
                                config["steps_offset"])
        _check_range(t, schedule.num_train_timesteps, self.name)
        prev = np.concatenate([t[1:], [-1]])
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
        beta_t, beta_prev = np.float32(1) - a_t, np.float32(1) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = np.float32(1) - cur_alpha
        c_x0 = np.sqrt(a_prev) * cur_beta / beta_t
        c_x = np.sqrt(cur_alpha) * beta_prev / beta_t
        if config["variance_type"] == "fixed_large":
            std = np.sqrt(cur_beta)
        else:  # fixed_small(_log): the posterior variance beta~_t (eq. 7), clamped as diffusers
            std = np.sqrt(np.maximum(beta_prev / beta_t * cur_beta, np.float32(1e-20)))
        std = np.where(t > 0, std, np.float32(0))
        return _vp_plan(self.name, config, t, a_t,
                        dict(c_x0=_f32(c_x0), c_x=_f32(c_x), std=_f32(std)))

    def stochastic(self, config, eta):
        return True

    def step(self, plan, tab, i, x, out, carry, noise, first, eta):
        x0 = self._clip(plan.config, to_x0(out, x, tab["alpha"][i], tab["sigma"][i],
                                             plan.config["prediction_type"]))
        x_prev = tab["c_x0"][i] * x0 + tab["c_x"][i] * x + tab["std"][i] * noise
        return x_prev, x0, carry


class DDIM(Sampler):
    """Song et al. 2021, eq. 12: ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z``
    with ``s = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))``."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    defaults = dict(_COMMON, clip_sample=True, set_alpha_to_one=True, clip_sample_range=1.0,
                    timestep_spacing="leading", **_THRESH)

    def _plan(self, config, schedule, n):
        ac = schedule.alphas_cumprod
        num_train = schedule.num_train_timesteps
        t = ts.spaced_timesteps(config["timestep_spacing"], num_train, n, config["steps_offset"])
        _check_range(t, num_train, self.name)
        prev = t - num_train // n  # diffusers' rule, whatever the spacing
        final = np.float32(1.0) if config["set_alpha_to_one"] else ac[0]
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
        var = (np.float32(1) - a_prev) / (np.float32(1) - a_t) * (np.float32(1) - a_t / a_prev)
        return _vp_plan(self.name, config, t, a_t,
                        dict(a_prev=_f32(a_prev), sqrt_a_prev=np.sqrt(_f32(a_prev)),
                             var=_f32(var)))

    def stochastic(self, config, eta):
        return not (isinstance(eta, (int, float)) and eta == 0)

    def step(self, plan, tab, i, x, out, carry, noise, first, eta):
        cfg = plan.config
        a, s = tab["alpha"][i], tab["sigma"][i]
        x0 = to_x0(out, x, a, s, cfg["prediction_type"])
        eps = to_eps(out, x, a, s, cfg["prediction_type"])
        x0 = self._clip(cfg, x0)
        std = eta * jnp.sqrt(tab["var"][i])
        x_prev = tab["sqrt_a_prev"][i] * x0 + jnp.sqrt(1 - tab["a_prev"][i] - std ** 2) * eps
        if noise is not None:
            x_prev = x_prev + std * noise
        return x_prev, x0, carry


def _vp_plan(name, config, t, a_t, tables) -> Plan:
    a_t = _f32(a_t)
    return Plan(sampler=name, config=config, timesteps=_f32(t), alpha=np.sqrt(a_t),
                sigma=np.sqrt(np.float32(1) - a_t), scale=np.ones(len(t) + 1, np.float32),
                tables=tables)


def _check_range(t, num_train, name):
    if t.min() < 0 or t.max() >= num_train:
        raise InputError(f"{name}: inference timesteps {t.min()}..{t.max()} fall outside "
                         f"[0, {num_train}) (check steps_offset / timestep_spacing)")


# ----------------------------------------------------------------------------- Euler family


def _euler_alphas_cumprod(config, schedule) -> np.ndarray:
    ac = schedule.alphas_cumprod.copy()
    if config["rescale_betas_zero_snr"]:
        ac[-1] = np.float32(2.0 ** -24)  # diffusers keeps sigma_max finite this way
    return ac


def _k_plan(name, config, timesteps, sigmas, tables) -> Plan:
    """Plan of a sampler in Karras space from its ``[S + 1]`` sigmas (last = final)."""
    sigmas = _f32(sigmas)
    scale = np.sqrt(sigmas ** 2 + np.float32(1)).astype(np.float32)
    s = len(timesteps)
    alpha = (np.float32(1) / scale[:s]).astype(np.float32)
    return Plan(sampler=name, config=config, timesteps=_f32(timesteps), alpha=alpha,
                sigma=(sigmas[:s] * alpha).astype(np.float32), scale=scale,
                tables=dict(tables, sig=sigmas))


class Euler(Sampler):
    """Euler method on the probability-flow ODE in Karras space (Karras et al. 2022, Alg. 1
    with ``S_churn = 0``): ``x += (x - x0) / sigma * (sigma_next - sigma)``."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    defaults = dict(_COMMON, interpolation_type="linear", sigma_min=None, sigma_max=None,
                    timestep_spacing="linspace", timestep_type="discrete",
                    final_sigmas_type="zero", **_LADDERS)
    unsupported = dict(interpolation_type=("linear", "log_linear"),
                       timestep_type=("discrete", "continuous"))

    def _plan(self, config, schedule, n):
        ac = _euler_alphas_cumprod(config, schedule)
        t = ts.spaced_timesteps(config["timestep_spacing"], schedule.num_train_timesteps, n,
                                config["steps_offset"], dtype=np.float32)
        train = ts.train_sigmas(ac)
        log_sigmas = np.log(train)
        if config["interpolation_type"] == "linear":
            sigmas = np.interp(t, np.arange(0, len(train)), train)
        else:  # log_linear: n + 1 sigmas log-uniform between the extremes (as diffusers)
            sigmas = np.exp(torch_linspace_f32(np.log(train[-1]), np.log(train[0]), n + 1))
        kind = ts.ladder_kind(config)
        if kind:
            sigmas = ts.sigma_ladder(kind, sigmas, n, config["sigma_min"], config["sigma_max"])
            t = ts.sigma_to_t(sigmas, log_sigmas)
        sigmas = _f32(np.concatenate([sigmas, [ts.final_sigma(config, ac)]]))
        if config["timestep_type"] == "continuous" and config["prediction_type"] == "v_prediction":
            t = np.float32(0.25) * np.log(sigmas[:-1])
        return _k_plan(self.name, config, t, sigmas, {})

    def prediction_types(self):
        return PREDICTION_TYPES

    def model_input(self, plan, tab, i, x):
        sig = tab["sig"][i]
        return x / (sig ** 2 + 1) ** 0.5

    def _x0(self, plan, tab, i, x, out):
        sig = tab["sig"][i]
        kind = plan.config["prediction_type"]
        if kind == "v_prediction":  # v is defined on the VP sample x / sqrt(sig^2 + 1)
            return out * (-sig / (sig ** 2 + 1) ** 0.5) + x / (sig ** 2 + 1)
        return to_x0(out, x, 1.0, sig, kind)  # eps and x0 hold in any scaling

    def step(self, plan, tab, i, x, out, carry, noise, first, eta):
        sig = tab["sig"][i]
        x0 = self._x0(plan, tab, i, x, out)
        derivative = (x - x0) / sig
        return x + derivative * (tab["sig"][i + 1] - sig), x0, carry


class EulerAncestral(Euler):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``, eta = 1): an Euler step down
    to ``sigma_down`` followed by fresh noise of std ``sigma_up``."""

    name = "euler_ancestral"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    defaults = dict(_COMMON, timestep_spacing="linspace")
    unsupported = {}

    def prediction_types(self):
        return ("epsilon", "v_prediction")  # diffusers raises for "sample" as well

    def _plan(self, config, schedule, n):
        ac = _euler_alphas_cumprod(config, schedule)
        t = ts.spaced_timesteps(config["timestep_spacing"], schedule.num_train_timesteps, n,
                                config["steps_offset"], dtype=np.float32)
        train = ts.train_sigmas(ac)
        sigmas = _f32(np.concatenate([np.interp(t, np.arange(0, len(train)), train), [0.0]]))
        s_from, s_to = sigmas[:-1], sigmas[1:]
        up = np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
        down = np.sqrt(s_to ** 2 - up ** 2)
        return _k_plan(self.name, config, t, sigmas, dict(sigma_up=_f32(up), sigma_down=_f32(down)))

    def stochastic(self, config, eta):
        return True

    def step(self, plan, tab, i, x, out, carry, noise, first, eta):
        sig = tab["sig"][i]
        x0 = self._x0(plan, tab, i, x, out)
        derivative = (x - x0) / sig
        x_next = x + derivative * (tab["sigma_down"][i] - sig) + noise * tab["sigma_up"][i]
        return x_next, x0, carry


# ----------------------------------------------------------------------------- DPM-Solver++


class DPMSolverPP(Sampler):
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Alg. 2; order 1 or 2; ODE or
    SDE variant). Every update is linear in the working sample, the current ``x_0`` estimate
    ``m0`` and the previous one ``m1``:
    ``x_next = A x + B m0 + C (m0 - m1) + N z``, with ``C = 0`` on first-order steps (the first
    step after the start and, as diffusers, the final step)."""

    name = "dpmsolver++"
    diffusers_class = "DPMSolverMultistepScheduler"
    defaults = dict(_COMMON, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                    lower_order_final=True, euler_at_final=False, use_lu_lambdas=False,
                    use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                    lambda_min_clipped=-float("inf"), variance_type=None,
                    timestep_spacing="linspace", use_dynamic_shifting=False,
                    time_shift_type="exponential", **_THRESH, **_LADDERS)
    unsupported = dict(solver_order=(1, 2), algorithm_type=("dpmsolver++", "sde-dpmsolver++"),
                       solver_type=("midpoint", "heun"), use_lu_lambdas=(False,),
                       use_flow_sigmas=(False,), use_dynamic_shifting=(False,),
                       variance_type=(None,))

    def _plan(self, config, schedule, n):
        ac = _euler_alphas_cumprod(config, schedule)
        num_train = schedule.num_train_timesteps
        lam = (np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))).astype(np.float32)
        clipped = int(np.searchsorted(lam[::-1], config["lambda_min_clipped"]))
        t = ts.dpm_timesteps(config["timestep_spacing"], num_train, num_train - clipped, n,
                             config["steps_offset"])
        train = ts.train_sigmas(ac)
        kind = ts.ladder_kind(config)
        if kind:
            sigmas = ts.sigma_ladder(kind, train[::-1].copy(), n)
            t = ts.sigma_to_t(sigmas, np.log(train))
            if kind == "karras" and config["beta_schedule"] != "squaredcos_cap_v2":
                t = t.round()
            t = t.astype(np.int64)
        else:
            _check_range(t, num_train, self.name)
            sigmas = np.interp(t, np.arange(0, len(train)), train)
        sigmas = _f32(np.concatenate([sigmas, [ts.final_sigma(config, ac)]]))
        return self._coefficients(config, t, sigmas)

    def _coefficients(self, config, t, sigmas) -> Plan:
        s = len(t)
        sig = sigmas.astype(np.float64)
        alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)
        sigma_vp = sig * alpha
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lam = np.log(alpha) - np.log(sigma_vp)  # +inf where sigma = 0
            h = lam[1:] - lam[:-1]                 # [S]
            a_t, s_t, s_s = alpha[1:], sigma_vp[1:], sigma_vp[:-1]
            e = np.exp(-h)
            sde = config["algorithm_type"] == "sde-dpmsolver++"
            if sde:
                big_a, big_b = s_t / s_s * e, a_t * (1 - e ** 2)
                noise = s_t * np.sqrt(1 - e ** 2)
                c = (0.5 * big_b if config["solver_type"] == "midpoint"
                     else a_t * ((1 - e ** 2) / (-2 * h) + 1))
            else:
                big_a, big_b = s_t / s_s, -a_t * (e - 1)
                noise = np.zeros(s)
                c = (0.5 * big_b if config["solver_type"] == "midpoint"
                     else a_t * ((e - 1) / h + 1))
            r0 = np.concatenate([[np.nan], (lam[1:s] - lam[:s - 1]) / h[1:]])  # h_0 / h
            c = c / r0
        last = np.arange(s) == s - 1
        lower_final = last & (bool(config["euler_at_final"])
                              or (bool(config["lower_order_final"]) and s < 15)
                              or config["final_sigmas_type"] == "zero")
        second = (config["solver_order"] == 2) & ~lower_final & (np.arange(s) > 0)
        c = np.where(second, c, 0.0)
        plan = _k_plan(self.name, config, t, sigmas, {})
        # DPM-Solver works on the VP sample: overwrite the Karras scale with 1.
        return dataclasses.replace(
            plan, scale=np.ones(s + 1, np.float32),
            tables=dict(A=_f32(big_a), B=_f32(big_b), C=_f32(c), N=_f32(noise),
                        second=second))

    def stochastic(self, config, eta):
        return config["algorithm_type"] == "sde-dpmsolver++"

    def init_carry(self, x):
        return jnp.zeros_like(x)

    def step(self, plan, tab, i, x, out, carry, noise, first, eta):
        cfg = plan.config
        m0 = to_x0(out, x, tab["alpha"][i], tab["sigma"][i], cfg["prediction_type"])
        if cfg["thresholding"]:
            m0 = dynamic_threshold(m0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
        c = jnp.where(first, 0.0, tab["C"][i])  # the first step after any start is order 1
        x_next = tab["A"][i] * x + tab["B"][i] * m0 + c * (m0 - carry)
        if noise is not None:
            x_next = x_next + tab["N"][i] * noise
        return x_next, m0, m0


SAMPLERS = {cls.name: cls() for cls in (DDPM, DDIM, Euler, EulerAncestral, DPMSolverPP)}
_SAMPLER_ALIASES = {
    **{s.diffusers_class: n for n, s in SAMPLERS.items()},
    "euler_a": "euler_ancestral", "dpm++2m": "dpmsolver++", "dpmsolver_multistep": "dpmsolver++",
    "dpm_solver_pp": "dpmsolver++",
}


def get_sampler(name: str) -> Sampler:
    """A sampler by name (``"ddim"``, ...) or diffusers class name (``"DDIMScheduler"``)."""
    key = _SAMPLER_ALIASES.get(name, name)
    if key not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)} "
                         f"or a diffusers class name {sorted(s.diffusers_class for s in SAMPLERS.values())}")
    return SAMPLERS[key]


def make_plan(scheduler_config, sampler: str, num_inference_steps: int) -> Plan:
    """The static plan of ``sampler`` for a diffusers config and a number of steps."""
    return get_sampler(sampler).plan(scheduler_config, num_inference_steps)
