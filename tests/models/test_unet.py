"""UNet2DConditionModel beyond parity: bf16 compute, remat, config validation, input
errors and sharding annotations.

Parity of the SD 1.5/2.1/XL-like families through the file converter (including odd
latent sizes, ControlNet residuals and attention masks) is in
``tests/convert/test_parity.py``; here weights come from the in-memory converter.
"""
from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "convert"))
import _sd_reference as ref  # noqa: E402
from diffjax import InputError  # noqa: E402
from diffjax.convert import convert_diffusers_state_dict  # noqa: E402
from diffjax.models.unet import UNet2DConditionModel  # noqa: E402
from diffjax.nn.unet_blocks import CrossAttnDownBlock2D  # noqa: E402

CONFIG = ref.TINY_SD21


@pytest.fixture(scope="module")
def sd21():
    model = ref.build_unet(CONFIG, seed=11)
    params = convert_diffusers_state_dict(dict(model.config), model.state_dict())
    return model, params


def test_bf16_compute_within_2pct_of_fp32(sd21):
    """bf16 activations (fp32 params, fp32 norms/softmax) vs the fp32 diffusers output."""
    model, params = sd21
    inputs = ref.unet_inputs(CONFIG, seed=2)
    unet = UNet2DConditionModel.from_config(CONFIG, dtype=jnp.bfloat16)
    out = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))(
        params, inputs["sample"], inputs["timesteps"], inputs["context"])
    assert out.dtype == jnp.bfloat16
    want = ref.run_unet(model, inputs)
    out = np.asarray(out, np.float32)
    rel = np.linalg.norm(out - want) / np.linalg.norm(want)
    torch_bf16 = ref.build_unet(CONFIG, seed=11).to(torch.bfloat16)
    with torch.no_grad():
        theirs = torch_bf16(ref.nchw(inputs["sample"]).bfloat16(),
                            torch.from_numpy(inputs["timesteps"]),
                            torch.from_numpy(inputs["context"]).bfloat16()).sample.float()
    theirs = ref.nhwc(theirs)
    rel_torch = np.linalg.norm(theirs - want) / np.linalg.norm(want)
    print(f"bf16 UNet relative L2 error {rel:.2e} (diffusers bf16: {rel_torch:.2e}), "
          f"max abs {np.abs(out - want).max():.2e}")
    assert rel <= 2e-2
    assert rel <= 1.1 * rel_torch


@pytest.mark.slow  # default-suite budget (compiles a block's gradient twice)
def test_remat_same_gradients_on_a_block():
    """remat=True recomputes activations but yields the same params and gradients."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 16))
    temb = jax.random.normal(jax.random.PRNGKey(1), (1, 32))
    ctx = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 24))
    blocks = [CrossAttnDownBlock2D(out_channels=16, num_attention_heads=2, resnet_groups=8,
                                   remat=r) for r in (False, True)]
    shapes = [nn.meta.unbox(jax.eval_shape(b.init, jax.random.PRNGKey(3), x, temb, ctx)["params"])
              for b in blocks]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32),
                          shapes[0])

    def loss(block):
        return lambda p: jnp.sum(block.apply({"params": p}, x, temb, ctx)[0] ** 2)

    grads = [jax.jit(jax.grad(loss(b)))(params) for b in blocks]
    for g0, g1 in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(g0, g1, rtol=1e-4, atol=1e-5 * float(np.abs(g0).max()))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(blocks[1])))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_unet_remat_flag_reaches_every_block():
    unet = UNet2DConditionModel.from_config(CONFIG, remat=True)
    args, kwargs = unet.dummy_inputs()
    params = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda p: jnp.sum(unet.apply({"params": p}, *args, **kwargs))))(nn.meta.unbox(params)))
    # 2 resnets + 2 transformers per level pair, 3 in the mid block, 4 + 4 in the up path
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 10


def test_logical_axis_annotations():
    unet = UNet2DConditionModel.from_config(CONFIG)
    args, kwargs = unet.dummy_inputs()
    specs = nn.get_partition_spec(jax.eval_shape(unet.init, jax.random.PRNGKey(0), *args, **kwargs))
    assert specs["params"]["conv_in"]["kernel"] == jax.sharding.PartitionSpec(
        None, None, "conv_in", "conv_out")
    assert specs["params"]["time_embedding"]["linear_1"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", "mlp")


@pytest.mark.parametrize("bad, match", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"addition_embed_type": "text"}, "addition_embed_type"),
    ({"down_block_types": ("AttnDownBlock2D", "DownBlock2D")}, "unsupported UNet block types"),
    ({"num_attention_heads": 4}, "num_attention_heads"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"block_out_channels": (16, 32, 64)}, "same length"),
])
def test_unsupported_configs_are_clear_errors(bad, match):
    with pytest.raises(InputError, match=match):
        UNet2DConditionModel.from_config({**CONFIG, **bad})
    unet = UNet2DConditionModel(**{**CONFIG, **bad})  # built directly: fails at init
    with pytest.raises(InputError, match=match):
        jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 4)), 1,
                       jnp.zeros((1, 7, 24)))


def test_bad_inputs_are_clear_errors(sd21):
    _, params = sd21
    unet = UNet2DConditionModel.from_config(CONFIG)
    x, ctx = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 7, 24))
    with pytest.raises(InputError, match="down-block residuals"):
        unet.apply({"params": params}, x, 1, ctx, down_block_additional_residuals=[x] * 3)
    with pytest.raises(InputError, match="channels"):
        unet.apply({"params": params}, jnp.zeros((1, 4, 16, 16)), 1, ctx)  # NCHW by mistake
    with pytest.raises(InputError, match="cross_attention_dim"):
        unet.apply({"params": params}, x, 1, jnp.zeros((1, 7, 32)))
    xl = UNet2DConditionModel.from_config(ref.TINY_SDXL)
    args, _ = xl.dummy_inputs()
    with pytest.raises(InputError, match="added_cond_kwargs"):
        jax.eval_shape(xl.init, jax.random.PRNGKey(0), *args)
