"""LoRA trees in a bitstream: per-output-channel quantisation + entropy coding.

The hint-guided video codec (IKIN) sends a per-clip LoRA with the guidance; its size is
part of the rate, so ``len(pack(tree, bits))`` is what a codec counts.

Layout (all integers little-endian)::

    b"DJLR" | version u8 | bits u8 | total length u32 | header length u32
    | header (zlib-compressed JSON)
    | payload | CRC32 u32 of everything before it

The JSON header lists every adapted module: its path, ``down``/``up`` shapes and
``alpha``, and for 8 / 4 bits each tensor's coding model. The payload is:

* ``bits=16``: the float16 values of every ``down`` then ``up`` (C order). Float bit
  patterns have little redundancy for a byte-level coder, so they are stored as they are.
* ``bits=8`` / ``bits=4``: per tensor, one float16 scale per output channel (last axis)
  ``s_c = max|w_c| / q`` with ``q = 2**(bits-1) - 1``, then all symbols
  ``round(w / s_c)`` in ``[-q, q]`` coded in one ANS stream with the project's coder
  (:mod:`diffjax.entropy.coder`, constriction). Each tensor's symbols get their own
  table row: a discretised zero-mean Laplace or Gaussian (whichever codes them in fewer
  bits) whose width travels in the header as a float32.

:func:`unpack` checks magic, version, CRC and lengths (a truncated or corrupt stream
raises :class:`~diffjax.entropy.bitstream.CorruptError` / ``TruncatedError``) and, given
``like`` (the receiving model's parameters or a LoRA tree), refuses a tree that does not fit
it with :class:`~diffjax.entropy.bitstream.WrongModelError`.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import numpy as np

from diffjax.entropy import coder
from diffjax.entropy.bitstream import CorruptError, TruncatedError, UnknownVersionError, WrongModelError
from diffjax.errors import CheckpointError, InputError
from diffjax.nn import lora as L

MAGIC = b"DJLR"
VERSION = 1
BITS = (16, 8, 4)
_MIN_WIDTH = 1e-3


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _pmf(kind: str, width: float, q: int) -> np.ndarray:
    """Discretised zero-mean Laplace / Gaussian over the integers ``-q..q`` (renormalised)."""
    k = np.arange(-q, q + 1, dtype=np.float64)
    width = max(float(width), _MIN_WIDTH)
    if kind == "laplace":
        cdf = lambda x: np.where(x < 0, 0.5 * np.exp(x / width), 1 - 0.5 * np.exp(-x / width))
    else:
        cdf = lambda x: 0.5 * (1 + np.vectorize(math.erf)(x / (width * math.sqrt(2))))
    p = cdf(k + 0.5) - cdf(k - 0.5)
    p = np.maximum(p, 1e-12)
    return p / p.sum()


def _fit(symbols: np.ndarray, q: int) -> tuple[str, float]:
    """The model (``laplace`` / ``gauss``, width) coding ``symbols`` in fewer ideal bits."""
    s = symbols.astype(np.float64)
    cands = [("laplace", float(np.float32(max(np.mean(np.abs(s)), _MIN_WIDTH)))),
             ("gauss", float(np.float32(max(np.sqrt(np.mean(s * s)), _MIN_WIDTH))))]
    counts = np.bincount(symbols.astype(np.int64) + q, minlength=2 * q + 1)
    bits = [-(counts * np.log2(_pmf(kind, w, q))).sum() for kind, w in cands]
    return cands[int(np.argmin(bits))]


def _table(models: list[tuple[str, float]], q: int) -> coder.CdfTable:
    n = 2 * q + 1
    pmf = np.stack([_pmf(kind, w, q) for kind, w in models])
    return coder.CdfTable.from_pmf(pmf, np.full(len(models), n), np.full(len(models), -q),
                                   np.full(len(models), 1e-9))


def quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(int symbols, float16 scales per last-axis channel)`` of ``w``."""
    q = _qmax(bits)
    w = np.asarray(w, np.float32)
    flat = w.reshape(-1, w.shape[-1])
    scale = (np.abs(flat).max(axis=0) / q).astype(np.float16)
    s = np.where(scale.astype(np.float32) > 0, scale.astype(np.float32), 1.0)
    sym = np.clip(np.rint(flat / s), -q, q).astype(np.int32)
    return sym.reshape(w.shape), scale


