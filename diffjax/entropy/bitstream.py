"""The diffjax bitstream container (format versions 1 and 2).

Every codec writes the same container, so any file can be identified (``diffjax info``)
and refused cleanly when it does not belong to the decoder at hand. Layout of version 1
(images; every file without a frame rate), all integers little-endian::

    offset size  field
    0      4     magic  b"DJXB"
    4      1     format version (1)
    5      2     codec id (see diffjax.codecs.base)
    7      1     quality / rate point (0 when the codec has none)
    8      16    model fingerprint (hash of the parameters and derived tables)
    24     4     frames      (1 for images)
    28     4     height      (true size, before padding)
    32     4     width
    36     1     channels
    37     1     number of sections S (1..MAX_SECTIONS)
    38     4     CRC32 of the payload
    42     4*S   section lengths in bytes
    42+4S  4     CRC32 of the header bytes before it
    46+4S  ...   payload: the sections, back to back

Version 2 (video: files that record a frame rate) inserts the frame rate as a fraction
after the payload CRC and shifts the rest by 8 bytes::

    42     4     frame rate numerator   (> 0)
    46     4     frame rate denominator (> 0)
    50     4*S   section lengths in bytes
    50+4S  4     CRC32 of the header bytes before it
    54+4S  ...   payload

:func:`pack` writes version 1 unless a frame rate is given, so image files keep their
exact bytes; :func:`read_header` reads both.

Checks run in this order, each with its own error (all subclasses of
:class:`diffjax.BitstreamError`, itself a ``ValueError``):

1. magic (:class:`CorruptError`; a prefix of the magic is :class:`TruncatedError`);
2. version (:class:`UnknownVersionError`), before anything version-specific is parsed;
3. header length (:class:`TruncatedError`), header CRC (:class:`CorruptError`);
4. codec id (:class:`WrongCodecError`) and fingerprint (:class:`WrongModelError`): a
   well-formed file from another codec or other weights;
5. payload length (:class:`TruncatedError` if short, :class:`CorruptError` if there are
   trailing bytes), payload CRC (:class:`CorruptError`), geometry sanity.

So a bit flip anywhere is a :class:`CorruptError` (or the version error if it hits the
version byte), while genuinely foreign files get the precise error.
"""
from __future__ import annotations

import dataclasses
import fractions
import struct
import zlib
from typing import Optional, Sequence

from diffjax.errors import BitstreamError

MAGIC = b"DJXB"
VERSION = 1  # images / no frame rate
VIDEO_VERSION = 2  # with a frame rate
VERSIONS = (VERSION, VIDEO_VERSION)
FINGERPRINT_BYTES = 16
MAX_SECTIONS = 16
MAX_DIM = 1 << 16  # largest frames/height/width the format accepts
_FIXED = struct.Struct("<4sBHB16sIIIBBI")  # up to and including the payload CRC
FIXED_SIZE = _FIXED.size  # 42
_FPS = struct.Struct("<II")  # version 2: frame rate numerator, denominator
FIXED_SIZES = {VERSION: FIXED_SIZE, VIDEO_VERSION: FIXED_SIZE + _FPS.size}


class TruncatedError(BitstreamError):
    """The data ends before the header or the payload it announces."""


class CorruptError(BitstreamError):
    """Not a diffjax bitstream, or damaged (bad magic, CRC mismatch, inconsistent data)."""


class UnknownVersionError(BitstreamError):
    """A diffjax bitstream in a format version this diffjax cannot read."""


class WrongCodecError(BitstreamError):
    """A valid bitstream written by a different codec."""


class WrongModelError(BitstreamError):
    """A valid bitstream written with different model parameters (fingerprint mismatch)."""


@dataclasses.dataclass(frozen=True)
class Header:
    """The parsed header of a bitstream."""

    codec_id: int
    fingerprint: bytes
    height: int
    width: int
    section_lengths: tuple
    frames: int = 1
    channels: int = 3
    quality: int = 0
    payload_crc: int = 0
    version: int = VERSION
    fps: Optional[fractions.Fraction] = None  # frame rate (version 2 files only)

    @property
    def header_size(self) -> int:
        return header_size(len(self.section_lengths), self.version)

    @property
    def total_size(self) -> int:
        return self.header_size + sum(self.section_lengths)


def header_size(num_sections: int, version: int = VERSION) -> int:
    """Bytes of a header of format ``version`` with ``num_sections`` sections."""
    return FIXED_SIZES[version] + 4 * num_sections + 4


def as_fps(fps) -> fractions.Fraction:
    """A positive frame rate as an exact fraction (``25``, ``29.97``, ``Fraction(30000, 1001)``)."""
    try:
        value = fractions.Fraction(fps).limit_denominator(1 << 20)
    except (TypeError, ValueError) as err:
        raise ValueError(f"frame rate must be a positive number, got {fps!r}") from err
    if not 0 < value < 1 << 20:
        raise ValueError(f"frame rate must be a positive number below 2^20, got {fps!r}")
    return value


