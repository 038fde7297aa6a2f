"""ControlNet model behaviour without a reference library: from_unet, the zero-convolution
identity (a fresh ControlNet leaves the UNet unchanged, Zhang et al. 2023 sec. 3.2),
multi-ControlNet sums, per-frame use and clear errors. Parity with diffusers is in
``tests/convert/test_controlnet_parity.py`` / ``test_controlnet_guided.py``."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.errors import InputError
from diffjax.models.controlnet import (ControlNetModel, MultiControlNet, check_compatible,
                                       controlled_apply_fn, from_unet, per_frame,
                                       zero_residuals_like)
from diffjax.models.unet import UNet2DConditionModel
from diffjax.nn.layers import host_random_params

UNET = UNet2DConditionModel(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
COND = (4, 8, 8, 16)
B, H = 2, 8


@functools.lru_cache(maxsize=None)
def setup_models():
    args, _ = UNET.dummy_inputs()
    shapes = nn.unbox(jax.eval_shape(lambda: UNET.init(jax.random.PRNGKey(0), *args)["params"]))
    unet_params = host_random_params(shapes, 0)  # no init compile
    cn, cn_params = from_unet(UNET, unet_params, jax.random.PRNGKey(1),
                              conditioning_embedding_out_channels=COND)
    return unet_params, cn, cn_params


@functools.lru_cache(maxsize=None)
def residual_fn(cn, guess_mode=False):
    """One jitted ControlNet call per (module, guess_mode): eager Flax applies compile every
    op on their own, which is slower than one program."""
    return jax.jit(lambda p, x, t, c, cond, s=1.0: cn.apply(
        {"params": p}, x, t, c, cond, conditioning_scale=s, guess_mode=guess_mode))


def inputs(seed=0, channels=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, H, 4), np.float32)
    t = np.array([900.0, 20.0], np.float32)
    ctx = rng.standard_normal((B, 5, 16), np.float32)
    cond = rng.uniform(0, 1, (B, 8 * H, 8 * H, channels)).astype(np.float32)
    return x, t, ctx, cond


def randomize(params, seed):
    """Every leaf ``0.1 N(0, 1)`` (numpy: eager jax.random compiles once per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.1 * rng.standard_normal(np.shape(a))).astype(np.float32),
                        params)


def test_from_unet_copies_encoder_and_zeroes_convs():
    unet_params, cn, p = setup_models()
    assert cn.num_skips == UNET.num_skips == 4
    for name in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, p[name], unet_params[name])
    assert "up_blocks_0" not in p and "conv_out" not in p
    zero = [n for n in p if n.startswith("controlnet_down_blocks_")] + ["controlnet_mid_block"]
    assert len(zero) == 5
    for name in zero:
        assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(p[name]))
    assert np.any(np.asarray(p["controlnet_cond_embedding"]["conv_in"]["kernel"]))


def test_zero_convs_leave_the_unet_unchanged():
    unet_params, cn, p = setup_models()
    x, t, ctx, cond = inputs()
    down, mid = residual_fn(cn)(p, x, t, ctx, cond)
    assert all(not np.any(np.asarray(r)) for r in (*down, mid))  # exactly zero
    fn = jax.jit(controlled_apply_fn(UNET, cn, scales=1.0))
    guided = fn({"unet": unet_params, "controlnets": [p]}, x, t, {"context": ctx, "images": [cond]})
    plain = jax.jit(lambda q, *a: UNET.apply({"params": q}, *a))(unet_params, x, t, ctx)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=0, atol=1e-6)
    # trained (non-zero) zero convs do change it; zeroing them again restores the identity
    trained = dict(p, controlnet_mid_block=randomize(p["controlnet_mid_block"], 3))
    moved = fn({"unet": unet_params, "controlnets": [trained]}, x, t,
               {"context": ctx, "images": [cond]})
    assert np.abs(np.asarray(moved) - np.asarray(plain)).max() > 1e-3
    back = fn({"unet": unet_params, "controlnets": [zero_residuals_like(cn, trained)]}, x, t,
              {"context": ctx, "images": [cond]})
    np.testing.assert_array_equal(np.asarray(back), np.asarray(guided))


