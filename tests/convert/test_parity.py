"""Numerical parity of the converted SD UNet / VAE with diffusers (PyTorch CPU, fp32).

Each case builds a random diffusers model of one family (real block types and key layout),
``save_pretrained``s it, converts the folder with ``diffjax.convert.convert``, loads it with
``load_pretrained`` and compares outputs on the same inputs: ``max|diff| <= 1e-4`` with the
reference output rescaled to unit standard deviation. The single-file test rebuilds an
original (LDM-layout) checkpoint from the diffusers weights with the standard key mapping
and checks it converts to *identical* parameters.
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

import _sd_reference as ref
from diffjax.convert import convert, load_pretrained

TOL = 1e-4


# Per family: latent size and whether the call also carries an encoder attention mask and
# ControlNet-style residuals (SD 2.1-like: 15x15 also exercises upsampling to the skip size).
CASES = {"sd15": dict(size=16), "sd21": dict(size=15, extras=True), "sdxl": dict(size=16)}
_EXTRA_KEYS = ("added_cond_kwargs", "encoder_attention_mask", "down_block_additional_residuals",
               "mid_block_additional_residual")


@functools.lru_cache(maxsize=None)
def unet_fn(module):
    """One jitted forward per (hashable) module config, shared across tests."""
    return jax.jit(lambda p, x, t, c, kw: module.apply({"params": p}, x, t, c, **kw))


@functools.lru_cache(maxsize=None)
def vae_fn(module):
    """encode -> (mean, logvar, decode(mean)) in one jitted program."""
    def roundtrip(p, x):
        post = module.apply({"params": p}, x, method="encode")
        return post.mean, post.logvar, module.apply({"params": p}, post.mean, method="decode")
    return jax.jit(roundtrip)


def run_flax_unet(module, params, inputs):
    kw = {k: inputs[k] for k in _EXTRA_KEYS if k in inputs}
    out = unet_fn(module)(params, inputs["sample"], inputs["timesteps"], inputs["context"], kw)
    return np.asarray(out)


def _quiet(_msg):
    pass


@pytest.fixture(scope="module", params=sorted(CASES))
def unet_case(request, tmp_path_factory):
    kind = request.param
    config = ref.UNET_CONFIGS[kind]
    model = ref.build_unet(config, seed=len(kind))
    root = tmp_path_factory.mktemp(f"unet_{kind}")
    model.save_pretrained(root / "diffusers")
    convert(root / "diffusers", root / "flax", progress=False, log=_quiet)
    module, params = load_pretrained(root / "flax")
    inputs = ref.unet_inputs(config, **CASES[kind])
    return types.SimpleNamespace(kind=kind, config=config, torch=model, root=root, module=module,
                                 params=params, inputs=inputs, ref=ref.run_unet(model, inputs),
                                 out=run_flax_unet(module, params, inputs))


def test_unet_matches_diffusers(unet_case):
    c = unet_case
    assert 0.5 < c.ref.std() < 2.0, "reference output must be of unit scale"
    assert c.out.shape == c.ref.shape == c.inputs["sample"].shape
    if "mid_block_additional_residual" in c.inputs:  # the residuals really change the output
        plain = ref.run_unet(c.torch, {k: c.inputs[k] for k in ("sample", "timesteps", "context")})
        assert np.abs(plain - c.ref).max() > 0.1
    err = np.abs(c.out - c.ref).max()
    print(f"{c.kind}: max|diff| = {err:.2e} (ref std {c.ref.std():.2f})")
    assert err <= TOL


def test_unet_config_round_trip(unet_case):
    """The saved JSON rebuilds the diffusers model's config exactly (names and values)."""
    torch_cfg = {k: v for k, v in unet_case.torch.config.items() if not k.startswith("_")}
    ours = unet_case.module.to_config()
    for key, value in torch_cfg.items():
        want = list(value) if isinstance(value, tuple) else value
        got = ours[key]
        assert json.loads(json.dumps(got)) == json.loads(json.dumps(want)), key
    assert ours["prediction_type"] == "epsilon"


