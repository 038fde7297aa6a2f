"""diffjax.compile: the backbone compiler options reach XLA, change no values, and fall back
to XLA's defaults where they do not apply."""
from __future__ import annotations

import jax
import numpy as np

import diffjax.compile as dc


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_float64(x, w):
    """The same 3x3 'SAME' convolution in float64 numpy: the exact values both compilations
    approximate."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, wd = x.shape[1:3]
    return sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + wd], w[i, j].astype(np.float64))
               for i in range(3) for j in range(3))


def test_cpu_options_route_convolutions_away_from_ynnpack_with_the_same_values():
    assert dc.compiler_options("cpu") == dc.CPU_COMPILER_OPTIONS
    assert dc.compiler_options("gpu") is None and dc.compiler_options("tpu") is None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    default, ours = jax.jit(_conv), dc.jit(_conv)
    assert "ynn_fusion" in default.lower(x, w).compile().as_text()
    assert "ynn_fusion" not in ours.lower(x, w).compile().as_text()
    # Each output sums 288 float32 products into values up to ~66; the two compilations sum in
    # different orders, so each carries its own float32 rounding (2e-5 and 4e-5 measured here,
    # 3e-5 apart on CI). Both must stay within a few ulps-per-term of the float64 result; a
    # wrong convolution is off by O(1).
    exact = _conv_float64(x, w)
    tolerance = 4e-6 * np.abs(exact).max()
    for compiled in (ours, default):
        np.testing.assert_allclose(np.asarray(compiled(x, w)), exact, rtol=0, atol=tolerance)


def test_an_option_this_xla_does_not_know_falls_back_to_the_defaults(monkeypatch):
    monkeypatch.setattr(dc, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_in_any_xla": True})
    dc._options_for.cache_clear()
    try:
        assert dc.compiler_options("cpu") is None
        assert float(dc.jit(lambda a: a * 2)(3.0)) == 6.0
    finally:
        dc._options_for.cache_clear()
