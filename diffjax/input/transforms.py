"""Per-record transforms: random crop, horizontal flip, uint8 -> float.

They are grain ``RandomMap`` transforms, so the ``np.random.Generator`` they receive is
seeded by grain from the pipeline seed and the record index: the same seed gives the same
crops and flips on every run and host. Crops are the augmentation of learned image
compression training (Ballé et al. 2018 train on random 256x256 crops; CompressAI's
``RandomCrop``); video clips use one crop window for all their frames.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from diffjax.errors import InputError


def _upscale_to_fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (bicubic, keeping the aspect ratio) so both sides are >= the crop size."""
    from PIL import Image

    h, w = image.shape[-3:-1]
    scale = max(height / h, width / w)
    size = (max(width, int(np.ceil(w * scale))), max(height, int(np.ceil(h * scale))))
    if image.ndim == 3:
        return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in image])


def random_crop(array: np.ndarray, height: int, width: int,
                rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """Crop ``[..., H, W, C]`` to ``[..., height, width, C]`` at a random position.

    Inputs smaller than the crop are first upscaled to fit (no padding borders enter
    the training data). Returns the crop and its ``(top, left)`` offset.
    """
    h, w = array.shape[-3:-1]
    if h < height or w < width:
        array = _upscale_to_fit(array, height, width)
        h, w = array.shape[-3:-1]
    top = int(rng.integers(0, h - height + 1))
    left = int(rng.integers(0, w - width + 1))
    return array[..., top:top + height, left:left + width, :], (top, left)


def to_float(array: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1] (the range CompressAI models train on)."""
    return array.astype(np.float32) * np.float32(1.0 / 255.0)


@dataclasses.dataclass
class CropFlipImage(grain.transforms.RandomMap):
    """``{"image": uint8 [H, W, 3]}`` -> ``{"image": float32 [h, w, 3]}`` (random crop + flip)."""

    height: int
    width: int
    flip: bool = True
    with_metadata: bool = False

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image, (top, left) = random_crop(element["image"], self.height, self.width, rng)
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            image = image[:, ::-1]
        out = {"image": to_float(image)}
        if self.with_metadata:
            out.update(index=element["index"], crop=np.array([top, left], np.int32),
                       flipped=np.bool_(flipped))
        return out


@dataclasses.dataclass
class RandomClip(grain.transforms.RandomMap):
    """``{"sequence": i}`` -> ``{"video": float32 [T, h, w, 3]}``: T consecutive frames from
    a random start, one random crop (and flip) for the whole clip.

    ``source`` is a :class:`~diffjax.input.sources.FrameFolderSource` or
    :class:`~diffjax.input.sources.VideoFileSource`; frames keep their display order.
    """

    source: object
    num_frames: int
    height: int
    width: int
    flip: bool = True
    with_metadata: bool = False

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        index = int(element["sequence"])
        available = self.source.num_frames(index)
        if available < self.num_frames:
            raise InputError(f"sequence {index} has {available} frames, clips need {self.num_frames}")
        start = int(rng.integers(0, available - self.num_frames + 1))
        clip = self.source.read_clip(index, start, self.num_frames)
        clip, (top, left) = random_crop(clip, self.height, self.width, rng)
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            clip = clip[:, :, ::-1]
        out = {"video": to_float(clip)}
        if self.with_metadata:
            out.update(sequence=np.int32(index),
                       frame_index=np.arange(start, start + self.num_frames, dtype=np.int32),
                       crop=np.array([top, left], np.int32), flipped=np.bool_(flipped))
        return out
