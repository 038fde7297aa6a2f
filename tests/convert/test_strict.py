"""Conversion is strict: missing, unexpected or mis-shaped keys are errors that list them.

Uses the tiny diffusers VAE (its parameter template is quick to trace). Every case is
checked both in memory (``convert_diffusers_state_dict``) and through the file path /
CLI, where nothing may be written.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import save_file

import _sd_reference as ref
from diffjax import CheckpointError, InputError
from diffjax.cli import main
from diffjax.convert import (CheckpointMismatchError, convert, convert_diffusers_state_dict,
                             convert_original_state_dict, load_pretrained)


@pytest.fixture(scope="module")
def vae_state():
    model = ref.build_vae(ref.TINY_VAE, seed=5)
    return dict(model.config), {k: v.clone() for k, v in model.state_dict().items()}


def _write_folder(path, config, state_dict):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    save_file({k: v.contiguous() for k, v in state_dict.items()},
              str(path / "diffusion_pytorch_model.safetensors"))
    return path


def _broken(state, kind):
    sd = dict(state)
    if kind == "missing":
        del sd["decoder.conv_out.bias"]
    elif kind == "extra":
        sd["decoder.extra_layer.weight"] = torch.zeros(3, 3)
    elif kind == "shape":
        sd["encoder.conv_in.weight"] = torch.zeros(16, 3, 5, 5)
    return sd


EXPECT = {
    "missing": ("1 missing", "decoder/conv_out/bias"),
    "extra": ("1 unexpected", "decoder.extra_layer.weight"),
    "shape": ("1 wrong shape", "encoder.conv_in.weight: checkpoint (16, 3, 5, 5)"),
}


@pytest.mark.parametrize("kind", sorted(EXPECT))
def test_in_memory_mismatch_lists_keys(vae_state, kind):
    config, state = vae_state
    with pytest.raises(CheckpointMismatchError) as info:
        convert_diffusers_state_dict(config, _broken(state, kind))
    for text in EXPECT[kind]:
        assert text in str(info.value)
    err = info.value
    assert isinstance(err, CheckpointError)
    assert len(err.missing) + len(err.unexpected) + len(err.mismatched) == 1


@pytest.mark.parametrize("kind", sorted(EXPECT))
def test_cli_mismatch_is_one_line_and_writes_nothing(vae_state, kind, tmp_path, capsys):
    config, state = vae_state
    src = _write_folder(tmp_path / "src", config, _broken(state, kind))
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffjax convert: error:") and "\n" not in err
    for text in EXPECT[kind]:
        assert text in err
    assert not dst.exists()


def test_clean_state_dict_converts(vae_state):
    config, state = vae_state
    params = convert_diffusers_state_dict(config, state)
    assert params["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 16)  # HWIO


def test_original_checkpoint_missing_and_foreign_keys(vae_state):
    config, state = vae_state
    original = ref.to_original_vae(state, ref.TINY_VAE)
    del original["first_stage_model.decoder.mid.attn_1.q.bias"]
    original["first_stage_model.decoder.mid.attn_9.q.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointMismatchError) as info:
        convert_original_state_dict(config, original, component="vae")
    msg = str(info.value)
    assert "decoder/mid_block/attentions_0/to_q/bias" in msg  # missing, by Flax path
    assert "decoder.mid.attn_9.q.bias" in msg  # unexpected, by its original name


def test_truncated_safetensors(vae_state, tmp_path):
    config, state = vae_state
    src = _write_folder(tmp_path / "src", config, state)
    weights = src / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert(src, tmp_path / "dst", progress=False, log=lambda s: None)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        convert(src, tmp_path / "dst", progress=False, log=lambda s: None)


def test_bad_sources_and_configs(vae_state, tmp_path):
    config, state = vae_state
    with pytest.raises(InputError, match="unknown config keys"):
        convert_diffusers_state_dict({**config, "not_a_key": 1}, state)
    with pytest.raises(InputError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "dst", log=lambda s: None)
    single = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    with pytest.raises(InputError, match="--config"):
        convert(single, tmp_path / "dst", log=lambda s: None)
    with pytest.raises(InputError, match="neither a preset"):
        convert(single, tmp_path / "dst", config="sd99", log=lambda s: None)
    (tmp_path / "dst").mkdir()
    with pytest.raises(InputError, match="already exists"):
        convert(single, tmp_path / "dst", config="sd15", log=lambda s: None)
    with pytest.raises(CheckpointError, match="not a diffjax model directory"):
        load_pretrained(tmp_path / "dst")


def test_pipeline_with_one_bad_model_writes_nothing(tmp_path, capsys):
    """The UNet is fine, the VAE lacks a key: the error comes before anything is written."""
    from safetensors.numpy import load_file, save_file as save_numpy

    sample = pathlib.Path(__file__).resolve().parents[2] / "data" / "sample_tiny_sd"
    src = shutil.copytree(sample, tmp_path / "pipe")
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["encoder.mid_block.attentions.0.to_v.weight"]
    save_numpy(state, str(weights))
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "encoder/mid_block/attentions_0/to_v/kernel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
