"""Full-size video UNets (slow tier): the real ModelScope text-to-video 1.7B config and SD 1.5
+ AnimateDiff v1 / v2 adapters.

* key layout: every diffusers key and shape maps onto the diffjax model (the diffusers
  models are built on torch's ``meta`` device: no memory);
* parity: random weights, 2 frames at a 16x16 latent, max relative error <= 1e-4 (needs
  ~16 GB of RAM for ModelScope).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import _video_reference as ref
from diffjax.convert import core, mapping, presets, video
from diffjax.convert.video import convert_motion_state_dicts
from diffjax.models.unet3d import UNet3DConditionModel, UNetMotionModel

pytestmark = pytest.mark.slow


def _plain(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _keys(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()
            if not k.endswith("pos_embed.pe")]


def test_modelscope_key_layout():
    from diffusers import UNet3DConditionModel as T3

    with torch.device("meta"):
        theirs = T3(**_plain(video.MODELSCOPE_T2V_UNET))
    ours = UNet3DConditionModel.from_config(video.MODELSCOPE_T2V_UNET)
    entries = mapping.plan(_keys(theirs), core.param_template(ours))
    assert len(entries) == len(theirs.state_dict())


@pytest.mark.parametrize("adapter", sorted(video.ADAPTERS))
def test_animatediff_key_layout(adapter):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel as TM

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_plain(presets.SD15_UNET))
        theirs = TM.from_unet2d(unet, MotionAdapter(**_plain(video.ADAPTERS[adapter])),
                                load_weights=False)
    ours = UNetMotionModel.from_unet2d(presets.SD15_UNET, video.ADAPTERS[adapter])
    assert ours.to_config()["motion_max_seq_length"] == theirs.config.motion_max_seq_length
    mapping.plan(_keys(theirs), core.param_template(ours))


def test_modelscope_parity():
    model = ref.build_unet3d(_plain(video.MODELSCOPE_T2V_UNET), seed=0)
    from diffjax.convert import build_model, convert_diffusers_state_dict

    params = convert_diffusers_state_dict(dict(model.config), model.state_dict(),
                                          class_name="UNet3DConditionModel")
    module = build_model(dict(model.config), "UNet3DConditionModel")
    inputs = ref.video_inputs(dict(model.config), batch=1, frames=2, size=16)
    want = ref.run_video(model, inputs, repeat_context=False)
    out = np.asarray(module.apply({"params": params}, inputs["sample"], inputs["timesteps"],
                                  inputs["context"]))
    assert np.abs(out - want).max() / np.abs(want).max() <= 1e-4


def test_animatediff_v2_parity():
    unet, adapter, model = ref.build_motion(_plain(presets.SD15_UNET),
                                            _plain(video.ANIMATEDIFF_V1_5_2_ADAPTER), seed=0)
    module, params = convert_motion_state_dicts(
        dict(unet.config), unet.state_dict(), dict(adapter.config), adapter.state_dict())
    inputs = ref.video_inputs(dict(unet.config), batch=1, frames=2, size=16)
    want = ref.run_video(model, inputs, repeat_context=True)
    out = np.asarray(module.apply({"params": params}, inputs["sample"], inputs["timesteps"],
                                  inputs["context"]))
    assert np.abs(out - want).max() / np.abs(want).max() <= 1e-4
