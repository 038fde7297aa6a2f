"""Tensor sources: read PyTorch checkpoints one tensor at a time, without torch if possible.

Every source exposes ``keys()``, ``shape(key)`` and ``read(key) -> np.ndarray`` so the
converter can check every key and shape *before* reading any data, then read tensor by
tensor (peak memory = the converted tree + one tensor):

* :class:`SafetensorsFile` parses the safetensors format directly (8-byte header length,
  JSON header, raw little-endian data) and reads each tensor with ``seek`` + ``readinto``;
  no mmap, so file pages do not inflate the process's resident memory.
* :class:`ShardedSafetensors` follows a ``*.safetensors.index.json`` weight map.
* :class:`TorchFile` reads ``.ckpt``/``.bin``/``.pt`` pickles through ``torch.load``
  (``weights_only=True, mmap=True``); torch is only needed for these.
* :class:`DictSource` wraps an in-memory ``state_dict`` (torch tensors or numpy arrays).
"""
from __future__ import annotations

import json
import pathlib
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from diffjax.errors import CheckpointError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class TensorSource:
    """Base class: a read-only mapping ``name -> tensor`` with shapes known up front."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Total size of all tensors (for progress and memory reports)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file, parsed and validated without mmap."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._file = open(self.path, "rb")
        size = self.path.stat().st_size
        raw = self._file.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({err})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = {}
        for key, info in header.items():
            try:
                dtype = np.dtype(_ST_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for {key!r}: {info}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or \
                    self._data_start + end > size or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {key!r} lies outside the file "
                                      "(truncated or corrupt)")
            self._entries[key] = (dtype, shape, begin)

    def keys(self):
        return list(self._entries)

    def shape(self, key):
        return self._entries[key][1]

    def nbytes(self):
        return sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for d, s, _ in self._entries.values())

    def read(self, key):
        dtype, shape, begin = self._entries[key]
        out = np.empty(shape, dtype)
        self._file.seek(self._data_start + begin)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self._file.readinto(view) != out.nbytes:
            raise CheckpointError(f"{self.path}: short read for {key!r} (truncated file)")
        return out

    def close(self):
        self._file.close()


class ShardedSafetensors(TensorSource):
    """Several safetensors shards listed by an index JSON (``{"weight_map": {key: file}}``)."""

    def __init__(self, index_path: str | pathlib.Path):
        index_path = pathlib.Path(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{index_path}: not a safetensors index ({err})") from None
        self._shards = {name: SafetensorsFile(index_path.parent / name)
                        for name in sorted(set(weight_map.values()))}
        self._where = {}
        for name, shard in self._shards.items():
            for key in shard.keys():
                self._where[key] = shard
        listed = set(weight_map)
        missing = sorted(listed - set(self._where))
        if missing:
            raise CheckpointError(f"{index_path}: keys listed in the index but absent from the "
                                  f"shards: {_short(missing)}")

    def keys(self):
        return list(self._where)

    def shape(self, key):
        return self._where[key].shape(key)

    def read(self, key):
        return self._where[key].read(key)

    def nbytes(self):
        return sum(s.nbytes() for s in self._shards.values())

    def close(self):
        for shard in self._shards.values():
            shard.close()


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor / numpy array / jax array -> numpy (bf16 kept as ml_dtypes.bfloat16)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


class DictSource(TensorSource):
    """An in-memory state dict ``{name: tensor}`` (torch tensors or arrays)."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self._sd = state_dict

    def keys(self):
        return list(self._sd)

    def shape(self, key):
        return tuple(int(d) for d in self._sd[key].shape)

    def read(self, key):
        return to_numpy(self._sd[key])

    def nbytes(self):
        return sum(int(np.prod(self.shape(k), dtype=np.int64)) * _itemsize(self._sd[k])
                   for k in self._sd)


def _itemsize(value) -> int:
    size = getattr(value, "itemsize", None)
    if size is None and hasattr(value, "element_size"):
        size = value.element_size()
    return int(size or 4)


class TorchFile(DictSource):
    """A pickled PyTorch checkpoint (``.ckpt``, ``.bin``, ``.pt``) loaded with mmap.

    Only tensors are loaded (``weights_only=True``). A top-level ``state_dict`` entry (as in
    original Stable Diffusion ``.ckpt`` files) is unwrapped; non-tensor entries are dropped.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{self.path}: reading PyTorch pickles needs torch; install it "
                                  "or convert the file to .safetensors first") from None
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for corrupt or foreign files
            raise CheckpointError(f"{self.path}: cannot load as a PyTorch checkpoint "
                                  f"({type(err).__name__}: {err})") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{self.path}: expected a state dict, got {type(obj).__name__}")
        super().__init__({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def open_file(path: str | pathlib.Path) -> TensorSource:
    """Open a single checkpoint file by extension."""
    path = pathlib.Path(path)
    if path.name.endswith(".safetensors.index.json"):
        return ShardedSafetensors(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        return TorchFile(path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, "
                          ".safetensors.index.json, .ckpt, .bin or .pt)")


def _short(keys: Iterable[str], limit: int = 50) -> str:
    keys = list(keys)
    text = ", ".join(keys[:limit])
    return text + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
