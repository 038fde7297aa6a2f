"""3-D conv blocks of the video diffusion autoencoder (Rampas 2024, sec. 3.4.1): shapes for
f_t in {2, 4, 8}, what the temporal compression computes, and that deflate can invert it."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.errors import InputError
from diffjax.nn.blocks3d import (ResnetBlock3D, SpatialDownsample3D, SpatialUpsample3D,
                                 TemporalCompress, TemporalDeflate)

from diffjax.nn.layers import host_random_params

KEY = jax.random.PRNGKey(0)


def params_for(module, *args):
    """Random parameters without tracing Flax's initialisers (slow to compile on CPU)."""
    return host_random_params(nn.meta.unbox(jax.eval_shape(module.init, KEY, *args)), 0)


def video(t=8, h=8, w=6, c=8, b=2, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, t, h, w, c))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_compress_and_deflate_shapes(factor):
    x = video(t=8)
    comp = TemporalCompress(16, factor=factor)
    p = params_for(comp, x)
    z = comp.apply(p, x)
    assert z.shape == (2, 8 // factor, 8, 6, 16)
    defl = TemporalDeflate(8, factor=factor)
    y = defl.apply(params_for(defl, z), z)
    assert y.shape == x.shape


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_compress_is_conv_then_mean_over_frames(factor):
    x = video(t=16, c=4)
    comp = TemporalCompress(4, factor=factor)
    p = {"params": {"proj": {"kernel": jnp.eye(4).reshape(1, 1, 1, 4, 4),
                             "bias": jnp.arange(4.0)}}}
    z = comp.apply(p, x)
    want = x.reshape(2, 16 // factor, factor, 8, 6, 4).mean(axis=2) + jnp.arange(4.0)
    np.testing.assert_allclose(z, want, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_deflate_puts_channel_groups_on_frames(factor):
    """With a block-identity kernel, deflate output frame ``s * f + k`` is channel group
    ``k`` of step ``s``; so deflate exactly inverts a lossless "inflate" of the frames."""
    b, t, c = 1, 16, 3
    x = video(t=t, c=c, b=b)
    packed = x.reshape(b, t // factor, factor, 8, 6, c).transpose(0, 1, 3, 4, 2, 5).reshape(
        b, t // factor, 8, 6, factor * c)
    defl = TemporalDeflate(c, factor=factor)
    p = {"params": {"proj": {"kernel": jnp.eye(factor * c).reshape(1, 1, 1, factor * c, -1),
                             "bias": jnp.zeros(factor * c)}}}
    np.testing.assert_allclose(defl.apply(p, packed), x, atol=1e-6)


def test_resnet_and_spatial_resampling_shapes():
    x = video(t=2, h=8, w=8, c=4)
    temb = jnp.ones((2, 8))
    block = ResnetBlock3D(8, groups=4)
    p = params_for(block, x, temb)
    assert p["params"]["conv1"]["kernel"].shape == (3, 3, 3, 4, 8)
    assert p["params"]["conv_shortcut"]["kernel"].shape == (1, 1, 1, 4, 8)
    down, up = SpatialDownsample3D(8), SpatialUpsample3D(4)
    pd = params_for(down, jnp.zeros((2, 2, 8, 8, 8)))
    pu = params_for(up, jnp.zeros((2, 2, 4, 4, 8)))

    @jax.jit
    def run(x, temb):
        y = block.apply(p, x, temb)
        d = down.apply(pd, y)
        return y, d, up.apply(pu, d)

    y, d, u = run(x, temb)
    assert y.shape == (2, 2, 8, 8, 8)
    assert d.shape == (2, 2, 4, 4, 8)  # time untouched, space halved
    assert u.shape == (2, 2, 8, 8, 4)


def test_bad_inputs():
    with pytest.raises(InputError, match="multiple"):
        jax.eval_shape(TemporalCompress(4, factor=4).init, KEY, video(t=6))
    with pytest.raises(InputError, match="one of"):
        jax.eval_shape(TemporalCompress(4, factor=3).init, KEY, video(t=6))
    with pytest.raises(InputError, match="NTHWC"):
        jax.eval_shape(SpatialDownsample3D(4).init, KEY, jnp.zeros((1, 8, 8, 4)))
