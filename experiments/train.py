"""Train a diffjax model from an ml_collections config file.

    python -m experiments.train --config=experiments/configs/NAME.py[:ARG] --workdir=DIR \
        [--config.key=value ...] [--distributed=auto|yes|no]

Running the same command again in the same ``--workdir`` resumes from its latest
checkpoint. On a multi-host TPU pod / GPU cluster run it on every host (see
``experiments/tpu/run.sh``); ``jax.distributed.initialize()`` is called when the
environment shows more than one process (or with ``--distributed=yes``). Errors from
bad input are printed as one line with exit status 2.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/configs/hyperprior.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.jsonl.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "Call jax.distributed.initialize(): auto = when the environment has several processes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
_STOP_AFTER_MINUTES = flags.DEFINE_float(
    "stop_after_minutes", None, "Stop with a checkpoint once this much wall time has passed "
    "(a lent accelerator's time slot); rerunning resumes exactly.")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None, "Stop with a checkpoint at this step (fits a job's time slot); "
    "rerun to continue. The schedule still spans config.num_train_steps.")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables that tell a launch has more than one process.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def multi_process_environment(env=os.environ) -> bool:
    """True when ``env`` describes a multi-process launch (TPU pod slice, SLURM, MPI,
    or an explicit JAX coordinator), i.e. when ``jax.distributed.initialize()`` is needed."""
    if any(env.get(k) for k in _MULTI_PROCESS_ENV):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID_HOSTS", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(key, "").isdigit() and int(env[key]) > 1:
            return True
    return False


def _one_line(err: BaseException) -> str:
    """A one-line message for a config/flag error. ml_collections embeds whole tracebacks
    in its messages (a failing ``get_config``) or quotes ``KeyError`` text with escaped
    newlines (a misspelled ``--config.key``); keep the line that says what is wrong."""
    if isinstance(err, OSError) and err.__cause__ is not None:
        err = err.__cause__  # "Configuration is not available because of ...": the cause
    text = str(err)
    if isinstance(err, (KeyError, AttributeError)):
        text = text.strip("'\"").replace("\\n", "\n").replace("\\'", "'")
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        return "unknown config field " + "; ".join(lines)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines) or len(lines) > 1:
        return f"{lines[0].rstrip(':')}: {lines[-1]}" if lines else type(err).__name__
    return lines[0] if lines else type(err).__name__


def _usage_error(err: BaseException):
    print(f"experiments.train: error: {_one_line(err)} (see --helpshort)", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing, with bad ``--config``/``--config.key=value`` arguments reported
    as one line and exit status 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as err:
        _usage_error(err)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    try:
        config.keys  # noqa: B018  (a config file that failed to load raises on any access)
    except OSError as err:
        _usage_error(err)
    from absl import logging

    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    import jax

    from diffjax.errors import DiffjaxError

    mode = _DISTRIBUTED.value
    if mode == "yes" or (mode == "auto" and multi_process_environment()):
        jax.distributed.initialize()
    from diffjax.train.loop import train

    try:
        train(config, _WORKDIR.value, progress=_PROGRESS.value,
              stop_after=_STOP_AFTER.value, stop_after_minutes=_STOP_AFTER_MINUTES.value)
    except DiffjaxError as err:
        print(f"experiments.train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("experiments.train: interrupted (checkpoints are consistent; rerun to resume)",
              file=sys.stderr)
        return 130
    return 0


def run():
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
