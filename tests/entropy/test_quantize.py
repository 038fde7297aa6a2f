"""Quantisation modes and the gradient tricks (diffjax.entropy.quantize)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.entropy import quantize as Q


def test_uniform_noise_is_unit_box_and_seeded():
    x = jnp.zeros((200_000,))
    a = Q.uniform_noise(x, jax.random.key(0, impl="rbg"))
    b = Q.uniform_noise(x, jax.random.key(0, impl="rbg"))
    c = Q.uniform_noise(x, jax.random.key(1, impl="rbg"))
    assert float(a.min()) >= -0.5 and float(a.max()) <= 0.5
    np.testing.assert_allclose(float(a.mean()), 0.0, atol=5e-3)
    np.testing.assert_allclose(float(a.std()), 12**-0.5, rtol=1e-2)  # U(-1/2, 1/2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ste_round_forward_rounds_backward_identity():
    x = jnp.array([-1.7, -0.5, 0.49, 1.5, 2.51])
    np.testing.assert_array_equal(Q.ste_round(x), jnp.round(x))
    g = jax.grad(lambda v: jnp.sum(Q.ste_round(v) * jnp.arange(5.0)))(x)
    np.testing.assert_array_equal(g, jnp.arange(5.0))


def test_mean_offset_rounding_and_symbols():
    x = jnp.array([0.2, 1.9, -3.3, 4.6])
    m = jnp.array([0.5, 0.5, -0.25, 10.0])
    np.testing.assert_allclose(Q.round_offset(x, m), jnp.round(x - m) + m)
    s = Q.symbols(x, m)
    assert s.dtype == jnp.int32
    np.testing.assert_array_equal(s, np.round(np.asarray(x - m)).astype(np.int32))
    # Hard rounding has zero gradient; STE passes it to x, never to the offset.
    gx, gm = jax.grad(lambda a, b: jnp.sum(Q.round_offset(a, b, ste=True)), (0, 1))(x, m)
    np.testing.assert_array_equal(gx, jnp.ones(4))
    np.testing.assert_array_equal(gm, jnp.zeros(4))
    np.testing.assert_array_equal(jax.grad(lambda a: jnp.sum(Q.round_offset(a, m)))(x),
                                  jnp.zeros(4))


def test_quantize_modes():
    x = jnp.linspace(-3, 3, 101)
    m = jnp.full_like(x, 0.3)
    key = jax.random.key(3, impl="rbg")
    rate, dec = Q.quantize(x, "noise", rng=key)
    assert np.array_equal(rate, dec) and float(jnp.abs(rate - x).max()) <= 0.5
    rate, dec = Q.quantize(x, "mixed", rng=key, offset=m)
    np.testing.assert_array_equal(rate, Q.uniform_noise(x, key))  # noise for the rate
    np.testing.assert_allclose(dec, jnp.round(x - m) + m)  # rounding for the decoder
    g = jax.grad(lambda v: jnp.sum(Q.quantize(v, "mixed", rng=key, offset=m)[1]))(x)
    np.testing.assert_array_equal(g, jnp.ones_like(x))
    for mode in ("ste", "round"):
        rate, dec = Q.quantize(x, mode, offset=m)
        np.testing.assert_allclose(rate, jnp.round(x - m) + m)
        np.testing.assert_array_equal(rate, dec)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        Q.quantize(x, "dequantize")
    with pytest.raises(ValueError, match="needs an rng"):
        Q.quantize(x, "noise")


def test_lower_bound_value_and_gradient_rule():
    x = jnp.array([0.05, 0.05, 0.5, 0.5])
    np.testing.assert_allclose(Q.lower_bound(x, 0.11), [0.11, 0.11, 0.5, 0.5])
    # Upstream gradient g: below the bound it passes only if it pushes x up (g < 0 on a loss).
    upstream = jnp.array([1.0, -1.0, 1.0, -1.0])
    _, vjp = jax.vjp(lambda v: Q.lower_bound(v, 0.11), x)
    np.testing.assert_array_equal(vjp(upstream)[0], [0.0, -1.0, 1.0, -1.0])
    assert jax.jit(Q.lower_bound, static_argnums=1)(x, 0.11).shape == (4,)
