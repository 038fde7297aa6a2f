"""Make the EfficientNetV2 parity references with torchvision's own ``EfficientNet``.

torchvision cannot be installed beside the test suite's torch, so this runs in a separate
virtual environment (torch 2.14.1 + torchvision 0.29.1, CPU, float32)::

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tv/bin/python tests/data/efficientnet/make_golden.py            # the committed golden
    /tmp/tv/bin/python tests/data/efficientnet/make_golden.py --full-size /tmp/effv2s_full.npz

Golden (``golden.npz``, committed): a reduced-width EfficientNetV2-S built from
torchvision's ``FusedMBConvConfig`` / ``MBConvConfig`` (width 0.25 via torchvision's
``adjust_channels``; 1-2 layers per stage so that every block kind has a residual block:
stage 1 (fused, expand 1), stage 2 (fused, expand 4) and stage 6 (MBConv); last conv to 320
channels), random weights with non-trivial BatchNorm statistics (random affines and
squeeze-excitation biases, then running statistics accumulated over random batches in
train mode; see :func:`randomise`), in eval mode. Saved: the ``features`` state dict
(``sd/<key>``), the stage table (``config``, JSON), two inputs (``x`` 2x3x64x64 and ``x_odd`` 1x3x40x56,
NCHW) and the outputs of every ``features[i]`` for ``x`` (``stage_i``) and the final
output for ``x_odd`` (``out_odd``).

``--full-size PATH``: torchvision's ``efficientnet_v2_s()`` (random init, BatchNorm
statistics randomised the same way), one 1x3x224x224 input, the ``features`` output; too
big to commit (80 MB), used once by ``tests/models/test_encoders_full_size.py``.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch
import torchvision
from torchvision.models import efficientnet as tv
from torchvision.ops import StochasticDepth

HERE = pathlib.Path(__file__).resolve().parent
WIDTH = 0.25
# (kind, expand, kernel, stride, in, out, layers) before width scaling: the V2-S table with
# 1-2 layers per stage.
REDUCED = [("fused", 1, 3, 1, 24, 24, 1), ("fused", 4, 3, 2, 24, 48, 2),
           ("fused", 4, 3, 2, 48, 64, 1), ("mbconv", 4, 3, 2, 64, 128, 1),
           ("mbconv", 6, 3, 1, 128, 160, 1), ("mbconv", 6, 3, 2, 160, 256, 2)]
LAST = 320  # 1280 * WIDTH


def reduced_model() -> tuple[torch.nn.Module, list]:
    configs, table = [], []
    for kind, e, k, s, cin, cout, n in REDUCED:
        if kind == "fused":  # FusedMBConvConfig takes no width_mult: scale like torchvision does
            cin, cout = (tv._MBConvConfig.adjust_channels(c, WIDTH) for c in (cin, cout))
            cfg = tv.FusedMBConvConfig(e, k, s, cin, cout, n)
        else:
            cfg = tv.MBConvConfig(e, k, s, cin, cout, n, width_mult=WIDTH)
        configs.append(cfg)
        table.append([kind, cfg.expand_ratio, cfg.kernel, cfg.stride, cfg.input_channels,
                      cfg.out_channels, cfg.num_layers])
    norm = lambda c: torch.nn.BatchNorm2d(c, eps=1e-3)  # noqa: E731 (as efficientnet_v2_s)
    model = tv.EfficientNet(configs, dropout=0.2, last_channel=LAST, norm_layer=norm)
    return model, table


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int, size: int) -> None:
    """Non-trivial BatchNorm statistics and biases (in place), then eval mode.

    Random BatchNorm affines and squeeze-excitation biases first, then running statistics
    accumulated (cumulative average) over random batches of the same distribution as the
    test inputs in train mode without stochastic depth, so that, as in a trained network,
    every BatchNorm's statistics match what reaches it. (Random statistics that do not match
    make the deep network chaotic: float32 and float64 torch then disagree by O(1) at the
    output, and no float32 reimplementation can be compared.)
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:  # squeeze-excitation
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    for m in bns:
        m.momentum = None  # cumulative average over the batches below
        m.reset_running_stats()
    model.train()
    for m in model.modules():
        if isinstance(m, StochasticDepth):
            m.eval()
    for _ in range(2):
        model.features(torch.rand(4, 3, size, size, generator=g) * 2 - 1)
    for m in bns:
        m.momentum = 0.1
    model.eval()


def state_arrays(model: torch.nn.Module) -> dict:
    return {f"sd/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()
            if k.startswith("features.")}


@torch.no_grad()
def golden(path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model, table = reduced_model()
    randomise(model, seed=1, size=64)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    x_odd = torch.rand(1, 3, 40, 56, generator=g) * 2 - 1
    out = {"config": np.array(json.dumps({"stages": table, "last_channels": LAST,
                                          "torch": torch.__version__,
                                          "torchvision": torchvision.__version__})),
           "x": x.numpy(), "x_odd": x_odd.numpy()}
    h = x
    for i, layer in enumerate(model.features):
        h = layer(h)
        out[f"stage_{i}"] = h.numpy()
    assert torch.equal(h, model.features(x))
    out["out_odd"] = model.features(x_odd).numpy()
    out.update(state_arrays(model))
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), output {tuple(h.shape)}")


@torch.no_grad()
def full_size(path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = tv.efficientnet_v2_s()
    randomise(model, seed=1, size=224)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2)) * 2 - 1
    stages, h = {}, x
    for i, layer in enumerate(model.features):
        h = layer(h)
        stages[f"stage_{i}"] = h.numpy()
    y = model.features(x)
    np.savez(path, x=x.numpy(), y=y.numpy(), **stages, **state_arrays(model))
    print(f"wrote {path}, output {tuple(y.shape)}, |y|max {y.abs().max():.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "golden.npz")
    parser.add_argument("--full-size", type=pathlib.Path, default=None,
                        help="write the full-size efficientnet_v2_s reference here instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.full_size is not None:
        full_size(args.full_size)
    else:
        golden(args.out)


if __name__ == "__main__":
    main()
