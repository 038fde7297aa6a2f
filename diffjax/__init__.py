"""diffjax: diffusion-based neural image and video compression in JAX/Flax.

Importing diffjax is cheap: no jit, no device work, no downloads. Submodules are
imported explicitly (``import diffjax.models.unet``) or lazily through attribute
access (``diffjax.metrics``).
"""
import importlib

from diffjax.errors import (  # noqa: F401  (public API)
    BitstreamError,
    CheckpointError,
    DiffjaxError,
    InputError,
)

__version__ = "0.1.0"

_SUBMODULES = (
    "nn", "models", "diffusion", "entropy", "codecs", "convert", "input", "train",
    "metrics", "eval",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"diffjax.{name}")
    raise AttributeError(f"module 'diffjax' has no attribute {name!r}")
