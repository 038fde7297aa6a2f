"""Parameterisations and loss weightings: formulas at known points, diffusers agreement."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _diffusion_ref import SD21

from diffjax.diffusion import (
    CosineSchedule,
    DiscreteSchedule,
    constant,
    convert,
    denoising_loss,
    edm,
    min_snr,
    p2,
    sech,
    to_eps,
    to_v,
    to_x0,
    training_target,
)
from diffjax.diffusion.losses import Weighting
from diffjax.errors import InputError

PREDS = ("epsilon", "sample", "v_prediction")


def test_parameterisation_round_trips_and_v_definition():
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    a = np.array([[0.3], [0.9]])
    s = np.sqrt(1 - a ** 2)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0  # Salimans & Ho 2022, eq. in sec. 4
    outputs = {"epsilon": eps, "sample": x0, "v_prediction": v}
    for source, out in outputs.items():
        np.testing.assert_allclose(to_x0(out, x_t, a, s, source), x0, atol=1e-12)
        np.testing.assert_allclose(to_eps(out, x_t, a, s, source), eps, atol=1e-12)
        np.testing.assert_allclose(to_v(out, x_t, a, s, source), v, atol=1e-12)
        for target, expected in outputs.items():
            np.testing.assert_allclose(convert(out, x_t, a, s, source=source, target=target),
                                       expected, atol=1e-12)
        np.testing.assert_allclose(training_target(x0, eps, a, s, source), out, atol=1e-12)
    for alias, name in [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")]:
        np.testing.assert_allclose(to_x0(outputs[name], x_t, a, s, alias), x0, atol=1e-12)
    with pytest.raises(InputError, match="prediction_type"):
        to_x0(eps, x_t, a, s, "score")


def test_training_inputs_match_diffusers_add_noise_and_velocity():
    """x_t and the v target of denoising_loss are diffusers' add_noise / get_velocity."""
    import diffusers

    ref = diffusers.DDPMScheduler.from_config(SD21)
    sched = DiscreteSchedule.from_config(SD21)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    noise = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    t = np.array([0, 500, 999])
    seen = {}

    def model(x_t, time):
        seen["x_t"], seen["time"] = x_t, time
        return jnp.zeros_like(x_t)

    @jax.jit
    def run(x0, noise):
        loss, aux = denoising_loss(model, x0, jax.random.PRNGKey(2), schedule=sched,
                                   prediction_type="v", t=t, noise=noise)
        return loss, aux, seen["x_t"], seen["time"]  # returned from inside the same trace

    loss, aux, x_t, time = run(x0, noise)
    tt = torch.from_numpy(t)
    x0_t, noise_t = torch.from_numpy(x0.copy()), torch.from_numpy(noise.copy())
    ref_xt = ref.add_noise(x0_t, noise_t, tt).numpy()
    ref_v = ref.get_velocity(x0_t, noise_t, tt).numpy()
    np.testing.assert_allclose(x_t, ref_xt, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(time, t.astype(np.float32))
    # zero output: the per-example loss is the mean square of the target
    np.testing.assert_allclose(aux["per_example"], (ref_v ** 2).reshape(3, -1).mean(1),
                               rtol=1e-5)
    np.testing.assert_allclose(loss, aux["per_example"].mean(), rtol=1e-6)


def test_min_snr_matches_diffusers_training_recipe():
    """diffusers' train_text_to_image --snr_gamma: min(SNR, g) / SNR (eps), / (SNR + 1) (v)."""
    import diffusers
    from diffusers.training_utils import compute_snr

    ref = diffusers.DDPMScheduler.from_config(SD21)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    snr = compute_snr(ref, t)
    base = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    logsnr = np.log(snr.numpy())
    np.testing.assert_allclose(min_snr(5.0)(logsnr, "epsilon"), (base / snr).numpy(), rtol=1e-5)
    np.testing.assert_allclose(min_snr(5.0)(logsnr, "v_prediction"), (base / (snr + 1)).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(min_snr(5.0)(logsnr, "sample"), base.numpy(), rtol=1e-5)


@pytest.mark.parametrize("weighting,logsnr,pred,expected", [
    (constant(), 3.0, "v", 1.0),
    (min_snr(5.0), 0.0, "eps", 1.0),
    (min_snr(5.0), math.log(10), "eps", 0.5),
    (min_snr(5.0), math.log(10), "x0", 5.0),
    (min_snr(5.0), math.log(10), "v", 5.0 / 11.0),
    (min_snr(5.0), math.log(0.5), "x0", 0.5),
    (p2(1.0, 1.0), 0.0, "eps", 0.5),                   # 1 / (1 + 1)
    (p2(1.0, 0.5), math.log(3), "eps", 0.5),           # 1 / sqrt(1 + 3)
    (p2(1.0, 1.0), math.log(3), "x0", 0.75),           # 3 / (1 + 3)
    (sech(), 0.0, "eps", 1.0),
    (sech(), 2.0, "eps", 1.0 / math.cosh(1.0)),
    (edm(0.5), 0.0, "x0", 5.0),                        # SNR + 1 / sigma_d^2
    (edm(0.5), math.log(4), "eps", 2.0),               # (4 + 4) / 4
    (edm(1.0), 0.0, "v", 1.0),                         # (1 + 1) / (1 + 1)
])
def test_weightings_at_known_points(weighting, logsnr, pred, expected):
    assert float(weighting(logsnr, pred)) == pytest.approx(expected, rel=1e-5)


def test_edm_weight_is_karras_lambda():
    """Karras et al. 2022: lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x0 error."""
    for sigma in (0.02, 0.5, 3.0, 40.0):
        expected = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        logsnr = -2 * math.log(sigma)
        assert float(edm(0.5)(logsnr, "x0")) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weighting", [min_snr(5.0), p2(1.0, 1.0), sech(), edm()],
                         ids=lambda w: w.kind)
def test_weightings_agree_across_parameterisations(weighting):
    """For the same prediction, w_target * |target error|^2 is the same for eps, x0 and v
    (``constant`` is 1 in each target space by definition, so it is not included)."""
    rng = np.random.default_rng(1)
    for logsnr in (-4.0, -0.5, 0.0, 1.3, 6.0):
        a = math.sqrt(1 / (1 + math.exp(-logsnr)))
        s = math.sqrt(1 - a * a)
        x0, eps, eps_hat = rng.normal(size=(3, 16))
        x_t = a * x0 + s * eps
        losses = []
        for pred in PREDS:
            target = training_target(x0, eps, a, s, pred)
            pred_out = convert(eps_hat, x_t, a, s, source="epsilon", target=pred)
            losses.append(float(weighting(logsnr, pred)) * np.sum((pred_out - target) ** 2))
        np.testing.assert_allclose(losses, losses[0], rtol=1e-4)


def test_weights_finite_at_extremes():
    for w in (min_snr(), p2(), sech(), edm(), constant()):
        for pred in PREDS:
            vals = np.asarray(w(jnp.array([-jnp.inf, -50.0, 0.0, 50.0, jnp.inf]), pred))
            assert np.all(np.isfinite(vals)), (w.kind, pred, vals)
    with pytest.raises(InputError, match="unknown weighting"):
        Weighting("snr+1")


def test_sech_uses_dlogsnr_dt():
    w = sech()
    assert float(w(0.0, "eps", dlogsnr_dt=-3.0)) == pytest.approx(3.0)
    assert float(w(2.0, "eps", dlogsnr_dt=-2.0)) == pytest.approx(2.0 / math.cosh(1.0), rel=1e-6)


def test_continuous_loss_gradient_reaches_t():
    """The foundation codec learns t: d loss / d t exists through alpha(t), sigma(t).

    Weights are constants w.r.t. t (stop_gradient), so the finite-difference check uses the
    constant weighting; the weighted losses must still give finite, non-zero gradients.
    """
    x0 = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 3)), jnp.float32)
    noise = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 3)), jnp.float32)

    def loss_of_t(t, sched, pred, weighting):
        def model(x_t, time):  # a fixed "network" of x_t only
            return 0.5 * x_t
        return denoising_loss(model, x0, jax.random.PRNGKey(0), schedule=sched,
                              prediction_type=pred, weighting=weighting, t=t, noise=noise)[0]

    t = jnp.array([0.3, 0.6])
    h = 1e-3
    for sched in (CosineSchedule(), DiscreteSchedule.from_config(SD21).continuous()):
        for pred, weighting in [("x0", min_snr(5.0)), ("eps", sech()), ("v", constant()),
                                ("x0", constant())]:
            f = jax.jit(jax.value_and_grad(
                lambda u: loss_of_t(u, sched, pred, weighting)))  # noqa: B023
            _, g = f(t)
            assert np.all(np.isfinite(g)) and np.all(np.abs(g) > 0), (pred, g)
            if weighting.kind == "constant":
                fd = (f(t + h)[0] - f(t - h)[0]) / (2 * h)
                np.testing.assert_allclose(np.sum(g), fd, rtol=1e-2, atol=1e-3)


def test_denoising_loss_samples_t_and_checks_inputs():
    x0 = jnp.ones((4, 4, 4, 2))
    sched = DiscreteSchedule.from_config(SD21)
    run = jax.jit(lambda x, k: denoising_loss(lambda x, t: x, x, k, schedule=sched,
                                              weighting=min_snr()))
    loss, aux = run(x0, jax.random.PRNGKey(0))
    assert aux["t"].dtype == jnp.int32 and aux["t"].shape == (4,)
    assert np.all((aux["t"] >= 0) & (aux["t"] < 1000)) and np.isfinite(loss)
    assert len(set(np.asarray(aux["t"]).tolist())) > 1
    run = jax.jit(lambda x, k: denoising_loss(lambda x, t: x, x, k, schedule=CosineSchedule(),
                                              t_range=(0.2, 0.4)))
    loss, aux = run(x0, jax.random.PRNGKey(0))
    assert np.all((aux["t"] >= 0.2) & (aux["t"] <= 0.4)) and np.isfinite(loss)
    with pytest.raises(InputError, match="schedule must be"):
        denoising_loss(lambda x, t: x, x0, jax.random.PRNGKey(0), schedule=SD21)
