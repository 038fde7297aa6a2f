"""Entropy models vs CompressAI (EntropyBottleneck, GaussianConditional) and the CDF tables.

Parameters are ported across with random (non-initial) values so every parameter matters;
likelihoods must agree within 1e-5.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from entropy_helpers import coded_likelihood_reference, fast_jit, import_compressai
from diffjax.entropy import coder
from diffjax.entropy import models as E

C = 12


@pytest.fixture(scope="module")
def cai():
    return import_compressai()


@pytest.fixture(scope="module")
def bottleneck_pair(cai):
    """A CompressAI EntropyBottleneck with perturbed parameters and our ported copy."""
    torch.manual_seed(0)
    ref = cai.entropy_models.EntropyBottleneck(C)
    with torch.no_grad():
        for p in list(ref.matrices) + list(ref.biases) + list(ref.factors):
            p.add_(0.3 * torch.randn_like(p))
    # Fit the tail quantiles to this density (CompressAI's bisection search), then
    # offset the medians a little so rounding around them is exercised.
    ref.update(force=True, update_quantiles=True)
    with torch.no_grad():
        ref.quantiles.add_(0.3 * torch.randn(C, 1, 1))
    n = len(ref.matrices)
    params = {"quantiles": ref.quantiles.detach().numpy()[:, 0, :]}
    for i in range(n):
        params[f"matrix{i}"] = ref.matrices[i].detach().numpy()
        params[f"bias{i}"] = ref.biases[i].detach().numpy()[..., 0]
        if i < n - 1:
            params[f"factor{i}"] = ref.factors[i].detach().numpy()[..., 0]
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return ref, params


@pytest.fixture(scope="module")
def eb_apply():
    model = E.EntropyBottleneck(C)
    return model, fast_jit(lambda p, z, key: model.apply({"params": p}, z, train=False)), \
        lambda p, z, key: model.apply({"params": p}, z, train=True, rngs={"noise": key})


def test_bottleneck_param_layout_matches_init(eb_apply, bottleneck_pair):
    model, _, _ = eb_apply
    init = fast_jit(lambda k: model.init({"params": k}, jnp.zeros((1, 2, 2, C)), train=False))(
        jax.random.key(0, impl="rbg"))
    shapes = jax.tree_util.tree_map(jnp.shape, init["params"])
    assert shapes == jax.tree_util.tree_map(jnp.shape, bottleneck_pair[1])
    np.testing.assert_array_equal(init["params"]["quantiles"][0], [-10.0, 0.0, 10.0])


def test_bottleneck_likelihood_matches_compressai(bottleneck_pair, eb_apply):
    ref, params = bottleneck_pair
    _, apply_eval, _ = eb_apply
    z = 4.0 * np.random.default_rng(1).standard_normal((2, 5, 7, C)).astype(np.float32)
    z_hat, lik = apply_eval(params, jnp.asarray(z), None)
    ref_hat, ref_lik = ref(torch.from_numpy(z).permute(0, 3, 1, 2), training=False)
    np.testing.assert_allclose(z_hat, ref_hat.permute(0, 2, 3, 1).detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(lik, ref_lik.permute(0, 2, 3, 1).detach().numpy(), atol=1e-5)
    # The density itself, on continuous (noisy) values as in training.
    v = np.random.default_rng(2).uniform(-12, 12, (C, 300)).astype(np.float32)
    ours, _, _ = E.factorized_likelihood(params, jnp.asarray(v))
    theirs, _, _ = ref._likelihood(torch.from_numpy(v)[:, None, :])
    np.testing.assert_allclose(ours, theirs[:, 0].detach().numpy(), atol=1e-5)
    assert float(jnp.abs(ours).max()) > 0.05  # the comparison is not between zeros


def test_bottleneck_aux_loss_matches_compressai_and_only_moves_quantiles(bottleneck_pair, eb_apply):
    ref, params = bottleneck_pair
    model = eb_apply[0]
    aux, grads = fast_jit(jax.value_and_grad(
        lambda p: model.apply({"params": p}, method="aux_loss")))(params)
    np.testing.assert_allclose(float(aux), float(ref.loss().detach()), rtol=1e-5)
    assert float(jnp.abs(grads["quantiles"]).sum()) > 0
    assert all(float(jnp.abs(g).sum()) == 0 for k, g in grads.items() if k != "quantiles")


def test_bottleneck_training_mode_noise_and_gradients(bottleneck_pair, eb_apply):
    _, params = bottleneck_pair
    _, _, apply_train = eb_apply
    z = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 4, C)), jnp.float32)
    key = jax.random.key(0, impl="rbg")

    def rate(p):
        z_tilde, lik = apply_train(p, z, key)
        return E.bits(lik), (z_tilde, lik)

    (_, (z_tilde, lik)), g = fast_jit(jax.value_and_grad(rate, has_aux=True))(params)
    assert 0 < float(jnp.abs(z_tilde - z).max()) <= 0.5
    assert float(lik.min()) >= 1e-9 and float(lik.max()) <= 1.0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
    assert float(jnp.abs(g["matrix0"]).sum()) > 0


@pytest.fixture(scope="module")
def gc_pair(cai):
    ref = cai.entropy_models.GaussianConditional(list(E.DEFAULT_SCALE_TABLE))
    ref.update()
    return ref


def _gc_inputs(seed=4, shape=(2, 6, 5, C)):
    rng = np.random.default_rng(seed)
    y = (6 * rng.standard_normal(shape)).astype(np.float32)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(300), shape)).astype(np.float32)
    means = (3 * rng.standard_normal(shape)).astype(np.float32)
    return y, scales, means


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.mark.parametrize("with_means", [False, True])
def test_gaussian_conditional_matches_compressai(gc_pair, with_means):
    y, scales, means = _gc_inputs()
    means = means if with_means else None
    tm = None if means is None else _nchw(means)
    # CompressAI semantics (continuous scales in evaluation) ...
    gc = E.GaussianConditional(eval_table_scales=False)
    y_hat, lik = gc.apply({}, jnp.asarray(y), jnp.asarray(scales),
                          None if means is None else jnp.asarray(means), train=False)
    ref_hat, ref_lik = gc_pair(_nchw(y), _nchw(scales), tm, training=False)
    np.testing.assert_allclose(y_hat, _nhwc(ref_hat), atol=1e-6)
    np.testing.assert_allclose(lik, _nhwc(ref_lik), atol=1e-5)
    assert float(lik.max()) > 0.5
    # ... and ours by default: scales snapped to the table, as the coder does.
    idx = gc_pair.build_indexes(_nchw(scales))
    np.testing.assert_array_equal(E.scale_indexes(jnp.asarray(scales), E.DEFAULT_SCALE_TABLE, 0.11),
                                  _nhwc(idx))
    np.testing.assert_array_equal(E.scale_indexes(scales, E.DEFAULT_SCALE_TABLE, 0.11, E.NP),
                                  _nhwc(idx))
    _, lik_tab = E.GaussianConditional().apply(
        {}, jnp.asarray(y), jnp.asarray(scales), None if means is None else jnp.asarray(means),
        train=False)
    ref_tab = gc_pair.likelihood_lower_bound(
        gc_pair._likelihood(ref_hat, gc_pair.scale_table[idx.long()], tm))
    symbols = np.rint(y - (0 if means is None else means))
    want, esc = coded_likelihood_reference(_nhwc(ref_tab), symbols, _nhwc(idx), E.gaussian_table())
    assert 0 < esc.sum() < esc.size  # both branches are exercised
    np.testing.assert_allclose(lik_tab, want, atol=1e-5, rtol=1e-4)


def test_laplace_conditional_matches_scipy():
    y, scales, means = _gc_inputs(5)
    gc = E.GaussianConditional(family="laplace", eval_table_scales=False)
    y_hat, lik = gc.apply({}, jnp.asarray(y), jnp.asarray(scales), jnp.asarray(means), train=False)
    s = np.maximum(scales.astype(np.float64), 0.11)
    v = np.abs(np.asarray(y_hat, np.float64) - means)
    ref = scipy.stats.laplace.cdf(0.5 - v, scale=s) - scipy.stats.laplace.cdf(-0.5 - v, scale=s)
    np.testing.assert_allclose(lik, np.maximum(ref, 1e-9), atol=1e-6)


def test_gaussian_training_mode_is_noisy_and_differentiable():
    y, scales, means = (jnp.asarray(a) for a in _gc_inputs(6, (1, 3, 3, C)))
    gc = E.GaussianConditional()

    key = jax.random.key(0, impl="rbg")

    def rate(s):
        y_tilde, lik = gc.apply({}, y, s, means, train=True, rngs={"noise": key})
        return E.bits(lik), y_tilde

    (_, y_tilde), g = fast_jit(jax.value_and_grad(rate, has_aux=True))(scales)
    assert 0 < float(jnp.abs(y_tilde - y).max()) <= 0.5
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_bits_helper():
    liks = {"y": jnp.full((2, 3, 3, 4), 0.5), "z": jnp.full((2, 1, 1, 4), 0.25)}
    np.testing.assert_allclose(float(E.bits(liks)), 2 * 36 * 1 + 2 * 4 * 2, rtol=1e-6)
    np.testing.assert_allclose(E.bits(liks, per_example=True), [36 + 8, 36 + 8], rtol=1e-6)


def test_gaussian_table_matches_compressai_update(gc_pair):
    table = E.gaussian_table()
    np.testing.assert_array_equal(table.offsets, gc_pair._offset.numpy())
    np.testing.assert_array_equal(table.lengths, gc_pair._cdf_length.numpy() - 2)
    # CompressAI quantises to 16 bits, we to 24: the PMFs agree to 16-bit resolution.
    for k in (0, 17, 40, 63):
        n = table.lengths[k]
        ours = table.freqs[k, : n + 1] / 2.0**coder.PRECISION
        theirs = np.diff(gc_pair._quantized_cdf[k, : n + 2].numpy()) / 2.0**16
        np.testing.assert_allclose(ours, theirs, atol=2 * n / 2.0**16 + 1e-4)


def test_factorized_table_matches_compressai_update(bottleneck_pair):
    ref, params = bottleneck_pair
    ref.update(force=True)
    table = E.factorized_table(params)
    np.testing.assert_array_equal(table.offsets, ref._offset.numpy())
    np.testing.assert_array_equal(table.lengths, ref._cdf_length.numpy() - 2)
    for k in range(C):
        n = table.lengths[k]
        ours = table.freqs[k, :n] / 2.0**coder.PRECISION
        theirs = np.diff(ref._quantized_cdf[k, : n + 2].numpy())[:n] / 2.0**16
        np.testing.assert_allclose(ours, theirs, atol=2 * n / 2.0**16 + 1e-4)


def test_tables_are_the_eval_rate_definition(bottleneck_pair, eb_apply):
    """Ideal code length under the integer tables == eval-mode bits (same definition).

    They differ only by the 24-bit quantisation of the PMFs and for escaped symbols
    (bounded likelihood vs escape code), which are rare for latents the model fits.
    """
    _, params = bottleneck_pair
    _, apply_eval, _ = eb_apply
    rng = np.random.default_rng(7)
    z = 3.0 * rng.standard_normal((1, 16, 16, C)).astype(np.float32)
    _, lik = apply_eval(params, jnp.asarray(z), None)
    medians = E.factorized_medians(params)
    symbols = np.round(z - medians).astype(np.int32)
    table = E.factorized_table(params)
    ideal = table.ideal_bits(symbols, np.broadcast_to(np.arange(C), symbols.shape))
    assert abs((ideal - coder.CHECKSUM_BITS) / float(E.bits(lik)) - 1) < 1e-3

    # Latents drawn from the model itself (escapes are then as rare as the tail mass).
    _, scales, means = _gc_inputs(8, (1, 24, 24, C))
    y = means + scales * rng.standard_normal(scales.shape).astype(np.float32)
    y_hat, lik = fast_jit(lambda *a: E.GaussianConditional().apply({}, *a, train=False))(
        jnp.asarray(y), jnp.asarray(scales), jnp.asarray(means))
    idx = E.scale_indexes(scales, E.DEFAULT_SCALE_TABLE, 0.11, E.NP)
    sym = np.rint(y - means).astype(np.int32)
    ideal = E.gaussian_table().ideal_bits(sym, idx)
    assert abs((ideal - coder.CHECKSUM_BITS) / float(E.bits(lik)) - 1) < 1e-4


def test_laplace_table_and_broken_parameters_rejected():
    t = E.gaussian_table(family="laplace")
    assert t.lengths[-1] == 2 * math.ceil(E.DEFAULT_SCALE_TABLE[-1] * -math.log(1e-9)) + 1
    from diffjax.errors import InputError

    with pytest.raises(InputError):
        E.gaussian_table(scale_table=(1.0, 0.5))
    bad = {"quantiles": np.array([[-1e9, 0.0, 1e9]]), "matrix0": np.zeros((1, 1, 1)),
           "bias0": np.zeros((1, 1))}
    with pytest.raises(InputError, match="quantiles span"):
        E.factorized_table(bad)
    bad["quantiles"] = np.array([[np.nan, 0.0, 1.0]])
    with pytest.raises(InputError, match="not finite"):
        E.factorized_table(bad)
