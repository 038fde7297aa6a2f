"""The shared layer helpers: GroupNorm against PyTorch and Flax (the CPU conv kernels are
tested in ``test_cpu_kernels.py``)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffjax import InputError
from diffjax.nn.layers import group_norm


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
