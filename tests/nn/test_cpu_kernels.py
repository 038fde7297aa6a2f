"""The CPU kernels of ``diffjax.nn.cpu_kernels`` and their backend switch.

* every kernel (patch-GEMM conv, 1x1 conv as a matmul, query-blocked attention, folded
  nearest-upsample conv) and the plain XLA op it replaces agree with a float64 numpy
  reference to float32 rounding, and with each other;
* the switch: on for the CPU backend, off for any other, forced by the environment variable
  and by the context manager (which wins), read by every core layer;
* a whole small UNet and VAE give the same parameter tree and the same output on both paths,
  with every kernel taken on the CPU path and none on the plain one.

Tolerances: float32 sums of ``K`` products carry a rounding error of about
``sqrt(K) * eps32`` times the sum of the magnitudes ``sum |x_i w_i|`` (Higham 2002, ch. 3);
the kernel checks bound the error by ``ERR_ULPS * sqrt(K) * eps32`` times that magnitude,
per output element. A wrong tap, padding or softmax is off by O(1) of it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffjax import InputError
from diffjax.nn import cpu_kernels as ck
from diffjax.nn.layers import BackendConv, CpuFriendlyConv, conv2d
from diffjax.nn.resnet import NearestUpsampleConv, Upsample2D, nearest_upsample

EPS32 = float(np.finfo(np.float32).eps)
ERR_ULPS = 2.0
DN = ck.NHWC_DIMS


# ------------------------------------------------------------------------------------------
# float64 references
# ------------------------------------------------------------------------------------------

def conv_ref(x, w, stride, padding):
    """NHWC x HWIO cross-correlation in float64 (numpy) and the same sum over ``|x| |w|``."""
    (pt, pb), (pl, pr) = padding
    sh, sw = stride
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    w = np.asarray(w, np.float64)
    kh, kw = w.shape[:2]
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    mag = np.zeros_like(out)
    for dy in range(kh):
        for dx in range(kw):
            tap = xp[:, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw]
            out += np.einsum("bhwc,cd->bhwd", tap, w[dy, dx])
            mag += np.einsum("bhwc,cd->bhwd", np.abs(tap), np.abs(w[dy, dx]))
    return out, mag


def attention_ref(q, k, v):
    """``softmax(q k^T / sqrt(d)) v`` over ``[B, T, N, H]`` in float64, and the magnitude
    ``softmax(...) |v|`` its float32 rounding scales with."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v), np.einsum("bnts,bsnh->btnh", p, np.abs(v))


def assert_float32_close(got, want, mag, k_terms, what):
    """``|got - want| <= ERR_ULPS * sqrt(k_terms) * eps32 * mag`` element by element."""
    got = np.asarray(got, np.float64)
    bound = ERR_ULPS * np.sqrt(k_terms) * EPS32 * mag + 1e-30
    worst = float(np.max(np.abs(got - want) / bound))
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the float32 rounding bound"


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------
# the switch
# ------------------------------------------------------------------------------------------

def test_switch_default_env_and_override(monkeypatch):
    monkeypatch.delenv(ck.ENV_VAR, raising=False)
    assert jax.default_backend() == "cpu" and ck.use_cpu_kernels()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not ck.use_cpu_kernels()                  # GPU/TPU: the plain XLA path
    monkeypatch.setenv(ck.ENV_VAR, "1")
    assert ck.use_cpu_kernels()                      # forced on, whatever the backend
    monkeypatch.undo()
    monkeypatch.setenv(ck.ENV_VAR, "0")
    assert not ck.use_cpu_kernels()                  # forced off on the CPU
    with ck.override(True):
        assert ck.use_cpu_kernels()                  # the context manager wins
        with ck.override(False):
            assert not ck.use_cpu_kernels()          # and nests
            with ck.override(None):
                assert not ck.use_cpu_kernels()      # None: back to the variable
        assert ck.use_cpu_kernels()
    assert not ck.use_cpu_kernels()
    monkeypatch.setenv(ck.ENV_VAR, " Auto ")
    assert ck.use_cpu_kernels()
    monkeypatch.setenv(ck.ENV_VAR, "yes please")
    with pytest.raises(InputError, match="DIFFJAX_CPU_KERNELS"):
        ck.use_cpu_kernels()


