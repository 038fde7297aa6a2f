"""Sharded sampling on 8 fake CPU devices equals the single-device result; no retracing."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffusion_ref import SD21, SD21_BASE

from diffjax.diffusion import CFG, initial_noise_scale, make_sampler, sample
from diffjax.errors import InputError
from diffjax.train.sharding import batch_sharding, logical_param_shardings, make_mesh

B, H, W, C = 8, 8, 8, 4
TOL = dict(rtol=1e-5, atol=1e-5)


class TinyDenoiser(nn.Module):
    """Two Dense layers over channels with logical axis names (``embed`` -> ``fsdp``)."""

    features: int = 16

    @nn.compact
    def __call__(self, x, t, cond=None):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(self.features, name="inp",
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        h = jnp.tanh(h * jnp.cos(t / 1000.0) + jnp.sin(t / 500.0))
        if cond is not None:
            h = h + cond["ctx"]
        return nn.Dense(x.shape[-1], name="out",
                        kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(h)


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() == 8, "conftest must fake 8 CPU devices"
    model = TinyDenoiser()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, H, W, C)), jnp.float32)
    t = jnp.float32(500.0)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    shardings = logical_param_shardings(abstract, mesh)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t))
    params = jax.device_put(params, shardings)
    return model, x, mesh, shardings, params


def _unsharded(model, params, x, **kwargs):
    params = jax.device_get(params)
    cond = kwargs.pop("cond", None)
    if cond is None:
        def fn(x_t, t):
            return model.apply(params, x_t, t)
    else:
        def fn(x_t, t, c):
            return model.apply(params, x_t, t, c)
    return jax.jit(lambda x: sample(fn, x, scheduler_config=SD21, cond=cond, **kwargs))(
        jax.device_get(x))


def test_parameters_split_by_logical_rules(setup):
    _, _, mesh, shardings, params = setup
    kernel = params["params"]["inp"]["kernel"]
    assert shardings["params"]["inp"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (C // 2, 16)  # really split in two


def test_sharded_equals_single_device_and_does_not_retrace(setup):
    model, x, mesh, shardings, params = setup
    chex.clear_trace_counter()
    def apply(p, x_t, t):
        return model.apply(p, x_t, t)

    apply_fn = chex.assert_max_traces(apply, n=1)
    run = make_sampler(apply_fn, scheduler_config=SD21, sampler="ddim", num_inference_steps=10,
                       mesh=mesh, param_shardings=shardings)
    out = run(params, x)
    assert out.sharding.is_equivalent_to(batch_sharding(mesh), out.ndim)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, _unsharded(model, params, x, sampler="ddim",
                                               num_inference_steps=10), **TOL)
    # new values, a partial start: same executable (assert_max_traces would raise otherwise)
    for start in (3, 9):
        part = run(params, x * 0.5, start_step=start)
        ref = _unsharded(model, params, x * 0.5, sampler="ddim", num_inference_steps=10,
                         start_step=start)
        np.testing.assert_allclose(part, ref, **TOL)
    assert run.jitted._cache_size() == 1


def test_sharded_stochastic_sampler_and_cfg(setup):
    """Per-step noise does not depend on the sharding; CFG doubles the sharded batch."""
    model, x, mesh, shardings, params = setup
    key = jax.random.PRNGKey(5)
    ctx = jnp.linspace(-1, 1, B * 16).reshape(B, 1, 1, 16)
    null = jnp.zeros_like(ctx)
    run = make_sampler(model.apply, scheduler_config=SD21_BASE, sampler="euler_ancestral",
                       num_inference_steps=6, mesh=mesh, param_shardings=shardings,
                       guidance_scale=4.0)
    x0 = x * initial_noise_scale(run.plan)
    out = run(params, x0, key=key, cond={"ctx": ctx}, uncond={"ctx": null})
    params_host = jax.device_get(params)
    ref = jax.jit(lambda x: sample(
        lambda x_t, t, c: model.apply(params_host, x_t, t, c), x, scheduler_config=SD21_BASE,
        sampler="euler_ancestral", num_inference_steps=6, key=key,
        guidance=CFG(4.0, {"ctx": null}), cond={"ctx": ctx}))(jax.device_get(x0))
    np.testing.assert_allclose(out, ref, **TOL)


def test_unsharded_entry_point(setup):
    model, x, _, _, params = setup
    params = jax.device_get(params)
    run = make_sampler(model.apply, scheduler_config=SD21, sampler="dpmsolver++",
                       num_inference_steps=8)
    np.testing.assert_allclose(run(params, x), _unsharded(model, params, x, sampler="dpmsolver++",
                                                          num_inference_steps=8), **TOL)


def test_sharded_bad_inputs(setup):
    model, x, mesh, shardings, params = setup
    run = make_sampler(model.apply, scheduler_config=SD21, num_inference_steps=4, mesh=mesh,
                       param_shardings=shardings, guidance_scale=2.0)
    with pytest.raises(InputError, match="multiple of"):
        run(params, x[:6])
    with pytest.raises(InputError, match="cond= and uncond="):
        run(params, x)
    with pytest.raises(InputError, match="start_step"):
        run(params, x, start_step=4, cond={"ctx": 0}, uncond={"ctx": 0})
