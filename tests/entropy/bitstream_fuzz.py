"""Seeded bitstream fuzzing shared by the container and codec robustness tests.

``fuzz_cases`` derives damaged variants of a valid file; ``expected_error`` is the error
the documented check order (``diffjax.entropy.bitstream`` docstring) assigns to each;
``run_fuzz`` asserts every case raises it within a time bound.
"""
import time

import numpy as np
import pytest

from diffjax.entropy import bitstream as B

def fields(num_sections: int, version: int = B.VERSION) -> dict:
    """Field -> (offset, size) in a header of ``version`` with ``num_sections`` sections."""
    fixed = B.FIXED_SIZES[version]
    end = fixed + 4 * num_sections
    out = {
        "magic": (0, 4), "version": (4, 1), "codec_id": (5, 2), "quality": (7, 1),
        "fingerprint": (8, 16), "frames": (24, 4), "height": (28, 4), "width": (32, 4),
        "channels": (36, 1), "num_sections": (37, 1), "payload_crc": (38, 4),
        "lengths": (fixed, 4 * num_sections), "header_crc": (end, 4),
    }
    if version == B.VIDEO_VERSION:
        out.update(fps_num=(42, 4), fps_den=(46, 4))
    return out


def expected_error(original: bytes, bad: bytes):
    """The error the documented check order (bitstream module docstring) assigns."""
    n = len(bad)
    if bad[:4] != B.MAGIC[: len(bad[:4])]:
        return B.CorruptError
    if n < 5:
        return B.TruncatedError
    if bad[4] not in B.VERSIONS:
        return B.UnknownVersionError
    if n < B.FIXED_SIZES[bad[4]]:
        return B.TruncatedError
    if not 1 <= bad[37] <= B.MAX_SECTIONS:
        return B.CorruptError
    hsize = B.header_size(bad[37], bad[4])
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
    field_list = list(fields(data[37], data[4]).values())
    hsize = B.header_size(data[37], data[4])
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
            off, size = field_list[rng.integers(len(field_list))]
            b = bytearray(data)
            new = rng.bytes(size)
            while new == bytes(b[off:off + size]):
                new = rng.bytes(size)
            b[off:off + size] = new
            cases.append(bytes(b))
        else:  # insert or delete a chunk in the payload
            pos = int(rng.integers(hsize, len(data)))
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


def section_cases(data: bytes, index: int, n: int, seed: int):
    """Variants of a valid file whose section ``index`` is damaged *inside* a valid
    container (header and CRCs recomputed): every truncation of the section (up to ``n``),
    ``n`` seeded 1-4 bit flips and ``n // 4`` extensions by random bytes. What the
    container cannot see: the codec's own checks must reject each."""
    rng = np.random.default_rng(seed)
    header, sections = B.unpack(data)
    section = sections[index]

    def repack(new: bytes) -> bytes:
        parts = list(sections)
        parts[index] = new
        return B.pack(header.codec_id, header.fingerprint, parts, height=header.height,
                      width=header.width, frames=header.frames, channels=header.channels,
                      quality=header.quality, fps=header.fps)

    step = max(1, len(section) // n)
    cases = [repack(section[:k]) for k in range(0, len(section), step)]
    for _ in range(n):
        b = bytearray(section)
        for _ in range(rng.integers(1, 5)):
            b[rng.integers(len(b))] ^= 1 << rng.integers(8)
        cases.append(repack(bytes(b)))
    for _ in range(max(1, n // 4)):
        cases.append(repack(section + rng.bytes(int(rng.integers(1, 9)))))
    return [c for c in cases if c != data]
