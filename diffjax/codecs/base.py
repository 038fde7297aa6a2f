"""The codec protocol every diffjax codec follows, for images (:class:`Codec`) and video
(:class:`VideoCodec`).

A codec is a small object that knows its network and its bitstream layout; the trained
parameters are passed in explicitly (pure functional, like Flax). Every image codec:

* has a ``name`` (CLI / registry name) and a ``codec_id`` (an integer written into the
  bitstream header, so a file from another codec is refused);
* ``encode(params, image) -> bytes``: ``image`` is a uint8 RGB array ``[H, W, 3]`` of any
  size (the codec pads to its stride and records the true geometry); the result is a
  complete versioned bitstream (see ``diffjax.entropy.bitstream``);
* ``decode(params, data) -> image``: the inverse, returning uint8 ``[H, W, 3]``; bad input
  raises a :class:`diffjax.BitstreamError` subclass, never returns garbage;
* ``fingerprint(params) -> bytes``: a hash of the parameters, written into the header so a
  file decoded with other weights is refused.

A **video codec** (:class:`VideoCodec`) has the same ``name``, ``codec_id`` and
``fingerprint``; ``encode(params, frames, fps=None)`` takes uint8 ``[T, H, W, 3]`` and
writes a container of format version 2, which records the frame count and the frame rate;
``decode_frames(params, data)`` is a generator that decodes group by group (a long clip is
never held as latents all at once) and ``decode`` stacks it. Bad input raises the same
typed errors as for images. ``media`` (``"image"`` / ``"video"``) tells the two apart.

Codecs register themselves with :func:`register` so the CLI and the rate-distortion runner
find them by name (``diffjax.codecs.get("hyperprior", N=128, M=192, mean_scale=True)``).

**Rate points.** A codec whose one set of parameters covers several rates (e.g. a
lambda-conditioned model) takes ``quality: int`` (0..255) as a constructor argument and
writes it into the header's quality field; a codec with one trained model per rate (the
hyperprior: one parameter set per lambda) writes 0 and the rate point is identified by the
fingerprint. The rate-distortion runner loops over (quality, params) pairs.

``qualities`` lists the valid values of the ``quality`` constructor argument (``()`` for a
codec without one); the CLI's ``--quality`` default is the middle one.

**Codec ids** (header field; ``register`` refuses duplicates): 1 hyperprior, 2 residual,
3 foundation, 4 diffae, 5 hint, 6 residual-video, 7 intra (any image codec on every frame
of a video), 8 diffae-video; 100+ for experiments.

Shared helpers: :func:`check_image` (validates uint8 ``[H, W, 3]``), :func:`pad_to_multiple`
/ :func:`crop` (edge-pad bottom/right to the model stride, crop back) and
:func:`fingerprint_pytree` (16-byte hash of a parameter pytree).
"""
from __future__ import annotations

import abc
import hashlib
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np


class Codec(abc.ABC):
    """Abstract base class of the codec protocol (see the module docstring)."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    media: ClassVar[str] = "image"
    qualities: tuple = ()

    @abc.abstractmethod
    def encode(self, params: Any, image: np.ndarray) -> bytes:
        """uint8 ``[H, W, 3]`` image -> complete bitstream."""

    @abc.abstractmethod
    def decode(self, params: Any, data: bytes) -> np.ndarray:
        """Bitstream -> uint8 ``[H, W, 3]`` image; raises ``BitstreamError`` on bad input."""

    @abc.abstractmethod
    def fingerprint(self, params: Any) -> bytes:
        """Hash of the parameters written into every bitstream header."""

    def encode_batch(self, params: Any, images: Sequence[np.ndarray]) -> list:
        """Encode several images; codecs may batch the network work (same result)."""
        return [self.encode(params, im) for im in images]

    def decode_batch(self, params: Any, datas: Sequence[bytes]) -> list:
        """Decode several bitstreams; must equal decoding them one at a time."""
        return [self.decode(params, d) for d in datas]


class VideoCodec(abc.ABC):
    """Abstract base class of video codecs (see the module docstring)."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    media: ClassVar[str] = "video"
    qualities: tuple = ()

    @abc.abstractmethod
    def encode(self, params: Any, frames: np.ndarray, fps: Any = None) -> bytes:
        """uint8 ``[T, H, W, 3]`` frames (and their frame rate) -> complete bitstream."""

    @abc.abstractmethod
    def decode_frames(self, params: Any, data: bytes, **options) -> Iterator[np.ndarray]:
        """Bitstream -> uint8 ``[H, W, 3]`` frames, one group at a time (a generator).

        The whole container (lengths, CRCs, codec, fingerprint) is verified before the
        first frame is produced, so a damaged file fails before any output is written."""

    @abc.abstractmethod
    def fingerprint(self, params: Any) -> bytes:
        """Hash of the parameters written into every bitstream header."""

    def decode(self, params: Any, data: bytes, **options) -> np.ndarray:
        """Bitstream -> uint8 ``[T, H, W, 3]`` (all of :meth:`decode_frames`)."""
        return np.stack(list(self.decode_frames(params, data, **options)))


