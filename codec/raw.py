"""The ``raw`` codec: the bytes stored as they are (the selector's fallback)."""
from __future__ import annotations

from .base import Codec, Encoded, register
from .frame import METHOD_RAW, Stream, hash64
from .zstd_codec import decode_stream


@register
class RawCodec(Codec):
    codec_id = "raw"

    def _encode(self, mv, dt):
        h = hash64(mv)  # the stream's checksum is the content checksum: hash once
        return Encoded(streams=[Stream("bytes", METHOD_RAW, mv.nbytes, mv, checksum=h)],
                       content_hash=h)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        (s,) = header.streams
        return decode_stream(frame, s)
