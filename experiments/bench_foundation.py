"""Decode time of the foundation latent codec, split into entropy decoding, UNet and VAE.

The issue's setting: a 768x512 image, the full SD 2.1 configuration with random weights,
2 / 5 / 10 DDIM steps. With ``--reference`` the same stages run in diffusers (PyTorch,
same configs, random weights, ``DDIMScheduler`` steps from the same noise level) in the same
process, and the ratios diffjax / diffusers are printed. The paper reports 3.49 s per
Kodak image (encode + decode) on an RTX 3090; the project's target on an H100 is < 1 s.

    python experiments/bench_foundation.py                       # SD 2.1, 768x512, CPU/GPU
    python experiments/bench_foundation.py --config tiny --reference --repeats 5
    python experiments/bench_foundation.py --dtype bfloat16      # GPU/TPU

Timings are medians over ``--repeats`` runs after one warm-up (compilation excluded and
reported separately). Random weights: the time does not depend on the values.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats):
    """(first-call seconds, median seconds of ``repeats`` further calls)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def image(height, width):
    from PIL import Image

    kodim = ROOT.parent / "shared" / "data" / "kodak" / "kodim01.png"
    if kodim.exists():
        im = np.asarray(Image.open(kodim).convert("RGB"))
        if im.shape[0] >= height and im.shape[1] >= width:
            return im[:height, :width]
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def build(config: str, dtype):
    from diffjax.codecs.foundation import FoundationCodec
    from diffjax.convert.presets import SD21_UNET, SD21_VAE
    from experiments.configs.foundation_sd21 import SD21_SCHEDULER, TINY_UNET, TINY_VAE

    vae, unet = (SD21_VAE, SD21_UNET) if config == "sd21" else (TINY_VAE, TINY_UNET)
    vae = {k: v for k, v in vae.items() if not k.startswith("_")}
    unet = {k: v for k, v in unet.items() if not k.startswith("_")}
    feats, hyper = ((64, 128, 256), 128) if config == "sd21" else ((16, 32), 16)
    return FoundationCodec(10, vae="sd", vae_config=vae, unet_config=unet,
                           scheduler_config=SD21_SCHEDULER, estimator_features=feats,
                           hyper_channels=hyper, dtype=dtype), vae, unet


def bench_diffjax(codec, params, data, steps, repeats):
    import jax
    import jax.numpy as jnp

    import diffjax.compile
    from diffjax.entropy import bitstream
    from diffjax.models.param_estimator import affine_inverse

    bb = codec.backbone
    fingerprint, latent_coder, medians = codec._prepared(params)
    header, sections = bitstream.unpack(data)
    z_shape, w_shape = codec.geometry(header.height, header.width)
    side = np.frombuffer(sections[0], "<f2").astype(np.float32)
    t, gamma = side[:1], side[1:].reshape(1, 2, -1)
    hyper = codec._fn("hyper")

    def entropy():
        w = latent_coder.decode_z(sections[1], w_shape)
        z, _ = latent_coder.decode_y([sections[2]], w[None],
                                     lambda w: (hyper(params, w, medians), None))
        return z[0]

    rows = {}
    rows["entropy"] = timed(entropy, repeats)
    z = entropy()[None]
    y_hat = affine_inverse(jnp.asarray(z), jnp.asarray(gamma))
    ctx = bb.context(params, 1)
    vae_dec = diffjax.compile.jit(lambda p, y: bb.decode(p, y))
    y0 = None
    for k in steps:
        unet = diffjax.compile.jit(lambda p, y, t, c, k=k: bb.denoise(p, y, t, k, c))
        rows[f"unet_{k}"] = timed(lambda: unet(params["unet"], y_hat, jnp.asarray(t), ctx),
                                  repeats)
        y0 = unet(params["unet"], y_hat, jnp.asarray(t), ctx)
    rows["vae"] = timed(lambda: vae_dec(params["vae"], y0), repeats)
    return rows, float(t[0]), y_hat.shape


def bench_diffusers(vae_cfg, unet_cfg, latent_shape, t, steps, repeats, dtype):
    """The same stages in diffusers: UNet DDIM steps (from t) and the VAE decoder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from experiments.configs.foundation_sd21 import SD21_SCHEDULER

    torch.manual_seed(0)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    unet = UNet2DConditionModel(**unet_cfg).to(tdtype).eval()
    vae = AutoencoderKL(**vae_cfg).to(tdtype).eval()
    b, h, w, c = latent_shape
    y = torch.randn(b, c, h, w, dtype=tdtype)
    cross = unet_cfg["cross_attention_dim"]
    ctx = torch.zeros(b, 1, cross if isinstance(cross, int) else cross[0], dtype=tdtype)
    rows = {}

    def run_unet(k):
        sched = DDIMScheduler(**SD21_SCHEDULER, timestep_spacing="trailing")
        sched.set_timesteps(max(k, round(k / t)))
        x = y
        for ts in sched.timesteps[-k:]:
            x = sched.step(unet(x, ts, ctx).sample, ts, x).prev_sample
        return x

    with torch.inference_mode():
        for k in steps:
            rows[f"unet_{k}"] = _torch_timed(lambda: run_unet(k), repeats)
        rows["vae"] = _torch_timed(lambda: vae.decode(y / 0.18215).sample, repeats)
    return rows


def _torch_timed(fn, repeats):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("sd21", "tiny"), default="sd21")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--reference", action="store_true", help="also time diffusers (torch)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    codec, vae_cfg, unet_cfg = build(args.config, jnp.bfloat16 if args.dtype == "bfloat16"
                                     else jnp.float32)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, config {args.config}, "
          f"{args.width}x{args.height}, {args.dtype}")
    t0 = time.perf_counter()
    params = codec.init(jax.random.key(0))
    print(f"random parameters: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    data = codec.encode(params, image(args.height, args.width))
    print(f"encode (incl. compilation): {time.perf_counter() - t0:.1f} s, {len(data)} bytes")
    ours, t, latent_shape = bench_diffjax(codec, params, data, args.steps, args.repeats)
    ref = (bench_diffusers(vae_cfg, unet_cfg, latent_shape[:1] + latent_shape[1:], t,
                           args.steps, args.repeats, args.dtype) if args.reference else {})
    print(f"side-information t = {t:.4f} (predicted steps {codec.predicted_steps(t)})")
    print(f"{'stage':<10}{'diffjax median s':>18}{'first call s':>14}"
          + (f"{'diffusers median s':>20}{'ratio':>8}" if ref else ""))
    for name, (first, med) in ours.items():
        line = f"{name:<10}{med:>18.4f}{first:>14.2f}"
        if name in ref:
            line += f"{ref[name][1]:>20.4f}{med / ref[name][1]:>8.2f}"
        print(line)
    for k in args.steps:
        total = ours["entropy"][1] + ours[f"unet_{k}"][1] + ours["vae"][1]
        print(f"decode total, {k} steps: {total:.3f} s")


if __name__ == "__main__":
    main()