def test_multi_controlnet_sums_scaled_residuals():
    _, cn, p = setup_models()
    p1, p2 = randomize(p, 1), randomize(p, 2)
    x, t, ctx, cond = inputs()
    cond2 = 1.0 - cond
    multi = MultiControlNet((cn, cn))
    down, mid = jax.jit(lambda a, b: multi.apply([a, b], x, t, ctx, [cond, cond2],
                                                  [0.5, 2.0]))(p1, p2)
    d1, m1 = residual_fn(cn)(p1, x, t, ctx, cond, 0.5)
    d2, m2 = residual_fn(cn)(p2, x, t, ctx, cond2, 2.0)
    for a, b, c in zip(down, d1, d2):
        np.testing.assert_allclose(a, b + c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mid, m1 + m2, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="2 ControlNets"):
        multi.apply([p1, p2], x, t, ctx, [cond, cond2], [0.5, 1.0, 2.0])


def test_guess_mode_scales_and_global_pool():
    _, cn, p = setup_models()
    p = randomize(p, 4)
    x, t, ctx, cond = inputs()
    base_d, base_m = residual_fn(cn)(p, x, t, ctx, cond)
    gd, gm = residual_fn(cn, True)(p, x, t, ctx, cond, 2.0)
    scales = 2.0 * np.logspace(-1, 0, len(base_d) + 1)
    for i, (a, b) in enumerate(zip(gd, base_d)):
        np.testing.assert_allclose(a, b * scales[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gm, base_m * 2.0, rtol=1e-5, atol=1e-6)
    pooled = cn.clone(global_pool_conditions=True)
    pd, _ = residual_fn(pooled)(p, x, t, ctx, cond)
    np.testing.assert_allclose(pd[0], np.mean(base_d[0], axis=(1, 2), keepdims=True), rtol=1e-5,
                               atol=1e-6)


def test_per_frame_guidance_equals_frame_by_frame():
    _, cn, p = setup_models()
    p = randomize(p, 5)
    x, t, ctx, cond = inputs()
    frames_x = jnp.stack([x, x[::-1]], axis=1)                 # [B, T=2, H, W, 4]
    frames_c = jnp.stack([cond, 1.0 - cond], axis=1)           # [B, T=2, 8H, 8W, 3]
    fn = residual_fn(cn)
    down, mid = per_frame(lambda xs, cs, tt, cc: fn(p, xs, tt, cc, cs), frames_x, frames_c,
                          repeat=(t, ctx))
    assert mid.shape[:2] == (B, 2) and down[0].shape[:2] == (B, 2)
    for f in range(2):
        d, m = fn(p, frames_x[:, f], t, ctx, frames_c[:, f])
        np.testing.assert_allclose(mid[:, f], m, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(down[0][:, f], d[0], rtol=1e-5, atol=1e-5)


def test_bad_condition_images_are_clear_errors():
    _, cn, p = setup_models()
    x, t, ctx, cond = inputs()
    with pytest.raises(InputError, match=r"needs 64x64 \(8x the 8x8 latent\)"):
        residual_fn(cn)(p, x, t, ctx, cond[:, :32, :32])
    with pytest.raises(InputError, match="has 1 channels, the ControlNet expects 3"):
        residual_fn(cn)(p, x, t, ctx, cond[..., :1])
    with pytest.raises(InputError, match="condition batch 1"):
        residual_fn(cn)(p, x, t, ctx, cond[:1])
    with pytest.raises(InputError, match="controlnet_conditioning_channel_order"):
        ControlNetModel.from_config({"controlnet_conditioning_channel_order": "yuv"})


def test_controlnet_not_matching_the_unet_is_a_clear_error():
    _, cn, _ = setup_models()
    other = UNET.clone(block_out_channels=(16, 24))
    with pytest.raises(InputError, match="encoder does not match the UNet: block_out_channels"):
        controlled_apply_fn(other, cn)
    with pytest.raises(InputError, match="cross_attention_dim 16 vs 32"):
        check_compatible(cn, UNET.clone(cross_attention_dim=32))
    with pytest.raises(InputError, match="layers_per_block"):
        check_compatible(cn, UNET.clone(layers_per_block=2))
    with pytest.raises(InputError, match="share one encoder"):
        MultiControlNet((cn, cn.clone(layers_per_block=2)))


@pytest.mark.slow
def test_per_frame_controlnet_guides_a_video_unet():
    """One image ControlNet guides every frame of a video UNet (AnimateDiff-style motion
    UNet on the same SD encoder): per-frame residuals ``[B, F, ...]``; zero convs at zero
    leave the video UNet unchanged, trained ones change it."""
    from diffjax.models.unet3d import UNetMotionModel

    _, cn, p = setup_models()
    keys = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "norm_num_groups", "cross_attention_dim", "attention_head_dim", "down_block_types",
            "up_block_types")
    video = UNetMotionModel.from_unet2d(
        {k: getattr(UNET, k) for k in keys},
        dict(block_out_channels=(16, 32), motion_layers_per_block=1,
             motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=8))
    args, kw = video.dummy_inputs()
    shapes = nn.unbox(jax.eval_shape(lambda: video.init(jax.random.PRNGKey(0), *args, **kw)))
    vp = host_random_params(shapes["params"], 1)
    x, t, ctx, cond = inputs()
    frames_x = jnp.stack([x, 0.5 * x], axis=1)              # [B, F=2, H, W, 4]
    frames_c = jnp.stack([cond, 1.0 - cond], axis=1)        # [B, F=2, 8H, 8W, 3]

    @jax.jit
    def run(vp, cp):
        down, mid = per_frame(lambda xs, cs, tt, cc: cn.apply({"params": cp}, xs, tt, cc, cs),
                              frames_x, frames_c, repeat=(t, ctx))
        guided = video.apply({"params": vp}, frames_x, t, ctx,
                             down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)
        return guided, video.apply({"params": vp}, frames_x, t, ctx)

    guided, plain = run(vp, p)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=0, atol=1e-6)
    trained = dict(p, controlnet_mid_block=randomize(p["controlnet_mid_block"], 6))
    guided, plain = run(vp, trained)
    assert np.abs(np.asarray(guided) - np.asarray(plain)).max() > 1e-3


