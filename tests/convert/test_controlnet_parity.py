"""ControlNet conversion and numerical parity with diffusers ``ControlNetModel`` (PyTorch CPU).

Each family (SD 1.5-like, SD 2.1-like) builds a random diffusers ControlNet whose zero
convolutions and condition ``conv_out`` are made non-zero, ``save_pretrained``s it, converts
the folder with ``diffjax.convert.convert`` / ``diffjax convert``, loads it and compares every
residual: ``max|diff| / max|ref| <= 1e-4``. The original-format test rebuilds an lllyasviel
checkpoint from the diffusers weights with the key map of
:mod:`diffjax.convert.controlnet_ldm` (inverted independently in
``_controlnet_reference.py``) and checks it converts to *identical* parameters.
"""
from __future__ import annotations

import functools
import json
import types

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _controlnet_reference as cref
import _sd_reference as ref
from diffjax.cli import main
from diffjax.convert import CheckpointMismatchError, convert, load_pretrained
from diffjax.convert.core import convert_original_state_dict
from diffjax.models.controlnet import ControlNetModel

TOL = 1e-4
SIZE = 8  # latent 8x8, condition 64x64


def _quiet(_msg):
    pass


@functools.lru_cache(maxsize=None)
def cn_fn(module, guess_mode=False):
    return jax.jit(lambda p, x, t, c, cond, s: module.apply(
        {"params": p}, x, t, c, cond, conditioning_scale=s, guess_mode=guess_mode))


@pytest.fixture(scope="module", params=sorted(cref.CN_CONFIGS))
def cn_case(request, tmp_path_factory):
    kind = request.param
    config = cref.CN_CONFIGS[kind]
    model = cref.build_controlnet(config, seed=len(kind))
    root = tmp_path_factory.mktemp(f"controlnet_{kind}")
    model.save_pretrained(root / "diffusers")
    assert main(["convert", str(root / "diffusers"), str(root / "flax"), "--no-progress"]) == 0
    module, params = load_pretrained(root / "flax")
    inputs = ref.unet_inputs(ref.UNET_CONFIGS[kind], size=SIZE)
    cond = cref.cond_image(config, SIZE)
    return types.SimpleNamespace(kind=kind, config=config, torch=model, root=root, module=module,
                                 params=params, inputs=inputs, cond=cond)


@pytest.mark.parametrize("scale,guess_mode", [(0.7, False), (1.3, True)])
def test_residuals_match_diffusers(cn_case, scale, guess_mode):
    c = cn_case
    assert isinstance(c.module, ControlNetModel)
    want_down, want_mid = cref.run_controlnet(c.torch, c.inputs, c.cond, scale, guess_mode)
    down, mid = cn_fn(c.module, guess_mode)(c.params, c.inputs["sample"], c.inputs["timesteps"],
                                            c.inputs["context"], c.cond, scale)
    assert len(down) == len(want_down) == c.module.num_skips
    for got, want in zip(down, want_down):
        assert got.shape == want.shape
        assert np.abs(want).max() > 0.1, "the residual must not be (near) zero"
        assert cref.rel_error(got, want) <= TOL
    assert cref.rel_error(mid, want_mid) <= TOL


def test_condition_changes_residuals(cn_case):
    """The condition path is live: another condition image gives other residuals."""
    c = cn_case
    fn = cn_fn(c.module)
    a = fn(c.params, c.inputs["sample"], c.inputs["timesteps"], c.inputs["context"], c.cond, 1.0)
    b = fn(c.params, c.inputs["sample"], c.inputs["timesteps"], c.inputs["context"],
           1.0 - c.cond, 1.0)
    for x, y in ((a[0][0], b[0][0]), (a[1], b[1])):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() > 0.1 * np.abs(np.asarray(x)).max()


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_original_checkpoint_equals_diffusers_folder(cn_case, tmp_path, prefix):
    c = cn_case
    original = cref.to_original_controlnet(c.torch.state_dict(), c.config, prefix=prefix)
    assert not any(k.startswith(prefix + "controlnet_") for k in original)
    if prefix:  # a v1.0-style file: the SD model beside the ControlNet (ignored)
        original["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    path = tmp_path / "control.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(c.torch.config)))
    convert(path, tmp_path / "flax", config=str(cfg), progress=False, log=_quiet)
    _, params = load_pretrained(tmp_path / "flax")
    flat_a = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_b = dict(jax.tree_util.tree_leaves_with_path(c.params))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]))


def test_original_conversion_is_strict(cn_case):
    c = cn_case
    original = cref.to_original_controlnet(c.torch.state_dict(), c.config)
    cfg = dict(c.torch.config)
    del original["control_model.zero_convs.1.0.weight"]
    original["control_model.input_hint_block.15.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as err:
        convert_original_state_dict(cfg, original, component="controlnet")
    assert "controlnet_down_blocks_1/kernel" in str(err.value)
    assert "input_hint_block.15.weight" in str(err.value)


def test_diffusers_conversion_is_strict(cn_case, tmp_path):
    c = cn_case
    sd = dict(c.torch.state_dict())
    sd["controlnet_mid_block.weight"] = sd["controlnet_mid_block.weight"][:, :-1]
    from diffjax.convert import convert_diffusers_state_dict

    with pytest.raises(CheckpointMismatchError, match="controlnet_mid_block"):
        convert_diffusers_state_dict(dict(c.torch.config), sd)


@pytest.mark.slow
def test_full_sd15_controlnet_matches_diffusers(tmp_path):
    """The released SD 1.5 ControlNet architecture (from_unet of the SD 1.5 UNet config)."""
    from diffjax.convert import convert_diffusers_state_dict
    from diffjax.convert.controlnet_ldm import controlnet_config_from_unet
    from diffjax.convert.presets import SD15_UNET

    config = {k: v for k, v in controlnet_config_from_unet(
        SD15_UNET, conditioning_embedding_out_channels=(16, 32, 96, 256)).items()
        if not k.startswith("_")}
    model = cref.build_controlnet(config, seed=5)
    assert sum(p.numel() for p in model.parameters()) > 300e6  # the real 361 M network
    unet_cfg = dict(SD15_UNET, in_channels=4)
    inputs = ref.unet_inputs(unet_cfg, batch=1, size=64)
    cond = cref.cond_image(config, 64, batch=1)
    want_down, want_mid = cref.run_controlnet(model, inputs, cond, 0.8)
    params = convert_diffusers_state_dict(dict(model.config), model.state_dict())
    del model
    module = ControlNetModel.from_config(config)
    down, mid = cn_fn(module)(params, inputs["sample"], inputs["timesteps"], inputs["context"],
                              cond, 0.8)
    assert len(down) == 12
    for got, want in zip(down, want_down):
        assert cref.rel_error(got, want) <= TOL
    assert cref.rel_error(mid, want_mid) <= TOL
