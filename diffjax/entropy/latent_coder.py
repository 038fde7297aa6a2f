"""Host-side hyperprior coding of latents into bitstream sections, and back.

Every diffjax codec built on a hyperprior (Ballé et al., ICLR 2018, fig. 4; Minnen et al.,
NeurIPS 2018 without the context model) codes its latents the same way, in two streams:

1. the hyper-latent symbols ``ẑ_sym = round(z - median)`` with the *factorized* table, one
   CDF row per channel (:func:`channel_indexes`);
2. the latent symbols ``round(y - μ)`` with the *Gaussian conditional* table, whose row per
   element (``σ``) and mean ``μ`` come from the hyper-synthesis ``h_s(ẑ)``.

The codec supplies the jitted network parts; :class:`LatentCoder` does the entropy coding
and the checks. Decoding a y stream needs the decoder's own ``h_s`` evaluation: if it
differs from the encoder's (other weights, or other floating-point results), the symbols do
not decode although the container CRC vouched for the bytes, and that is reported as
:class:`~diffjax.entropy.bitstream.WrongModelError` rather than as a garbage image.

:class:`IdentityCache` is the one parameter-preparation cache of the codecs: derived
tables and fingerprints are computed once per parameter tree (by the identity of its
immutable jax leaves).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from diffjax.entropy import coder
from diffjax.entropy.bitstream import CorruptError, WrongModelError
from diffjax.errors import InputError

# hyper(z_symbols [B, h, w, N] int32) -> (indexes [B, H, W, M] int32, means [B, H, W, M] or None)
HyperFn = Callable[[np.ndarray], tuple]


def channel_indexes(shape: Sequence[int]) -> np.ndarray:
    """Factorized-table row of every hyper-latent symbol: its channel (last axis)."""
    return np.broadcast_to(np.arange(shape[-1], dtype=np.int32), tuple(shape))


def check_symbols(values: np.ndarray, what: str = "latents") -> np.ndarray:
    """Round latents (``y - μ``) to int32 symbols, refusing non-finite or uncodable values."""
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
        raise InputError(f"the analysis transform produced non-finite {what} (NaN/inf params?)")
    if np.abs(values).max(initial=0) > coder.MAX_ABS_SYMBOL:
        raise InputError(f"{what} too large to code (broken parameters?)")
    return np.rint(values).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class LatentCoder:
    """The two-stream hyperprior coder (see the module docstring).

    Attributes:
      z_table: factorized CDF table of the hyper-latent (one row per channel).
      y_table: Gaussian-conditional CDF table of the latent (one row per scale).
    """

    z_table: coder.CdfTable
    y_table: coder.CdfTable

    def encode(self, z_symbols: np.ndarray, y_symbols: np.ndarray,
               y_indexes: np.ndarray) -> list[bytes]:
        """One example's symbols -> ``[z stream, y stream]``."""
        z_symbols = np.asarray(z_symbols)
        return [coder.encode(z_symbols, channel_indexes(z_symbols.shape), self.z_table),
                coder.encode(np.asarray(y_symbols), np.asarray(y_indexes), self.y_table)]

    def decode_z(self, z_stream: bytes, z_shape: Sequence[int]) -> np.ndarray:
        """The hyper-latent symbols of one example (``z_shape`` from the header geometry)."""
        return coder.decode(z_stream, channel_indexes(z_shape), self.z_table)

    def decode_y(self, y_streams: Sequence[bytes], z_symbols: np.ndarray,
                 hyper: HyperFn) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode a batch of y streams whose hyper-latents are ``z_symbols [B, ...]``.

        ``hyper`` evaluates ``h_s`` once for the batch. Returns ``(y_symbols [B, ...] int32,
        means or None)``; ``ŷ = y_symbols + means``.
        """
        indexes, means = hyper(np.asarray(z_symbols))
        indexes = np.asarray(indexes)
        y = np.empty(indexes.shape, np.int32)
        for j, stream in enumerate(y_streams):
            try:
                y[j] = coder.decode(stream, indexes[j], self.y_table)
            except CorruptError as err:
                raise WrongModelError(
                    "latents do not decode although the file is intact: this decoder's "
                    "hyper-synthesis disagrees with the encoder's (different weights or "
                    f"different floating-point results) [{err}]") from err
        return y, (None if means is None else np.asarray(means))

    def decode(self, streams: Sequence[Sequence[bytes]], z_shape: Sequence[int],
               hyper: HyperFn) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode ``[z stream, y stream]`` pairs of same-size examples in one ``h_s`` call."""
        z = np.stack([self.decode_z(s[0], z_shape) for s in streams])
        return self.decode_y([s[1] for s in streams], z, hyper)


class IdentityCache:
    """Remembers ``build(params)`` for the last parameter tree it saw.

    The key is the identity of the tree's leaves; only trees of immutable ``jax.Array``
    leaves are cached (a numpy leaf could change in place without the cache noticing).
    """

    def __init__(self):
        self._leaves: tuple = ()
        self._value: Any = None

    def get(self, params: Any, build: Callable[[Any], Any]) -> Any:
        import jax

        leaves = jax.tree_util.tree_leaves(params)
        if (self._value is not None and len(leaves) == len(self._leaves)
                and all(a is b for a, b in zip(leaves, self._leaves))):
            return self._value
        value = build(params)
        if all(isinstance(a, jax.Array) for a in leaves):
            self._leaves, self._value = tuple(leaves), value
        return value


def group_indexes(items: Sequence, key: Callable) -> dict:
    """Indexes of ``items`` grouped by ``key(item)``, in first-seen order (same-size
    examples share one network call)."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups
