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
from bitstream_fuzz import fields, fuzz_cases, run_fuzz

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


def test_video_files_record_frame_count_and_rate():
    from fractions import Fraction

    data = _file(frames=7, fps=Fraction(30000, 1001))
    header, sections = B.unpack(data, codec_id=1, fingerprint=FP)
    assert sections == SECTIONS and data[4] == B.VIDEO_VERSION == header.version
    assert (header.frames, header.fps) == (7, Fraction(30000, 1001))
    assert header.header_size == B.FIXED_SIZE + 8 + 4 * 3 + 4 == len(data) - 309
    assert B.unpack(_file(fps=25))[0].fps == 25
    assert B.unpack(_file(fps=29.97))[0].fps == Fraction(2997, 100)
    # Without a frame rate the layout (and so every image file) is version 1, unchanged.
    assert _file(frames=7)[4] == B.VERSION and B.unpack(_file(frames=7))[0].fps is None
    for bad in (0, -1, "x", float("nan")):
        with pytest.raises(ValueError):
            _file(fps=bad)
    # A header whose CRC vouches for a zero frame rate is corrupt, not a division by zero.
    raw = bytearray(data)
    raw[42:50] = bytes(8)
    hsize = B.header_size(3, B.VIDEO_VERSION)
    raw[hsize - 4:hsize] = struct.pack("<I", zlib.crc32(bytes(raw[:hsize - 4])))
    with pytest.raises(B.CorruptError, match="frame rate"):
        B.unpack(bytes(raw))


def test_fuzz_video_container():
    data = _file(frames=12, fps=24)
    run_fuzz(lambda d: B.unpack(d, codec_id=1, fingerprint=FP), data,
             fuzz_cases(data, 1500, seed=3), 0.05)


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
    future[4] = 3
    with pytest.raises(B.UnknownVersionError, match="version 3"):
        B.unpack(bytes(future))


def test_header_field_edits_raise_the_documented_error():
    data = _file()
    for name, (off, size) in fields(len(SECTIONS)).items():
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
