"""Building blocks vs their diffusers / PyTorch counterparts, including options that the
SD configs do not use (scale-shift time conditioning, output scaling, only-cross-attention,
GELU feed-forward) but later models (refiner UNet, ControlNet, video UNet) may."""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "convert"))
import _sd_reference as ref  # noqa: E402
from diffjax import InputError  # noqa: E402
from diffjax.convert.mapping import build_tree, param_template, plan  # noqa: E402
from diffjax.convert.sources import DictSource  # noqa: E402
from diffjax.nn.attention import BasicTransformerBlock, attention  # noqa: E402
from diffjax.nn.embeddings import timestep_embedding  # noqa: E402
from diffjax.nn.layers import activation  # noqa: E402
from diffjax.nn.resnet import ResnetBlock2D, nearest_upsample  # noqa: E402


def _params_from_torch(module, torch_module, *args):
    """Strictly convert a torch block's state dict onto a Flax block (same mapping as models)."""
    src = DictSource(torch_module.state_dict())
    entries = plan([(k, src.shape(k)) for k in src.keys()], param_template(module, *args))
    return build_tree(entries, src.read)


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (33, False, 1), (8, True, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                  downscale_freq_shift=shift).numpy()
    got = np.asarray(timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift))
    assert got.shape == (4, dim)
    # sin/cos of float32 arguments up to ~1e3: one ulp of the argument (exp may differ by an
    # ulp between XLA and torch) is 6e-5, so allow 1e-4 there and 2e-6 for small t.
    np.testing.assert_allclose(got[:3], want[:3], atol=2e-6)
    np.testing.assert_allclose(got[3], want[3], atol=1e-4)


@pytest.mark.parametrize("size_in, size_out", [(4, 8), (8, 15), (5, 9), (7, 15), (3, 7)])
def test_nearest_upsample_matches_torch_index_rule(size_in, size_out):
    x = np.arange(2 * size_in * (size_in + 1) * 3, dtype=np.float32).reshape(
        2, size_in, size_in + 1, 3)
    out_size = (size_out, size_out + 2)
    want = F.interpolate(ref.nchw(x), size=out_size, mode="nearest")
    np.testing.assert_array_equal(nearest_upsample(x, out_size), ref.nhwc(want))


def test_resnet_scale_shift_and_output_scale_match_diffusers():
    from diffusers.models.resnet import ResnetBlock2D as TorchResnet

    torch.manual_seed(0)
    theirs = TorchResnet(in_channels=8, out_channels=16, temb_channels=12, groups=4,
                         time_embedding_norm="scale_shift", output_scale_factor=2.0,
                         skip_time_act=True, eps=1e-5).eval()
    ref.randomize_(theirs, 0)
    ours = ResnetBlock2D(16, groups=4, eps=1e-5, time_embedding_norm="scale_shift",
                         output_scale_factor=2.0, skip_time_act=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 5, 8)).astype(np.float32)
    temb = rng.standard_normal((2, 12)).astype(np.float32)
    params = _params_from_torch(ours, theirs, x, temb)
    got = jax.jit(lambda p, x, t: ours.apply({"params": p}, x, t))(params, x, temb)
    with torch.no_grad():
        want = ref.nhwc(theirs(ref.nchw(x), torch.from_numpy(temb)))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("only_cross, act", [(True, "gelu"), (False, "geglu-approximate"),
                                             (False, "swiglu")])
def test_transformer_block_variants_match_diffusers(only_cross, act):
    from diffusers.models.attention import BasicTransformerBlock as TorchBlock

    torch.manual_seed(1)
    theirs = TorchBlock(16, 2, 8, cross_attention_dim=12, activation_fn=act,
                        only_cross_attention=only_cross, attention_bias=True).eval()
    ref.randomize_(theirs, 1)
    ours = BasicTransformerBlock(16, 2, 8, only_cross_attention=only_cross, activation_fn=act,
                                 attention_bias=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 10, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
    params = _params_from_torch(ours, theirs, x, ctx)
    got = jax.jit(lambda p, x, c: ours.apply({"params": p}, x, c))(params, x, ctx)
    with torch.no_grad():
        want = theirs(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_attention_with_bias_matches_torch_sdpa():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((2, 6, 3, 4), (2, 5, 3, 4), (2, 5, 3, 4)))
    bias = np.where(rng.uniform(size=(2, 1, 1, 5)) < 0.3, -10000.0, 0.0).astype(np.float32)
    got = attention(q, k, v, bias=bias)
    t = lambda a: torch.from_numpy(a).transpose(1, 2)  # BTNH -> BNTH
    want = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=torch.from_numpy(bias))
    np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2).numpy(), atol=1e-5)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(InputError, match="unsupported activation 'tanhshrink'"):
        activation("tanhshrink")
