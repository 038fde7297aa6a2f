"""Sampler parity with diffusers' schedulers (torch CPU), step by step.

For a fixed deterministic denoise function implemented identically in JAX and torch, every
intermediate sample (and x0 estimate, where diffusers exposes it) of diffjax's jitted loop
must match diffusers' scheduler loop to 1e-5. Stochastic samplers get the same noise
(diffusers' ``randn_tensor`` is patched to return diffjax's ``step_noise``).
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffusion_ref import (
    SD21,
    SD21_BASE,
    denoise_jax,
    denoise_torch,
    run_diffusers,
    scheduler_class,
    step_noises,
)

from diffjax.diffusion import (
    CFG,
    SAMPLERS,
    initial_noise_scale,
    make_plan,
    run_plan,
    sample,
    sdedit,
    sdedit_start_step,
)
from diffjax.errors import InputError

TOL = dict(rtol=1e-5, atol=1e-5)
SHAPE = (2, 8, 8, 4)
NAMES = ["ddpm", "ddim", "euler", "euler_ancestral", "dpmsolver++"]
KEY = jax.random.PRNGKey(7)


@pytest.fixture(scope="module")
def noise():
    return np.asarray(jax.random.normal(jax.random.PRNGKey(1), SHAPE))


def _compare(name, config, n, x_vp, *, start=0, eta=0.0, full_run=False, tol=TOL):
    """Run both sides; assert every intermediate sample and x0 estimate agree."""
    plan = make_plan(config, name, n)
    stochastic = SAMPLERS[name].stochastic(plan.config, eta)
    fn = jax.jit(lambda x, key: run_plan(plan, denoise_jax, x, start_step=start, key=key,
                                         eta=eta, return_trajectory=True))
    final, traj = fn(jnp.asarray(x_vp), KEY)
    noises = step_noises(KEY, plan.num_steps, SHAPE) if stochastic else None
    if full_run:  # diffusers pipelines start from eps * init_noise_sigma
        sch = scheduler_class(name).from_config(config)
        sch.set_timesteps(n)
        x_work = x_vp / initial_noise_scale(plan) * float(sch.init_noise_sigma)
    else:
        x_work = x_vp * plan.scale[start]
    np.testing.assert_allclose(x_vp * plan.scale[start], x_work, rtol=1e-6, atol=1e-6)
    sch, xs, x0s = run_diffusers(name, config, n, x_work, start=start, noises=noises, eta=eta)
    # equal, up to torch's float32 log for the continuous (0.25 log sigma) Euler timesteps
    np.testing.assert_allclose(plan.timesteps, sch.timesteps.numpy().astype(np.float32),
                               rtol=2e-6, atol=0)
    assert traj["x"].shape == (plan.num_steps - start,) + SHAPE
    for k, (ref_x, ref_x0) in enumerate(zip(xs, x0s)):
        i = start + k
        np.testing.assert_allclose(np.asarray(traj["x"][k]) * plan.scale[i + 1], ref_x,
                                   err_msg=f"{name} step {i}", **tol)
        if ref_x0 is not None:
            np.testing.assert_allclose(traj["x0"][k], ref_x0, err_msg=f"{name} x0 {i}", **tol)
    np.testing.assert_allclose(final, xs[-1] / plan.scale[plan.num_steps], **tol)
    assert np.isfinite(xs[-1]).all() and np.abs(xs[-1]).max() > 0.1  # a non-trivial run


FAST_CASES = [(name, cfg, n, start) for name in NAMES for cfg, n, start in
              [(SD21, 10, 0), (SD21_BASE, 25, 0), (SD21, 20, 7)]]


@pytest.mark.parametrize("name,config,n,start", FAST_CASES,
                         ids=[f"{c[0]}-{c[1]['prediction_type']}-{c[2]}-from{c[3]}"
                              for c in FAST_CASES])
def test_parity_sd21(name, config, n, start, noise):
    _compare(name, config, n, noise, start=start, full_run=start == 0)


# Less common scheduler options, each against the same diffusers class.
OPTION_CASES = [
    ("ddim", dict(SD21, timestep_spacing="trailing", rescale_betas_zero_snr=True), 8, 0.0),
    ("ddim", dict(SD21_BASE, set_alpha_to_one=True), 6, 0.7),
    ("ddpm", dict(SD21_BASE, thresholding=True, sample_max_value=1.5), 6, 0.0),
    ("euler", dict(SD21, use_karras_sigmas=True, timestep_spacing="leading"), 8, 0.0),
    ("dpmsolver++", dict(SD21_BASE, algorithm_type="sde-dpmsolver++"), 8, 0.0),
]
SLOW_OPTION_CASES = [
    ("ddpm", {"clip_sample": True, "variance_type": "fixed_large"}, 6, 0.0),
    ("euler", dict(SD21_BASE, timestep_spacing="trailing", final_sigmas_type="sigma_min"), 8, 0.0),
    ("euler_ancestral", dict(SD21_BASE, timestep_spacing="trailing"), 8, 0.0),
    ("dpmsolver++", dict(SD21, solver_type="heun", use_karras_sigmas=True), 20, 0.0),
    ("dpmsolver++", dict(SD21_BASE, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                         final_sigmas_type="sigma_min"), 16, 0.0),
    ("dpmsolver++", dict(SD21, algorithm_type="sde-dpmsolver++", solver_type="heun"), 10, 0.0),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"), 10, 1.0),
    ("ddpm", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                  clip_sample=False), 20, 0.0),
]


@pytest.mark.parametrize("name,config,n,eta", OPTION_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(OPTION_CASES)])
def test_parity_scheduler_options(name, config, n, eta, noise):
    _compare(name, config, n, noise, eta=eta, full_run=True)


@pytest.mark.slow
@pytest.mark.parametrize("name,config,n,eta", SLOW_OPTION_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SLOW_OPTION_CASES)])
def test_parity_scheduler_options_slow(name, config, n, eta, noise):
    _compare(name, config, n, noise, eta=eta, full_run=True)


SLOW_CASES = [(name, cfg, n, start) for name in NAMES
              for cfg in (SD21, SD21_BASE) for n, start in [(1, 0), (5, 0), (50, 0), (50, 45)]]


@pytest.mark.slow
@pytest.mark.parametrize("name,config,n,start", SLOW_CASES)
def test_parity_sd21_more_steps(name, config, n, start, noise):
    _compare(name, config, n, noise, start=start, full_run=start == 0)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    dict(SD21_BASE, solver_order=1), dict(SD21, lower_order_final=False, euler_at_final=True),
    dict(SD21, timestep_spacing="leading", use_exponential_sigmas=True),
    dict(SD21, use_beta_sigmas=True), dict(SD21, thresholding=True, sample_max_value=2.0),
])
def test_parity_dpm_options_slow(config, noise):
    _compare("dpmsolver++", config, 12, noise, full_run=True)


# Zero terminal SNR in Karras space: diffusers sets alpha_bar[-1] = 2^-24, so sigma_max = 4096
# and the first x0 = x - sigma * eps cancels terms of size 4096 |eps|: float32 resolves it to
# about 4096 * 2^-24 * |x| ~ 1e-3, in diffusers as here. The tolerance says so.
ZSNR_TOL = dict(rtol=1e-5, atol=4096 * 2.0 ** -24 * 16)


@pytest.mark.slow
@pytest.mark.parametrize("config,tol", [
    (dict(SD21, timestep_type="continuous"), TOL),
    (dict(SD21_BASE, interpolation_type="log_linear"), TOL),
    (dict(SD21_BASE, use_exponential_sigmas=True), TOL),
    (dict(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing"), ZSNR_TOL),
])
def test_parity_euler_options_slow(config, tol, noise):
    _compare("euler", config, 10, noise, full_run=True, tol=tol)


def test_defaults_match_diffusers_signatures():
    """Sampler-specific defaults are those of the diffusers class (what from_config uses)."""
    for sampler in SAMPLERS.values():
        params = inspect.signature(scheduler_class(sampler.name).__init__).parameters
        for key, value in sampler.defaults.items():
            assert key in params, (sampler.name, key)
            assert params[key].default == value, (sampler.name, key, params[key].default, value)


def test_traced_start_step_matches_static(noise):
    """One executable serves every start step (Relic-style partial decoding)."""
    plan = make_plan(SD21, "ddim", 20)
    traced = jax.jit(lambda x, s: run_plan(plan, denoise_jax, x, start_step=s))
    for start in (0, 7, 19):
        static = run_plan(plan, denoise_jax, jnp.asarray(noise), start_step=start)
        np.testing.assert_allclose(traced(noise, start), static, rtol=1e-6, atol=1e-6)
    assert traced._cache_size() == 1


def test_dpm_traced_start_is_first_order(noise):
    plan = make_plan(SD21, "dpmsolver++", 20)
    fn = jax.jit(lambda x, s: run_plan(plan, denoise_jax, x, start_step=s))
    ref = run_plan(plan, denoise_jax, jnp.asarray(noise), start_step=5, return_trajectory=True)
    np.testing.assert_allclose(fn(noise, 5), ref[0], rtol=1e-6, atol=1e-6)


def test_sdedit_matches_img2img(noise):
    """SDEdit = diffusers img2img: add_noise at timesteps[t_start], then denoise from there."""
    import torch

    x0 = np.tanh(noise)
    for name, n, strength in [("ddim", 20, 0.35), ("euler", 10, 0.6), ("dpmsolver++", 10, 0.5)]:
        plan = make_plan(SD21, name, n)
        eps = np.asarray(jax.random.normal(jax.random.PRNGKey(3), SHAPE))
        out, traj = sdedit(denoise_jax, x0, scheduler_config=SD21, strength=strength,
                           key=KEY, sampler=name, num_inference_steps=n, noise=eps,
                           return_trajectory=True)
        start = sdedit_start_step(n, strength)
        sch = scheduler_class(name).from_config(SD21)
        sch.set_timesteps(n)
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(start)
        to_t = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)  # noqa: E731
        x_work = sch.add_noise(to_t(x0), to_t(eps), sch.timesteps[start:start + 1])
        x_work = x_work.permute(0, 2, 3, 1).numpy()
        _, xs, _ = run_diffusers(name, SD21, n, x_work, start=start)
        assert traj["x"].shape[0] == len(xs) == n - start
        np.testing.assert_allclose(out, xs[-1], **TOL)


def test_cfg_matches_diffusers_pipeline_guidance(noise):
    """CFG on the doubled batch, with guidance_rescale, against diffusers' own helper."""
    import torch
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    ctx = np.linspace(-1, 1, SHAPE[0] * SHAPE[-1], dtype=np.float32).reshape(SHAPE[0], 1, 1, -1)
    null = np.zeros_like(ctx)
    scale, rescale = 5.0, 0.7

    def f_jax(x, t, cond):
        return denoise_jax(x, t) + 0.5 * jnp.tanh(cond["ctx"] * x)

    def f_torch_cfg(x, t):
        both = torch.cat([x, x])
        c = torch.from_numpy(np.concatenate([null, ctx])).permute(0, 3, 1, 2)
        out = denoise_torch(both, t) + 0.5 * torch.tanh(c * both)
        u, c_out = out.chunk(2)
        guided = u + scale * (c_out - u)
        return rescale_noise_cfg(guided, c_out, guidance_rescale=rescale)

    guidance = CFG(scale, {"ctx": jnp.asarray(null)}, rescale=rescale)
    plan = make_plan(SD21, "euler", 8)
    out = sample(f_jax, noise * initial_noise_scale(plan), scheduler_config=SD21,
                 sampler="euler", num_inference_steps=8, guidance=guidance,
                 cond={"ctx": jnp.asarray(ctx)})
    sch = scheduler_class("euler").from_config(SD21)
    sch.set_timesteps(8)
    _, xs, _ = run_diffusers("euler", SD21, 8, noise * float(sch.init_noise_sigma),
                             cond_fn=f_torch_cfg)
    np.testing.assert_allclose(out, xs[-1], **TOL)


