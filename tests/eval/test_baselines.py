"""Classical baselines: real encoders, real sizes, reference operating points."""
import numpy as np
import pytest
from PIL import Image

from diffjax import BitstreamError, InputError
from diffjax.eval import baselines
from diffjax.eval.video import load_clip


def _psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


@pytest.fixture(scope="module")
def kodak(shared_data):
    return [np.asarray(Image.open(p).convert("RGB"))
            for p in sorted((shared_data / "kodak").glob("kodim*.png"))]


@pytest.mark.parametrize("name, low, high", [
    ("jpeg", 10, 80), ("webp", 10, 80), ("avif", 20, 80), ("hevc", 40, 24), ("av1", 50, 24)])
def test_image_baseline_roundtrip_and_rate_order(name, low, high, kodak):
    """Odd-sized crop; the higher setting costs more bits and gives a higher PSNR; the
    encoder is deterministic (same bytes twice); garbage is refused."""
    x = np.ascontiguousarray(kodak[2][101:148, 37:100])  # 47 x 63
    lo, hi = baselines.make_coder(name, low), baselines.make_coder(name, high)
    data_lo, data_hi = lo.encode(x), hi.encode(x)
    assert data_hi == hi.encode(x)
    y_lo, y_hi = lo.decode(data_lo), hi.decode(data_hi)
    assert y_lo.shape == y_hi.shape == x.shape and y_hi.dtype == np.uint8
    assert len(data_hi) > len(data_lo) > 0
    assert _psnr(x, y_hi) > _psnr(x, y_lo) > 20
    with pytest.raises(BitstreamError):
        lo.decode(b"\x00garbage" * 16)


def test_kodak_reference_operating_points(kodak):
    """The issue's reference measurements (Pillow 13): JPEG q=20 -> 0.508 bpp / 29.14 dB,
    WebP q=30 -> 0.476 bpp / 31.23 dB (mean over the 24 Kodak images)."""
    for name, q, bpp, psnr in (("jpeg", 20, 0.508, 29.14), ("webp", 30, 0.476, 31.23)):
        coder = baselines.make_coder(name, q)
        rates, quals = [], []
        for x in kodak:
            data = coder.encode(x)
            rates.append(8 * len(data) / (x.shape[0] * x.shape[1]))
            quals.append(_psnr(x, coder.decode(data)))
        assert np.mean(rates) == pytest.approx(bpp, abs=0.0006), name
        assert np.mean(quals) == pytest.approx(psnr, abs=0.006), name


@pytest.mark.slow
def test_kodak_avif_reference_operating_point(kodak):
    """AVIF q=40 (speed 4) -> 0.379 bpp / 31.48 dB on Kodak (minutes on 2 cores)."""
    coder = baselines.make_coder("avif", 40)
    data = [coder.encode(x) for x in kodak]
    assert np.mean([8 * len(d) / x[..., 0].size for d, x in zip(data, kodak)]) == \
        pytest.approx(0.379, abs=0.0006)
    assert np.mean([_psnr(x, coder.decode(d)) for d, x in zip(data, kodak)]) == \
        pytest.approx(31.48, abs=0.006)


@pytest.mark.parametrize("name", ["x264", "x265"])
def test_video_baselines(name, shared_data):
    clip = load_clip(shared_data / "basketballpass", max_frames=4)[:, :64, :96]
    lo, hi = baselines.make_coder(name, 40), baselines.make_coder(name, 22)
    d_lo, d_hi = lo.encode(clip), hi.encode(clip)
    y_lo, y_hi = lo.decode(d_lo), hi.decode(d_hi)
    assert y_lo.shape == y_hi.shape == clip.shape
    assert len(d_hi) > len(d_lo)
    assert _psnr(clip, y_hi) > _psnr(clip, y_lo) > 20
    with pytest.raises(InputError, match="even"):
        lo.encode(clip[:, :63])
    with pytest.raises(BitstreamError):
        lo.decode(b"\x00\x00\x01garbage" * 8)


def test_load_clip_from_video_file_and_errors(shared_data, tmp_path):
    clip = load_clip(shared_data / "video_clips" / "realshort_320x240.mp4", max_frames=3)
    assert clip.shape == (3, 240, 320, 3) and clip.dtype == np.uint8
    with pytest.raises(InputError):
        load_clip(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="unknown baseline"):
        baselines.make_coder("jpeg2000", 10)
