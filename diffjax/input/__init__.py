"""diffjax.input: grain pipelines over local images and video, and tfds builders.

* :mod:`diffjax.input.sources`: random-access sources (image folders, frame folders,
  video files decoded with PyAV, raw YUV 4:2:0).
* :mod:`diffjax.input.transforms`: seeded random crop / flip / uint8 -> float.
* :mod:`diffjax.input.pipeline`: infinite, deterministic, per-process sharded batch
  datasets (:func:`image_dataset`, :func:`video_dataset`, :func:`dataset_from_config`),
  :func:`iterate` with prefetching and :func:`prefetch_to_device`.
* :mod:`diffjax.input.tfds_builders`: tensorflow-datasets builders (Kodak, CLIC,
  Vimeo-90k, UVG, generic folders) reading local copies from ``manual_dir``; needs the
  optional ``tensorflow-cpu`` + ``tensorflow-datasets`` install.
"""
from diffjax.input.pipeline import (  # noqa: F401
    batched_dataset,
    dataset_from_config,
    image_dataset,
    iterate,
    prefetch_to_device,
    process_shard,
    video_dataset,
)
