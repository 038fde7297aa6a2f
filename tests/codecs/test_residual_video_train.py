"""Residual video codec training (issue 28): the backbone cache and its windows, the
config, BD-rate in LPIPS; smoke training with an exact resume, export, evaluation and the
device script in the slow tier (the train step's compilation takes minutes on 2 cores)."""
import json
import os
import pathlib
import subprocess

import jax
import numpy as np
import pytest

from diffjax.eval.baselines import FfmpegVideoCoder
from diffjax.eval.runner import bd_rate_table, format_bd_table
from diffjax.input import backbone_video as bv
from diffjax.input.pipeline import dataset_from_config
from experiments.configs import residual_video

ROOT = pathlib.Path(__file__).resolve().parents[2]


def smoke_config(tmp_path):
    config = residual_video.get_config("smoke")
    config.data.cache_dir = str(tmp_path / "cache")
    return config


def test_backbone_cache_and_windows(tmp_path):
    config = smoke_config(tmp_path)
    data = config.data.to_dict()
    spec = bv.BackboneSpec.from_config(data)
    assert [pathlib.Path(c).name for c in spec.clips] == \
        ["carphone_qcif_120f_pristine.mp4", "realshort_320x240.mp4"]  # training clips
    folder = bv.ensure_cache(spec, data["cache_dir"], progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert [c["frames"] for c in index["clips"]] == [4, 4]
    orig = np.load(folder / "00_orig.npy")
    assert max(orig.shape[1:3]) <= 64 and orig.shape[1] % 2 == 0
    coder = FfmpegVideoCoder("x265", 40)
    np.testing.assert_array_equal(np.load(folder / "00_crf40.npy"),
                                  coder.decode(coder.encode(orig)))
    mtime = (folder / "index.json").stat().st_mtime
    assert bv.ensure_cache(spec, data["cache_dir"]) == folder  # reused, not rebuilt
    assert (folder / "index.json").stat().st_mtime == mtime
    ds = dataset_from_config(data, global_batch_size=2, seed=0)
    batch = ds[3]
    assert batch["video"].shape == batch["backbone"].shape == (2, 2, 32, 32, 3)
    assert set(batch["crf"].tolist()) <= {30.0, 40.0}
    for k in batch:  # random access: batch k is a function of (seed, k)
        np.testing.assert_array_equal(batch[k], ds[3][k])
    # the backbone frames are the cached decodes of the same window of the originals
    err = np.abs(batch["video"] - batch["backbone"]).mean()
    assert 0 < err < 0.1
    with pytest.raises(Exception, match="no cached clip"):
        dataset_from_config({**data, "crop": 512}, global_batch_size=2, seed=0)


def test_config_arguments():
    for arg in ("", "cpu", "gpu", "noprev", "x264", "gpu,noprev", "smoke"):
        c = residual_video.get_config(arg)
        assert c.task.name == "residual_video" and c.data.kind == "backbone_video"
        assert c.data.backbone == c.task.kwargs.backbone
    assert residual_video.get_config("noprev").task.kwargs.prev_frame is False
    assert residual_video.get_config("").task.kwargs.init_from_image.endswith(
        "diffjax/weights/residual")
    assert residual_video.get_config("").task.kwargs.sampler_steps == 10
    with pytest.raises(ValueError):
        residual_video.get_config("cpu,gpu")
    with pytest.raises(ValueError):
        residual_video.get_config("tpu")


def test_gpu_config_starts_from_the_shipped_image_model():
    """``residual_video.py:gpu`` has the shipped image refiner's widths: its parameters
    load into the video model (new rows zero) without a mismatch."""
    from diffjax.codecs import pretrained
    from diffjax.models.video_refiner import from_image_params
    from diffjax.train.task import build_task

    task = build_task(residual_video.get_config("gpu").to_dict()["task"])
    spec = {"video": jax.ShapeDtypeStruct((16, 3, 128, 128, 3), np.float32)}
    import flax.linen as nn

    abstract = jax.eval_shape(lambda r: task.model.init(
        {"params": r}, np.zeros((1, 128, 128, 3), np.float32), np.zeros((1,), np.int32),
        np.zeros((1,), np.float32))["params"], jax.random.PRNGKey(0))
    shipped = pretrained.load_model(None, "residual").params
    params = jax.eval_shape(lambda a: from_image_params(a, shipped, task.model), abstract)
    assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(abstract))
    boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), spec)
    assert jax.tree.structure(boxed) == jax.tree.structure(abstract)  # boxes kept


def test_bd_rate_in_lpips():
    """Half the bits at equal LPIPS is -50 % (LPIPS as the quality -10 log10 LPIPS)."""
    anchor = [{"bpp": b, "lpips": l, "psnr": 30.0 + i, "ms_ssim": None}
              for i, (b, l) in enumerate([(0.1, 0.3), (0.2, 0.2), (0.4, 0.12), (0.8, 0.07)])]
    test = [{**p, "bpp": p["bpp"] / 2} for p in anchor]
    table = bd_rate_table({"curves": {"x265": anchor, "refined": test}, "references": {}},
                          "x265", metrics=("psnr", "ms_ssim", "lpips"))
    assert table["lpips"]["refined"] == pytest.approx(-50.0, abs=1e-6)
    assert "BD-rate LPIPS" in format_bd_table(table)


@pytest.mark.slow
def test_smoke_training_resumes_exactly_exports_and_evaluates(tmp_path):
    from diffjax.codecs import pretrained
    from diffjax.train.loop import train

    config = smoke_config(tmp_path)
    straight = train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False, stop_after=2)
    resumed = train(config, tmp_path / "b", progress=False)
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    log = lambda d: [json.loads(s) for s in (tmp_path / d / "metrics.jsonl").read_text().split("\n") if s]  # noqa: E731,E501
    assert [r["loss"] for r in log("a")] == [r["loss"] for r in log("b")]
    model = pretrained.export_model(tmp_path / "a", tmp_path / "model")
    assert model.codec_name == "residual-video" and model.config["steps"] == 2
    from experiments import eval_residual_video

    clip = ROOT.parent / "shared" / "data" / "video_clips" / "foreman_cif_60f_h264_crf23.mp4"
    assert eval_residual_video.main([str(clip), "--model", str(tmp_path / "model"), "--out",
                                     str(tmp_path / "eval"), "--frames", "2", "--crfs",
                                     "40,30", "--no-progress"]) == 0
    result = json.loads((tmp_path / "eval" / "rd.json").read_text())
    assert "lpips" in result["bd_rate"] and len(result["curves"]) == 3


@pytest.mark.slow
def test_device_script_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    subprocess.run([str(ROOT / "experiments" / "device" / "residual_video.sh"), "smoke"],
                   env=env, check=True, timeout=3600)
    from diffjax.codecs import pretrained

    model = pretrained.load_model(tmp_path / "out" / "residual-video-smoke")
    assert model.codec_name == "residual-video" and model.info["step"] == 4