def test_controlnet_config_of_the_sd_presets():
    """What ``diffjax convert ctrl.pth --config sd15`` builds for an original ControlNet."""
    from diffjax.convert.controlnet_ldm import controlnet_config_from_unet, controlnet_renamer
    from diffjax.convert.presets import SD15_UNET, SD21_UNET

    cn15 = ControlNetModel.from_config(controlnet_config_from_unet(SD15_UNET))
    assert cn15.num_skips == 12 and cn15.condition_factor == 8
    check_compatible(cn15, UNet2DConditionModel.from_config(SD15_UNET))
    cn21 = ControlNetModel.from_config(controlnet_config_from_unet(SD21_UNET))
    assert cn21.use_linear_projection and cn21.cross_attention_dim == 1024
    rename = controlnet_renamer(cn15.to_config())
    assert rename("input_hint_block.14.weight", ()) == ("controlnet_cond_embedding.conv_out.weight", "")
    assert rename("input_hint_block.12.bias", ()) == ("controlnet_cond_embedding.blocks.5.bias", "")
    assert rename("input_hint_block.13.weight", ()) is None  # a SiLU has no weights
    assert rename("zero_convs.11.0.weight", ()) == ("controlnet_down_blocks.11.weight", "")
    assert rename("middle_block_out.0.bias", ()) == ("controlnet_mid_block.bias", "")
    assert rename("input_blocks.3.0.op.weight", ()) == ("down_blocks.0.downsamplers.0.conv.weight", "")
    assert rename("output_blocks.0.0.in_layers.0.weight", ()) is None
