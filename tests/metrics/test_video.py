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


# ----------------------------------------------------------------------------- warping error

def _texture(seed, size):
    import cv2

    noise = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 2.0)
    blurred = (blurred - blurred.min()) / (blurred.max() - blurred.min())
    return np.rint(blurred * 255).astype(np.uint8)


def _panning(t=4, size=32, dx=2, dy=1):
    big = _texture(0, size + 3 * t)
    return np.stack([big[8 - dy * i:8 - dy * i + size, 12 - dx * i:12 - dx * i + size]
                     for i in range(t)])


def test_warping_error_static_shift_and_flicker():
    """Static scene, copy decoded: 0. Panning by (2, 1) px a frame, copy decoded: ~0
    (Farneback + bilinear warp residue). Frame-alternating brightness: ~3 (d/255)^2, the
    value of a perfectly compensated flicker of d levels on every channel."""
    from diffjax.metrics.video import warping_error

    static = np.repeat(_panning()[:1], 4, axis=0)
    assert warping_error(static, static) == pytest.approx(0.0, abs=1e-5)
    pan = _panning()
    copy_err = warping_error(pan, pan)
    assert copy_err < 1e-4
    # without the mask the pixels entering the frame (no source in t-1) count
    assert warping_error(pan, pan, mask=False) > 10 * copy_err
    d = 12
    for ref in (static, pan):
        flicker = ref.astype(int)
        flicker[1::2] += d
        assert flicker.max() <= 255  # no clipping: the flicker is exactly d everywhere
        err = warping_error(ref, flicker.astype(np.uint8))
        assert err == pytest.approx(3 * (d / 255) ** 2, rel=0.05)
        assert err > 50 * copy_err
    # precomputed reference flows give the same values
    from diffjax.metrics.video import reference_flows

    flows = reference_flows(pan)
    assert warping_error(pan, flicker.astype(np.uint8), flows=flows) == err
    with pytest.raises(InputError, match="do not fit"):
        warping_error(pan[:3], pan[:3], flows=flows)
    # the metric is in video_metrics, beside the existing names
    out = video_metrics(pan, pan, metrics=("psnr", "warping_error"))
    assert set(out) == {"psnr", "warping_error"} and out["warping_error"] == copy_err


def test_warping_error_hand_computed():
    """Exact integer flows (flow_fn): the warp, the mask and the average by hand."""
    from diffjax.metrics.video import backward_warp, warping_error

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)  # the reference only gives flow
    y = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)

    def flow_fn(a, b):  # every pixel moves 1 px right from t-1 to t
        sign = -1.0 if np.array_equal(a, x_unit[1]) else 1.0
        return np.broadcast_to(np.array([sign, 0.0], np.float32), (5, 6, 2))

    x_unit = x.astype(np.float32) / np.float32(255)
    yf = y.astype(np.float64) / 255
    # warp(y_0)(r, c) = y_0(r, c - 1); column 0 maps outside frame 0 and is masked
    expected = np.sum((yf[1, :, 1:] - yf[0, :, :-1]) ** 2, axis=-1).mean()
    got = warping_error(x_unit, y.astype(np.float32) / np.float32(255), flow_fn=flow_fn)
    assert got == pytest.approx(expected, rel=1e-5)
    warped, inside = backward_warp(yf[0], np.broadcast_to(np.float32([-1, 0]), (5, 6, 2)))
    np.testing.assert_allclose(warped[:, 1:], yf[0][:, :-1], atol=1e-6)
    assert not inside[:, 0].any() and inside[:, 1:].all()


def test_warping_error_mask_excludes_occlusions():
    """A square moving 4 px right over a static background, with exact flows: the
    forward-backward check flags the uncovered strip, so a copy of the reference scores
    exactly 0 with the mask and > 0 without it (the strip shows the square in t-1)."""
    from diffjax.metrics.video import occlusion_mask, warping_error

    bg, fg = _texture(1, 40), _texture(2, 12)
    clip = np.stack([bg.copy(), bg.copy()])
    clip[0, 14:26, 8:20] = fg
    clip[1, 14:26, 12:24] = fg
    bw = np.zeros((40, 40, 2), np.float32)  # t -> t-1: the square came from 4 px left
    bw[14:26, 12:24, 0] = -4
    fw = np.zeros((40, 40, 2), np.float32)  # t-1 -> t
    fw[14:26, 8:20, 0] = 4
    occluded = occlusion_mask(bw, fw)
    assert occluded[14:26, 8:12].all()  # uncovered background: inconsistent
    # the square's inside and the far background are kept (its last row and column
    # are motion boundaries: Lai et al.'s one-sided flow differences)
    assert not occluded[14:25, 12:23].any() and not occluded[:12].any()
    unit = clip.astype(np.float32) / np.float32(255)

    def flow_fn(a, b):
        return bw if np.array_equal(a, unit[1]) else fw

    assert warping_error(unit, unit, flow_fn=flow_fn) == 0.0
    assert warping_error(unit, unit, flow_fn=flow_fn, mask=False) > 1e-3


def test_warping_error_errors():
    from diffjax.metrics.video import warping_error

    x = _clip(4, t=1)
    with pytest.raises(InputError, match="2 frames"):
        warping_error(x, x)
    with pytest.raises(InputError, match="same shape"):
        warping_error(_clip(4), _clip(4)[:, :8])
