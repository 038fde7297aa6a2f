"""The ready GPU training scripts in ``experiments/device/`` (run on a lent accelerator).

The default tier checks that each script parses and that the config it runs fits the
weights it starts from; the slow tier runs the residual script end to end with its smoke
config on this CPU (two stages and the export, as on the device).
"""
import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "experiments" / "device").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_residual_gpu_shipped_config_matches_the_shipped_weights():
    """``residual.py:gpu,shipped`` must have the shipped model's widths, or
    ``init_from=diffjax/weights/residual`` fails on the device."""
    from diffjax.train.task import build_task
    from experiments.configs import residual

    shipped = json.loads((ROOT / "diffjax" / "weights" / "residual" / "model.json").read_text())
    for stage in ("base", "enhance"):
        config = residual.get_config(f"gpu,shipped,{stage}")
        assert (config.data.crop, config.batch_size) == (256, 16)
        kwargs = build_task(config.to_dict()["task"]).codec_kwargs()
        assert {k: v for k, v in kwargs.items() if k != "steps"} == \
            {k: v for k, v in shipped["kwargs"].items() if k != "steps"}
    with pytest.raises(ValueError, match="goes with 'gpu'"):
        residual.get_config("cpu,shipped")


@pytest.mark.slow
def test_residual_script_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    subprocess.run([str(ROOT / "experiments" / "device" / "residual.sh"), "smoke"], env=env,
                   check=True, timeout=1800)
    from diffjax.codecs import pretrained

    model = pretrained.load_model(tmp_path / "out" / "residual-gpu")
    assert model.codec_name == "residual" and model.info["step"] == 2
    assert (tmp_path / "out" / "enhance_metrics.jsonl").stat().st_size > 0
