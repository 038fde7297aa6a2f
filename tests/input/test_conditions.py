"""Condition extractors (canny via OpenCV, low-res colour through real ffmpeg H.264/H.265,
depth from files) and the conditioned (image, cond) pipeline."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffjax.errors import InputError
from diffjax.input import conditions as C
from diffjax.input.pipeline import dataset_from_config, iterate


@pytest.fixture(scope="module")
def image(shared_data):
    from diffjax.input.sources import list_files, load_image

    path = list_files(shared_data / "bsds500" / "val", [".jpg"])[0]
    return np.ascontiguousarray(load_image(path)[100:196, 100:228])  # 96 x 128


def test_canny_matches_opencv(image):
    import cv2

    out = C.CannyEdges(50, 150)(image)
    assert out.shape == (96, 128, 3) and out.dtype == np.float32
    want = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 50, 150) / 255.0
    np.testing.assert_array_equal(out[..., 0], want)
    assert set(np.unique(out)) == {0.0, 1.0}
    assert C.CannyEdges(channels=1)(image).shape == (96, 128, 1)


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_low_res_colour_is_really_coded(image, codec):
    plain = C.LowResColour(8)(image)
    assert plain.shape == image.shape
    small = C.LowResColour(8).low_res(image)
    assert small.shape == (12, 16, 3)
    coarse, fine = C.LowResColour(8, codec, 51), C.LowResColour(8, codec, 10)
    err_coarse = np.abs(coarse.low_res(image).astype(int) - small).mean()
    err_fine = np.abs(fine.low_res(image).astype(int) - small).mean()
    assert err_fine < err_coarse  # the CRF acts: a real encoder ran
    assert err_coarse > 1.0
    np.testing.assert_array_equal(coarse(image), coarse(image))  # deterministic


def test_code_frames_reports_the_stream_size(image):
    frames = np.stack([image, image[:, ::-1]])
    low, n_low = C.code_frames(frames, "h264", 45)
    high, n_high = C.code_frames(frames, "h264", 5)
    assert low.shape == frames.shape and n_low < n_high
    assert np.abs(high.astype(int) - frames).mean() < np.abs(low.astype(int) - frames).mean()
    with pytest.raises(InputError, match="codec"):
        C.code_frames(frames, "vp9")
    with pytest.raises(InputError, match="crf"):
        C.code_frames(frames, "h264", 60)


def test_depth_from_files_is_cropped_flipped_and_normalised(tmp_path):
    depth = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 20)
    (tmp_path / "sub").mkdir()
    Image.fromarray(depth).save(tmp_path / "sub" / "a.png")
    ex = C.DepthFromFiles(str(tmp_path))
    crop = np.zeros((10, 20, 3), np.uint8)
    out = ex(crop, relpath="sub/a.jpg", full_size=(40, 60), crop=(5, 7), flipped=True)
    want = depth[5:15, 7:27][:, ::-1].astype(np.float32)
    want = (want - want.min()) / (want.max() - want.min())
    np.testing.assert_allclose(out[..., 0], want, atol=1e-6)
    assert out.shape == (10, 20, 3)
    with pytest.raises(InputError, match="no depth map"):
        ex(crop, relpath="sub/missing.jpg")


def test_build_extractor_errors():
    assert isinstance(C.build_extractor({"name": "canny", "low": 10}), C.CannyEdges)
    with pytest.raises(InputError, match="unknown condition extractor"):
        C.build_extractor({"name": "sobel"})
    with pytest.raises(InputError, match="bad arguments"):
        C.build_extractor({"name": "canny", "sigma": 1})
    with pytest.raises(InputError, match="codec"):
        C.build_extractor({"name": "lowres", "codec": "av1"})


def test_conditioned_pipeline_is_random_access(shared_data):
    """Batch k is the same whether the iterator starts at 0 or at k (exact resume)."""
    cfg = {"kind": "conditioned_images", "path": str(shared_data / "bsds500" / "val"),
           "crop": 48, "condition": {"name": "canny"}}
    ds = dataset_from_config(cfg, global_batch_size=2, seed=3)
    from_start = list(zip(range(3), iterate(ds, start=0, num_threads=1)))
    later = next(iterate(ds, start=2, num_threads=1))
    batch = from_start[2][1]
    assert batch["image"].shape == (2, 48, 48, 3) and batch["cond"].shape == (2, 48, 48, 3)
    for key in ("image", "cond"):
        np.testing.assert_array_equal(later[key], batch[key])
    # the condition is the canny map of the (cropped, flipped) image itself
    grey = (batch["image"][0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(batch["cond"][0], C.CannyEdges()(grey))
