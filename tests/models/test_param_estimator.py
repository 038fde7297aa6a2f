"""P(y, lambda) and the affine quantiser of the foundation codec (Relic et al. 2024)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from diffjax.entropy.quantize import quantize
from diffjax.models import param_estimator as pe

C = 8


@pytest.fixture(scope="module")
def model():
    net = pe.ParamEstimator(latent_channels=C, features=(16, 32))
    y = jax.random.normal(jax.random.key(0), (2, 16, 16, C))
    params = nn.unbox(net.init(jax.random.key(1), y, jnp.array([1.0, 20.0])))["params"]
    apply = jax.jit(lambda p, y, lam: net.apply({"params": p}, y, lam))
    return net, params, apply, y


def test_outputs_shapes_ranges_and_init(model):
    _, params, apply, y = model
    gamma, t = apply(params, y, jnp.array([1.0, 20.0]))
    assert gamma.shape == (2, 2, C) and t.shape == (2,)
    assert gamma.dtype == jnp.float32 and t.dtype == jnp.float32
    assert bool(jnp.all((t > 0) & (t < 1)))
    np.testing.assert_allclose(t, 0.05, atol=5e-3)        # init_t
    np.testing.assert_allclose(gamma, 0.0, atol=5e-2)     # init_log_scale = 0, shift = 0


def test_lambda_and_content_change_the_output(model):
    _, params, apply, y = model
    g1, t1 = apply(params, y, jnp.array([1.0, 1.0]))
    g20, t20 = apply(params, y, jnp.array([20.0, 20.0]))
    assert float(jnp.max(jnp.abs(g1 - g20))) > 0 and float(jnp.max(jnp.abs(t1 - t20))) > 0
    # same lambda, different images -> different parameters
    assert float(jnp.max(jnp.abs(g1[0] - g1[1]))) > 0


def test_fully_convolutional_any_latent_size(model):
    net, params, _, _ = model
    for shape in ((1, 8, 8, C), (3, 12, 20, C), (1, 1, 1, C)):
        gamma, t = net.apply({"params": params}, jnp.ones(shape), 5.0)
        assert gamma.shape == (shape[0], 2, C) and t.shape == (shape[0],)


def test_widening_stride2_structure(model):
    _, params, _, _ = model
    assert params["down_0"]["kernel"].shape == (3, 3, C + 1, 16)  # y + lambda channel
    assert params["down_1"]["kernel"].shape == (3, 3, 16, 32)
    assert params["conv_1"]["kernel"].shape == (3, 3, 32, 32)
    assert params["head"]["kernel"].shape == (32, 2 * C + 1)


def test_bf16_compute_keeps_float32_outputs(model):
    _, params, _, y = model
    net = pe.ParamEstimator(latent_channels=C, features=(16, 32), dtype=jnp.bfloat16)
    gamma, t = net.apply({"params": params}, y, 10.0)
    assert gamma.dtype == jnp.float32 and t.dtype == jnp.float32


@settings(max_examples=60, deadline=None)
@given(log_scale=st.floats(-6.0, 6.0), shift=st.floats(-50.0, 50.0), seed=st.integers(0, 2**16))
def test_quantise_dequantise_exactly_invertible_on_grid(log_scale, shift, seed):
    rng = np.random.default_rng(seed)
    z = rng.integers(-4096, 4097, size=(2, 3, 5, 4)).astype(np.int32)
    gamma = np.zeros((2, 2, 4), np.float32)
    gamma[:, 0] = log_scale + rng.uniform(-1, 1, (2, 4))
    gamma[:, 1] = shift + rng.uniform(-1, 1, (2, 4))
    y_hat = pe.dequantize_latent(jnp.asarray(z), jnp.asarray(gamma))
    z_again = pe.quantize_latent(y_hat, jnp.asarray(gamma))
    assert z_again.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(z_again), z)


@settings(max_examples=30, deadline=None)
@given(log_scale=st.floats(-4.0, 4.0), shift=st.floats(-5.0, 5.0))
def test_quantisation_error_is_half_a_step(log_scale, shift):
    y = jax.random.normal(jax.random.key(3), (1, 6, 6, 4)) * 3
    gamma = jnp.stack([jnp.full((4,), log_scale), jnp.full((4,), shift)])[None]
    err = pe.dequantize_latent(pe.quantize_latent(y, gamma), gamma) - y
    step = np.exp(log_scale)
    assert float(jnp.max(jnp.abs(err))) <= 0.5 / step * (1 + 1e-5) + 1e-6


def test_affine_pair_matches_formula():
    y = jnp.arange(24.0).reshape(1, 2, 3, 4) / 7
    gamma = jnp.array([[[0.0, 1.0, -1.0, 2.0], [0.5, -0.5, 3.0, 0.0]]])
    s = jnp.exp(gamma[0, 0])
    np.testing.assert_allclose(pe.affine_forward(y, gamma), y * s + gamma[0, 1], rtol=1e-6)
    np.testing.assert_allclose(pe.affine_inverse(pe.affine_forward(y, gamma), gamma), y,
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def distortion_grads(model):
    net, params, _, y = model

    def loss(p, mode):
        gamma, _ = net.apply({"params": p}, y, 10.0)
        gamma = gamma + jnp.array([-1.0, 0.0])[None, :, None]  # coarse grid: real error
        _, z_dec = quantize(pe.affine_forward(y, gamma), mode, rng=jax.random.key(7))
        y_hat = pe.affine_inverse(z_dec, gamma)
        return jnp.mean((y_hat - y) ** 2)

    return jax.jit(jax.grad(loss), static_argnums=1), params


@pytest.mark.parametrize("mode", ["noise", "mixed"])
def test_distortion_gradients_reach_gamma_and_every_layer(distortion_grads, mode):
    grad_fn, params = distortion_grads
    grads = grad_fn(params, mode)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    head = grads["head"]["bias"]
    # coarser steps -> larger error: d MSE / d log_scale < 0 for every channel
    assert bool(jnp.all(head[:C] < 0)), head[:C]


def test_bad_gamma_shape_is_rejected():
    with pytest.raises(AssertionError):
        pe.affine_forward(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 3, 3)))