def test_cond_pytree_passes_through_untouched(noise):
    """Cross-attention context, concatenated latents and control residuals arrive as given."""
    cond = {"context": jnp.ones((2, 3, 5)), "concat": jnp.full((2, 8, 8, 2), 0.5),
            "control": [jnp.full((2, 4, 4, 4), 0.25), jnp.full((2, 8, 8, 4), 0.1)]}
    seen = []

    def with_cond(x, t, c):
        seen.append(jax.tree.structure(c))
        assert [a.shape for a in jax.tree.leaves(c)] == [a.shape for a in jax.tree.leaves(cond)]
        return denoise_jax(x, t) + c["concat"].mean(-1, keepdims=True) * c["control"][1]

    def closure(x, t):
        return denoise_jax(x, t) + cond["concat"].mean(-1, keepdims=True) * cond["control"][1]

    a = jax.jit(lambda x, c: sample(with_cond, x, scheduler_config=SD21, cond=c,
                                    num_inference_steps=5))(noise, cond)
    b = sample(closure, jnp.asarray(noise), scheduler_config=SD21, num_inference_steps=5)
    assert seen and all(s == jax.tree.structure(cond) for s in seen)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="plms"), "unknown sampler"),
    (dict(sampler="euler", eta=0.5), "eta applies to the DDIM"),
    (dict(sampler="ddpm"), "pass key="),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=1001), "num_inference_steps"),
    (dict(start_step=10, num_inference_steps=10), "start_step"),
    (dict(scheduler_config=dict(SD21, prediction_type="flow")), "prediction_type"),
    (dict(scheduler_config=dict(SD21, beta_schedule="quadratic")), "beta_schedule"),
    (dict(scheduler_config=dict(SD21, timestep_spacing="uniform")), "timestep_spacing"),
    (dict(sampler="dpmsolver++", scheduler_config=dict(SD21, solver_order=3)), "solver_order"),
    (dict(sampler="ddpm", key=KEY, scheduler_config=dict(SD21, variance_type="learned")),
     "variance_type"),
    (dict(scheduler_config=dict(SD21, steps_offset=50), num_inference_steps=20), "outside"),
    (dict(scheduler_config="/nonexistent/scheduler_config.json"), "cannot read"),
    (dict(guidance=3.0), "guidance must be callable"),
])
def test_bad_input_raises_diffjax_error(kwargs, match, noise):
    args = dict(scheduler_config=SD21, num_inference_steps=10)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        sample(denoise_jax, jnp.asarray(noise), **args)


