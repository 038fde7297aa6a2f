"""Backbone-coded training clips for the residual video codec (Brenig & Timofte, "Higher
fidelity perceptual image and video compression with a latent conditioned residual
denoising diffusion model", video: the refiner learns to enhance a frozen video codec).

The backbone (x265 / x264 through ffmpeg, the encoder of
:class:`diffjax.eval.baselines.FfmpegVideoCoder` that the codec uses) runs once per clip
and CRF, not once per step: :func:`ensure_cache` codes the first ``max_frames`` frames of
each clip (downscaled so the longer side is at most ``max_side``) at every CRF of
``crfs`` and stores the originals and the decodes as uint8 ``.npy`` arrays, read
memory-mapped during training. A cache folder holds

* ``index.json``: ``{"version", "spec", "ffmpeg", "clips": [{"name", "frames", "height",
  "width"}]}``; a folder whose ``index.json`` does not match the spec and the ffmpeg
  version is rebuilt;
* ``{i:02d}_orig.npy`` and ``{i:02d}_crf{c}.npy``: ``[T, H, W, 3]`` per clip.

Training reads random windows of ``num_frames`` consecutive frames (``data.kind =
"backbone_video"``, :func:`backbone_video_dataset`): one random crop and flip for the
window, one random CRF of ``crfs``; batches ``{"video", "backbone": float32 [B, T, h, w, 3]
in [0, 1], "crf": float32 [B]}``. Batch ``k`` depends only on the seed and ``k``, so
training resumes exactly. ``python -m diffjax.input.backbone_video CONFIG[:ARG]`` builds the
cache of a config (before a job whose time is counted).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
from typing import Any, Mapping

import grain
import numpy as np

from diffjax.errors import InputError

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What a backbone cache is built from (recorded in its ``index.json``)."""

    clips: tuple[str, ...]
    backbone: str = "x265"
    crfs: tuple[int, ...] = (20, 25, 30, 35, 40)
    max_frames: int = 32
    max_side: int = 320

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BackboneSpec":
        from diffjax.codecs.residual_video import check_crf
        from diffjax.models.video_refiner import FFMPEG_BACKBONES

        spec = cls(clips=tuple(str(p) for p in cfg.get("clips", ())),
                   backbone=str(cfg.get("backbone", "x265")),
                   crfs=tuple(check_crf(int(c)) for c in cfg.get("crfs", (30,))),
                   max_frames=int(cfg.get("max_frames", 32)),
                   max_side=int(cfg.get("max_side", 320)))
        if not spec.clips or not spec.crfs:
            raise InputError("backbone_video: give clips and crfs")
        if spec.backbone not in FFMPEG_BACKBONES:
            raise InputError(f"backbone_video: backbone must be one of {FFMPEG_BACKBONES}")
        if spec.max_frames < 2 or spec.max_side < 16:
            raise InputError("backbone_video: max_frames must be >= 2 and max_side >= 16")
        return spec

    def as_json(self) -> dict:
        return {"clips": [pathlib.Path(c).name for c in self.clips], "backbone": self.backbone,
                "crfs": list(self.crfs), "max_frames": self.max_frames,
                "max_side": self.max_side}


def cache_folder(spec: BackboneSpec, root: str | os.PathLike) -> pathlib.Path:
    """``root/<backbone>-<hash of the spec>``: specs never share a folder."""
    key = hashlib.sha256(json.dumps(spec.as_json(), sort_keys=True).encode()).hexdigest()
    return pathlib.Path(root) / f"{spec.backbone}-{key[:12]}"


def _ffmpeg_version() -> str:
    from diffjax.eval.baselines import tool_versions

    return tool_versions().get("ffmpeg", "")


def _read_clip(path: pathlib.Path, spec: BackboneSpec) -> np.ndarray:
    """The first ``max_frames`` frames, downscaled to ``max_side``, cropped to even sides."""
    from diffjax.input import sources
    from diffjax.input.latent_cache import _fit

    if not path.is_file():
        raise InputError(f"training clip {str(path)!r} does not exist")
    src = sources.VideoFileSource([path])
    n = min(spec.max_frames, src.num_frames(0))
    return np.stack([_fit(f, spec.max_side, 2) for f in src.read_clip(0, 0, n)])


def _index_matches(folder: pathlib.Path, spec: BackboneSpec, check_ffmpeg: bool) -> bool:
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return False
    if index.get("version") != CACHE_VERSION or index.get("spec") != spec.as_json():
        return False
    return not check_ffmpeg or index.get("ffmpeg") == _ffmpeg_version()


