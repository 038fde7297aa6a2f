"""Speed of ControlNet + UNet: diffjax (jitted) vs diffusers (PyTorch, no_grad), side by side.

One guided denoiser evaluation as a ControlNet pipeline runs it per step (Zhang et al.
2023): the SD 1.5 ControlNet (``ControlNetModel.from_unet`` of the SD 1.5 UNet config:
361 M parameters) on a 512x512 condition image gives the residuals, the SD 1.5 UNet (860 M)
consumes them. Batch 1, fp32, a 64x64 latent, a 77x768 context, random weights shared by
both libraries (converted in memory) and outputs checked to agree. The median of
``--repeats`` timed calls after one warm-up call each (diffjax's warm-up includes
compilation, reported separately). The two libraries' 1.2 G parameters (4.9 GB each in
fp32) do not fit side by side on a small machine, so diffusers runs first and is freed
before diffjax runs: on a shared machine compare the printed load averages. The ratio is
diffjax / diffusers (< 1 = diffjax faster).

    python experiments/bench_controlnet.py                 # 3 repeats
    python experiments/bench_controlnet.py --repeats 5
"""
from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def build_torch(seed: int = 0):
    """diffusers SD 1.5 UNet and ``ControlNetModel.from_unet`` of it (zero convs random)."""
    import torch
    from diffusers import ControlNetModel as TorchControlNet
    from diffusers import UNet2DConditionModel as TorchUNet

    from diffjax.convert import presets

    config = {k: v for k, v in presets.SD15_UNET.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    unet_t = TorchUNet(**config).eval()
    cn_t = TorchControlNet.from_unet(unet_t).eval()
    with torch.no_grad():  # zero convs at zero would make the residuals trivially zero
        gen = torch.Generator().manual_seed(seed)
        for name, p in cn_t.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return config, unet_t, cn_t


def to_device(tree):
    """``jax.device_put`` leaf by leaf, dropping each host copy as soon as it is moved."""
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    del tree
    for i in range(len(leaves)):
        leaves[i] = jax.device_put(leaves[i])
    return jax.tree.unflatten(treedef, leaves)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import statistics
    import time

    import tempfile

    import jax
    import torch

    import diffjax.compile
    from diffjax.convert import build_model, convert_diffusers_state_dict
    from diffjax.convert.sources import DictSource
    from diffjax.models.controlnet import controlled_apply_fn

    load0 = os.getloadavg()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.1f}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64, 4), np.float32)
    t = np.array([500.0], np.float32)
    ctx = rng.standard_normal((1, 77, 768), np.float32)
    cond = rng.uniform(0, 1, (1, 512, 512, 3)).astype(np.float32)

    # ---- diffusers (then freed: both libraries' 1.2 G parameters do not fit at once on
    # a small machine, so the two run one after the other, not interleaved)
    config, unet_t, cn_t = build_torch()
    xt, tt, ct = (torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                  torch.from_numpy(ctx))
    cond_t = torch.from_numpy(cond).permute(0, 3, 1, 2)

    def theirs():
        down, mid = cn_t(xt, tt, ct, cond_t, conditioning_scale=1.0, return_dict=False)
        return unet_t(xt, tt, ct, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample

    with torch.no_grad():
        want = theirs().permute(0, 2, 3, 1).numpy()
        theirs_runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            theirs()
            theirs_runs.append(time.perf_counter() - t0)
        plain = unet_t(xt, tt, ct).sample.permute(0, 2, 3, 1).numpy()
    cn_config = dict(cn_t.config)
    # through .npy files (one per tensor, read back memory-mapped), so the torch models are
    # freed before conversion and no second full copy is ever held
    tmp = tempfile.TemporaryDirectory(prefix="bench_controlnet_")
    names = {}
    for model, what in ((unet_t, "unet"), (cn_t, "controlnet")):
        names[what] = []
        for i, (key, value) in enumerate(model.state_dict().items()):
            np.save(f"{tmp.name}/{what}_{i}.npy", value.detach().numpy())
            names[what].append(key)
    del unet_t, cn_t, model, value
    gc.collect()

    def source(what):
        return DictSource({k: np.load(f"{tmp.name}/{what}_{i}.npy", mmap_mode="r")
                           for i, k in enumerate(names[what])})

    params = {"unet": to_device(convert_diffusers_state_dict(config, source("unet")))}
    params["controlnets"] = [to_device(convert_diffusers_state_dict(cn_config,
                                                                    source("controlnet")))]
    tmp.cleanup()

    # ---- diffjax
    fn = diffjax.compile.jit(controlled_apply_fn(build_model(config), build_model(cn_config),
                                                 scales=1.0))
    inputs = jax.device_put((x, t, {"context": ctx, "images": [cond]}))
    t0 = time.perf_counter()
    got = np.asarray(fn(params, *inputs).block_until_ready())
    first = time.perf_counter() - t0
    ours_runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn(params, *inputs).block_until_ready()
        ours_runs.append(time.perf_counter() - t0)
    ours_s, theirs_s = statistics.median(ours_runs), statistics.median(theirs_runs)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    effect = float(np.abs(want - plain).max() / np.abs(want).max())
    load1 = os.getloadavg()
    print(f"\nmedian of {args.repeats} runs, batch 1, fp32 "
          f"(load average {load0[0]:.1f} -> {load1[0]:.1f})")
    print("| row | diffjax (s) | diffusers (s) | diffjax / diffusers | diffjax compile (s) "
          "| max rel. diff | residual effect |")
    print("|---|---|---|---|---|---|---|")
    print(f"| SD1.5 ControlNet + UNet, 64x64 latent, 512x512 cond | {ours_s:.3f} | "
          f"{theirs_s:.3f} | {ours_s / theirs_s:.2f} | {first:.1f} | {err:.1e} | {effect:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