def test_override_is_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with ck.override(False):
            raise RuntimeError
    assert ck.use_cpu_kernels()


# ------------------------------------------------------------------------------------------
# each kernel against XLA's op and a float64 reference
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, kernel, cin, stride, padding", [
    ((8, 8), 3, 6, 1, ((1, 1), (1, 1))),
    ((9, 7), 3, 6, 2, ((1, 1), (1, 1))),
    ((8, 8), 3, 6, 2, ((0, 1), (0, 1))),    # the SD VAE downsampler's asymmetric padding
    ((6, 6), 5, 6, 1, ((2, 2), (2, 2))),
    ((5, 4), 3, 96, 1, ((1, 1), (1, 1))),   # a long reduction (K = 864)
])
def test_patch_matmul_conv_equals_xla_conv(hw, kernel, cin, stride, padding):
    rng = np.random.default_rng(1)
    x, w = rand(rng, 2, *hw, cin), rand(rng, kernel, kernel, cin, 5)
    want, mag = conv_ref(x, w, (stride, stride), padding)
    plain = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN)
    got = ck.patch_matmul_conv(x, w, (stride, stride), padding)
    assert got.shape == plain.shape == want.shape
    k_terms = kernel * kernel * cin
    assert_float32_close(got, want, mag, k_terms, "patch GEMM")
    assert_float32_close(plain, want, mag, k_terms, "XLA conv")
    assert_float32_close(got, np.asarray(plain, np.float64), 2 * mag, k_terms, "GEMM vs XLA")


@pytest.mark.parametrize("cin", [7, 320])
def test_pointwise_conv_equals_xla_conv(cin):
    rng = np.random.default_rng(3)
    x, w = rand(rng, 2, 5, 6, cin), rand(rng, 1, 1, cin, 3)
    pad = ((0, 0), (0, 0))
    want, mag = conv_ref(x, w, (1, 1), pad)
    plain = jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN)
    got = ck.pointwise_conv(x, w)
    assert_float32_close(got, want, mag, cin, "1x1 matmul")
    assert_float32_close(plain, want, mag, cin, "XLA 1x1 conv")


def _spy(monkeypatch, name):
    """Record the calls of ``cpu_kernels.<name>`` (still running it)."""
    calls, real = [], getattr(ck, name)
    monkeypatch.setattr(ck, name, lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def test_conv_dispatch_takes_each_kernel_only_where_it_applies(monkeypatch):
    patch, point = _spy(monkeypatch, "patch_matmul_conv"), _spy(monkeypatch, "pointwise_conv")
    rng = np.random.default_rng(4)
    w3, w1 = rand(rng, 3, 3, 3, 4), rand(rng, 1, 1, 3, 4)
    one = ((1, 1), (1, 1))
    for hw, w, stride, pad in [((16, 16), w3, 1, one), ((17, 16), w3, 1, one),
                               ((31, 32), w3, 2, one), ((40, 40), w1, 1, ((0, 0), (0, 0))),
                               ((4, 4), w1, 2, ((0, 0), (0, 0))), ((4, 4), w1, 1, one),
                               ((4, 4), w3, 1, "SAME")]:
        x = rand(rng, 1, *hw, 3)
        want = jax.lax.conv_general_dilated(x, w, (stride,) * 2, pad, dimension_numbers=DN)
        got = ck.conv_general_dilated(x, w, (stride,) * 2, pad, dimension_numbers=DN)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # 16x16 and the stride-2 16x16 output: patches; 17x16 (272 pixels) and string padding:
    # XLA; 1x1 stride 1 unpadded: the matmul (any size); strided or padded 1x1: XLA
    assert patch == [(1, 16, 16, 3), (1, 31, 32, 3)]
    assert point == [(1, 40, 40, 3)]


@pytest.mark.parametrize("t, s, block", [(48, 64, 16), (40, 64, 16), (8, 64, 16),
                                         (256, 40, ck.CPU_QUERY_BLOCK)])
def test_query_blocked_attention_equals_plain(t, s, block):
    """Several blocks, one ragged block (T not a multiple: one block), T <= block, the
    default block size."""
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, 2, t, 3, 8), rand(rng, 2, s, 3, 8), rand(rng, 2, s, 3, 8)
    want, mag = attention_ref(q, k, v)
    got = ck.query_blocked_attention(q, k, v, block)
    plain = jax.nn.dot_product_attention(q, k, v)
    assert got.shape == plain.shape and got.dtype == q.dtype
    # the softmax's exp and normalisation add a few roundings to the S-term sum
    assert_float32_close(got, want, mag, 4 * s, "blocked attention")
    assert_float32_close(plain, want, mag, 4 * s, "XLA attention")