def dequantize(sym: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (sym.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


def pack(lora: Any, bits: int = 8) -> bytes:
    """Quantise ``lora`` (16-bit float, 8 or 4 bits) and entropy-code it (see module doc)."""
    if bits not in BITS:
        raise InputError(f"LoRA pack: bits must be one of {BITS}, got {bits}")
    items = L.entries(lora)
    if not items:
        raise InputError("LoRA pack: the tree is empty")
    modules, tensors = [], []
    for path, entry in sorted(items.items()):
        down, up = (np.asarray(entry[k], np.float32) for k in ("down", "up"))
        alpha = float(np.asarray(entry["alpha"], np.float32))
        if not (np.all(np.isfinite(down)) and np.all(np.isfinite(up)) and math.isfinite(alpha)):
            raise InputError(f"LoRA pack: non-finite values in {'/'.join(path)}")
        modules.append({"path": list(path), "down": list(down.shape), "up": list(up.shape),
                        "alpha": alpha})
        tensors += [down, up]
    payload = bytearray()
    if bits == 16:
        for t in tensors:
            payload += t.astype("<f2").tobytes()
    else:
        q = _qmax(bits)
        syms, models = [], []
        for t in tensors:
            sym, scale = quantize(t, bits)
            payload += scale.astype("<f2").tobytes()
            syms.append(sym.reshape(-1))
            models.append(_fit(sym.reshape(-1), q))
        for m, info in zip(modules, zip(models[0::2], models[1::2])):
            m["models"] = [[kind, width] for kind, width in info]
        table = _table(models, q)
        symbols = np.concatenate(syms)
        indexes = np.concatenate([np.full(s.size, i, np.int32) for i, s in enumerate(syms)])
        stream = coder.encode(symbols, indexes, table)
        payload += struct.pack("<I", len(stream)) + stream
    header = zlib.compress(json.dumps({"modules": modules}, separators=(",", ":")).encode(), 9)
    total = 4 + 10 + len(header) + len(payload) + 4
    body = MAGIC + struct.pack("<BBII", VERSION, bits, total, len(header)) + header + bytes(payload)
    return body + struct.pack("<I", zlib.crc32(body))


def _read(data: bytes, pos: int, n: int, what: str) -> tuple[bytes, int]:
    if pos + n > len(data):
        raise TruncatedError(f"LoRA bitstream truncated in {what}")
    return data[pos:pos + n], pos + n


def unpack(data: bytes, like: Any = None) -> dict:
    """Decode :func:`pack` output into a LoRA tree of float32 numpy arrays.

    ``like``: the receiving model's parameters (or a LoRA tree of the expected layout);
    a tree that does not fit is refused with ``WrongModelError``.
    """
    data = bytes(data)
    if len(data) >= 4 and data[:4] != MAGIC:
        raise CorruptError("not a diffjax LoRA bitstream (bad magic)")
    if len(data) < 18:
        raise TruncatedError(f"LoRA bitstream of {len(data)} bytes is truncated")
    version, bits, total, hlen = struct.unpack("<BBII", data[4:14])
    if version != VERSION:
        raise UnknownVersionError(f"LoRA bitstream version {version} (this diffjax reads {VERSION})")
    if len(data) < total:
        raise TruncatedError(f"LoRA bitstream truncated: {len(data)} of {total} bytes")
    if len(data) > total:
        raise CorruptError(f"LoRA bitstream has {len(data) - total} bytes past its end")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise CorruptError("LoRA bitstream CRC mismatch (corrupt data)")
    if bits not in BITS:
        raise CorruptError(f"LoRA bitstream has bits={bits}")
    body = data[:-4]
    raw, pos = _read(body, 14, hlen, "the header")
    try:
        modules = json.loads(zlib.decompress(raw))["modules"]
        shapes = [(tuple(m["path"]), tuple(m["down"]), tuple(m["up"]), float(m["alpha"]))
                  for m in modules]
    except (ValueError, KeyError, TypeError, zlib.error) as err:
        raise CorruptError(f"LoRA bitstream header unreadable ({err})") from None
    tensors = []
    if bits == 16:
        for _, ds, us, _ in shapes:
            for s in (ds, us):
                n = int(np.prod(s))
                chunk, pos = _read(body, pos, 2 * n, "the values")
                tensors.append(np.frombuffer(chunk, "<f2").astype(np.float32).reshape(s))
    else:
        q = _qmax(bits)
        scales, models, sizes = [], [], []
        for m, (_, ds, us, _) in zip(modules, shapes):
            for s, model in zip((ds, us), m.get("models") or []):
                chunk, pos = _read(body, pos, 2 * s[-1], "the scales")
                scales.append(np.frombuffer(chunk, "<f2"))
                models.append((str(model[0]), float(model[1])))
                sizes.append(s)
        if len(models) != 2 * len(shapes):
            raise CorruptError("LoRA bitstream header lacks coding models")
        chunk, pos = _read(body, pos, 4, "the stream length")
        (slen,) = struct.unpack("<I", chunk)
        stream, pos = _read(body, pos, slen, "the entropy-coded stream")
        indexes = np.concatenate([np.full(int(np.prod(s)), i, np.int32)
                                  for i, s in enumerate(sizes)])
        symbols = coder.decode(stream, indexes, _table(models, q))
        start = 0
        for s, scale in zip(sizes, scales):
            n = int(np.prod(s))
            tensors.append(dequantize(symbols[start:start + n].reshape(s), scale))
            start += n
    if pos != len(body):
        raise CorruptError(f"LoRA bitstream has {len(body) - pos} unexpected trailing bytes")
    tree = L.from_entries({path: {"down": tensors[2 * i], "up": tensors[2 * i + 1],
                                  "alpha": np.asarray(alpha, np.float32)}
                           for i, (path, _, _, alpha) in enumerate(shapes)})
    if like is not None:
        _check_fits(tree, like)
    return tree


def _check_fits(tree: Any, like: Any) -> None:
    flat = L.flat_params(like)
    try:
        if flat and all(p[-1] in L.LEAVES for p in flat):  # a LoRA tree
            want = {p: tuple(np.shape(v)) for p, v in flat.items()}
            got = {p: tuple(np.shape(v)) for p, v in L.flat_params(tree).items()}
            if want != got:
                diff = sorted("/".join(p) for p in set(want) ^ set(got))
                diff += sorted("/".join(p) for p in set(want) & set(got) if want[p] != got[p])
                raise CheckpointError(f"layout differs at {diff[:10]}")
        else:
            L.check(like, tree, what="the LoRA in the bitstream")
    except CheckpointError as err:
        raise WrongModelError(f"LoRA bitstream does not fit the receiving model: {err}") from None


def quantization_report(lora: Any) -> list[dict]:
    """Per setting: packed bytes and the relative L2 error of the kernel updates
    ``||delta_q - delta|| / ||delta||`` over all modules (the error the model sees)."""
    ref = {p: np.asarray(L.delta(e)) for p, e in L.entries(lora).items()}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in ref.values()))
    rows = []
    for bits in BITS:
        data = pack(lora, bits)
        got = {p: np.asarray(L.delta(e)) for p, e in L.entries(unpack(data, like=lora)).items()}
        err = math.sqrt(sum(float(np.sum((got[p] - ref[p]) ** 2)) for p in ref))
        rows.append({"bits": bits, "bytes": len(data), "rel_delta_error": err / max(norm, 1e-30)})
    return rows
