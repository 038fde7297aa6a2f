"""LoRA fine-tune step: diffjax vs diffusers + peft on the same CPU, plus step memory.

The setting of issue 22: the SD 2.1 UNet configuration (random weights, identical in both
libraries: converted in memory), batch 1, a 32x32x4 latent, a 77x1024 context, rank-4
LoRA (alpha 4) on ``to_q|to_k|to_v|to_out.0``, MSE to a noise target, one Adam update
of the adapters. Rows:

* **time**: median seconds of one training step, after a warm-up (diffjax's includes
  compilation, reported separately), the two libraries alternating step by step so load
  from other processes falls on both alike; ratio = diffjax / diffusers (<= 1.0 = target).
* **memory**: XLA's own accounting of the compiled diffjax steps
  (``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased, i.e. the
  peak of live buffers the step needs) for the LoRA step and for a full fine-tune step
  (gradients of every parameter + Adam moments of every parameter); ratio LoRA / full
  (<= 60 % = target). The full step is compiled but never run (its ~14 GB would not fit
  beside the other processes of a shared machine).
* **bitstream**: ``lora.pack`` size and the relative error of the kernel updates for
  16 / 8 / 4 bits on the adapter the timed steps trained.

    python experiments/bench_lora.py                # 3 timed steps each
    python experiments/bench_lora.py --repeats 5 --no-full
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = ALPHA = 4
LR = 1e-3


def _inputs():
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((1, 32, 32, 4), np.float32),
                t=np.array([500.0], np.float32),
                ctx=rng.standard_normal((1, 77, 1024), np.float32),
                noise=rng.standard_normal((1, 32, 32, 4), np.float32))


def _mib(n: float) -> float:
    return n / 2 ** 20


def memory(compiled) -> float:
    """Bytes of live buffers the compiled step needs (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tune memory row")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from peft import LoraConfig

    import diffjax.compile
    from diffjax.convert import build_model, convert_diffusers_state_dict, presets
    from diffjax.nn import lora as L
    from diffjax.nn import lora_pack

    load0 = os.getloadavg()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load average "
          f"{load0[0]:.1f}", flush=True)
    config = {k: v for k, v in presets.SD21_UNET.items() if not k.startswith("_")}
    torch.manual_seed(0)
    theirs = TorchUNet(**config).train()
    module = build_model(config)
    params = jax.device_put(convert_diffusers_state_dict(config, theirs.state_dict()))
    inp = _inputs()

    # ---- diffusers + peft
    theirs.requires_grad_(False)
    theirs.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                  init_lora_weights="gaussian"))
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    t_opt = torch.optim.Adam(trainable, lr=LR)
    xt = torch.from_numpy(inp["x"]).permute(0, 3, 1, 2)
    tt, ct = torch.from_numpy(inp["t"]), torch.from_numpy(inp["ctx"])
    nt = torch.from_numpy(inp["noise"]).permute(0, 3, 1, 2)

    def torch_step():
        t_opt.zero_grad(set_to_none=True)
        loss = torch.mean((theirs(xt, tt, ct).sample - nt) ** 2)
        loss.backward()
        t_opt.step()
        return float(loss.detach())

    # ---- diffjax: the same adapter init (peft's down, up = 0)
    lora = L.init(jax.random.PRNGKey(0), params, TARGETS, RANK, ALPHA)
    tx = optax.adam(LR)

    def loss_fn(lora, params, x, t, c, n):
        return jnp.mean(jnp.square(L.apply(module, params, lora, x, t, c) - n))

    def lora_step(lora, opt, params, x, t, c, n):
        loss, g = jax.value_and_grad(loss_fn)(lora, params, x, t, c, n)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    step = diffjax.compile.jit(lora_step, donate_argnums=(0, 1))
    state = {"lora": lora, "opt": tx.init(lora)}
    data = tuple(jax.device_put(inp[k]) for k in ("x", "t", "ctx", "noise"))

    def jax_step():
        state["lora"], state["opt"], loss = step(state["lora"], state["opt"], params, *data)
        return float(loss)

    t0 = time.perf_counter()
    compiled = step.lower(state["lora"], state["opt"], params, *data).compile()
    compile_s = time.perf_counter() - t0
    lora_mem = memory(compiled)
    print(f"diffjax LoRA step compiled in {compile_s:.0f} s", flush=True)
    jax_step()
    torch_step()
    runs = {"diffjax": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("diffjax", jax_step), ("diffusers", torch_step)):
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    ours, ref = statistics.median(runs["diffjax"]), statistics.median(runs["diffusers"])
    load1 = os.getloadavg()
    print(f"\nLoRA step, SD 2.1 UNet config, 32x32 latent, rank {RANK}, attention targets "
          f"({L.num_params(state['lora']) / 1e6:.2f} M LoRA parameters)")
    print(f"  diffjax   {ours:7.2f} s  (median of {args.repeats}; compile {compile_s:.0f} s)")
    print(f"  diffusers {ref:7.2f} s  (+ peft)")
    print(f"  ratio diffjax / diffusers = {ours / ref:.2f}   (target <= 1.0)")
    print(f"  load average {load0[0]:.1f} -> {load1[0]:.1f}")

    print(f"\nmemory of the compiled diffjax steps (XLA memory analysis)")
    print(f"  LoRA step {_mib(lora_mem):9.0f} MiB")
    if not args.no_full:
        def full_step(params, opt, x, t, c, n):
            def loss(p):
                return jnp.mean(jnp.square(module.apply({"params": p}, x, t, c) - n))
            value, g = jax.value_and_grad(loss)(params)
            upd, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, upd), opt, value

        abstract = lambda tree: jax.tree.map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
        opt_abs = jax.eval_shape(tx.init, abstract(params))
        t0 = time.perf_counter()
        full = diffjax.compile.jit(full_step, donate_argnums=(0, 1)).lower(
            abstract(params), opt_abs, *data).compile()
        full_mem = memory(full)
        print(f"  full step {_mib(full_mem):9.0f} MiB (compiled in {time.perf_counter() - t0:.0f} s)")
        print(f"  ratio LoRA / full = {lora_mem / full_mem:.1%}   (target <= 60 %)")

    print(f"\nlora.pack of the adapter after {args.repeats + 1} Adam steps (lr {LR})")
    trained = jax.tree.map(np.asarray, state["lora"])
    for row in lora_pack.quantization_report(trained):
        print(f"  {row['bits']:2d} bits: {row['bytes']:8d} bytes, relative error of the "
              f"kernel updates {row['rel_delta_error']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
