"""``diffjax info FILE``: print the header of a diffjax bitstream and verify it."""
from __future__ import annotations

import argparse
import json

HELP = "print the header of a diffjax bitstream (codec, model fingerprint, geometry, sizes)"

_EPILOG = """\
The header is always verified (magic, version, header CRC); the payload length and CRC
are checked too. A damaged or foreign file prints one error line and exits with status 2
(after the header, when the header itself is intact).

examples:
  diffjax info kodim01.djx
  diffjax info --json kodim01.djx
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.add_argument("file", metavar="FILE", help="a bitstream written by a diffjax codec")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    from diffjax.entropy import bitstream

    with open(args.file, "rb") as f:
        data = f.read()
    from diffjax.entropy.info import describe

    info = describe(data)
    if args.json:
        print(json.dumps(info))
    else:
        frames = f", {info['frames']} frames" if info["frames"] != 1 else ""
        rows = [
            ("format", f"diffjax bitstream v{info['format_version']}"),
            ("codec", f"{info['codec']} (id {info['codec_id']})"),
            ("quality", info["quality"]),
            ("fingerprint", info["fingerprint"]),
            ("geometry", f"{info['width']}x{info['height']} px, {info['channels']} channels"
                         f"{frames}"),
            ("sections", ", ".join(
                str(n) if not info.get("section_names") else f"{name} {n}"
                for name, n in zip(info.get("section_names") or info["section_bytes"],
                                   info["section_bytes"])) + " bytes"),
            ("header", f"{info['header_bytes']} bytes"),
            ("size", f"{info['declared_bytes']} bytes, {info['bits_per_pixel']:.4f} bits/pixel"
                     + ("" if info["file_bytes"] == info["declared_bytes"]
                        else f" (the file has {info['file_bytes']} bytes)")),
        ]
        for key, value in rows:
            print(f"{key + ':':<13}{value}")
    bitstream.unpack(data)  # length and payload CRC; raises a one-line BitstreamError
    if not args.json:
        print(f"{'payload:':<13}intact (CRC32 {info['payload_crc32']})")
    return 0
