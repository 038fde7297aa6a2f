"""How diffjax compiles its convolutional backbones: ``jax.jit`` plus XLA options per backend.

On the CPU backend, XLA hands convolutions and matmuls (with some of their neighbouring
element-wise and reduction ops) to the YNNPACK library by default. For the Stable Diffusion
UNet and VAE, YNNPACK's convolution is 1.2-1.3x slower than XLA's own (Eigen) convolution
on large feature maps (2-core CPU: 64x64 320->320 56 -> 42 ms, 64x64 960->320 164 ->
137 ms); keeping YNNPACK for single matmuls only takes the SD 2.1 UNet at a 64x64 latent
from 6.35 to 5.72 s (README, "SD backbone"). :func:`compiler_options` is that setting, passed as
``jax.jit(..., compiler_options=...)`` so it applies to diffjax's own computations only
and not to the rest of a user's program; :func:`jit` is ``jax.jit`` with it.

Users who jit a backbone themselves get the same speed with::

    fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c),
                 compiler_options=diffjax.compile.compiler_options())

The options change only which kernels run, not what is computed (outputs agree with the
default compilation to float32 rounding). Entropy-model computations (the hyperprior
codecs' scales, whose exact values the decoder must reproduce) keep the default
compilation so that bitstreams stay decodable across diffjax versions.

These options pick XLA's kernels for the ops diffjax emits. Which ops it emits on the CPU
backend (patch-GEMM and 1x1 convolutions, query-blocked attention, the folded upsampling
conv) is decided separately, at trace time, by :mod:`diffjax.nn.cpu_kernels`
(``DIFFJAX_CPU_KERNELS``); both are keyed on the backend and off on GPU/TPU.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax

# XLA DebugOptions for the CPU backend: YNNPACK for single dots only (convolutions go to
# XLA's Eigen kernels, element-wise and reduction fusions to XLA's own emitters).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _options_for(backend: str) -> tuple[tuple[str, Any], ...]:
    if backend != "cpu":
        return ()
    try:  # an XLA that no longer knows the option: fall back to the defaults
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - any compile failure means "do not use the option"
        return ()
    return tuple(CPU_COMPILER_OPTIONS.items())


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """XLA options for diffjax's backbones on ``backend`` (default: JAX's default backend).

    ``None`` where there is nothing to set (GPU/TPU, or an XLA without the option).
    """
    options = _options_for(backend or jax.default_backend())
    return dict(options) or None


def jit(fun: Callable, **kwargs) -> Callable:
    """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options`."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
