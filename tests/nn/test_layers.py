"""The shared layer helpers: GroupNorm against PyTorch and Flax, the CPU patch-GEMM conv
against XLA's convolution."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import diffjax.nn.layers as layers
from diffjax import InputError
from diffjax.nn.layers import CpuFriendlyConv, conv2d, group_norm


@pytest.mark.parametrize("shape, groups", [((2, 6, 5, 32), 8), ((1, 4, 4, 12), 3),
                                           ((2, 7, 16), 4)])
def test_group_norm_matches_torch_and_flax(shape, groups):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    c = shape[-1]
    params = {"scale": rng.standard_normal(c).astype(np.float32),
              "bias": rng.standard_normal(c).astype(np.float32)}
    ours = np.asarray(group_norm(groups, eps=1e-6, param_dtype=jnp.float32).apply(
        {"params": params}, x))
    flax_gn = nn.GroupNorm(groups, epsilon=1e-6, use_fast_variance=False)
    np.testing.assert_allclose(ours, flax_gn.apply({"params": params}, x), atol=1e-5)
    ref = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(params["scale"]))
        ref.bias.copy_(torch.from_numpy(params["bias"]))
        want = ref(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
    np.testing.assert_allclose(ours, np.moveaxis(want, 1, -1), atol=1e-5)


def test_group_norm_bf16_input_and_bad_groups():
    x = jnp.ones((1, 4, 4, 8), jnp.bfloat16) * jnp.arange(8, dtype=jnp.bfloat16)
    gn = group_norm(4, eps=1e-6, param_dtype=jnp.float32)
    out = gn.apply(gn.init(jax.random.key(0), x), x)
    assert out.dtype == jnp.float32
    with pytest.raises(InputError, match="do not split into 3 groups"):
        gn3 = group_norm(3, eps=1e-6, param_dtype=jnp.float32)
        gn3.init(jax.random.key(0), x)


@pytest.mark.parametrize("hw, kernel, stride, padding", [
    ((8, 8), 3, 1, ((1, 1), (1, 1))),
    ((9, 7), 3, 2, ((1, 1), (1, 1))),
    ((8, 8), 3, 2, ((0, 1), (0, 1))),   # the SD downsampler's asymmetric padding
    ((6, 6), 5, 1, ((2, 2), (2, 2))),
])
def test_patch_matmul_conv_equals_xla_conv(hw, kernel, stride, padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, 6)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 6, 5)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    want = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
    got = layers.patch_matmul_conv(x, w, (stride, stride), padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_conv2d_uses_the_patch_gemm_only_for_small_maps(monkeypatch):
    calls = []
    real = layers.patch_matmul_conv
    monkeypatch.setattr(layers, "patch_matmul_conv",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    conv = conv2d(4, dtype=jnp.float32, param_dtype=jnp.float32)
    small, large = jnp.ones((1, 16, 16, 3)), jnp.ones((1, 17, 16, 3))
    params = conv.init(jax.random.key(0), small)
    calls.clear()
    conv.apply(params, small)
    assert calls == [(1, 16, 16, 3)]        # 256 output pixels: the GEMM path
    conv.apply(params, large)
    assert calls == [(1, 16, 16, 3)]        # 272 output pixels: XLA's convolution
    conv1x1 = conv2d(4, kernel_size=1, dtype=jnp.float32, param_dtype=jnp.float32)
    conv1x1.apply(conv1x1.init(jax.random.key(0), small), small)
    assert len(calls) == 1                  # 1x1 convs take the channel matmul, not patches
    out = CpuFriendlyConv()(np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 1), np.float32),
                            (1, 1), "SAME", dimension_numbers=jax.lax.conv_dimension_numbers(
                                (1, 4, 4, 2), (3, 3, 2, 1), ("NHWC", "HWIO", "NHWC")))
    assert float(out[0, 1, 1, 0]) == 18.0   # string padding: XLA's path, still right


@pytest.mark.parametrize("stride, padding", [(1, ((0, 0), (0, 0))), (2, ((0, 0), (0, 0))),
                                             (1, ((1, 1), (0, 0)))])
def test_pointwise_conv_equals_xla_conv(monkeypatch, stride, padding):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((1, 1, 7, 3)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    want = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
    einsums = []
    real = jnp.einsum
    monkeypatch.setattr(jnp, "einsum", lambda *a, **k: einsums.append(a[0]) or real(*a, **k))
    got = CpuFriendlyConv()(x, w, (stride, stride), padding, dimension_numbers=dn)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # stride 1 without padding is a matmul over channels; anything else is XLA's kernel
    assert einsums == (["bhwc,cd->bhwd"] if stride == 1 and padding[0] == (0, 0) else [])


@pytest.mark.parametrize("hw", [(5, 7), (9, 8)])
def test_upsample_conv_on_the_low_resolution_input_equals_upsample_then_conv(hw):
    """(5, 7) upsamples to 140 <= 256 pixels: upsample + patch conv; (9, 8): the folded
    2x2 phase convs of NearestUpsampleConv."""
    from diffjax.nn.resnet import NearestUpsampleConv, Upsample2D, nearest_upsample

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, *hw, 6)).astype(np.float32)
    up = Upsample2D(4)
    params = nn.meta.unbox(up.init(jax.random.key(0), x))
    params = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    conv = params["params"]["conv"]
    assert conv["kernel"].shape == (3, 3, 6, 4) and conv["bias"].shape == (4,)  # nn.Conv's
    plain = conv2d(4, dtype=jnp.float32, param_dtype=jnp.float32)
    want = plain.apply({"params": conv}, nearest_upsample(x))
    got = up.apply(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    folded = NearestUpsampleConv(4).apply({"params": conv}, x)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(want), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(folded if hw == (9, 8) else want))
    # an odd target size (UNet forward_upsample_size) takes the upsample-then-conv path
    odd_size = (2 * hw[0] - 1, 2 * hw[1] - 1)
    odd = up.apply(params, x, output_size=odd_size)
    want_odd = plain.apply({"params": conv}, nearest_upsample(x, odd_size))
    np.testing.assert_allclose(np.asarray(odd), np.asarray(want_odd), atol=1e-6)
