"""Bjøntegaard deltas on synthetic curves with known answers."""
import numpy as np
import pytest

from diffjax import InputError
from diffjax.metrics import bd_psnr, bd_rate

RATES = np.array([0.1, 0.25, 0.5, 1.0, 1.6])


def _psnr(rates, a=30.0, b=4.0):
    return a + b * np.log(rates / 0.1)  # linear in log-rate, reproduced exactly by PCHIP


def test_constant_rate_ratio_gives_that_bd_rate():
    q = _psnr(RATES)
    assert bd_rate(RATES, q, 0.8 * RATES, q) == pytest.approx(-20.0, abs=1e-9)
    assert bd_rate(RATES, q, 1.25 * RATES, q) == pytest.approx(25.0, abs=1e-9)
    assert bd_rate(RATES, q, RATES, q) == pytest.approx(0.0, abs=1e-12)


def test_quality_offset_gives_bd_psnr_and_matching_bd_rate():
    q = _psnr(RATES)
    # +1 dB everywhere = same quality at exp(-1/4) of the rate
    assert bd_psnr(RATES, q, RATES, q + 1.0) == pytest.approx(1.0, abs=1e-9)
    assert bd_rate(RATES, q, RATES, q + 1.0) == pytest.approx((np.exp(-0.25) - 1) * 100, abs=1e-9)


def test_nonlinear_curve_and_partial_overlap():
    """Concave curve, test shifted to different rates; unordered input points."""
    anchor_r = np.array([0.12, 0.3, 0.7, 1.5])
    anchor_q = 25 + 6 * np.sqrt(anchor_r)
    test_r = anchor_r * 0.9
    order = [2, 0, 3, 1]
    got = bd_rate(anchor_r[order], anchor_q[order], test_r, anchor_q)
    assert got == pytest.approx(-10.0, abs=1e-9)


def test_ms_ssim_in_db():
    ms = np.array([0.90, 0.95, 0.97, 0.985])
    db = -10 * np.log10(1 - ms)
    assert bd_rate(RATES[:4], ms, RATES[:4] * 0.5, ms, metric="ms-ssim") == pytest.approx(-50.0)
    assert bd_psnr(RATES[:4], ms, RATES[:4], 1 - (1 - ms) / 10 ** 0.1, metric="ms-ssim") == \
        pytest.approx(1.0, abs=1e-9)
    assert bd_rate(RATES[:4], db, RATES[:4] * 0.5, db, metric="db") == pytest.approx(-50.0)


@pytest.mark.parametrize("args, match", [
    (([0.1, 0.2], [30, 31], [5.0, 6.0], [40, 41]), "overlap"),
    (([0.1], [30], [0.1], [30]), "at least 2"),
    (([0.1, -0.2], [30, 31], [0.1, 0.2], [30, 31]), "positive"),
    (([0.1, 0.2, 0.3], [30, 30, 31], [0.1, 0.2], [30, 31]), "distinct"),
])
def test_bad_curves(args, match):
    with pytest.raises(InputError, match=match):
        bd_rate(*args)
    with pytest.raises(InputError, match="metric"):
        bd_rate([0.1, 0.2], [30, 31], [0.1, 0.2], [30, 31], metric="lpips")
