"""Fields every training config has (``experiments/configs/*.py`` start from this).

A config file defines ``get_config(arg: str = "")``; the launcher passes what follows
``:`` in ``--config=experiments/configs/NAME.py:ARG``. Every config accepts ``smoke``
(alone or in a comma list, e.g. ``smoke,q3``) to shrink itself to a run of a few
seconds on CPU. Fields can be overridden on the command line:
``--config.batch_size=16 --config.optimizer.learning_rate=3e-4``.
"""
from __future__ import annotations

import os
import pathlib

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


# DEVELOPERS.md, "training" row, video column (paths under the data root): every video
# training set reads this list, never an evaluation clip.
TRAINING_CLIPS = (
    "video_more/sam2_meta/01_dog.mp4", "video_more/sam2_meta/02_cups.mp4",
    "video_more/sam2_meta/03_blocks.mp4",
    "video_more/openh264_cisco/CiscoVT2people_320x192_12fps.yuv",
    "video_more/openh264_cisco/VID_1280x720_cabac_temporal_direct.264",
    "video_more/openh264_cisco/VID_1920x1080_cabac_temporal_direct.264",
    "video_more/openh264_cisco/Zhling_1280x720.264",
    "video_clips/carphone_qcif_120f_pristine.mp4", "video_clips/bikes_640x272.mp4",
    "video_clips/realshort_320x240.mp4",
)

def data_root() -> pathlib.Path:
    """Where datasets live: ``$DIFFJAX_DATA``, else ``../shared/data`` beside the checkout."""
    return pathlib.Path(os.environ.get("DIFFJAX_DATA", REPO_ROOT.parent / "shared" / "data"))


def parse_arg(arg: str) -> set[str]:
    """``"smoke,q3"`` -> ``{"smoke", "q3"}``."""
    return {a.strip() for a in (arg or "").split(",") if a.strip()}


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 100_000
    c.batch_size = 16                 # global, split over processes and devices
    c.log_every = 100
    c.checkpoint_every = 5_000
    c.keep_checkpoints = 3
    c.ema_decay = 0.0                 # 0 = no EMA parameters
    c.tensorboard = False
    c.init_from = ""                  # training workdir / model folder whose params start this run
    c.parallel = "jit"                # "jit" (mesh shardings) or "pmap"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})   # -1 = all remaining devices
    c.fsdp_min_size = 0               # >0: also fsdp-shard unannotated params this large
    c.logical_axis_rules = ml_collections.config_dict.placeholder(list)  # None = defaults

    c.data = ml_collections.ConfigDict()
    c.data.kind = "images"            # images | video | tfds
    c.data.path = str(data_root() / "bsds500" / "train")
    c.data.crop = 256
    c.data.flip = True
    c.data.num_threads = 4
    c.data.prefetch = 8
    c.data.worker_count = 0           # >0: grain multiprocessing workers

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_clip_norm = 1.0

    c.task = ml_collections.ConfigDict()
    c.task.name = ""
    c.task.kwargs = ml_collections.ConfigDict()
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to a few CPU-seconds: few steps, tiny crops and batches."""
    c.num_train_steps = 4
    c.batch_size = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.data.crop = 64
    c.data.num_threads = 2
    c.optimizer.warmup_steps = 0
    return c


def trainval_dir(root: pathlib.Path | None = None) -> str:
    """A folder of symlinks to BSDS500 train + val images (the test split stays unseen)."""
    src = pathlib.Path(root or data_root()) / "bsds500"
    out = REPO_ROOT / "runs" / "bsds500_trainval"
    if not (src / "train").is_dir():
        return str(src / "train")  # the loader reports the missing folder
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for f in sorted((src / split).iterdir()):
            link = out / f"{split}_{f.name}"
            if not link.exists():
                os.symlink(f.resolve(), link)
    return str(out)


def apply_cpu_stretch(c: ml_collections.ConfigDict, *, crop: int, steps: int,
                      learning_rate: float, warmup_steps: int, log_every: int,
                      checkpoint_every: int, batch_size: int = 8) -> ml_collections.ConfigDict:
    """The shared shape of the runs trained on this project's 2-core CPU machines: BSDS500
    train + val (:func:`trainval_dir`), 2 loader threads, warmup + cosine to 0.1x, gradient
    clipping at 1, the last 2 checkpoints kept."""
    c.data.path = trainval_dir()
    c.data.crop = crop
    c.data.num_threads = 2
    c.batch_size = batch_size
    c.num_train_steps = steps
    c.log_every = log_every
    c.checkpoint_every = checkpoint_every
    c.keep_checkpoints = 2
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = warmup_steps
    c.optimizer.schedule = "cosine"
    c.optimizer.end_learning_rate_factor = 0.1
    c.optimizer.grad_clip_norm = 1.0
    return c