def _check_uint8_rgb(x: Any, ndim: int, what: str, layout: str) -> np.ndarray:
    from diffjax.errors import InputError

    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise InputError(f"expected uint8 {what}, got dtype {x.dtype}")
    if x.ndim != ndim or x.shape[-1] != 3 or min(x.shape[:-1]) < 1:
        raise InputError(f"expected RGB {what} {layout}, got shape {x.shape}")
    return x


def check_frames(frames: Any) -> np.ndarray:
    """Validate a video codec input: a uint8 ``[T, H, W, 3]`` array with T, H, W >= 1."""
    return _check_uint8_rgb(frames, 4, "frames", "[T, H, W, 3]")


def check_image(image: Any) -> np.ndarray:
    """Validate a codec input: a uint8 ``[H, W, 3]`` array with H, W >= 1."""
    return _check_uint8_rgb(image, 3, "image", "[H, W, 3]")


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-pad ``[..., H, W, C]`` at the bottom/right up to multiples of ``multiple``.

    Edge (replicate) padding costs fewer bits than zeros and works for any size; the true
    size travels in the bitstream header and :func:`crop` undoes it.
    """
    h, w = image.shape[-3], image.shape[-2]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return image
    pad = [(0, 0)] * (image.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
    return np.pad(image, pad, mode="edge")


def crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`pad_to_multiple`: the top-left ``height x width``."""
    return image[..., :height, :width, :]


def fingerprint_pytree(tree: Any, *extra: bytes) -> bytes:
    """16-byte BLAKE2b of a pytree's paths, dtypes, shapes and values (little-endian).

    ``extra`` (e.g. a config string, derived tables) is hashed too. The same parameters
    give the same fingerprint on every machine.
    """
    import jax

    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype.name}{a.shape}".encode())
        h.update(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes())
    for e in extra:
        h.update(len(e).to_bytes(8, "little"))
        h.update(e)
    return h.digest()


_REGISTRY: dict[str, Callable[..., Codec]] = {}
_IDS: dict[int, str] = {}
# diffjax's own codecs: name -> (codec id, module that registers it), imported on first use
# so that a command pays only for the codec it runs (the foundation codec pulls in the SD
# backbones and converters). Codecs defined elsewhere register with the decorator alone.
BUILTIN: dict[str, tuple[int, str]] = {
    "hyperprior": (1, "diffjax.codecs.hyperprior"),
    "residual": (2, "diffjax.codecs.residual"),
    "foundation": (3, "diffjax.codecs.foundation"),
    "diffae": (4, "diffjax.codecs.diffae"),
    "hint": (5, "diffjax.codecs.hint"),
    "residual-video": (6, "diffjax.codecs.residual_video"),
    "intra": (7, "diffjax.codecs.intra"),
    "diffae-video": (8, "diffjax.codecs.diffae_video"),
}


def _import_builtin(name: str) -> None:
    if name in BUILTIN and name not in _REGISTRY:
        import importlib

        importlib.import_module(BUILTIN[name][1])


def register(name: str):
    """Class/factory decorator: ``@register("hyperprior")``.

    A class with a ``codec_id`` is also entered in the id table used by ``diffjax info``;
    a name or id used twice raises ``ValueError``.
    """

    def wrap(factory):
        codec_id = getattr(factory, "codec_id", None)
        if name in BUILTIN and BUILTIN[name][0] != codec_id:
            raise ValueError(f"codec name {name!r} is diffjax's codec id {BUILTIN[name][0]}")
        if codec_id is not None and any(cid == codec_id and n != name
                                        for n, (cid, _) in BUILTIN.items()):
            raise ValueError(f"codec id {codec_id} is diffjax's {codec_name(codec_id)!r}")
        old = _REGISTRY.get(name, factory)
        if (old.__module__, old.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"codec name {name!r} is already registered")
        if codec_id is not None:
            if _IDS.get(codec_id, name) != name:
                raise ValueError(f"codec id {codec_id} is already used by {_IDS[codec_id]!r}")
            _IDS[codec_id] = name
        _REGISTRY[name] = factory
        return factory

    return wrap


def codec_name(codec_id: int) -> str | None:
    """The registered name of ``codec_id`` (None if unknown)."""
    builtin = {cid: name for name, (cid, _) in BUILTIN.items()}
    return _IDS.get(codec_id) or builtin.get(codec_id)


def available() -> list[str]:
    """Names of the registered codecs (diffjax's own and any registered since)."""
    return sorted(set(_REGISTRY) | set(BUILTIN))


def codec_class(name: str) -> Callable[..., Codec]:
    """The registered class (factory) of codec ``name``."""
    from diffjax.errors import InputError

    _import_builtin(name)
    if name not in _REGISTRY:
        raise InputError(f"unknown codec {name!r}; available: {', '.join(available()) or 'none'}")
    return _REGISTRY[name]


def get(name: str, **kwargs) -> Codec:
    """Instantiate a registered codec by name."""
    return codec_class(name)(**kwargs)
