"""LoRA import / export against diffusers + peft (PyTorch CPU, fp32).

A random diffusers UNet (SD 2.1 key layout, tiny widths) gets a peft adapter with random
``lora_A`` and ``lora_B`` (rank 4, alpha 8), on the attention projections only or on
attention + convolutions (LoCon). The same adapter is written in each file layout users
have (diffusers/peft with the adapter metadata in the header, old ``lora.down``/``up``,
old attention-processor keys, kohya with ``.alpha``); each file is imported by
``diffjax.convert.lora`` and the diffjax UNet with the unmerged LoRA must match the peft
model's output (``max|diff| / max|ref| <= 1e-4``). Where diffusers' own
``load_lora_weights`` reads the file, its output is checked too. Export goes the other way:
the diffjax tree written by ``export_diffusers`` is loaded by diffusers.
"""
from __future__ import annotations

import functools
import json
import pathlib
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _sd_reference as ref
from diffjax.convert import build_model, convert_diffusers_state_dict, load_pretrained
from diffjax.convert import lora as CL
from diffjax.convert.sources import SafetensorsFile
from diffjax.errors import CheckpointError
from diffjax.nn import lora as L

TOL = 1e-4
RANK, ALPHA = 4, 8.0
TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0"],
           "locon": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "conv"]}
CONFIG = dict(ref.TINY_SD21, block_out_channels=(8, 16), norm_num_groups=4,
              cross_attention_dim=8, attention_head_dim=2)
SIZE = 8


class _Pipe:
    """The minimum of a pipeline that diffusers' ``load_lora_weights`` needs (a UNet)."""

    hf_device_map = None
    unet_name, text_encoder_name = "unet", "text_encoder"

    def __init__(self, unet):
        self.unet, self.text_encoder = unet, None

    @property
    def components(self):
        return {"unet": self.unet}


@functools.lru_cache(maxsize=None)
def _pipe_cls():
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    return type("Pipe", (_Pipe, StableDiffusionLoraLoaderMixin), {})


def diffusers_with_file(path) -> np.ndarray:
    """Output of a fresh copy of the base UNet after diffusers' ``load_lora_weights(path)``."""
    unet = ref.build_unet(CONFIG, seed=3)
    _pipe_cls()(unet).load_lora_weights(str(path))
    return ref.run_unet(unet, ref.unet_inputs(CONFIG, size=SIZE))


def rel_err(out, want) -> float:
    return float(np.abs(out - want).max() / np.abs(want).max())


@functools.lru_cache(maxsize=None)
def base():
    unet = ref.build_unet(CONFIG, seed=3)
    params = convert_diffusers_state_dict(dict(unet.config), unet.state_dict())
    module = build_model(dict(unet.config))
    inputs = ref.unet_inputs(CONFIG, size=SIZE)
    return types.SimpleNamespace(module=module, params=params, inputs=inputs,
                                 plain=ref.run_unet(unet, inputs))


