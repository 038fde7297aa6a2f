"""grain input pipelines: deterministic, sharded per process, prefetched.

A pipeline is a grain ``MapDataset`` of *batches* that is infinite (every epoch is
reshuffled with a seed derived from the pipeline seed and the epoch) and random access:
batch ``k`` is a pure function of ``(seed, shard, k)``. Training therefore resumes
exactly by starting the iterator at the restored step (:func:`iterate` with
``start=step``), with no iterator state to checkpoint.

Sharding across hosts follows the usual JAX multi-host recipe: process ``i`` of ``n``
(``jax.process_index()``/``jax.process_count()``) reads records ``i, i+n, i+2n, ...`` of
the source and produces ``global_batch // n`` examples per step; the train loop assembles
the global array with ``jax.make_array_from_process_local_data``.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

import grain
import numpy as np

from diffjax.errors import InputError
from diffjax.input import sources, transforms


def process_shard(shard_index: int | None = None,
                  shard_count: int | None = None) -> tuple[int, int]:
    """``(index, count)`` of this process; defaults to ``jax.process_index()/count()``."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise InputError(f"shard index {shard_index} outside [0, {shard_count})")
    return shard_index, shard_count


def local_batch_size(global_batch_size: int, shard_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise InputError(f"global batch size {global_batch_size} must be a positive multiple "
                         f"of the number of processes ({shard_count})")
    return global_batch_size // shard_count


def _mix_seed(seed: int, shard_index: int) -> int:
    """A 32-bit seed per (seed, shard) so hosts do not draw correlated augmentations."""
    return int(np.random.SeedSequence([int(seed), int(shard_index)]).generate_state(1)[0])


def batched_dataset(source: Any, transform: grain.transforms.RandomMap, *,
                    global_batch_size: int, seed: int, shuffle: bool = True,
                    shard_index: int | None = None,
                    shard_count: int | None = None) -> grain.MapDataset:
    """Infinite ``MapDataset`` of per-process batches from a random-access ``source``.

    Records are split across processes *before* shuffling, so shards are disjoint; each
    epoch is reshuffled (grain's shuffle seeds epoch ``e`` with ``seed + e``);
    ``transform`` gets a generator seeded by (seed, shard, record position).
    """
    shard_index, shard_count = process_shard(shard_index, shard_count)
    batch = local_batch_size(global_batch_size, shard_count)
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise InputError(f"{source!r} has fewer records than the {shard_count} processes")
    local_seed = _mix_seed(seed, shard_index)
    if shuffle:
        ds = ds.shuffle(seed=local_seed)
    ds = ds.repeat(None)
    ds = ds.random_map(transform, seed=local_seed)
    return ds.batch(batch, drop_remainder=True)


def image_dataset(root: str | os.PathLike, *, crop: int | tuple[int, int],
                  global_batch_size: int, seed: int, flip: bool = True,
                  with_metadata: bool = False, **shard) -> grain.MapDataset:
    """Batches ``{"image": float32 [B, h, w, 3]}`` in [0, 1] from an image folder."""
    h, w = (crop, crop) if isinstance(crop, int) else crop
    source = sources.ImageFolderSource(root)
    return batched_dataset(source, transforms.CropFlipImage(h, w, flip, with_metadata),
                           global_batch_size=global_batch_size, seed=seed, **shard)


def video_dataset(root: str | os.PathLike, *, num_frames: int, crop: int | tuple[int, int],
                  global_batch_size: int, seed: int, kind: str = "auto", flip: bool = True,
                  with_metadata: bool = False, **shard) -> grain.MapDataset:
    """Batches ``{"video": float32 [B, T, h, w, 3]}`` of random T-frame clips.

    ``kind``: ``"frames"`` (folders of frame images), ``"files"`` (video files decoded
    with PyAV) or ``"auto"`` (files if ``root`` holds any video file, else frames).
    """
    h, w = (crop, crop) if isinstance(crop, int) else crop
    if kind == "auto":
        try:
            sources.list_files(root, sources.VIDEO_EXTENSIONS)
            kind = "files"
        except InputError:
            kind = "frames"
    if kind == "files":
        source = sources.VideoFileSource(root, min_frames=num_frames)
    elif kind == "frames":
        source = sources.FrameFolderSource(root, min_frames=num_frames)
    else:
        raise InputError(f"video kind must be 'auto', 'frames' or 'files', got {kind!r}")
    transform = transforms.RandomClip(source, num_frames, h, w, flip, with_metadata)
    return batched_dataset(source, transform, global_batch_size=global_batch_size,
                           seed=seed, **shard)


def iterate(ds: grain.MapDataset, *, start: int = 0, num_threads: int = 4,
            prefetch_buffer_size: int = 8, worker_count: int = 0) -> Iterator[dict]:
    """Iterate batches ``start, start+1, ...`` with threaded (and optionally
    multi-process) prefetching. Exactly the batches ``ds[start], ds[start+1], ...``."""
    ds = ds[start:]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def prefetch_to_device(iterator: Iterator[Any], put: Callable[[Any], Any],
                       size: int = 2) -> Iterator[Any]:
    """Run ``put`` (host batch -> device arrays) ``size`` batches ahead in a thread, so the
    host-to-device copy overlaps the train step. Errors in the thread are re-raised."""
    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    done = object()
    stop = threading.Event()

    def offer(item) -> bool:
        # A blocking put would hang (and leak the thread and its batches) once the
        # consumer stops early, e.g. at the end of train(); poll the stop flag instead.
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for item in iterator:
                if stop.is_set() or not offer(put(item)):
                    return
        except BaseException as err:  # noqa: BLE001  (re-raised in the consumer)
            offer(_Raised(err))
            return
        offer(done)

    thread = threading.Thread(target=worker, daemon=True, name="diffjax-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.err
            yield item
    finally:
        stop.set()
        while not q.empty():  # drop prefetched batches (device memory) now
            q.get_nowait()


class _Raised:
    def __init__(self, err: BaseException):
        self.err = err


def dataset_from_config(cfg: Mapping[str, Any], *, global_batch_size: int, seed: int,
                        **shard) -> grain.MapDataset:
    """Build a pipeline from the ``config.data`` section of an experiment config.

    ``kind``: ``"images"`` (``path``, ``crop``), ``"video"`` (``path``, ``num_frames``,
    ``crop``, ``video_kind``), ``"conditioned_images"`` (``path``, ``crop``, ``condition``:
    ``{"image", "cond"}`` batches, :mod:`diffjax.input.conditions`), ``"latents"``
    (``path``, ``crop``, ``latent_cache``: ``{"latent"}`` crops of cached autoencoder
    latents, :mod:`diffjax.input.latent_cache`) or ``"tfds"`` (``name``,
    ``split``, ``data_dir``, ``crop``,
    and ``num_frames`` for video datasets: a dataset prepared in array_record format by
    :mod:`diffjax.input.tfds_builders`, read by grain through ``as_data_source``; image
    datasets give ``{"image"}`` batches, video ones ``{"video"}`` clips).
    """
    kind = cfg.get("kind", "images")
    flip = bool(cfg.get("flip", True))
    if kind == "images":
        return image_dataset(cfg["path"], crop=_crop(cfg), global_batch_size=global_batch_size,
                             seed=seed, flip=flip, **shard)
    if kind == "video":
        return video_dataset(cfg["path"], num_frames=int(cfg["num_frames"]), crop=_crop(cfg),
                             global_batch_size=global_batch_size, seed=seed, flip=flip,
                             kind=cfg.get("video_kind", "auto"), **shard)
    if kind == "conditioned_images":  # (image, condition) pairs for ControlNet training
        from diffjax.input import conditions

        return conditions.conditioned_image_dataset(
            cfg["path"], crop=_crop(cfg), condition=dict(cfg["condition"]),
            global_batch_size=global_batch_size, seed=seed, flip=flip, **shard)
    if kind == "latents":  # cached first-stage latents (latent diffusion training)
        from diffjax.input import latent_cache

        return latent_cache.latent_dataset(cfg, global_batch_size=global_batch_size,
                                           seed=seed, **shard)
    if kind == "backbone_video":  # backbone-coded clips (residual video codec training)
        from diffjax.input import backbone_video

        return backbone_video.backbone_video_dataset(cfg, global_batch_size=global_batch_size,
                                                     seed=seed, **shard)
    if kind == "tfds":
        from diffjax.input import tfds_builders

        source = tfds_builders.data_source(cfg["name"], split=cfg.get("split", "train"),
                                           data_dir=cfg.get("data_dir") or None)
        h, w = _crop(cfg)
        if source.kind == "video":
            num_frames = int(cfg.get("num_frames") or source.length)
            transform = transforms.RandomClip(source, num_frames, h, w, flip)
        else:
            transform = transforms.CropFlipImage(h, w, flip)
        return batched_dataset(source, transform, global_batch_size=global_batch_size,
                               seed=seed, **shard)
    raise InputError(f"unknown data kind {kind!r}; use 'images', 'video', "
                     "'conditioned_images', 'latents', 'backbone_video' or 'tfds'")


def _crop(cfg: Mapping[str, Any]) -> tuple[int, int]:
    crop = cfg["crop"]
    if isinstance(crop, int):
        return crop, crop
    h, w = crop
    return int(h), int(w)