def test_query_blocked_attention_in_bf16_is_as_close_as_plain():
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rand(rng, 1, 48, 2, 8), jnp.bfloat16) for _ in range(3))
    want, _ = attention_ref(*(np.asarray(a, np.float32) for a in (q, k, v)))
    got = np.asarray(ck.query_blocked_attention(q, k, v, 16), np.float32)
    plain = np.asarray(jax.nn.dot_product_attention(q, k, v), np.float32)
    assert np.abs(got - want).max() <= 2 * np.abs(plain - want).max() + 1e-2


@pytest.mark.parametrize("hw, cin", [((9, 8), 6), ((5, 7), 6), ((12, 12), 64)])
def test_nearest_upsample_conv_equals_upsample_then_conv(hw, cin):
    rng = np.random.default_rng(2)
    x, w = rand(rng, 2, *hw, cin), rand(rng, 3, 3, cin, 4)
    up = np.asarray(nearest_upsample(x))
    want, mag = conv_ref(up, w, (1, 1), ((1, 1), (1, 1)))
    got = ck.nearest_upsample_conv(x, w)
    plain = jax.lax.conv_general_dilated(up, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
    assert got.shape == (2, 2 * hw[0], 2 * hw[1], 4)
    # the folded taps add one rounding per summed pair: counted as twice the terms
    assert_float32_close(got, want, mag, 2 * 9 * cin, "folded upsample conv")
    assert_float32_close(plain, want, mag, 9 * cin, "upsample + XLA conv")


# ------------------------------------------------------------------------------------------
# the core layers follow the switch
# ------------------------------------------------------------------------------------------

def test_conv2d_and_backend_conv_follow_the_switch(monkeypatch):
    assert CpuFriendlyConv is BackendConv                       # the former name still works
    calls = _spy(monkeypatch, "conv_general_dilated")
    conv = conv2d(4, dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.ones((1, 8, 8, 3))
    params = conv.init(jax.random.key(0), x)
    calls.clear()
    with ck.override(False):
        off = conv.apply(params, x)
    assert calls == []
    with ck.override(True):
        on = conv.apply(params, x)
    assert calls == [(1, 8, 8, 3)]
    np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    calls.clear()
    conv.apply(params, x)
    assert calls == []                                          # other backends: plain


@pytest.mark.parametrize("hw", [(9, 8), (5, 7)])
def test_upsample2d_follows_the_switch_with_the_same_parameters(monkeypatch, hw):
    """(9, 8) is large enough to fold on the CPU path; (5, 7) (140 <= 256 output pixels)
    upsamples first on both paths."""
    folded = _spy(monkeypatch, "nearest_upsample_conv")
    rng = np.random.default_rng(7)
    x = rand(rng, 2, *hw, 6)
    up = Upsample2D(4)
    with ck.override(True):
        p_on = nn.meta.unbox(up.init(jax.random.key(0), x))
    with ck.override(False):
        p_off = nn.meta.unbox(up.init(jax.random.key(0), x))
    jax.tree.map(np.testing.assert_array_equal, p_on, p_off)   # same names, shapes, values
    conv = p_on["params"]["conv"]
    assert conv["kernel"].shape == (3, 3, 6, 4) and conv["bias"].shape == (4,)
    params = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape), a.dtype), p_on)
    folded.clear()
    with ck.override(False):
        off = up.apply(params, x)
    assert folded == []
    with ck.override(True):
        on = up.apply(params, x)
    assert len(folded) == (1 if hw == (9, 8) else 0)
    want, mag = conv_ref(nearest_upsample(x), params["params"]["conv"]["kernel"], (1, 1),
                         ((1, 1), (1, 1)))
    want = want + np.asarray(params["params"]["conv"]["bias"], np.float64)
    mag = mag + np.abs(np.asarray(params["params"]["conv"]["bias"], np.float64))
    assert_float32_close(on, want, mag, 2 * 9 * 6, "Upsample2D, CPU kernels")
    assert_float32_close(off, want, mag, 9 * 6, "Upsample2D, plain")
    direct = NearestUpsampleConv(4).apply({"params": params["params"]["conv"]}, x)
    assert_float32_close(direct, want, mag, 2 * 9 * 6, "NearestUpsampleConv")
    # an odd target size (UNet forward_upsample_size) never folds
    odd_size = (2 * hw[0] - 1, 2 * hw[1] - 1)
    with ck.override(True):
        odd = up.apply(params, x, output_size=odd_size)
    want_odd, _ = conv_ref(nearest_upsample(x, odd_size), params["params"]["conv"]["kernel"],
                           (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_allclose(np.asarray(odd) - np.asarray(params["params"]["conv"]["bias"]),
                               want_odd, atol=1e-4)


def test_long_attention_follows_the_switch_and_matches_torch(monkeypatch):
    from diffjax.nn.attention import attention

    monkeypatch.setattr(ck, "CPU_BLOCK_MIN_LOGITS", 2 * 256 * 40)   # this test's size
    blocked = []
    real = ck.query_blocked_attention
    monkeypatch.setattr(ck, "query_blocked_attention",
                        lambda *a: blocked.append(a[-1]) or real(*a))
    rng = np.random.default_rng(4)
    q, k, v = rand(rng, 1, 256, 2, 8), rand(rng, 1, 40, 2, 8), rand(rng, 1, 40, 2, 8)
    with ck.override(False):
        off = attention(q, k, v)
    assert blocked == []
    on = attention(q, k, v)
    assert blocked == [ck.CPU_QUERY_BLOCK]
    attention(q[:, :255], k, v)                      # one logit short: plain attention
    attention(q, k, v, bias=np.zeros((1, 1, 1, 40), np.float32))  # a bias: plain
    attention(q, k, v, implementation="xla")         # an explicit implementation: plain
    assert blocked == [ck.CPU_QUERY_BLOCK]
    with ck.override(False):
        attention(q, k, v, block_size=64)            # an explicit block size: always blocked
    assert blocked == [ck.CPU_QUERY_BLOCK, 64]
    t = lambda a: torch.from_numpy(a).transpose(1, 2)  # BTNH -> BNTH
    want = F.scaled_dot_product_attention(t(q), t(k), t(v)).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(on), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(off), want, atol=1e-5)


# ------------------------------------------------------------------------------------------
# whole networks
# ------------------------------------------------------------------------------------------

KERNELS = ("patch_matmul_conv", "pointwise_conv", "query_blocked_attention",
           "nearest_upsample_conv")


def _both_paths(monkeypatch, init, apply):
    """Trace and run a network with the CPU kernels forced off and then on.

    Each path gets fresh functions: ``jax.jit`` caches a trace by function, and the switch,
    read at trace time, is not part of that cache's key. The parameter trees of both paths
    (from ``init``, shapes only) must be identical; the values are drawn once on the host.
    Asserts that no kernel runs on the plain path; returns ``(out_off, out_on, kernel
    calls on the CPU path)``."""
    from diffjax.nn.layers import host_random_params

    monkeypatch.setattr(ck, "CPU_BLOCK_MIN_LOGITS", 2 ** 16)  # let the tiny attention block
    spies = {name: _spy(monkeypatch, name) for name in KERNELS}
    shapes, results = {}, {}
    for enabled in (False, True):
        with ck.override(enabled):
            shapes[enabled] = jax.eval_shape(lambda: nn.meta.unbox(init()))
    assert jax.tree.structure(shapes[False]) == jax.tree.structure(shapes[True])
    assert jax.tree.leaves(shapes[False]) == jax.tree.leaves(shapes[True])  # shapes, dtypes
    params = host_random_params(shapes[True], seed=0, jitter=0.1)
    for enabled in (False, True):
        for calls in spies.values():
            calls.clear()
        with ck.override(enabled):
            traced = jax.jit(lambda p: apply(p)).trace(params)
        counts = {name: len(calls) for name, calls in spies.items()}
        out = np.asarray(traced.lower().compile()(params))
        results[enabled] = out, counts, str(traced.jaxpr)
    (out_off, counts_off, jaxpr_off), (out_on, counts_on, jaxpr_on) = results[False], results[True]
    assert counts_off == dict.fromkeys(KERNELS, 0), counts_off
    assert "optimization_barrier" not in jaxpr_off
    assert "optimization_barrier" in jaxpr_on
    return out_off, out_on, counts_on


def _assert_paths_agree(out_off, out_on):
    """Whole-network outputs agree to float32 rounding accumulated over the layers:
    max |diff| <= 1e-5 of the output's scale (about 100 eps32)."""
    scale = np.abs(out_off).max()
    assert scale > 0
    assert np.abs(out_on - out_off).max() <= 1e-5 * scale, np.abs(out_on - out_off).max() / scale


@pytest.mark.slow  # default-suite budget; every kernel and the VAE round trip stay
def test_small_unet_forward_agrees_between_the_paths(monkeypatch):
    from diffjax.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16, 32), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=16, norm_num_groups=8)
    rng = np.random.default_rng(8)
    x, ctx = rand(rng, 1, 32, 32, 4), rand(rng, 1, 7, 16)   # levels 32x32, 16x16, 8x8
    t = np.array([500.0], np.float32)
    out_off, out_on, counts = _both_paths(
        monkeypatch, lambda: unet.init(jax.random.key(0), x, t, ctx),
        lambda p: unet.apply(p, x, t, ctx))
    assert out_on.shape == (1, 32, 32, 4)
    # every kernel runs on the CPU path: 3x3 convs at 16x16 / 8x8, 1x1 proj_in/out and
    # shortcuts, the 32x32 self-attention, the 16x16 -> 32x32 upsampler
    assert all(counts[name] > 0 for name in KERNELS), counts
    _assert_paths_agree(out_off, out_on)


def test_small_vae_roundtrip_agrees_between_the_paths(monkeypatch):
    from diffjax.models.vae import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=8, layers_per_block=1)
    x = np.random.default_rng(9).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)

    def roundtrip(p):
        z = vae.apply(p, x, method="encode").mean
        return vae.apply(p, z, method="decode")

    out_off, out_on, counts = _both_paths(
        monkeypatch, lambda: vae.init(jax.random.key(0), x), roundtrip)
    assert out_on.shape == x.shape
    assert all(counts[name] > 0 for name in KERNELS), counts   # 16x16 latent, 16 -> 32 up
    _assert_paths_agree(out_off, out_on)
