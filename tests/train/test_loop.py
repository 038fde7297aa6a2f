"""The real train loop (``diffjax.train.loop.train``) on the toy task, 8 fake devices.

* resume: 4 steps in one run == 2 steps, restart, 2 more (parameters bit-for-bit and the
  ``metrics.jsonl`` losses, step 4 included, within 1e-6), with one line per step;
* a save interrupted by a crash leaves no valid-looking step: the next run resumes
  from the last complete checkpoint, removes the partial one and ends identical;
* the loop's pmap path gives the same losses and parameters as its jit path;
* checkpoints: saved every N, keep K, config JSON beside the state.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffjax.train.loop import train
from diffjax.train.writers import read_metrics
from experiments.configs.toy_autoencoder import get_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def make_config(shared_data, **overrides):
    c = get_config("smoke")
    c.data.path = str(shared_data / "bsds500" / "train")
    c.data.crop = 32
    c.batch_size = 16
    c.num_train_steps = 4
    c.checkpoint_every = 2
    c.keep_checkpoints = 2
    for k, v in overrides.items():
        c[k] = v
    return c


def max_diff(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb) > 0
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shared_data):
    """4 uninterrupted steps (the reference run)."""
    workdir = tmp_path_factory.mktemp("straight")
    state = train(make_config(shared_data), workdir, progress=False)
    return jax.device_get(state), read_metrics(workdir), workdir


def test_metrics_and_checkpoints(straight):
    state, metrics, workdir = straight
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and "mse" in m and "learning_rate" in m for m in metrics)
    assert int(state.step) == 4
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]  # every 2 steps, keep 2
    saved = json.loads((workdir / "checkpoints" / "4" / "config" / "metadata").read_text())
    assert saved["num_train_steps"] == 4 and saved["task"]["name"] == "toy_autoencoder"
    assert json.loads((workdir / "config.json").read_text())["seed"] == 0


def test_resume_two_plus_two_equals_four(straight, tmp_path, shared_data):
    ref_state, ref_metrics, _ = straight
    # interrupted after step 2 (same config: the cosine schedule still spans 4 steps)
    first = train(make_config(shared_data), tmp_path, progress=False, stop_after=2)
    assert int(first.step) == 2
    resumed = train(make_config(shared_data), tmp_path, progress=False)
    assert int(resumed.step) == 4
    assert max_diff(resumed.params, ref_state.params) == 0.0
    assert max_diff(resumed.opt_state, ref_state.opt_state) == 0.0
    assert max_diff(resumed.ema_params, ref_state.ema_params) == 0.0
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for got, want in zip(metrics, ref_metrics):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6, atol=0)
    assert max_diff(first.params, ref_state.params) > 1e-4  # 2 steps != 4 steps


CRASH_SCRIPT = r"""
import json, os, pathlib, sys, time
sys.path.insert(0, {repo!r})
from experiments.configs.toy_autoencoder import get_config
from diffjax.train.loop import train
workdir = pathlib.Path({workdir!r}); ckdir = workdir / "checkpoints"

def crash_while_saving(step, state, metrics):
    if step != 4:
        return
    deadline = time.time() + 30
    while time.time() < deadline:  # the async save of step 4 is under way: kill it
        if any(".orbax-checkpoint-tmp" in p.name for p in ckdir.iterdir()):
            os._exit(17)
        if (ckdir / "4").exists():
            os._exit(18)
        time.sleep(0.0005)
    os._exit(19)

