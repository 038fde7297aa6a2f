"""experiments/eval_foundation.py: a trained foundation workdir -> Kodak-style RD + lambda table."""
import json

import numpy as np
import pytest
from PIL import Image

from diffjax.train.loop import train
from experiments import eval_foundation
from experiments.configs import foundation_taef2, hyperprior


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data):
    """Two steps of the TAEF2 smoke config (real TAEF2 weights, random tiny denoiser)."""
    wd = tmp_path_factory.mktemp("fd2")
    config = foundation_taef2.get_config("smoke")
    config.num_train_steps = 2
    train(config, str(wd), progress=False)
    return wd


def test_rd_and_lambda_table_from_real_bitstreams(workdir, tmp_path, shared_data):
    images = tmp_path / "images"
    images.mkdir()
    kodim = np.asarray(Image.open(shared_data / "kodak" / "kodim23.png").convert("RGB"))
    Image.fromarray(kodim[:48, :64]).save(images / "a.png")
    Image.fromarray(kodim[100:140, 200:256]).save(images / "b.png")
    out = tmp_path / "out"
    assert eval_foundation.main([str(workdir), str(images), "--out", str(out),
                                 "--lambdas", "1,20"]) == 0

    rd = json.loads((out / "rd.json").read_text())
    points = rd["curves"][eval_foundation.CURVE]
    assert [p["setting"]["quality"] for p in sorted(points, key=lambda p: p["setting"]["quality"])] == [1, 20]
    for p in points:
        assert len(p["per_image"]) == 2 and p["bpp"] > 0 and np.isfinite(p["psnr"])
    rows = json.loads((out / "lambda.json").read_text())
    assert [r["lambda"] for r in rows] == [1, 20]
    kwargs, params, _ = eval_foundation.load_model(str(workdir))
    for r in rows:
        assert 0 < r["t_min"] <= r["t_mean"] <= r["t_max"] <= 1
        assert 1 <= r["steps_min"] <= r["steps_max"] <= kwargs["num_inference_steps"]
    for name in ("rd_psnr.png", "rd_lpips.png", "lambda.png", "bd_rate.md"):
        assert (out / name).stat().st_size > 0
    assert not (out / "bitstreams").exists()  # removed after the side information was read


def test_side_info_matches_the_encoder(workdir):
    from diffjax.codecs.base import pad_to_multiple
    from diffjax.codecs.foundation import FoundationCodec

    kwargs, params, _ = eval_foundation.load_model(str(workdir))
    codec = FoundationCodec(5, **kwargs)
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)
    lat = codec.latents(params, pad_to_multiple(img, codec.backbone.stride)[None])
    info = codec.side_info(params, codec.encode(params, img))
    assert info["t"] == pytest.approx(float(lat["t"][0]))
    assert info["steps"] == codec.predicted_steps(info["t"])
    np.testing.assert_array_equal(np.concatenate([info["log_scale"], info["shift"]]),
                                  lat["gamma"][0].reshape(-1).astype(np.float32))


def test_refuses_a_workdir_of_another_task(tmp_path):
    from diffjax.errors import InputError

    wd = tmp_path / "hp"
    config = hyperprior.get_config("smoke")
    config.num_train_steps = 1
    train(config, str(wd), progress=False)
    with pytest.raises(InputError, match="hyperprior model, not a foundation model"):
        eval_foundation.load_model(str(wd))