def ensure_cache(spec: BackboneSpec, root: str | os.PathLike, progress: bool = True
                 ) -> pathlib.Path:
    """The cache folder of ``spec`` under ``root``, built first if missing or stale.

    A folder that matches the spec is used as it is where ffmpeg is missing (a prepared
    cache carried to a machine without it); where ffmpeg exists it must also match its
    version. Built in a temporary folder and moved into place, so a folder is complete."""
    from tqdm.auto import tqdm

    from diffjax.eval.baselines import FfmpegVideoCoder

    folder = cache_folder(spec, root)
    if _index_matches(folder, spec, check_ffmpeg=shutil.which("ffmpeg") is not None):
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    clips = []
    bar = tqdm(total=len(spec.clips) * (1 + len(spec.crfs)), desc="backbone cache",
               unit="decode", disable=not progress, file=sys.stderr)
    try:
        for i, clip in enumerate(spec.clips):
            frames = _read_clip(pathlib.Path(clip), spec)
            np.save(tmp / f"{i:02d}_orig.npy", frames)
            bar.update(1)
            for crf in spec.crfs:
                coder = FfmpegVideoCoder(spec.backbone, crf)
                np.save(tmp / f"{i:02d}_crf{crf}.npy", coder.decode(coder.encode(frames)))
                bar.update(1)
            t, h, w = frames.shape[:3]
            clips.append({"name": pathlib.Path(clip).name, "frames": t, "height": h,
                          "width": w})
        (tmp / "index.json").write_text(json.dumps(
            {"version": CACHE_VERSION, "spec": spec.as_json(), "ffmpeg": _ffmpeg_version(),
             "clips": clips}, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class WindowSource:
    """Random-access records ``{"clip", "start"}``: every window of ``num_frames``
    consecutive frames of the cached clips at least ``height x width``."""

    def __init__(self, folder: pathlib.Path, num_frames: int, height: int, width: int):
        index = json.loads((folder / "index.json").read_text())
        self.folder, self.crfs = folder, tuple(index["spec"]["crfs"])
        self.clips = [i for i, c in enumerate(index["clips"])
                      if c["height"] >= height and c["width"] >= width
                      and c["frames"] >= num_frames]
        if not self.clips:
            raise InputError(f"no cached clip has {num_frames} frames of at least "
                             f"{width}x{height}")
        self.records = [(c, s) for c in self.clips
                        for s in range(index["clips"][c]["frames"] - num_frames + 1)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        c, s = self.records[i]
        return {"clip": np.int32(c), "start": np.int32(s)}


@dataclasses.dataclass
class BackboneWindow(grain.transforms.RandomMap):
    """``{"clip", "start"}`` -> ``{"video", "backbone", "crf"}`` (module docstring)."""

    folder: pathlib.Path
    crfs: tuple
    num_frames: int
    height: int
    width: int
    flip: bool = True

    def _array(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_arrays", {})
        if name not in cache:
            cache[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return cache[name]

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        c, s = int(element["clip"]), int(element["start"])
        crf = self.crfs[int(rng.integers(len(self.crfs)))]
        orig = self._array(f"{c:02d}_orig")
        _, h, w, _ = orig.shape
        top = int(rng.integers(h - self.height + 1))
        left = int(rng.integers(w - self.width + 1))
        flipped = bool(self.flip and rng.random() < 0.5)
        window = (slice(s, s + self.num_frames), slice(top, top + self.height),
                  slice(left, left + self.width))

        def get(name):
            x = np.asarray(self._array(name)[window], np.float32) / 255.0
            return np.ascontiguousarray(x[:, :, ::-1] if flipped else x)

        return {"video": get(f"{c:02d}_orig"), "backbone": get(f"{c:02d}_crf{crf}"),
                "crf": np.float32(crf)}


def backbone_video_dataset(cfg: Mapping[str, Any], *, global_batch_size: int, seed: int,
                           **shard) -> grain.MapDataset:
    """Batches of a ``config.data`` with ``kind = "backbone_video"``: ``clips``,
    ``backbone``, ``crfs``, ``max_frames``, ``max_side`` (the :class:`BackboneSpec`),
    ``cache_dir`` (default ``runs/backbone_cache``), ``num_frames``, ``crop``, ``flip``."""
    from diffjax.input.pipeline import _crop, batched_dataset

    spec = BackboneSpec.from_config(cfg)
    folder = ensure_cache(spec, cfg.get("cache_dir") or default_cache_root(),
                          progress=bool(cfg.get("progress", True)))
    h, w = _crop(cfg)
    n = int(cfg.get("num_frames", 3))
    source = WindowSource(folder, n, h, w)
    transform = BackboneWindow(folder, source.crfs, n, h, w, bool(cfg.get("flip", True)))
    return batched_dataset(source, transform, global_batch_size=global_batch_size,
                           seed=seed, **shard)


def default_cache_root() -> pathlib.Path:
    """``runs/backbone_cache`` of the checkout (``runs/`` is git-ignored)."""
    return pathlib.Path(__file__).resolve().parents[2] / "runs" / "backbone_cache"


def main(argv: list[str] | None = None) -> int:
    """``python -m diffjax.input.backbone_video experiments/configs/NAME.py[:ARG]
    [CACHE_DIR]``: build the backbone cache of a config's data section."""
    import importlib.util

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__, file=sys.stderr)
        return 2
    path, _, arg = argv[0].partition(":")
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    data = module.get_config(arg).data.to_dict()
    root = argv[1] if len(argv) > 1 else (data.get("cache_dir") or default_cache_root())
    folder = ensure_cache(BackboneSpec.from_config(data), root)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{folder}: {size / 2 ** 20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
