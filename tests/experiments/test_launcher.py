"""The experiment launchers: ``python -m experiments.train`` and ``experiments/tpu/run.sh``.

* the hyperprior ``smoke`` config trains for 2 steps through the real command line
  (8 fake CPU devices): exit 0, one ``metrics.jsonl`` line per step with step and loss,
  the same metrics printed to stdout with ``--progress=false``, a checkpoint at step 2;
* bad ``--config`` arguments and overrides exit with status 2 and one clear line, no
  traceback;
* ``run.sh`` is ``bash -n`` clean, prints its usage, refuses to run without its
  environment, and hands every TPU host the right command (a fake ``gcloud`` on ``PATH``
  runs the ``--command`` locally).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN_SH = REPO / "experiments" / "tpu" / "run.sh"
SMOKE = "--config=experiments/configs/hyperprior.py:smoke"


def launch(*args, timeout=300):
    env = dict(os.environ)
    # LLVM optimisation dominates this tiny model's CPU compile time (~5x); numerics of a
    # 2-step smoke run do not depend on it.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hyperprior_smoke")
    proc = launch(SMOKE, f"--workdir={workdir}", "--config.num_train_steps=2", "--progress=false")
    return proc, workdir


def test_hyperprior_smoke_trains_from_the_command_line(smoke_run):
    proc, workdir = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records)
    assert {"bpp", "mse", "aux_loss", "learning_rate"} <= set(records[0])
    checkpoints = workdir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2"]
    assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 2


def test_progress_false_still_prints_metrics_to_stdout(smoke_run):
    proc, workdir = smoke_run
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 2
    for line, record in zip(lines, records):
        assert line.startswith(f"step {record['step']}/2: loss={record['loss']:.4g} ")
        assert "bpp=" in line
    assert "it/s" not in proc.stderr and "train:" not in proc.stderr  # no tqdm bar


@pytest.mark.parametrize("args, message", [
    ((SMOKE, "--config.num_train_step=2"),
     'unknown config field \'num_train_step\'; Did you mean "num_train_steps"'),
    ((SMOKE, "--config.optimizer.nme=adam"), "unknown config field 'nme'"),
    (("--config=experiments/configs/hyperprior.py:q9",),
     "unknown config argument 'q9'; use q1..q8, scale, smoke"),
    (("--config=experiments/configs/no_such.py",), "No such file or directory"),
    (("--config=experiments/configs/no_such.py", "--config.seed=1"), "No such file or directory"),
    ((SMOKE, "--config.batch_size=eight"), "--config.batch_size=eight"),
    ((SMOKE, "--config.optimizer.name=lion"), "unknown optimizer 'lion'"),
    ((SMOKE, "--config.data.path=/no/such/dir"), "data path '/no/such/dir' does not exist"),
    ((SMOKE, "--workdri=x"), "Unknown command line flag 'workdri'"),
])
def test_bad_arguments_give_one_clear_line(args, message, tmp_path):
    if not any(a.startswith("--workdir") or a.startswith("--workdri") for a in args):
        args = (*args, f"--workdir={tmp_path}")
    proc = launch(*args, "--progress=false", timeout=120)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith("experiments.train: error: ") and message in err[0]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- run.sh


def run_sh(*args, env=None, **kw):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TPU", "ZONE", "CONFIG", "WORKDIR", "SETUP", "DETACH")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(RUN_SH), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60, **kw)


def test_run_sh_is_bash_n_clean_and_documents_itself():
    assert subprocess.run(["bash", "-n", str(RUN_SH)], capture_output=True).returncode == 0
    assert os.access(RUN_SH, os.X_OK)
    proc = run_sh("--help")
    assert proc.returncode == 0
    for word in ("Usage:", "TPU", "ZONE", "CONFIG", "WORKDIR", "gs://", "--worker=all",
                 "experiments.train", "jax.distributed.initialize"):
        assert word in proc.stdout + RUN_SH.read_text(), word


def test_run_sh_refuses_without_its_environment():
    proc = run_sh()
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("run.sh: missing environment variable(s): "
                                   "TPU ZONE CONFIG WORKDIR (see --help)")
    proc = run_sh("--bogus")
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr


FAKE_GCLOUD = """#!/usr/bin/env bash
# records its arguments, then runs --command=... as the remote host would
printf '%s\\n' "$@" > "$GCLOUD_LOG"
for a in "$@"; do
  case "$a" in --command=*) exec bash -c "${a#--command=}" ;; esac
done
"""

FAKE_PYTHON = """#!/usr/bin/env bash
pwd > "$PYTHON_LOG"
printf '%s\\n' "$@" >> "$PYTHON_LOG"
"""


def test_run_sh_runs_the_train_command_on_all_workers(tmp_path):
    bin_dir, repo_dir = tmp_path / "bin", tmp_path / "checkout dir"
    bin_dir.mkdir()
    repo_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("fake-python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
           "PYTHON_LOG": str(tmp_path / "python.log"), "TPU": "my-v4-32", "ZONE": "us-central2-b",
           "PROJECT": "my-project", "CONFIG": "experiments/configs/hyperprior.py:q3",
           "WORKDIR": "gs://bucket/runs/hp q3", "REPO_DIR": str(repo_dir),
           "PYTHON": str(bin_dir / "fake-python"), "SETUP": "touch setup-ran"}
    proc = run_sh("--", "--config.optimizer.learning_rate=3e-4", "--config.data.path=/d/it's here",
                  env=env)
    assert proc.returncode == 0, proc.stderr
    gcloud = (tmp_path / "gcloud.log").read_text().splitlines()
    assert gcloud[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-v4-32", "--zone=us-central2-b",
                          "--worker=all", "--project=my-project"]
    assert (repo_dir / "setup-ran").exists()  # SETUP ran first, in REPO_DIR
    ran = (tmp_path / "python.log").read_text().splitlines()
    assert ran == [str(repo_dir), "-m", "experiments.train",
                   "--config=experiments/configs/hyperprior.py:q3",
                   "--workdir=gs://bucket/runs/hp q3", "--distributed=yes", "--progress=false",
                   "--config.optimizer.learning_rate=3e-4", "--config.data.path=/d/it's here"]

    (tmp_path / "python.log").unlink()
    dry = run_sh("--dry-run", env={**env, "DETACH": "1", "WORKDIR": "/local/dir"})
    assert dry.returncode == 0
    assert dry.stdout.startswith("gcloud compute tpus tpu-vm ssh my-v4-32 ")
    assert "nohup" in dry.stdout and "not a gs:// path" in dry.stderr
    assert not (tmp_path / "python.log").exists()  # a dry run runs nothing


@pytest.mark.parametrize("config", ["foundation_sd21.py:smoke", "foundation_taef2.py:smoke"])
@pytest.mark.slow
def test_foundation_smoke_configs_train_from_the_command_line(config, tmp_path):
    """The foundation codec's smoke configs run 2 steps of the real launcher (the other
    codecs' smoke configs train in tests/codecs: test_residual, test_latent_denoiser)."""
    proc = launch(f"--config=experiments/configs/{config}", f"--workdir={tmp_path}",
                  "--config.num_train_steps=2", "--progress=false", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in records)
    assert (tmp_path / "checkpoints" / "2").is_dir()
