"""``diffjax convert`` for the video UNets: diffusers folders, original ModelScope files and
``--motion-adapter``; strict key checks. Parameters are compared with the in-memory
conversion (whose forward pass is checked against diffusers in tests/models/test_unet3d.py)."""
from __future__ import annotations

import pathlib
import sys

import flax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import _video_reference as ref  # noqa: E402

from diffjax.cli import main  # noqa: E402
from diffjax.convert import CheckpointMismatchError, convert, convert_diffusers_state_dict  # noqa: E402
from diffjax.convert import load_pretrained  # noqa: E402
from diffjax.convert.video import convert_motion_state_dicts  # noqa: E402
from diffjax.errors import InputError  # noqa: E402


def _quiet(_msg):
    pass


def assert_same_params(a, b):
    fa, fb = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.fixture(scope="module")
def unet3d(tmp_path_factory):
    model = ref.build_unet3d(seed=11)
    root = tmp_path_factory.mktemp("unet3d")
    model.save_pretrained(root / "diffusers")
    params = convert_diffusers_state_dict(dict(model.config), model.state_dict(),
                                          class_name="UNet3DConditionModel")
    return model, root, params


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    unet, adapter, model = ref.build_motion(seed=13)
    root = tmp_path_factory.mktemp("motion")
    unet.save_pretrained(root / "unet")
    adapter.save_pretrained(root / "adapter")
    model.save_pretrained(root / "motion_unet")
    module, params = convert_motion_state_dicts(dict(unet.config), unet.state_dict(),
                                                dict(adapter.config), adapter.state_dict())
    return root, module, params


def test_unet3d_folder(unet3d):
    _, root, params = unet3d
    convert(root / "diffusers", root / "flax", progress=False, log=_quiet)
    module, loaded = load_pretrained(root / "flax")
    assert type(module).__name__ == "UNet3DConditionModel"
    assert_same_params(loaded, params)


def test_saved_motion_unet_folder(motion):
    root, module, params = motion
    convert(root / "motion_unet", root / "flax_saved", progress=False, log=_quiet)
    loaded_module, loaded = load_pretrained(root / "flax_saved")
    assert loaded_module.to_config() == module.to_config()
    assert_same_params(loaded, params)


def test_cli_unet_plus_motion_adapter(motion, capsys):
    root, module, params = motion
    dst = root / "flax_cli"
    assert main(["convert", str(root / "unet"), str(dst), "--motion-adapter",
                 str(root / "adapter"), "--no-progress"]) == 0
    assert "unet (motion)" in capsys.readouterr().out
    loaded_module, loaded = load_pretrained(dst)
    assert type(loaded_module).__name__ == "UNetMotionModel"
    assert loaded_module.to_config() == module.to_config()
    assert_same_params(loaded, params)


@pytest.mark.parametrize("prefix,conv1d", [("", True), ("model.diffusion_model.", False)])
def test_original_modelscope_file(unet3d, tmp_path, prefix, conv1d):
    model, root, params = unet3d
    original = ref.to_modelscope(model.state_dict(), dict(model.config), conv1d_proj=conv1d)
    assert any("temopral_conv" in k for k in original)
    src = tmp_path / "text2video_pytorch_model.pth"
    torch.save({prefix + k: v.contiguous() for k, v in original.items()}, src)
    (tmp_path / "config.json").write_text(model.to_json_string())
    convert(src, tmp_path / "flax", config=str(tmp_path / "config.json"), progress=False,
            log=_quiet)
    _, loaded = load_pretrained(tmp_path / "flax")
    assert_same_params(loaded, params)


def test_strict_folder_lists_bad_keys(unet3d, tmp_path):
    model, _, _ = unet3d
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    del sd["down_blocks.0.temp_convs.0.conv4.3.weight"]
    sd["mid_block.temp_convs.0.extra.weight"] = torch.zeros(3)
    sd["transformer_in.proj_in.weight"] = torch.zeros(7, 16)
    src = tmp_path / "bad"
    src.mkdir()
    save_file(sd, src / "diffusion_pytorch_model.safetensors")
    (src / "config.json").write_text(model.to_json_string())
    with pytest.raises(CheckpointMismatchError) as err:
        convert(src, tmp_path / "out", progress=False, log=_quiet)
    e = err.value
    assert e.missing == ["down_blocks_0/temp_convs_0/conv4_3/kernel"]
    assert e.unexpected == ["mid_block.temp_convs.0.extra.weight"]
    assert len(e.mismatched) == 1 and "transformer_in.proj_in.weight" in e.mismatched[0]
    assert not (tmp_path / "out").exists()


def test_strict_modelscope_names(unet3d, tmp_path):
    model, _, _ = unet3d
    original = ref.to_modelscope(model.state_dict(), dict(model.config))
    original["input_blocks.1.0.temopral_conv.conv9.0.weight"] = original.pop(
        "input_blocks.1.0.temopral_conv.conv1.0.weight")
    src = tmp_path / "ms.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, src)
    (tmp_path / "config.json").write_text(model.to_json_string())
    with pytest.raises(CheckpointMismatchError) as err:
        convert(src, tmp_path / "out", config=str(tmp_path / "config.json"), progress=False,
                log=_quiet)
    assert err.value.missing == ["down_blocks_0/temp_convs_0/conv1_0/scale"]
    assert err.value.unexpected == [
        "input_blocks.1.0.temopral_conv.conv9.0.weight "
        "(-> down_blocks.0.temp_convs.0.conv9.0.weight)"]


def test_strict_motion_adapter(motion, tmp_path):
    root, _, _ = motion
    from diffusers import MotionAdapter

    # an adapter trained for another frame count: its pos_embed tables do not fit
    other = MotionAdapter(**{**ref.TINY_ADAPTER, "motion_max_seq_length": 16})
    sd = {k: v.contiguous() for k, v in other.state_dict().items()}
    del sd["up_blocks.0.motion_modules.1.proj_out.bias"]
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    cfg = other.to_json_string().replace('"motion_max_seq_length": 16',
                                         '"motion_max_seq_length": 8')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(CheckpointMismatchError, match="pos_embed.pe") as err:
        convert(root / "unet", tmp_path / "out", motion_adapter=tmp_path, progress=False,
                log=_quiet)
    assert len(err.value.mismatched) == 7  # one table per motion module
    sd = {k: v for k, v in sd.items() if not k.endswith("pos_embed.pe")}
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        convert(root / "unet", tmp_path / "out", motion_adapter=tmp_path, progress=False,
                log=_quiet)
    assert err.value.missing == ["up_blocks_0/motion_modules_1/proj_out/bias"]
    with pytest.raises(InputError, match="SD UNet2DConditionModel"):
        convert(root / "motion_unet", tmp_path / "out", motion_adapter=root / "adapter",
                progress=False, log=_quiet)
    assert not (tmp_path / "out").exists()