def _check_geometry(frames, height, width, channels, err=ValueError):
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        if not 1 <= v <= MAX_DIM:
            raise err(f"{name} {v} outside 1..{MAX_DIM}")
    if not 1 <= channels <= 255:
        raise err(f"channels {channels} outside 1..255")


def pack(
    codec_id: int,
    fingerprint: bytes,
    sections: Sequence[bytes],
    *,
    height: int,
    width: int,
    frames: int = 1,
    channels: int = 3,
    quality: int = 0,
    fps=None,
) -> bytes:
    """Assemble a complete bitstream from its sections (version 2 when ``fps`` is given)."""
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
    if not 1 <= len(sections) <= MAX_SECTIONS:
        raise ValueError(f"1..{MAX_SECTIONS} sections, got {len(sections)}")
    if not 0 <= codec_id < 1 << 16 or not 0 <= quality < 256:
        raise ValueError("codec_id must fit 16 bits and quality 8 bits")
    _check_geometry(frames, height, width, channels)
    payload = b"".join(bytes(s) for s in sections)
    head = _FIXED.pack(
        MAGIC, VERSION, codec_id, quality, bytes(fingerprint), frames, height, width,
        channels, len(sections), zlib.crc32(payload),
    )
    if fps is not None:
        rate = as_fps(fps)
        head = head[:4] + bytes([VIDEO_VERSION]) + head[5:] + _FPS.pack(rate.numerator,
                                                                      rate.denominator)
    head += struct.pack(f"<{len(sections)}I", *(len(s) for s in sections))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def read_header(data: bytes) -> Header:
    """Parse and verify the header (checks 1-3 of the module docstring) only."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[:4] != MAGIC[: len(data[:4])]:
        raise CorruptError("not a diffjax bitstream (bad magic)")
    if len(data) < 5:
        raise TruncatedError(f"bitstream truncated: {len(data)} bytes, header incomplete")
    if data[4] not in VERSIONS:
        raise UnknownVersionError(
            f"bitstream format version {data[4]}; this diffjax reads versions "
            f"{', '.join(map(str, VERSIONS))}"
        )
    fixed = FIXED_SIZES[data[4]]
    if len(data) < fixed:
        raise TruncatedError(f"bitstream truncated: {len(data)} bytes, header incomplete")
    (_, version, codec_id, quality, fingerprint, frames, height, width, channels, nsec,
     payload_crc) = _FIXED.unpack_from(data)
    if not 1 <= nsec <= MAX_SECTIONS:
        raise CorruptError(f"bitstream header is corrupt ({nsec} sections)")
    hsize = header_size(nsec, version)
    if len(data) < hsize:
        raise TruncatedError(f"bitstream truncated: {len(data)} bytes, header needs {hsize}")
    (crc,) = struct.unpack_from("<I", data, hsize - 4)
    if crc != zlib.crc32(data[: hsize - 4]):
        raise CorruptError("bitstream header is corrupt (CRC mismatch)")
    lengths = struct.unpack_from(f"<{nsec}I", data, fixed)
    _check_geometry(frames, height, width, channels, CorruptError)
    fps = None
    if version == VIDEO_VERSION:
        num, den = _FPS.unpack_from(data, FIXED_SIZE)
        if not (num and den):
            raise CorruptError("bitstream header is corrupt (zero frame rate)")
        fps = fractions.Fraction(num, den)
    return Header(codec_id, fingerprint, height, width, tuple(lengths), frames, channels,
                  quality, payload_crc, version, fps)


def unpack(
    data: bytes,
    *,
    codec_id: Optional[int] = None,
    fingerprint: Optional[bytes] = None,
) -> tuple[Header, list]:
    """Verify a whole bitstream and split it; returns ``(header, sections)``.

    ``codec_id``/``fingerprint``, when given, must match the header.
    """
    header = read_header(data)
    data = bytes(data)
    if codec_id is not None and header.codec_id != codec_id:
        raise WrongCodecError(
            f"bitstream was written by codec id {header.codec_id}, this is codec id {codec_id}"
        )
    if fingerprint is not None and header.fingerprint != bytes(fingerprint):
        raise WrongModelError(
            f"bitstream was written with model {header.fingerprint.hex()}, "
            f"these parameters are {bytes(fingerprint).hex()}"
        )
    total = header.total_size
    if len(data) < total:
        raise TruncatedError(f"bitstream truncated: {len(data)} of {total} bytes")
    if len(data) > total:
        raise CorruptError(f"bitstream has {len(data) - total} trailing bytes")
    payload = data[header.header_size:]
    if zlib.crc32(payload) != header.payload_crc:
        raise CorruptError("bitstream payload is corrupt (CRC mismatch)")
    sections, pos = [], 0
    for n in header.section_lengths:
        sections.append(payload[pos:pos + n])
        pos += n
    return header, sections
