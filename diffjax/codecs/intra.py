"""Intra-only video: any diffjax image codec coding every frame on its own.

This is the simplest real video codec (no temporal prediction, so its rate is the sum of
the frames' image rates) and the baseline every temporal codec must beat: ``diffjax
compress clip.mp4`` uses it with the default image codec when no video codec is named.

Bitstream (codec id 7, container version 2 with the frame count and frame rate; the
quality byte and the fingerprint are the image codec's):

* section 0, the index: ``<H`` image codec id, then per frame ``<B`` number of image
  sections and ``<I`` each section's length;
* section 1, the payload: every frame's image sections, back to back.

Each frame is decoded by rebuilding the image codec's own bitstream around its sections,
so the image decoder runs all of its checks; the container's CRC already vouches for the
bytes, and an index that does not add up is a :class:`CorruptError`.

    codec = IntraCodec(diffjax.codecs.get("residual", quality=3, **config))
    data = codec.encode(params, frames, fps=25)       # uint8 [T, H, W, 3] -> bytes
    for frame in codec.decode_frames(params, data):   # one frame at a time
        ...
"""
from __future__ import annotations

import struct
from typing import Any, Iterator

import numpy as np

from diffjax.codecs.base import Codec, VideoCodec, check_frames, codec_name, register
from diffjax.entropy import bitstream
from diffjax.entropy.bitstream import CorruptError, WrongModelError
from diffjax.errors import InputError

_CODEC = struct.Struct("<H")
_COUNT = struct.Struct("<B")
_LEN = struct.Struct("<I")


@register("intra")
class IntraCodec(VideoCodec):
    """Codes each frame with ``image_codec`` (a :class:`~diffjax.codecs.base.Codec`).

    ``image_codec`` may also be a registered image codec's name, with its constructor
    arguments as keyword arguments. ``params`` are the image codec's parameters.
    """

    name = "intra"
    codec_id = 7

    def __init__(self, image_codec: Codec | str = "residual", **image_codec_kwargs):
        if isinstance(image_codec, str):
            from diffjax.codecs.base import get

            image_codec = get(image_codec, **image_codec_kwargs)
        elif image_codec_kwargs:
            raise InputError("constructor arguments go with an image codec name, not an instance")
        if getattr(image_codec, "media", "image") != "image":
            raise InputError(f"the intra codec wraps an image codec, not {image_codec.name!r}")
        self.image_codec = image_codec
        self.qualities = tuple(getattr(image_codec, "qualities", ()))

    def fingerprint(self, params: Any) -> bytes:
        return self.image_codec.fingerprint(params)

    @staticmethod
    def image_codec_id(data: bytes) -> int:
        """The id of the image codec that coded the frames of an intra file."""
        _, sections = bitstream.unpack(data, codec_id=IntraCodec.codec_id)
        if len(sections) != 2 or len(sections[0]) < _CODEC.size:
            raise CorruptError("intra bitstream has the wrong section layout")
        return _CODEC.unpack_from(sections[0])[0]

    def encode(self, params: Any, frames: np.ndarray, fps: Any = None) -> bytes:
        frames = check_frames(frames)
        index = [_CODEC.pack(self.image_codec.codec_id)]
        payload, quality, fingerprint = [], 0, self.fingerprint(params)
        for data in self.image_codec.encode_batch(params, list(frames)):
            header, sections = bitstream.unpack(data, codec_id=self.image_codec.codec_id)
            quality = header.quality
            index.append(_COUNT.pack(len(sections)))
            index.extend(_LEN.pack(len(s)) for s in sections)
            payload.extend(sections)
        t, h, w = frames.shape[:3]
        return bitstream.pack(self.codec_id, fingerprint, [b"".join(index), b"".join(payload)],
                              height=h, width=w, frames=t, quality=quality,
                              fps=25 if fps is None else fps)

    def decode_frames(self, params: Any, data: bytes, **options) -> Iterator[np.ndarray]:
        """Frames one by one; ``options`` go to the image codec's ``decode`` (e.g. ``steps``)."""
        header, frame_sections = self._split(params, data)
        return self._frames(params, header, frame_sections, options)

    def _frames(self, params, header, frame_sections, options):
        fingerprint = self.fingerprint(params)
        for sections in frame_sections:
            inner = bitstream.pack(self.image_codec.codec_id, fingerprint, sections,
                                   height=header.height, width=header.width,
                                   quality=header.quality)
            yield self.image_codec.decode(params, inner, **options)

    def _split(self, params, data: bytes):
        """Verify the container and the index; ``(header, [sections of each frame])``."""
        header, sections = bitstream.unpack(data, codec_id=self.codec_id,
                                            fingerprint=self.fingerprint(params))
        if len(sections) != 2 or len(sections[0]) < _CODEC.size or header.channels != 3:
            raise CorruptError("intra bitstream has the wrong section layout")
        index, payload = sections
        (inner_id,) = _CODEC.unpack_from(index)
        if inner_id != self.image_codec.codec_id:
            raise WrongModelError(
                f"the frames were coded by {codec_name(inner_id) or f'codec id {inner_id}'}, "
                f"this intra codec wraps {self.image_codec.name}")
        pos, offset, frames = _CODEC.size, 0, []
        try:
            for _ in range(header.frames):
                (count,) = _COUNT.unpack_from(index, pos)
                lengths = struct.unpack_from(f"<{count}I", index, pos + 1)
                pos += 1 + 4 * count
                frames.append([payload[offset + sum(lengths[:i]):offset + sum(lengths[:i + 1])]
                               for i in range(count)])
                offset += sum(lengths)
        except struct.error as err:
            raise CorruptError("intra bitstream index is shorter than its frame count") from err
        if pos != len(index) or offset != len(payload) or any(not f for f in frames):
            raise CorruptError("intra bitstream index does not match its payload")
        return header, frames
