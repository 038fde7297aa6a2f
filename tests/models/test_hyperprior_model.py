"""HyperpriorModel and GDN vs CompressAI (ScaleHyperprior, MeanScaleHyperprior, GDN).

CompressAI models get random, perturbed weights (GDN and the entropy bottleneck moved off
their initial values, quantiles fitted), are ported with ``params_from_compressai`` and
must agree number for number (float32 tolerances).
"""
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "entropy"))
from entropy_helpers import fast_jit, import_compressai  # noqa: E402

from diffjax.errors import CheckpointError  # noqa: E402
from diffjax.models import hyperprior as H  # noqa: E402
from diffjax.nn.gdn import GDN  # noqa: E402

N, M = 8, 12


def _perturb(ref):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("beta", "gamma")):  # stay in the non-negative reparam domain
                p.copy_(p.abs() + 0.1 * torch.rand_like(p))
            elif "entropy_bottleneck" in name and "quantiles" not in name:
                p.add_(0.3 * torch.randn_like(p))
        ref.entropy_bottleneck.update(force=True, update_quantiles=True)
    return ref.eval()


@functools.lru_cache(maxsize=None)
def _make_pair(mean_scale: bool):
    cai = import_compressai()
    cls = cai.models.MeanScaleHyperprior if mean_scale else cai.models.ScaleHyperprior
    ref = _perturb(cls(N, M))
    params = H.params_from_compressai(ref.state_dict(), mean_scale=mean_scale)
    model = H.HyperpriorModel(N=N, M=M, mean_scale=mean_scale, eval_table_scales=False)
    return ref, jax.tree_util.tree_map(jnp.asarray, params), model


@pytest.fixture(scope="module", params=[False, True], ids=["scale", "mean_scale"])
def pair(request):
    return _make_pair(request.param)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).uniform(0, 1, (2, 64, 128, 3)).astype(np.float32)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def test_gdn_and_igdn_match_compressai():
    cai = import_compressai()
    x = np.random.default_rng(1).standard_normal((2, 5, 6, 10)).astype(np.float32)
    for inverse in (False, True):
        ref = cai.layers.GDN(10, inverse=inverse)
        with torch.no_grad():
            ref.beta.copy_(1 + torch.rand(10))
            ref.gamma.copy_(0.2 * torch.rand(10, 10))
        params = {"beta": ref.beta.detach().numpy(), "gamma": ref.gamma.detach().numpy().T}
        ours = GDN(inverse=inverse).apply({"params": params}, jnp.asarray(x))
        np.testing.assert_allclose(ours, _nhwc(ref(_nchw(x))), rtol=1e-5, atol=1e-6)
    init = GDN().init(jax.random.key(0, impl="rbg"), jnp.asarray(x))["params"]
    np.testing.assert_allclose(init["beta"], cai.layers.GDN(10).beta.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(init["gamma"], cai.layers.GDN(10).gamma.detach().numpy().T,
                               rtol=1e-6, atol=1e-7)


def test_param_tree_matches_init(pair):
    """Ported CompressAI params have exactly our tree; evaluation defaults to the coder's
    table-scale rate (its likelihoods vs CompressAI: tests/entropy/test_models.py)."""
    ref, params, model = pair
    assert H.HyperpriorModel().eval_table_scales
    init = jax.eval_shape(lambda: model.init({"params": jax.random.key(0, impl="rbg")},
                                             jnp.zeros((1, 64, 64, 3)), train=False))
    assert jax.tree_util.tree_map(jnp.shape, init["params"]) == \
        jax.tree_util.tree_map(jnp.shape, params)


def test_forward_matches_compressai(pair, image):
    ref, params, model = pair
    out = fast_jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, image)
    with torch.no_grad():
        theirs = ref(_nchw(image))
    np.testing.assert_allclose(out["x_hat"], _nhwc(theirs["x_hat"]), atol=2e-5)
    for k in ("y", "z"):
        np.testing.assert_allclose(out["likelihoods"][k], _nhwc(theirs["likelihoods"][k]),
                                   atol=1e-5)
    # The pieces the codec uses agree too.
    y = fast_jit(lambda p, x: model.apply({"params": p}, x, method="analysis"))(params, image)
    with torch.no_grad():
        ref_y = ref.g_a(_nchw(image))
    np.testing.assert_allclose(y, _nhwc(ref_y), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(y).max()) > 0.1
    assert float(jnp.abs(out["x_hat"]).max()) > 0.01


def test_training_mode_losses_and_gradients(image):
    """Training path (compiled once, for the mean-scale model: the code path is shared)."""
    _, params, model = _make_pair(True)
    x = jnp.asarray(image)

    @fast_jit
    def loss_and_grads(p, key):
        def f(p):
            out = model.apply({"params": p}, x, train=True, rngs={"noise": key})
            loss, metrics = H.rate_distortion_loss(out, x, lmbda=0.01)
            return loss, (metrics, out["likelihoods"])
        return jax.value_and_grad(f, has_aux=True)(p)

    (loss, (metrics, liks)), grads = loss_and_grads(params, jax.random.key(0, impl="rbg"))
    (loss2, _), _ = loss_and_grads(params, jax.random.key(1, impl="rbg"))
    assert np.isfinite(float(loss)) and float(loss) != float(loss2)  # noise is drawn
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["bpp"]) + 0.01 * 255**2 * float(metrics["mse"]), rel=1e-5)
    total_bits = sum(-np.log2(np.asarray(v, np.float64)).sum() for v in liks.values())
    assert float(metrics["bpp"]) == pytest.approx(total_bits / (2 * 64 * 128), rel=1e-5)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name, g = jax.tree_util.keystr(path), np.asarray(g)
        assert np.all(np.isfinite(g)), name
        if "quantiles" in name:
            assert not g.any(), name  # only the aux loss moves the quantiles
        else:
            assert np.abs(g).sum() > 0, name
    aux = fast_jit(jax.grad(lambda p: model.apply({"params": p}, method="aux_loss")))(params)
    moved = {jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_flatten_with_path(aux)[0]
             if np.asarray(g).any()}
    assert moved == {"['entropy_bottleneck']['quantiles']"}


def test_bad_inputs_and_checkpoints(pair):
    ref, params, model = pair
    with pytest.raises(ValueError, match="multiple of 64"):
        model.apply({"params": params}, jnp.zeros((1, 48, 64, 3)), train=False)
    sd = dict(ref.state_dict())
    del sd["g_s.3.gamma"]
    with pytest.raises(CheckpointError, match="g_s.3.gamma"):
        H.params_from_compressai(sd, mean_scale=model.mean_scale)


def test_bfloat16_compute_keeps_likelihoods_float32(image):
    _, params, _ = _make_pair(True)
    m16 = H.HyperpriorModel(N=N, M=M, mean_scale=True, dtype=jnp.bfloat16)
    out = fast_jit(lambda p, x: m16.apply({"params": p}, x, train=False))(params, image[:1])
    assert out["x_hat"].dtype == jnp.bfloat16
    assert out["likelihoods"]["y"].dtype == jnp.float32
    assert out["likelihoods"]["z"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out["likelihoods"]["y"])))
