"""The sub-pixel transposed convolution equals ``nn.ConvTranspose`` (values, parameters,
gradients) for the kernels, strides and paddings diffjax uses."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.nn.conv_transpose import SubpixelConvTranspose


@pytest.mark.parametrize("kernel, stride, size", [(5, 2, (7, 5)), (3, 2, (4, 6)), (5, 4, (3, 3)),
                                                   (4, 2, (5, 4)), (1, 2, (3, 2))])
def test_matches_flax_conv_transpose(kernel, stride, size):
    lo = kernel - 1 - kernel // 2
    pads = ((lo, lo + stride - 1),) * 2
    if kernel % 2 == 0:  # even kernels: any split with lo + hi = k + s - 2
        pads = ((kernel - 1, stride - 1),) * 2
    ref = nn.ConvTranspose(6, (kernel, kernel), (stride, stride), padding=pads,
                           transpose_kernel=True)
    ours = SubpixelConvTranspose(6, (kernel, kernel), (stride, stride), padding=pads)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *size, 3)), jnp.float32)
    params = ref.init(jax.random.PRNGKey(1), x)
    params["params"]["bias"] = jnp.arange(6.0) / 10
    ours_params = ours.init(jax.random.PRNGKey(1), x)
    chex_shapes = jax.tree.map(jnp.shape, params), jax.tree.map(jnp.shape, ours_params)
    assert chex_shapes[0] == chex_shapes[1]  # same parameter tree: checkpoints unchanged
    np.testing.assert_array_equal(ours_params["params"]["kernel"], params["params"]["kernel"])
    want = ref.apply(params, x)
    got = ours.apply(params, x)
    assert got.shape == want.shape == (2, size[0] * stride, size[1] * stride, 6)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                 g_ours, g_ref)


def test_bfloat16_compute_and_bad_padding():
    m = SubpixelConvTranspose(4, (5, 5), (2, 2), padding=((2, 3), (2, 3)), dtype=jnp.bfloat16)
    x = jnp.ones((1, 3, 3, 2))
    p = m.init(jax.random.PRNGKey(0), x)
    assert m.apply(p, x).dtype == jnp.bfloat16
    bad = SubpixelConvTranspose(4, (5, 5), (2, 2), padding=((2, 2), (2, 2)))
    with pytest.raises(ValueError, match="lo \\+ hi"):
        bad.init(jax.random.PRNGKey(0), x)