def test_wrong_model_output_shape_raises(noise):
    with pytest.raises(InputError, match="denoise_fn returned shape"):
        sample(lambda x, t: x[..., :2], jnp.asarray(noise), scheduler_config=SD21,
               num_inference_steps=3)


def test_integer_input_raises():
    with pytest.raises(InputError, match="floating"):
        sample(denoise_jax, jnp.zeros(SHAPE, jnp.int32), scheduler_config=SD21)


def test_scheduler_config_json_file(tmp_path, noise):
    import json

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD21))
    a = sample(denoise_jax, jnp.asarray(noise), scheduler_config=str(path), num_inference_steps=4)
    b = sample(denoise_jax, jnp.asarray(noise), scheduler_config=SD21, num_inference_steps=4)
    np.testing.assert_array_equal(a, b)


def test_start_step_for_t_drives_partial_decoding(noise):
    """A codec-predicted continuous t picks the start step inside one compiled function."""
    from diffjax.diffusion import start_step_for_t

    plan = make_plan(SD21, "ddim", 50)
    pick = jax.jit(lambda t: start_step_for_t(t, plan))
    for i in (0, 13, 49):
        t = (float(plan.timesteps[i]) + 1.0) / 1000.0  # t = (timestep + 1) / N
        assert int(pick(t)) == i
        assert int(pick(t + 0.004)) == i  # nearest grid step (grid spacing 0.02)
    decode = jax.jit(lambda x, t: run_plan(plan, denoise_jax, x,
                                           start_step=start_step_for_t(t, plan)))
    for t in (0.1, 0.33):
        start = int(pick(t))
        ref = run_plan(plan, denoise_jax, jnp.asarray(noise), start_step=start)
        np.testing.assert_allclose(decode(noise, t), ref, rtol=1e-6, atol=1e-6)
    assert decode._cache_size() == 1
