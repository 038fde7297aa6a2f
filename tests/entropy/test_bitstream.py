"""The container format: layout, and a seeded fuzz of every kind of bad input.

Each damaged or foreign file must raise the matching BitstreamError subclass, quickly.
The default tier runs a few thousand cases; ``-m slow`` runs a much larger fuzz.
"""
import struct
import time
import zlib

import numpy as np
import pytest

import diffjax
from diffjax.entropy import bitstream as B

FP = bytes(range(16))
SECTIONS = [b"meta-data", bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8)), b""]


def _file(codec_id=1, fingerprint=FP, **kw):
    return B.pack(codec_id, fingerprint, SECTIONS, height=37, width=61, **kw)


def test_layout_and_round_trip():
    data = _file(quality=7)
    header, sections = B.unpack(data, codec_id=1, fingerprint=FP)
    assert sections == SECTIONS
    assert (header.height, header.width, header.frames, header.channels) == (37, 61, 1, 3)
    assert (header.codec_id, header.quality, header.fingerprint) == (1, 7, FP)
    assert header.header_size == B.FIXED_SIZE + 4 * 3 + 4 == 58
    assert len(data) == header.total_size == 58 + sum(map(len, SECTIONS))
    assert data[:4] == B.MAGIC and data[4] == B.VERSION
    assert struct.unpack_from("<I", data, 38)[0] == zlib.crc32(b"".join(SECTIONS))
    # All errors are diffjax BitstreamErrors, themselves ValueErrors.
    for err in (B.TruncatedError, B.CorruptError, B.UnknownVersionError, B.WrongCodecError,
                B.WrongModelError):
        assert issubclass(err, diffjax.BitstreamError) and issubclass(err, ValueError)


def test_pack_rejects_bad_fields():
    with pytest.raises(ValueError):
        B.pack(1, FP, SECTIONS, height=0, width=5)
    with pytest.raises(ValueError):
        B.pack(1, FP[:8], SECTIONS, height=5, width=5)
    with pytest.raises(ValueError):
        B.pack(1, FP, [], height=5, width=5)
    with pytest.raises(ValueError):
        B.pack(70000, FP, SECTIONS, height=5, width=5)


def test_foreign_files():
    data = _file()
    with pytest.raises(B.WrongCodecError):
        B.unpack(_file(codec_id=2), codec_id=1, fingerprint=FP)
    with pytest.raises(B.WrongModelError):
        B.unpack(_file(fingerprint=bytes(16)), codec_id=1, fingerprint=FP)
    with pytest.raises(B.CorruptError, match="trailing"):
        B.unpack(data + b"\0", codec_id=1, fingerprint=FP)
    with pytest.raises(B.CorruptError, match="magic"):
        B.unpack(b"\x89PNG\r\n\x1a\n" + data[8:])
    with pytest.raises(B.CorruptError):
        B.unpack("not bytes")
    future = bytearray(data)
    future[4] = 2
    with pytest.raises(B.UnknownVersionError, match="version 2"):
        B.unpack(bytes(future))


# Field -> (offset, size) in the version-1 header (edited by the fuzzer).
FIELDS = {
    "magic": (0, 4), "version": (4, 1), "codec_id": (5, 2), "quality": (7, 1),
    "fingerprint": (8, 16), "frames": (24, 4), "height": (28, 4), "width": (32, 4),
    "channels": (36, 1), "num_sections": (37, 1), "payload_crc": (38, 4),
    "lengths": (42, 12), "header_crc": (54, 4),
}


def expected_error(original: bytes, bad: bytes):
    """The error the documented check order (bitstream module docstring) assigns."""
    n = len(bad)
    if bad[:4] != B.MAGIC[: len(bad[:4])]:
        return B.CorruptError
    if n < 5:
        return B.TruncatedError
    if bad[4] != B.VERSION:
        return B.UnknownVersionError
    if n < B.FIXED_SIZE:
        return B.TruncatedError
    if not 1 <= bad[37] <= B.MAX_SECTIONS:
        return B.CorruptError
    hsize = B.header_size(bad[37])
    if n < hsize:
        return B.TruncatedError
    if bad[:hsize] != original[:hsize]:
        return B.CorruptError  # any header edit breaks the header CRC
    if n < len(original):
        return B.TruncatedError
    return B.CorruptError  # trailing bytes or payload CRC


def fuzz_cases(data: bytes, n: int, seed: int):
    """Truncations, bit flips, random bytes and header field edits (seeded)."""
    rng = np.random.default_rng(seed)
    cases = [data[:k] for k in range(len(data))]  # every truncation
    for _ in range(n):
        kind = rng.integers(0, 4)
        if kind == 0:  # 1-8 bit flips anywhere
            b = bytearray(data)
            for _ in range(rng.integers(1, 9)):
                b[rng.integers(len(b))] ^= 1 << rng.integers(8)
            cases.append(bytes(b))
        elif kind == 1:  # random bytes, sometimes behind a valid magic
            junk = rng.bytes(int(rng.integers(0, 2 * len(data))))
            cases.append(junk if rng.random() < 0.5 else B.MAGIC + junk)
        elif kind == 2:  # one header field set to another random value
            off, size = list(FIELDS.values())[rng.integers(len(FIELDS))]
            b = bytearray(data)
            new = rng.bytes(size)
            while new == bytes(b[off:off + size]):
                new = rng.bytes(size)
            b[off:off + size] = new
            cases.append(bytes(b))
        else:  # insert or delete a chunk in the payload
            pos = int(rng.integers(58, len(data)))
            cases.append(data[:pos] + rng.bytes(int(rng.integers(1, 9))) + data[pos:]
                         if rng.random() < 0.5 else data[:pos] + data[pos + 1:])
    return cases


def run_fuzz(decode, data: bytes, cases, per_case_s: float):
    """Every case must raise its expected error within ``per_case_s``; returns stats."""
    worst, counts = 0.0, {}
    for bad in cases:
        if bad == data:
            continue
        want = expected_error(data, bad)
        start = time.perf_counter()
        with pytest.raises(want):
            decode(bad)
        took = time.perf_counter() - start
        worst = max(worst, took)
        assert took < per_case_s, (took, bad[:64])
        counts[want.__name__] = counts.get(want.__name__, 0) + 1
    return worst, counts


def test_header_field_edits_raise_the_documented_error():
    data = _file()
    for name, (off, size) in FIELDS.items():
        b = bytearray(data)
        b[off] ^= 0x40
        want = {"magic": B.CorruptError, "version": B.UnknownVersionError}.get(name)
        if name == "num_sections":  # 3 -> 67 sections: outside 1..16
            want = B.CorruptError
        with pytest.raises(want or B.CorruptError):
            B.unpack(bytes(b), codec_id=1, fingerprint=FP)


def test_fuzz_container():
    data = _file()
    cases = fuzz_cases(data, 3000, seed=1)
    start = time.perf_counter()
    worst, counts = run_fuzz(lambda d: B.unpack(d, codec_id=1, fingerprint=FP), data, cases, 0.05)
    assert time.perf_counter() - start < 20
    # Every error class is exercised.
    assert {"TruncatedError", "CorruptError", "UnknownVersionError"} <= set(counts), counts


@pytest.mark.slow
def test_fuzz_container_large():
    data = _file()
    for seed in range(10):
        run_fuzz(lambda d: B.unpack(d, codec_id=1, fingerprint=FP), data,
                 fuzz_cases(data, 5000, seed=100 + seed), 0.05)
