"""Benchmark: 50-step DDIM around a small SD-2.1-like UNet, diffjax vs diffusers.

Measured side by side in one run, on the same machine and shapes:

* ``bare fori``: a jitted ``lax.fori_loop`` of N UNet calls with no sampler arithmetic (the
  cost of the model alone, the baseline of the <5 % overhead target);
* ``diffjax fori``: ``jax.jit(diffjax.diffusion.sample)`` (DDIM, one ``fori_loop``);
* ``diffjax py-loop``: a Python loop of N calls to one jitted DDIM step (model + update);
* ``torch bare``: N calls of the diffusers torch UNet (no scheduler);
* ``diffusers``: ``DDIMScheduler`` loop around the same torch UNet (the reference).

The torch UNet is a seeded random ``diffusers.UNet2DConditionModel`` (tiny SD 2.1 layout:
linear projections, upcast attention, v-prediction config); diffjax runs the same weights
converted in memory with :func:`diffjax.convert.convert_diffusers_state_dict`. The final
samples of both loops are compared as a sanity check.

    python experiments/bench_sampling.py                 # defaults below
    python experiments/bench_sampling.py --size 32 --batch 2 --repeats 5 --steps 50
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


def unet_config(width: int) -> dict:
    return dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=int, default=32, help="UNet base channels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm

    from diffjax.convert import build_model, convert_diffusers_state_dict
    from diffjax.diffusion import make_plan, sample
    from diffjax.diffusion.samplers import get_sampler

    if args.threads:
        torch.set_num_threads(args.threads)
    config = unet_config(args.width)
    torch.manual_seed(0)
    torch_unet = UNet2DConditionModel(**config).eval()
    params = {"params": convert_diffusers_state_dict(dict(torch_unet.config),
                                                      torch_unet.state_dict())}
    unet = build_model(dict(torch_unet.config))

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((args.batch, args.size, args.size, 4)).astype(np.float32)
    ctx_np = rng.standard_normal((args.batch, 7, 32)).astype(np.float32)
    x, ctx = jnp.asarray(x_np), jnp.asarray(ctx_np)
    n = args.steps
    plan = make_plan(SD21_SCHEDULER, "ddim", n)
    ts = jnp.asarray(plan.timesteps)

    def denoise(p, x_t, t, c):
        return unet.apply(p, x_t, t, c)

    @jax.jit
    def bare_fori(p, x, c):
        return jax.lax.fori_loop(0, n, lambda i, v: denoise(p, v, ts[i], c), x)

    @jax.jit
    def diffjax_fori(p, x, c):
        return sample(lambda x_t, t, cc: denoise(p, x_t, t, cc), x, cond=c,
                      scheduler_config=SD21_SCHEDULER, sampler="ddim", num_inference_steps=n)

    ddim, tab_np = get_sampler("ddim"), plan

    @jax.jit
    def one_step(p, x, c, i):
        tab = tab_np.arrays()
        out = denoise(p, x, tab["timesteps"][i], c)
        return ddim.step(tab_np, tab, i, x, out, (), None, i == 0, 0.0)[0]

    def diffjax_pyloop():
        v = x
        for i in range(n):
            v = one_step(params, v, ctx, jnp.int32(i))
        return v.block_until_ready()

    x_t, ctx_t = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ctx_np)
    sched = DDIMScheduler.from_config(SD21_SCHEDULER)

    @torch.no_grad()
    def torch_bare():
        v = x_t
        for t in sched.timesteps:
            v = torch_unet(v, t, ctx_t).sample
        return v

    @torch.no_grad()
    def diffusers_loop():
        sched.set_timesteps(n)
        v = x_t
        for t in sched.timesteps:
            v = sched.step(torch_unet(v, t, ctx_t).sample, t, v).prev_sample
        return v

    sched.set_timesteps(n)
    print(f"devices: jax {jax.devices()[0].platform} x{jax.device_count()}, torch threads "
          f"{torch.get_num_threads()}; UNet width {args.width}, latent {args.batch}x"
          f"{args.size}x{args.size}x4, {n} DDIM steps, {args.repeats} repeats (median)")
    t0 = time.perf_counter()
    for fn in (bare_fori, diffjax_fori):
        fn(params, x, ctx).block_until_ready()
    one_step(params, x, ctx, jnp.int32(0)).block_until_ready()
    print(f"compile (3 jitted functions): {time.perf_counter() - t0:.1f} s")
    ours = np.asarray(diffjax_fori(params, x, ctx))
    ref = diffusers_loop().permute(0, 2, 3, 1).numpy()
    print(f"final sample diffjax vs diffusers: max|diff| = {np.abs(ours - ref).max():.2e} "
          f"(max|x| = {np.abs(ref).max():.2f})")
    np.testing.assert_allclose(np.asarray(diffjax_pyloop()), ours, rtol=1e-4, atol=1e-4)

    runs = {
        "bare fori (model only)": lambda: bare_fori(params, x, ctx).block_until_ready(),
        "diffjax fori (sample)": lambda: diffjax_fori(params, x, ctx).block_until_ready(),
        "diffjax py-loop of jitted steps": diffjax_pyloop,
        "torch bare (model only)": torch_bare,
        "diffusers DDIMScheduler loop": diffusers_loop,
    }
    med = {}
    # Interleave repeats so machine-load drift hits every variant alike.
    samples = {k: [] for k in runs}
    for _ in tqdm(range(args.repeats), desc="timing", unit="repeat"):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    print(f"\n{'variant':34s} {'median s':>9s} {'steps/s':>8s}")
    for name, vals in samples.items():
        med[name] = statistics.median(vals)
        print(f"{name:34s} {med[name]:9.3f} {n / med[name]:8.1f}")
    base = med["bare fori (model only)"]
    print("\nratios (time / time):")
    print(f"  diffjax fori / bare fori              {med['diffjax fori (sample)'] / base:6.3f}"
          "   (target < 1.05)")
    print(f"  diffjax py-loop / diffjax fori        "
          f"{med['diffjax py-loop of jitted steps'] / med['diffjax fori (sample)']:6.3f}")
    print(f"  diffusers loop / torch bare           "
          f"{med['diffusers DDIMScheduler loop'] / med['torch bare (model only)']:6.3f}")
    print(f"  diffusers loop / diffjax fori         "
          f"{med['diffusers DDIMScheduler loop'] / med['diffjax fori (sample)']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
