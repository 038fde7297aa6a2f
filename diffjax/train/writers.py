"""Metric writers: ``metrics.jsonl`` (always) and TensorBoard (optional).

``metrics.jsonl`` in the work dir holds one JSON object per logged step, e.g.
``{"step": 100, "loss": 0.61, "bpp": 0.42, "learning_rate": 1e-4, "steps_per_sec": 3.1}``.
On resume the lines of steps after the restored checkpoint (written by the run that was
interrupted) are dropped, so the file always describes one consistent run.

TensorBoard event files are written with ``tensorboardX`` when it is installed, else with
``flax.metrics.tensorboard`` (needs TensorFlow, the optional extra); asking for
TensorBoard with neither installed is an error, not a silent no-op.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping

from diffjax.errors import InputError

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of ``<workdir>/metrics.jsonl`` (empty list if none)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_value(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf


class JsonlWriter:
    """Appends one JSON line per :meth:`write`; ``truncate_after`` drops stale lines."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (called when resuming from ``step``)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path.parent) if int(r["step"]) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Scalars to TensorBoard event files under ``<workdir>/tensorboard``."""

    def __init__(self, workdir: str | os.PathLike):
        logdir = str(pathlib.Path(workdir) / "tensorboard")
        try:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir)
            self._scalar = self._writer.add_scalar
        except ImportError:
            try:
                from flax.metrics import tensorboard
                self._writer = tensorboard.SummaryWriter(logdir)
            except ImportError as err:
                raise InputError("TensorBoard logging needs `tensorboardX` or TensorFlow "
                                 "(pip install tensorboardX); set config.tensorboard=False") from err
            self._scalar = lambda tag, value, step: self._writer.scalar(tag, value, step)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._scalar(k, float(v), int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
