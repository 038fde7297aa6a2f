"""Video UNets vs diffusers: ``UNet3DConditionModel`` (ModelScope) and ``UNetMotionModel``
(AnimateDiff), tiny random-weight configs whose zero-initialised temporal layers are made
non-zero; and the zeroed-temporal-layers == 2-D UNet per frame property."""
from __future__ import annotations

import functools
import types

import flax
import jax
import numpy as np
import pytest

import _video_reference as ref
from diffjax.convert import build_model, convert_diffusers_state_dict
from diffjax.convert.video import convert_motion_state_dicts
from diffjax.errors import InputError
from diffjax.models.unet import UNet2DConditionModel
from diffjax.models.unet3d import TEMPORAL_PATTERN, UNet3DConditionModel, UNetMotionModel

TOL = 1e-4  # max |diff| / max |ref|, with unit-std references


@functools.lru_cache(maxsize=None)
def video_fn(module):
    return jax.jit(lambda p, x, t, c, kw: module.apply({"params": p}, x, t, c, **kw))


def rel_err(out, want):
    return float(np.max(np.abs(np.asarray(out) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def unet3d():
    model = ref.build_unet3d(seed=3)
    config = dict(model.config)
    params = convert_diffusers_state_dict(config, model.state_dict(),
                                          class_name="UNet3DConditionModel")
    module = build_model(config, "UNet3DConditionModel")
    return types.SimpleNamespace(torch=model, config=config, module=module, params=params)


@pytest.fixture(scope="module")
def motion():
    unet, adapter, model = ref.build_motion(seed=5)
    module, params = convert_motion_state_dicts(
        dict(unet.config), unet.state_dict(), dict(adapter.config), adapter.state_dict())
    return types.SimpleNamespace(unet=unet, adapter=adapter, torch=model, module=module,
                                 params=params)


def test_unet3d_matches_diffusers(unet3d):
    inputs = ref.video_inputs(ref.TINY_3D, seed=1)
    want = ref.run_video(unet3d.torch, inputs, repeat_context=False)
    assert 0.5 < want.std() < 2.0
    out = video_fn(unet3d.module)(unet3d.params, inputs["sample"], inputs["timesteps"],
                                  inputs["context"], {})
    assert out.shape == inputs["sample"].shape
    assert rel_err(out, want) <= TOL
    # the temporal layers count: the same frames in another order give other outputs
    perm = inputs["sample"][:, ::-1]
    out_perm = video_fn(unet3d.module)(unet3d.params, perm, inputs["timesteps"],
                                       inputs["context"], {})
    assert rel_err(np.asarray(out_perm)[:, ::-1], want) > 1e-2


def test_motion_unet_matches_diffusers_per_frame_context_and_residuals(motion):
    """Per-frame contexts ``[B, F, S, D]`` and per-frame ControlNet residuals, vs the
    motion UNet diffusers builds with ``UNetMotionModel.from_unet2d(unet, adapter)``."""
    inputs = ref.video_inputs(ref.TINY_SD, seed=2, per_frame_context=True)
    rng = np.random.default_rng(7)
    shapes = ref.skip_shapes(ref.TINY_SD, 2, ref.FRAMES, 8)
    down = [0.3 * rng.standard_normal(s).astype(np.float32) for s in shapes]
    mid = 0.3 * rng.standard_normal(shapes[-1]).astype(np.float32)
    want = ref.run_video(motion.torch, inputs, True, residuals=(down, mid))
    plain = ref.run_video(motion.torch, inputs, True)
    assert rel_err(plain, want) > 1e-2  # the residuals matter
    kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    out = video_fn(motion.module)(motion.params, inputs["sample"], inputs["timesteps"],
                                  inputs["context"], kw)
    assert rel_err(out, want) <= TOL


def test_motion_unet_is_built_from_the_sd_unet(motion):
    """The spatial parameters are exactly the 2-D checkpoint's (key for key)."""
    flat = flax.traverse_util.flatten_dict(motion.params)
    spatial = {k: v for k, v in flat.items() if "motion_modules" not in "/".join(k)}
    p2d = flax.traverse_util.flatten_dict(convert_diffusers_state_dict(
        dict(motion.unet.config), motion.unet.state_dict(), class_name="UNet2DConditionModel"))
    assert spatial.keys() == p2d.keys()
    for k in spatial:
        np.testing.assert_array_equal(spatial[k], p2d[k])
    motion_keys = [k for k in flat if "motion_modules" in "/".join(k)]
    assert motion_keys and all(
        __import__("re").search(TEMPORAL_PATTERN, "/".join(k)) for k in motion_keys)


def _zero_temporal(params):
    """Zero the output projection of every temporal residual branch (temporal convs' last
    conv, temporal transformers' proj_out): each branch becomes the identity."""
    def zero(path, leaf):
        p = "/".join(str(getattr(k, "key", k)) for k in path)
        last = ("conv4_3/" in p) or ("/proj_out/" in p and ("temp_attentions" in p or
                                                          "motion_modules" in p or
                                                          "transformer_in" in p))
        return np.zeros_like(leaf) if last else leaf
    return jax.tree_util.tree_map_with_path(zero, params)


def _strip_temporal(params):
    flat = flax.traverse_util.flatten_dict(params)
    keep = {k: v for k, v in flat.items()
            if not __import__("re").search(TEMPORAL_PATTERN, "/".join(k))}
    return flax.traverse_util.unflatten_dict(keep)


def _per_frame_2d(module2d, params2d, inputs):
    x = inputs["sample"]
    b, f = x.shape[:2]
    out = jax.jit(module2d.apply)({"params": params2d}, x.reshape((b * f,) + x.shape[2:]),
                         np.repeat(inputs["timesteps"], f), np.repeat(inputs["context"], f, 0))
    return np.asarray(out).reshape(x.shape[:4] + (-1,))


def test_zeroed_motion_modules_equal_2d_unet_per_frame(motion):
    inputs = ref.video_inputs(ref.TINY_SD, seed=4)
    module2d = UNet2DConditionModel.from_config(motion.module.unet2d_config())
    want = _per_frame_2d(module2d, _strip_temporal(motion.params), inputs)
    out = video_fn(motion.module)(_zero_temporal(motion.params), inputs["sample"],
                                  inputs["timesteps"], inputs["context"], {})
    assert rel_err(out, want) <= 1e-5
    full = video_fn(motion.module)(motion.params, inputs["sample"], inputs["timesteps"],
                                   inputs["context"], {})
    assert rel_err(full, want) > 1e-2  # ... and the motion modules do something when on


def test_zeroed_temporal_layers_equal_2d_unet_per_frame(unet3d):
    cfg = unet3d.module
    heads = [c // cfg.attention_head_dim for c in cfg.block_out_channels]
    module2d = UNet2DConditionModel.from_config(dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=heads, use_linear_projection=True,
        down_block_types=[t.replace("3D", "2D") for t in cfg.down_block_types],
        up_block_types=[t.replace("3D", "2D") for t in cfg.up_block_types]))
    inputs = ref.video_inputs(ref.TINY_3D, seed=6)
    want = _per_frame_2d(module2d, _strip_temporal(unet3d.params), inputs)
    out = video_fn(unet3d.module)(_zero_temporal(unet3d.params), inputs["sample"],
                                  inputs["timesteps"], inputs["context"], {})
    assert rel_err(out, want) <= 1e-5


def test_bad_inputs_raise(motion):
    x = np.zeros((1, 2, 8, 8, 4), np.float32)
    apply = functools.partial(motion.module.apply, {"params": motion.params})
    with pytest.raises(InputError, match="channels"):
        apply(np.zeros((1, 2, 8, 8, 3), np.float32), np.zeros(1), np.zeros((1, 5, 24)))
    with pytest.raises(InputError, match="frames"):
        apply(x, np.zeros(1), np.zeros((1, 3, 5, 24), np.float32))
    with pytest.raises(InputError, match="cross_attention_dim"):
        apply(x, np.zeros(1), np.zeros((1, 5, 7), np.float32))
    with pytest.raises(InputError, match="max_seq_length"):
        apply(np.zeros((1, 9, 8, 8, 4), np.float32), np.zeros(1), np.zeros((1, 5, 24)))
    with pytest.raises(InputError, match="num_attention_heads"):
        UNet3DConditionModel.from_config({**ref.TINY_3D, "num_attention_heads": 4})
    with pytest.raises(InputError, match="conv_in"):
        UNetMotionModel.from_unet2d(ref.TINY_SD, {**ref.TINY_ADAPTER, "conv_in_channels": 8})
