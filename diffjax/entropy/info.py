"""Header fields of a diffjax bitstream as a dict (``diffjax info`` prints them)."""
from __future__ import annotations


def describe(data: bytes) -> dict:
    """Header fields of ``data`` as a dict (the header must be intact)."""
    from diffjax.codecs import codec_name
    from diffjax.entropy import bitstream

    h = bitstream.read_header(data)
    pixels = h.frames * h.height * h.width
    out = {
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
    names = _section_names(h.codec_id, data)
    if names is not None:  # codecs that name their sections
        out["section_names"] = names
    return out


def _section_names(codec_id: int, data: bytes) -> list | None:
    """The codec's names of the sections (codecs with a ``section_names(data)`` static
    method, e.g. the hint codec), or None."""
    from diffjax.codecs import codec_name
    from diffjax.errors import BitstreamError

    name = codec_name(codec_id)
    if name is None:
        return None
    try:
        from diffjax.codecs.base import codec_class

        names = getattr(codec_class(name), "section_names", None)
        return None if names is None else list(names(data))
    except (BitstreamError, ImportError, ValueError):
        return None
