"""Converter plumbing: sources (sharded, legacy names, pipelines), dtypes, CLI, the sample.

Parameters are compared *exactly* with the in-memory conversion of the same diffusers
model, whose numerical parity is proven in ``test_parity.py``.
"""
from __future__ import annotations

import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.torch import save_file

import _sd_reference as ref
from diffjax import InputError
from diffjax.cli import main
from diffjax.convert import (build_model, components_of, convert, convert_diffusers_state_dict,
                             load_pretrained, read_model_config)
from diffjax.models.unet import UNet2DConditionModel
from diffjax.models.vae import AutoencoderKL

SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "data" / "sample_tiny_sd"


def _quiet(_msg):
    pass


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def vae_model():
    return ref.build_vae(ref.TINY_VAE, seed=7)


@pytest.fixture(scope="module")
def vae_reference(vae_model):
    return convert_diffusers_state_dict(dict(vae_model.config), vae_model.state_dict())


def test_sharded_safetensors(vae_model, vae_reference, tmp_path):
    vae_model.save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    index = tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    convert(tmp_path / "sharded", tmp_path / "out", progress=False, log=_quiet)
    module, params = load_pretrained(tmp_path / "out")
    assert isinstance(module, AutoencoderKL)
    _same(params, vae_reference)


def test_legacy_vae_attention_names(vae_model, vae_reference):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in vae_model.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = value
    assert any(".proj_attn." in k for k in state)
    _same(convert_diffusers_state_dict(dict(vae_model.config), state), vae_reference)


def test_dtype_cast_and_load_options(vae_model, vae_reference, tmp_path):
    vae_model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "bf16", dtype="bfloat16", progress=False, log=_quiet)
    doc = read_model_config(tmp_path / "bf16")
    assert doc["param_dtypes"] == ["bfloat16"] and doc["class_name"] == "AutoencoderKL"
    module, params = load_pretrained(tmp_path / "bf16", param_dtype=jnp.float32,
                                     dtype=jnp.bfloat16, remat=True)
    assert module.dtype == jnp.bfloat16 and module.remat
    leaves = jax.tree.leaves(params)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    ref_leaves = jax.tree.leaves(vae_reference)
    for x, y in zip(leaves, ref_leaves):  # bf16 rounding only
        np.testing.assert_allclose(np.asarray(x), y, rtol=2 ** -8, atol=1e-30)
    mesh_sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                               jax.sharding.PartitionSpec())
    _, replicated = load_pretrained(tmp_path / "bf16", sharding=mesh_sharding)
    assert all(x.sharding == mesh_sharding for x in jax.tree.leaves(replicated))


def test_cli_converts_the_committed_sample(tmp_path, capsys):
    """The README main job: a diffusers pipeline folder -> unet/ + vae/ with metadata."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet

    dst = tmp_path / "tiny_sd"
    assert main(["convert", str(SAMPLE), str(dst), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "unet:" in out and "vae:" in out
    assert components_of(dst) == ["unet", "vae"]
    with pytest.raises(InputError, match="pass component="):
        load_pretrained(dst)
    unet, unet_params = load_pretrained(dst, "unet")
    assert isinstance(unet, UNet2DConditionModel)
    assert unet.prediction_type == "v_prediction"  # from scheduler/scheduler_config.json
    assert read_model_config(dst / "unet")["metadata"]["layout"] == "diffusers"
    with torch.no_grad():
        torch_unet = TorchUNet.from_pretrained(SAMPLE / "unet")
        torch_vae = TorchVAE.from_pretrained(SAMPLE / "vae")
    _same(unet_params, convert_diffusers_state_dict(dict(torch_unet.config), torch_unet.state_dict()))
    _same(load_pretrained(dst, "vae")[1],
          convert_diffusers_state_dict(dict(torch_vae.config), torch_vae.state_dict()))
    # --component + --prediction-type override
    assert main(["convert", str(SAMPLE), str(tmp_path / "u"), "--component", "unet",
                 "--prediction-type", "epsilon", "--no-progress"]) == 0
    assert load_pretrained(tmp_path / "u")[0].prediction_type == "epsilon"


def test_relative_model_paths_load(tmp_path, monkeypatch):
    """Orbax refuses relative paths; users type them (``--config.task.kwargs.unet_path=runs/x``)."""
    from diffjax.convert.core import save_pretrained

    module = build_model({"_class_name": "AutoencoderKL", "block_out_channels": [8],
                          "norm_num_groups": 4, "latent_channels": 2})
    params = flax.linen.unbox(module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    monkeypatch.chdir(tmp_path)
    save_pretrained("rel/vae", module, params)
    assert read_model_config("rel/vae")["config"]["latent_channels"] == 2
    _same(load_pretrained("rel/vae")[1], params)
    _same(load_pretrained("rel", "vae")[1], params)


def test_model_from_config_dicts():
    unet = build_model(ref.TINY_SDXL)
    assert isinstance(unet, UNet2DConditionModel) and unet.addition_embed_type == "text_time"
    assert unet.transformer_layers_per_block == (1, 2)  # lists become hashable tuples
    assert isinstance(build_model(ref.TINY_VAE), AutoencoderKL)
    with pytest.raises(InputError, match="unsupported model class"):
        build_model({"_class_name": "PriorTransformer"})
    assert type(build_model({"_class_name": "ControlNetModel"})).__name__ == "ControlNetModel"
