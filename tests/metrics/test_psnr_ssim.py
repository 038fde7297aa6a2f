"""PSNR / SSIM / MS-SSIM against closed forms and pytorch_msssim (the reference)."""
import functools

import jax
import numpy as np
import pytest
import pytorch_msssim
import torch

from diffjax import InputError
from diffjax.metrics import ms_ssim, ms_ssim_db, mse, psnr, ssim


def _noisy_pair(seed, shape, sigma):
    rng = np.random.default_rng(seed)
    # smooth-ish content so SSIM is far from 0 and 1
    base = rng.integers(0, 256, shape).astype(np.float64)
    x = np.clip(base * 0.5 + 64, 0, 255).astype(np.uint8)
    y = np.clip(x + rng.normal(0, sigma, shape), 0, 255).astype(np.uint8)
    return x, y


def test_psnr_closed_form_per_image_then_mean():
    x = np.full((2, 16, 24, 3), 100, np.uint8)
    y = x.copy()
    y[0] += 1   # MSE (1/255)^2   -> 48.1308 dB
    y[1] += 10  # MSE (10/255)^2  -> 28.1308 dB
    per = np.asarray(psnr(x, y, reduction="none"))
    np.testing.assert_allclose(per, [20 * np.log10(255), 20 * np.log10(25.5)], atol=1e-4)
    # mean of per-image PSNRs, not PSNR of the pooled MSE
    assert float(psnr(x, y)) == pytest.approx(per.mean(), abs=1e-5)
    pooled = 10 * np.log10(1 / float(mse(x, y)))
    assert abs(pooled - per.mean()) > 5
    assert np.isinf(float(psnr(x, x)))


def test_psnr_uint8_and_float_inputs_agree_hwc():
    x, y = _noisy_pair(1, (20, 30, 3), 5)
    a = float(psnr(x, y))
    b = float(psnr(x.astype(np.float32) / 255, y.astype(np.float32) / 255))
    assert a == pytest.approx(b, abs=1e-4)
    ref = 10 * np.log10(255.0 ** 2 / np.mean((x.astype(float) - y) ** 2))
    assert a == pytest.approx(ref, abs=1e-4)


@pytest.fixture(scope="module")
def jitted():
    """Callers jit (DESIGN.md); one compiled function per metric for the whole module."""
    return (jax.jit(functools.partial(ms_ssim, reduction="none")),
            jax.jit(functools.partial(ssim, reduction="none")))


def test_ms_ssim_matches_pytorch_msssim(jitted):
    """177 x 190: odd height at scale 1, odd width at scale 2 (95) exercise the avg-pool
    padding rule; uint8 input traced by jit."""
    jms, jss = jitted
    x, y = _noisy_pair(0, (2, 177, 190, 3), 20)
    y[1] = np.clip(x[1].astype(int) + 3, 0, 255)  # a second, milder distortion
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).double()
    ty = torch.from_numpy(y).permute(0, 3, 1, 2).double()
    ref = pytorch_msssim.ms_ssim(tx, ty, data_range=255, size_average=False).numpy()
    np.testing.assert_allclose(np.asarray(jms(x, y)), ref, atol=1e-4)
    assert 0.3 < ref.min() < 0.999  # a non-trivial operating point
    ref_ssim = pytorch_msssim.ssim(tx, ty, data_range=255, size_average=False).numpy()
    np.testing.assert_allclose(np.asarray(jss(x, y)), ref_ssim, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jms(x, x)), 1.0, atol=1e-6)


def test_ms_ssim_db_scale():
    assert float(ms_ssim_db(0.99)) == pytest.approx(20.0, abs=1e-4)
    assert float(ms_ssim_db(0.9)) == pytest.approx(10.0, abs=1e-4)


@pytest.mark.parametrize("bad, match", [
    (lambda x: (x, x[:, :-1]), "same shape"),
    (lambda x: (x[:, :100, :100], x[:, :100, :100]), "160"),
    (lambda x: (x.astype(np.float32), x.astype(np.float32)), r"\[0, 1\]"),
    (lambda x: (x.astype(np.int32), x.astype(np.int32)), "uint8"),
    (lambda x: (x[0, :, :, 0], x[0, :, :, 0]), "expected an image"),
])
def test_bad_input_is_refused(bad, match):
    x = np.zeros((1, 176, 176, 3), np.uint8) + 7
    a, b = bad(x)
    with pytest.raises(InputError, match=match):
        ms_ssim(a, b)


def test_nan_and_reduction_errors():
    x = np.zeros((8, 8, 3), np.float32)
    y = x.copy()
    y[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        psnr(x, y)
    with pytest.raises(InputError, match="reduction"):
        psnr(x, x, reduction="sum")
