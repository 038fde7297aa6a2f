"""Video metrics: frame averages equal the image metrics; tLP has known values."""
import functools

import jax
import numpy as np
import pytest

from diffjax import InputError
from diffjax.metrics import load_lpips_params, lpips_distance, psnr, video_metrics


@pytest.fixture(scope="module")
def lpips_fn():
    return jax.jit(functools.partial(lpips_distance, net="alex"))


def _clip(seed, t=4, h=32, w=40):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
    frames = [np.roll(base, 2 * i, axis=1) for i in range(t)]  # a panning clip
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def test_frame_average_and_tlp_known_values(lpips_fn):
    x = _clip(0)
    rng = np.random.default_rng(1)
    y = np.clip(x + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    out = video_metrics(x, y, metrics=("psnr", "lpips", "tlp"), lpips_fn=lpips_fn, batch_size=4)
    params = load_lpips_params("alex")
    xf, yf = x / np.float32(255), y / np.float32(255)
    assert out["psnr"] == pytest.approx(float(np.mean(psnr(x, y, reduction="none"))), abs=1e-5)
    assert out["lpips"] == pytest.approx(float(np.mean(lpips_fn(params, xf, yf))), abs=1e-6)
    # identical video: tLP = 0; frozen video (every frame = the first): tLP = mean
    # source change LPIPS(x_t, x_{t-1}), since the decoded change is 0
    assert video_metrics(x, x, metrics=("tlp",), lpips_fn=lpips_fn)["tlp"] == pytest.approx(0.0,
                                                                                          abs=1e-7)
    frozen = np.repeat(x[:1], len(x), axis=0)
    source_change = np.asarray(lpips_fn(params, xf[1:], xf[:-1]))
    got = video_metrics(x[None], frozen[None], metrics=("tlp",), lpips_fn=lpips_fn)["tlp"]
    assert got == pytest.approx(float(source_change.mean()), abs=1e-6)
    assert got > 0.02  # a real, non-zero change


def test_video_input_errors():
    x = _clip(2, t=1)
    with pytest.raises(InputError, match="2 frames"):
        video_metrics(x, x, metrics=("tlp",))
    with pytest.raises(InputError, match="unknown"):
        video_metrics(x, x, metrics=("vmaf",))
    with pytest.raises(InputError, match="clip"):
        video_metrics(x[0], x[0])