@pytest.fixture(scope="module")
def vae_case(tmp_path_factory):
    model = ref.build_vae(ref.TINY_VAE, seed=3)
    root = tmp_path_factory.mktemp("vae")
    model.save_pretrained(root / "diffusers")
    convert(root / "diffusers", root / "flax", progress=False, log=_quiet)
    module, params = load_pretrained(root / "flax")
    x = ref.vae_input(ref.TINY_VAE)
    with torch.no_grad():
        post = model.encode(ref.nchw(x)).latent_dist
        decoded = model.decode(post.mean).sample
    return types.SimpleNamespace(torch=model, root=root, module=module, params=params, x=x,
                                 mean=ref.nhwc(post.mean), logvar=ref.nhwc(post.logvar),
                                 decoded=ref.nhwc(decoded))


def test_vae_matches_diffusers(vae_case):
    c = vae_case
    mean, logvar, image = vae_fn(c.module)(c.params, c.x)
    for name, got, want in (("mean", mean, c.mean), ("logvar", logvar, c.logvar),
                            ("decode", image, c.decoded)):
        got = np.asarray(got)
        assert got.shape == want.shape, name
        assert 0.5 < want.std() < 2.0 or name == "logvar", f"{name} reference must be unit scale"
        err = np.abs(got - want).max()
        print(f"vae {name}: max|diff| = {err:.2e}")
        assert err <= TOL, name
    assert c.module.scaling_factor == pytest.approx(0.18215)


def _assert_same_params(a, b):
    fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("unet_case", ["sd15"], indirect=True)
def test_original_single_file_checkpoint(unet_case, vae_case, tmp_path):
    """An original SD file (UNet + VAE + unrelated text-encoder keys) converts exactly."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    unet_sd = unet_case.torch.state_dict()
    vae_sd = vae_case.torch.state_dict()
    original = {**ref.to_original_unet(unet_sd, unet_case.config),
                **ref.to_original_vae(vae_sd, ref.TINY_VAE),
                "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8),
                "alphas_cumprod": torch.linspace(1, 0, 10)}
    # The test's mapping is the standard one: diffusers' own single-file loader inverts it.
    back = convert_ldm_unet_checkpoint(original, dict(unet_case.torch.config))
    assert sorted(back) == sorted(unet_sd)
    assert all(torch.equal(back[k], unet_sd[k]) for k in unet_sd)
    back = convert_ldm_vae_checkpoint(original, dict(vae_case.torch.config))
    assert sorted(back) == sorted(vae_sd)
    assert all(torch.equal(back[k], vae_sd[k]) for k in vae_sd)

    path = tmp_path / "tiny-original.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    unet_json = unet_case.root / "diffusers" / "config.json"
    convert(path, tmp_path / "unet", config=str(unet_json), progress=False, log=_quiet)
    module, params = load_pretrained(tmp_path / "unet")
    _assert_same_params(params, unet_case.params)
    out = run_flax_unet(module, params, unet_case.inputs)
    assert np.abs(out - unet_case.ref).max() <= TOL

    convert(path, tmp_path / "vae", config=str(vae_case.root / "diffusers" / "config.json"),
            progress=False, log=_quiet)
    _, vae_params = load_pretrained(tmp_path / "vae")
    _assert_same_params(vae_params, vae_case.params)

    # The same checkpoint as a pickled .ckpt ({"state_dict": ...}), read through torch.
    ckpt = tmp_path / "tiny-original.ckpt"
    torch.save({"state_dict": original, "global_step": 1}, ckpt)
    convert(ckpt, tmp_path / "unet_ckpt", config=str(unet_json), progress=False, log=_quiet)
    _assert_same_params(load_pretrained(tmp_path / "unet_ckpt")[1], unet_case.params)
