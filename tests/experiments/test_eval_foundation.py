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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_refuses_a_workdir_of_another_task(tmp_path):
    from diffjax.errors import InputError

    wd = tmp_path / "hp"
    config = hyperprior.get_config("smoke")
    config.num_train_steps = 1
    train(config, str(wd), progress=False)
    with pytest.raises(InputError, match="hyperprior model, not a foundation model"):
        eval_foundation.load_model(str(wd))


def _curve(bpps, psnrs, lpips, label="q"):
    return [{"label": f"{label}={i}", "setting": {"quality": i}, "bpp": b, "psnr": p,
             "ms_ssim": 1 - 10 ** (-p / 20), "ms_ssim_db": p / 2, "lpips": lp,
             "enc_s": 0.1, "dec_s": 0.2, "per_image": []}
            for i, (b, p, lp) in enumerate(zip(bpps, psnrs, lpips))]


def _rd(curves, images=("a.png", "b.png"), **extra):
    return {"format": "diffjax-rd/1", "dataset": {"name": "tiny", "images": [
        {"name": n} for n in images]}, "settings": {}, "environment": {},
            "curves": curves, "references": {}, **extra}


def test_reuse_recombines_the_previous_foundation_curve(tmp_path):
    """``--reuse DIR``: the foundation curve and lambda.json of DIR are kept as they were,
    every other curve (and reference) comes from the new ``--combine`` file; no workdir,
    no images, nothing evaluated."""
    jpeg = _curve([0.2, 0.4, 0.8, 1.6], [25.0, 28.0, 31.0, 34.0], [0.4, 0.3, 0.2, 0.1])
    ours = _curve([0.5, 0.9, 1.5], [24.0, 27.0, 30.0], [0.3, 0.2, 0.1], "lambda")
    old_other = _curve([0.3, 0.6, 1.2], [26.0, 29.0, 32.0], [0.5, 0.4, 0.3])
    new_other = _curve([0.2, 0.5, 1.0, 1.4], [27.0, 30.0, 33.0, 35.0], [0.3, 0.2, 0.1, 0.05])
    prev = tmp_path / "prev"
    prev.mkdir()
    rows = [{"lambda": lam, "bpp": p["bpp"], "psnr": p["psnr"], "ms_ssim": p["ms_ssim"],
             "lpips": p["lpips"], "t_mean": 0.1, "t_min": 0.05, "t_max": 0.2,
             "steps_mean": 3.0, "steps_min": 2, "steps_max": 4, "dec_s": 1.0, "enc_s": 0.5}
            for lam, p in zip((1, 5, 20), ours)]
    (prev / "rd.json").write_text(json.dumps(_rd(
        {"JPEG": jpeg, "residual (old)": old_other, eval_foundation.CURVE: ours},
        references={"old ref": {"bpp": [0.1], "psnr": [20.0]}},
        argv=["eval_foundation.py", "runs/x", "kodak"])))
    (prev / "lambda.json").write_text(json.dumps(rows))
    combine = tmp_path / "combine.json"
    combine.write_text(json.dumps(_rd({"JPEG": jpeg, "residual (new)": new_other})))

    out = tmp_path / "out"
    assert eval_foundation.main(["--reuse", str(prev), "--out", str(out),
                                 "--combine", str(combine)]) == 0
    rd = json.loads((out / "rd.json").read_text())
    assert list(rd["curves"]) == ["JPEG", "residual (new)", eval_foundation.CURVE]
    assert rd["curves"][eval_foundation.CURVE] == ours
    assert rd["curves"]["residual (new)"] == new_other
    assert rd["references"] == {}  # the old combination's references are not carried over
    assert rd["reused_from"] == {"folder": str(prev), "argv": ["eval_foundation.py", "runs/x",
                                                                "kodak"]}
    assert "--reuse" in rd["argv"]
    assert json.loads((out / "lambda.json").read_text()) == rows
    table = (out / "bd_rate.md").read_text()
    assert "residual (new)" in table and "residual (old)" not in table
    assert rd["bd_rate"]["anchor"] == "JPEG"
    assert set(rd["bd_rate"]["psnr"]) == {"residual (new)", eval_foundation.CURVE}
    for name in ("rd_psnr.png", "rd_lpips.png", "rd_ms_ssim.png", "lambda.png"):
        assert (out / name).stat().st_size > 0

    # reusing the output in place keeps the first provenance
    assert eval_foundation.main(["--reuse", str(out), "--out", str(out),
                                 "--combine", str(combine)]) == 0
    again = json.loads((out / "rd.json").read_text())
    assert again["curves"] == rd["curves"] and again["reused_from"] == rd["reused_from"]


def test_reuse_errors(tmp_path):
    with pytest.raises(SystemExit):  # --reuse with a workdir: argparse error
        eval_foundation.main(["runs/x", "kodak", "--reuse", str(tmp_path), "--out", "o"])
    with pytest.raises(SystemExit):  # neither a model nor --reuse
        eval_foundation.main(["--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not an output of this script"):
        eval_foundation.main(["--reuse", str(tmp_path), "--out", str(tmp_path / "o")])
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "rd.json").write_text(json.dumps(_rd({eval_foundation.CURVE: _curve(
        [0.5, 0.9], [24.0, 27.0], [0.3, 0.2])})))
    (prev / "lambda.json").write_text("[]")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_rd({"JPEG": _curve([0.2, 0.4], [25.0, 28.0], [0.4, 0.3])},
                                    images=("c.png",))))
    with pytest.raises(SystemExit, match="other images"):
        eval_foundation.main(["--reuse", str(prev), "--out", str(tmp_path / "o"),
                              "--combine", str(other)])
    (prev / "rd.json").write_text(json.dumps(_rd({"JPEG": []})))
    with pytest.raises(SystemExit, match="has no"):
        eval_foundation.main(["--reuse", str(prev), "--out", str(tmp_path / "o")])