@functools.lru_cache(maxsize=None)
def adapter(kind: str):
    """``(peft state dict without the "unet." prefix, reference output)``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = ref.build_unet(CONFIG, seed=3)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[kind],
                                init_lora_weights=False))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    sd = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return sd, ref.run_unet(unet, base().inputs)


def diffjax_out(lora, scale=1.0) -> np.ndarray:
    b = base()
    x = b.inputs
    return np.asarray(L.apply(b.module, b.params, lora, x["sample"], x["timesteps"],
                              x["context"], scale=scale))


def write_file(tmp: pathlib.Path, kind: str, layout: str) -> pathlib.Path:
    """The adapter ``kind`` as a file of ``layout``; alpha travels as the layout allows."""
    sd, _ = adapter(kind)
    out, meta = {}, None
    for key, value in sd.items():
        module, ab, _ = key.rsplit(".", 2)  # <module>.lora_A.weight
        down = ab == "lora_A"
        if layout == "peft":
            out[f"unet.{key}"] = value
        elif layout == "kohya":
            stem = "lora_unet_" + module.replace(".", "_")
            out[f"{stem}.lora_{'down' if down else 'up'}.weight"] = value
            out[f"{stem}.alpha"] = torch.tensor(ALPHA)
        else:  # no alpha in these layouts: fold alpha / rank into up
            value = value if down else value * (ALPHA / RANK)
            w = "down" if down else "up"
            if layout == "old":
                out[f"unet.{module}.lora.{w}.weight"] = value
            elif layout == "processor":
                attn, proj = module.rsplit(".", 1) if not module.endswith("to_out.0") else (
                    module[:-len(".to_out.0")], "to_out")
                out[f"{attn}.processor.{proj}_lora.{w}.weight"] = value
    if layout == "peft":
        meta = {"lora_adapter_metadata": json.dumps(
            {"unet.r": RANK, "unet.lora_alpha": ALPHA, "unet.target_modules": TARGETS[kind]})}
    path = tmp / f"{kind}_{layout}.safetensors"
    save_file(out, str(path), metadata=meta)
    return path


CASES = [("attention", "peft"), ("attention", "old"), ("attention", "processor"),
         ("attention", "kohya"), ("locon", "peft"), ("locon", "old"), ("locon", "kohya")]


@pytest.mark.parametrize("kind,layout", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_import_matches_peft(kind, layout, tmp_path):
    _, want = adapter(kind)
    assert rel_err(base().plain, want) > 1e-2, "the adapter must change the output"
    path = write_file(tmp_path, kind, layout)
    lora = CL.import_lora(path, base().params)
    assert len(L.entries(lora)) == len({k.rsplit(".", 2)[0] for k in adapter(kind)[0]})
    assert rel_err(diffjax_out(lora), want) <= TOL
    if layout in ("peft", "kohya"):  # diffusers reads these files: the same output
        assert rel_err(diffusers_with_file(path), want) <= TOL


@pytest.mark.slow
def test_merged_checkpoint_and_lora_only_cli(tmp_path):
    """``diffjax convert UNET --lora FILE --lora-scale S`` and ``--lora-only``."""
    from diffjax.cli import main

    unet = ref.build_unet(CONFIG, seed=3)
    unet.save_pretrained(tmp_path / "unet")
    path = write_file(tmp_path, "locon", "kohya")
    assert main(["convert", str(tmp_path / "unet"), str(tmp_path / "merged"), "--lora", str(path),
                 "--lora-scale", "0.5", "--no-progress"]) == 0
    module, params = load_pretrained(tmp_path / "merged")
    x = base().inputs
    merged = np.asarray(module.apply({"params": params}, x["sample"], x["timesteps"],
                                     x["context"]))
    lora = CL.import_lora(path, base().params)
    assert rel_err(merged, diffjax_out(lora, scale=0.5)) <= TOL
    assert rel_err(merged, base().plain) > 1e-3
    assert main(["convert", "--lora-only", str(write_file(tmp_path, "locon", "peft")),
                 str(tmp_path / "lora_tree")]) == 0
    loaded = CL.load_lora(tmp_path / "lora_tree", base().params)
    peft_lora = CL.import_lora(tmp_path / "locon_peft.safetensors", base().params)
    got = L.entries(loaded)
    assert set(got) == set(L.entries(peft_lora))
    for p, e in L.entries(peft_lora).items():
        for k in ("down", "up", "alpha"):
            np.testing.assert_array_equal(np.asarray(got[p][k]), np.asarray(e[k]))


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_export_loads_in_diffusers(kind, tmp_path):
    _, want = adapter(kind)
    lora = CL.import_lora(write_file(tmp_path, kind, "kohya"), base().params)
    path = CL.export_diffusers(lora, tmp_path / "export")
    assert path.name == "pytorch_lora_weights.safetensors"
    assert rel_err(diffusers_with_file(path), want) <= TOL
    again = CL.import_lora(path, base().params)  # and back: the metadata gives alpha
    assert rel_err(diffjax_out(again), want) <= TOL


def test_alpha_defaults_to_rank_without_metadata():
    sd, _ = adapter("attention")
    lora = CL.import_lora(sd, base().params)
    assert {float(e["alpha"]) for e in L.entries(lora).values()} == {float(RANK)}
    lora = CL.import_lora(sd, base().params, metadata={"r": RANK, "lora_alpha": ALPHA})
    assert {float(e["alpha"]) for e in L.entries(lora).values()} == {ALPHA}


# ----------------------------------------------------------------------------- bad files
def test_truncated_file(tmp_path):
    path = write_file(tmp_path, "attention", "peft")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        CL.import_lora(tmp_path / "cut.safetensors", base().params)


def test_wrong_model_lists_every_key(tmp_path):
    path = write_file(tmp_path, "locon", "peft")
    other = build_model(dict(CONFIG, block_out_channels=(8, 24)))
    from diffjax.convert.core import param_template
    import flax

    template = flax.traverse_util.unflatten_dict(param_template(other))
    with pytest.raises(CL.LoraFileError, match="do not adapt the kernel") as err:
        CL.import_lora(path, template)
    assert len(err.value.bad) > 10  # every mis-shaped module, not just the first


def test_unknown_keys_and_missing_halves(tmp_path):
    sd, _ = adapter("attention")
    bad = dict(sd)
    bad["down_blocks.0.nonexistent.to_q.lora_A.weight"] = torch.zeros(4, 8)
    bad["down_blocks.0.nonexistent.to_q.lora_B.weight"] = torch.zeros(8, 4)
    bad["some_random_tensor"] = torch.zeros(3)
    first_b = next(k for k in sd if k.endswith("lora_B.weight"))
    del bad[first_b]
    with pytest.raises(CL.LoraFileError) as err:
        CL.import_lora(bad, base().params)
    text = str(err.value)
    assert "nonexistent" in text and "some_random_tensor" in text
    assert "needs both down and up" in text
    te = dict(sd, **{"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                     torch.zeros(4, 8)})
    with pytest.raises(CL.LoraFileError, match="text-encoder"):
        CL.import_lora(te, base().params)
    assert L.entries(CL.import_lora(te, base().params, skip_text_encoder=True))


def test_nan_values(tmp_path):
    sd, _ = adapter("attention")
    bad = dict(sd)
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    bad[key] = sd[key].clone()
    bad[key][0, 0] = float("nan")
    with pytest.raises(CL.LoraFileError, match="non-finite"):
        CL.import_lora(bad, base().params)


@pytest.mark.slow
def test_full_sd21_unet_parity(tmp_path):
    """The real SD 2.1 UNet configuration (865 M parameters, random weights), LoCon LoRA."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffjax.convert import presets

    config = presets.get("sd21")["unet"]
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config).eval()
    params = convert_diffusers_state_dict(dict(unet.config), unet.state_dict())
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS["locon"],
                                init_lora_weights=False))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    sd = get_peft_model_state_dict(unet)
    inputs = ref.unet_inputs(dict(config), batch=1, size=32)
    want = ref.run_unet(unet, inputs)
    path = tmp_path / "sd21_lora.safetensors"
    save_file({f"unet.{k}": v.contiguous() for k, v in sd.items()}, str(path), metadata={
        "lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": ALPHA})})
    lora = CL.import_lora(path, params)
    module = build_model(dict(unet.config))
    out = np.asarray(L.apply(module, params, lora, inputs["sample"], inputs["timesteps"],
                             inputs["context"]))
    assert rel_err(out, want) <= TOL
    assert SafetensorsFile(path).metadata["lora_adapter_metadata"]
