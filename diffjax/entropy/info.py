"""Header fields of a diffjax bitstream as a dict (``diffjax info`` prints them)."""
from __future__ import annotations


def describe(data: bytes) -> dict:
    """Header fields of ``data`` as a dict (the header must be intact)."""
    from diffjax.codecs import codec_name
    from diffjax.entropy import bitstream

    h = bitstream.read_header(data)
    pixels = h.frames * h.height * h.width
    return {
        "format_version": h.version,
        "codec_id": h.codec_id,
        "codec": codec_name(h.codec_id) or "unknown",
        "quality": h.quality,
        "fingerprint": h.fingerprint.hex(),
        "frames": h.frames,
        "height": h.height,
        "width": h.width,
        "channels": h.channels,
        "header_bytes": h.header_size,
        "section_bytes": list(h.section_lengths),
        "payload_crc32": f"{h.payload_crc:08x}",
        "file_bytes": len(data),
        "declared_bytes": h.total_size,
        "bits_per_pixel": 8.0 * h.total_size / pixels,
    }
