"""Schedules: bit-exact with diffusers; continuous versions exact at the grid, smooth in t."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffusion_ref import SD21

from diffjax.diffusion import (
    CosineSchedule,
    DiscreteSchedule,
    continuous_schedule,
    standard_normal,
    t_to_timestep,
    timestep_to_t,
)
from diffjax.diffusion.schedules import load_scheduler_config
from diffjax.errors import InputError

CONFIGS = [
    dict(SD21),
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD21, rescale_betas_zero_snr=True),
    dict(beta_schedule="linear", rescale_betas_zero_snr=True, num_train_timesteps=500),
    dict(beta_schedule="sigmoid", beta_start=0.0001, beta_end=0.02),
    dict(trained_betas=list(np.linspace(1e-4, 0.02, 1000))),
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_betas_and_alphas_cumprod_bit_exact(config):
    import diffusers

    ref = diffusers.DDPMScheduler.from_config(config)
    sched = DiscreteSchedule.from_config(config)
    if config.get("rescale_betas_zero_snr") or config.get("beta_schedule") == "sigmoid":
        # torch's CPU float32 sqrt and sigmoid are not correctly rounded (about 1 in 5 sqrt
        # results is 1 ulp off IEEE), and Lin et al.'s rescale goes through sqrt(alpha_bar):
        # equal to the float32 noise floor instead of bit for bit.
        np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(),
                                   rtol=1e-5, atol=5e-7)
        np.testing.assert_allclose(sched.betas, ref.betas.numpy(), rtol=5e-3, atol=5e-6)
        if config.get("rescale_betas_zero_snr"):
            assert sched.alphas_cumprod[-1] == 0.0 == ref.alphas_cumprod[-1]
    else:
        np.testing.assert_array_equal(sched.betas, ref.betas.numpy())
        np.testing.assert_array_equal(sched.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("config", CONFIGS[:5], ids=range(5))
def test_continuous_equals_discrete_at_grid(config):
    sched = DiscreteSchedule.from_config(config)
    cont = sched.continuous()
    n = sched.num_train_timesteps
    i = np.arange(n)
    t = timestep_to_t(i, n)
    a_bar = np.asarray(jax.jit(cont.alpha_bar)(t))
    np.testing.assert_allclose(a_bar, sched.alphas_cumprod, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.jit(t_to_timestep, static_argnums=1)(t, n)), i,
                               atol=1e-3)
    assert float(cont.alpha_bar(0.0)) == 1.0
    # logSNR is strictly decreasing between (and across) the knots: monotone interpolation.
    lam = np.asarray(jax.jit(cont.logsnr)(np.linspace(0.0005, 0.999, 4001, dtype=np.float32)))
    assert np.all(np.diff(lam) < 0)


def test_continuous_gradients_are_finite_and_match_finite_differences():
    cont = continuous_schedule(SD21)
    t = jnp.asarray([0.013, 0.25, 0.5004, 0.77, 0.9871])  # between and near knots
    h = 2e-3

    @jax.jit
    def values_and_grads(t):
        out = {}
        for name in ("alpha", "sigma", "logsnr"):
            fn = getattr(cont, name)
            out[name] = (jax.vmap(jax.grad(fn))(t),
                         [fn(t + d) - fn(t - d) for d in (h / 2, h)])
        return out

    for name, (grad, (d_half, d_full)) in values_and_grads(t).items():
        assert np.all(np.isfinite(grad)), name
        # Richardson extrapolation cancels the h^2 term of the central difference
        fd = (4 * np.asarray(d_half, np.float64) / h - np.asarray(d_full, np.float64) / (2 * h)) / 3
        np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3, err_msg=name)
    # gradient through alpha(t) at an exact knot (t = (i + 1) / N) is finite too
    knot = timestep_to_t(499, 1000)
    assert np.isfinite(float(jax.jit(jax.grad(cont.alpha))(knot)))


def test_cosine_closed_form_equals_squaredcos_cap_v2():
    """iDDPM eq. 17: alpha_bar_i = f((i+1)/N) / f(0), except where the 0.999 cap acts."""
    sched = DiscreteSchedule.from_config(dict(beta_schedule="squaredcos_cap_v2"))
    n = sched.num_train_timesteps
    capped = sched.betas >= np.float32(0.999)
    assert 0 < capped.sum() <= 2  # only the last step(s)
    first_cap = np.argmax(capped)
    t = timestep_to_t(np.arange(n), n)
    closed = np.asarray(CosineSchedule().alpha_bar(t))
    np.testing.assert_allclose(closed[:first_cap], sched.alphas_cumprod[:first_cap],
                               rtol=1e-5, atol=1e-6)
    assert float(CosineSchedule().alpha_bar(0.0)) == pytest.approx(1.0, abs=1e-7)
    assert float(CosineSchedule().alpha_bar(1.0)) < 1e-8
    # the gradient of the closed form w.r.t. t matches its analytic derivative
    s = 0.008
    t0 = 0.3
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    analytic = -np.pi / (1 + s) * np.cos((t0 + s) / (1 + s) * np.pi / 2) * \
        np.sin((t0 + s) / (1 + s) * np.pi / 2) / f(0.0)
    assert float(jax.grad(CosineSchedule().alpha_bar)(t0)) == pytest.approx(analytic, rel=1e-4)


def test_zero_terminal_snr_continuous_endpoints():
    cont = continuous_schedule(dict(SD21, rescale_betas_zero_snr=True))
    assert float(cont.alpha(1.0)) == 0.0
    assert float(cont.sigma(1.0)) == 1.0
    assert float(cont.logsnr(1.0)) == -np.inf
    assert np.isfinite(float(jax.grad(cont.alpha)(0.999)))


def test_load_scheduler_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD21))
    assert load_scheduler_config(path) == {k: v for k, v in SD21.items() if k[0] != "_"}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        load_scheduler_config(tmp_path / "bad.json")
    with pytest.raises(InputError, match="mapping"):
        load_scheduler_config(42)


@pytest.mark.parametrize("config,match", [
    (dict(trained_betas=[0.1, 0.2]), "trained_betas has shape"),
    (dict(beta_schedule="cubic"), "beta_schedule"),
    (dict(beta_start=-0.1), "betas must lie"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
])
def test_bad_schedule_config_raises(config, match):
    with pytest.raises(InputError, match=match):
        DiscreteSchedule.from_config(config)


def test_standard_normal_equals_jax():
    key = jax.random.PRNGKey(3)
    # (a small rank-4 shape: jax.random.normal itself compiles slowly for big rank-4 shapes)
    np.testing.assert_array_equal(standard_normal(key, (2, 2, 2, 3)),
                                  jax.random.normal(key, (2, 2, 2, 3)))