config = get_config("smoke")
config.update(json.loads({overrides!r}))
config.data.path = {data!r}
config.data.crop = 32
train(config, workdir, hooks=[crash_while_saving], progress=False)
"""


@pytest.mark.slow  # default-suite budget; test_resume_two_plus_two_equals_four stays
def test_interrupted_save_resumes_cleanly(straight, tmp_path, shared_data):
    ref_state, ref_metrics, _ = straight
    cfg = make_config(shared_data)
    overrides = json.dumps({k: cfg[k] for k in ("batch_size", "num_train_steps",
                                                 "checkpoint_every", "keep_checkpoints")})
    script = CRASH_SCRIPT.format(repo=str(REPO), workdir=str(tmp_path), overrides=overrides,
                                 data=cfg.data.path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 17, proc.stderr[-3000:]
    ckdir = tmp_path / "checkpoints"
    assert any(".orbax-checkpoint-tmp" in p.name for p in ckdir.iterdir())
    assert not (ckdir / "4").exists()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]  # 3, 4 are stale
    resumed = train(make_config(shared_data), tmp_path, progress=False)
    assert sorted(p.name for p in ckdir.iterdir()) == ["2", "4"]  # partial save removed
    assert max_diff(resumed.params, ref_state.params) == 0.0
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in ref_metrics],
                               rtol=1e-6)


@pytest.mark.slow  # default-suite budget; test_step.py checks the pmap step equals the jit step
def test_loop_pmap_path_equals_jit_path(straight, tmp_path, shared_data):
    ref_state, ref_metrics, _ = straight
    state = train(make_config(shared_data, parallel="pmap"), tmp_path, progress=False)
    assert max_diff(state.params, ref_state.params) < 1e-6
    assert max_diff(state.ema_params, ref_state.ema_params) < 1e-6
    metrics = read_metrics(tmp_path)
    np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in ref_metrics],
                               rtol=1e-6)


def test_finished_run_is_not_retrained(straight, shared_data):
    """Running again in a finished workdir restores step 4 and does nothing else."""
    ref_state, ref_metrics, workdir = straight
    state = train(make_config(shared_data), workdir, progress=False)
    assert int(state.step) == 4 and max_diff(state.params, ref_state.params) == 0.0
    assert read_metrics(workdir) == ref_metrics


@pytest.mark.slow  # default-suite budget; test_init_from_a_model_folder stays
def test_init_from_starts_a_new_run_from_another_runs_params(straight, tmp_path, shared_data):
    """``config.init_from``: step 0 of a new run holds the other run's latest parameters,
    with a fresh optimizer; then it trains on from there."""
    ref_state, _, ref_workdir = straight
    cfg = make_config(shared_data, init_from=str(ref_workdir))
    started = train(cfg, tmp_path / "a", progress=False, stop_after=0)
    assert int(started.step) == 0
    assert max_diff(started.params, ref_state.params) == 0.0
    assert all(float(np.max(np.abs(np.asarray(m)))) == 0.0
               for m in jax.tree.leaves(started.opt_state) if np.ndim(m) > 0)
    trained = train(cfg, tmp_path / "a", progress=False, stop_after=1)
    assert int(trained.step) == 1 and max_diff(trained.params, ref_state.params) > 0.0


def test_init_from_a_different_model_lists_the_mismatches(straight, tmp_path, shared_data):
    from diffjax.errors import CheckpointError

    _, _, ref_workdir = straight
    cfg = make_config(shared_data, init_from=str(ref_workdir))
    cfg.task.kwargs.channels = 12  # other widths: every conv kernel has another shape
    with pytest.raises(CheckpointError, match="wrong shape"):
        train(cfg, tmp_path / "b", progress=False, stop_after=0)
    cfg = make_config(shared_data, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="not a training workdir"):
        train(cfg, tmp_path / "c", progress=False, stop_after=0)


def test_init_from_a_model_folder(straight, tmp_path, shared_data):
    """A model folder (``params.msgpack``, e.g. the shipped weights) starts a run too."""
    from flax import serialization

    ref_state, _, _ = straight
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "params.msgpack").write_bytes(serialization.msgpack_serialize(
        jax.tree.map(np.asarray, jax.device_get(ref_state.params))))
    started = train(make_config(shared_data, init_from=str(folder)), tmp_path / "run",
                    progress=False, stop_after=0)
    assert max_diff(started.params, ref_state.params) == 0.0


def test_init_from_a_corrupt_model_folder_is_a_clear_error(tmp_path, shared_data):
    from diffjax.errors import CheckpointError

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "params.msgpack").write_bytes(b"\x93not msgpack params")
    with pytest.raises(CheckpointError, match="cannot read params.msgpack"):
        train(make_config(shared_data, init_from=str(folder)), tmp_path / "run",
              progress=False, stop_after=0)
