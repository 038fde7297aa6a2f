"""Training the diffusion autoencoder (image and video): configs, the Table 1 switches,
smoke training with exact Orbax resume (BatchNorm statistics in the train state), export
through the one model format and the CLI (slow tier)."""
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import diffjax.codecs
from diffjax.codecs.diffae_train import DiffAETask, make_weighting
from diffjax.errors import InputError
from diffjax.train.checkpoint import read_workdir_params
from diffjax.train.loop import train
from diffjax.train.task import build_task
from diffjax.train.writers import read_metrics
from experiments.configs import diffae, diffae_video
from experiments.configs.base import TRAINING_CLIPS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_configs_and_ablation_switches():
    c = diffae.get_config("cpu")
    assert c.task.name == "diffae" and c.task.kwargs.weighting == "min_snr"
    assert c.task.kwargs.codec.prediction_type == "sample"  # x0 + min-SNR(5): Table 1's best
    assert c.task.kwargs.min_snr_gamma == 5.0 and c.task.kwargs.codec.guidance_scale == 3.0
    names = sorted(p.name for p in pathlib.Path(c.data.path).iterdir())
    assert len(names) == 300 and all(n.startswith(("train_", "val_")) for n in names)
    for arg, target, weighting in (("eps,p2", "epsilon", "p2"), ("v,sech", "v_prediction", "sech"),
                                   ("x0,const", "sample", "constant"), ("eps", "epsilon", "min_snr")):
        c = diffae.get_config(f"cpu,{arg}")
        assert (c.task.kwargs.codec.prediction_type, c.task.kwargs.weighting) == (target, weighting)
    for bad in ("eps,v", "p2,sech", "tpu"):
        with pytest.raises(ValueError):
            diffae.get_config(bad)
    with pytest.raises(InputError):
        make_weighting("edm")
    assert make_weighting("p2", p2_k=2.0, p2_gamma=0.5).k == 2.0
    v = diffae_video.get_config("cpu,ft8")
    assert v.task.name == "diffae_video" and v.task.kwargs.codec.temporal_factor == 8
    assert v.data.num_frames == v.task.kwargs.codec.group_frames == 8
    training = {pathlib.Path(p).name for p in TRAINING_CLIPS}
    clips = {p.name for p in pathlib.Path(v.data.path).iterdir()}
    assert clips and clips <= training  # DEVELOPERS.md's training clips only
    task = build_task(diffae.get_config("smoke,v,sech").task.to_dict())
    assert isinstance(task, DiffAETask) and task.stateful and not task.per_example_rng
    assert task.provenance()["prediction_type"] == "v_prediction"
    with pytest.raises(InputError):
        DiffAETask(codec=diffae.codec_kwargs("smoke"), quality_weights=[1, 2])


def _max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))


@pytest.mark.slow
def test_smoke_training_resumes_exactly_and_exports(tmp_path):
    cfg = diffae.get_config("smoke")
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_after=2)
    train(cfg, tmp_path / "resumed", progress=False)
    runs = [read_workdir_params(tmp_path / n) for n in ("straight", "resumed")]
    assert _max_diff(runs[0][1], runs[1][1]) == 0.0
    state0, state1 = runs[0][2]["model_state"], runs[1][2]["model_state"]
    assert _max_diff(state0, state1) == 0.0
    stats = state0["encoder"]["batch_stats"]["proj_norm"]
    assert not np.allclose(stats["var"], 1.0)  # the step updated the running statistics
    losses = [[m["loss"] for m in read_metrics(tmp_path / n)] for n in ("straight", "resumed")]
    assert len(losses[0]) == 4 and np.allclose(losses[0], losses[1], rtol=0, atol=1e-6)
    # the one model format: export, then the CLI compresses and decompresses with it
    model = tmp_path / "model"
    out = subprocess.run([sys.executable, "-m", "experiments.export", "--workdir",
                          str(tmp_path / "straight"), "--out", str(model)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    codec, params = diffjax.codecs.load(model, "diffae")
    assert _max_diff(params["encoder"]["batch_stats"], state0["encoder"]["batch_stats"]) == 0.0
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    cmd = [sys.executable, "-m", "diffjax.cli"]
    for args in (["compress", str(tmp_path / "in.png"), "--codec", "diffae", "--model", str(model),
                  "-o", str(tmp_path / "a.djx")],
                 ["decompress", str(tmp_path / "a.djx"), "--model", str(model),
                  "-o", str(tmp_path / "out.png")]):
        out = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    data = (tmp_path / "a.djx").read_bytes()
    decoded = np.asarray(Image.open(tmp_path / "out.png"))
    np.testing.assert_array_equal(decoded, codec.at_quality(1).decode(params, data))


@pytest.mark.slow
def test_video_smoke_training_and_export(tmp_path):
    cfg = diffae_video.get_config("smoke,ft2")
    cfg.num_train_steps = 2
    train(cfg, tmp_path / "run", progress=False)
    codec, params = diffjax.codecs.load(tmp_path / "run", "diffae-video")
    assert codec.temporal_factor == 2 and "batch_stats" in params["encoder"]
    frames = np.random.default_rng(1).integers(0, 256, (3, 20, 24, 3), np.uint8)
    out = codec.decode(params, codec.encode(params, frames))
    assert out.shape == frames.shape
