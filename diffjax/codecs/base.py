"""The codec protocol every diffjax codec follows.

A codec is a small object that knows its network and its bitstream layout; the trained
parameters are passed in explicitly (pure functional, like Flax). Every codec:

* has a ``name`` (CLI / registry name) and a ``codec_id`` (an integer written into the
  bitstream header, so a file from another codec is refused);
* ``encode(params, image) -> bytes``: ``image`` is a uint8 RGB array ``[H, W, 3]`` of any
  size (the codec pads to its stride and records the true geometry); the result is a
  complete versioned bitstream (see ``diffjax.entropy.bitstream``);
* ``decode(params, data) -> image``: the inverse, returning uint8 ``[H, W, 3]``; bad input
  raises a :class:`diffjax.BitstreamError` subclass, never returns garbage;
* ``fingerprint(params) -> bytes``: a hash of the parameters, written into the header so a
  file decoded with other weights is refused.

Codecs register themselves with :func:`register` so the CLI and the rate-distortion runner
find them by name.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar

import numpy as np


class Codec(abc.ABC):
    """Abstract base class of the codec protocol (see the module docstring)."""

    name: ClassVar[str]
    codec_id: ClassVar[int]

    @abc.abstractmethod
    def encode(self, params: Any, image: np.ndarray) -> bytes:
        """uint8 ``[H, W, 3]`` image -> complete bitstream."""

    @abc.abstractmethod
    def decode(self, params: Any, data: bytes) -> np.ndarray:
        """Bitstream -> uint8 ``[H, W, 3]`` image; raises ``BitstreamError`` on bad input."""

    @abc.abstractmethod
    def fingerprint(self, params: Any) -> bytes:
        """Hash of the parameters written into every bitstream header."""


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register(name: str):
    """Class/factory decorator: ``@register("hyperprior")``."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    """Names of the registered codecs."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Codec:
    """Instantiate a registered codec by name."""
    from diffjax.errors import InputError

    if name not in _REGISTRY:
        raise InputError(f"unknown codec {name!r}; available: {', '.join(available()) or 'none'}")
    return _REGISTRY[name](**kwargs)
