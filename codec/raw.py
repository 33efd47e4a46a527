"""The ``raw`` codec: the bytes stored as they are (the selector's fallback)."""
from __future__ import annotations

from .base import Codec, register
from .frame import METHOD_RAW, Stream
from .zstd_codec import as_is_or, decode_stream


@register
class RawCodec(Codec):
    codec_id = "raw"

    def _encode(self, mv, dt):
        return as_is_or(Stream("bytes", METHOD_RAW, mv.nbytes, mv), mv)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        (s,) = header.streams
        return decode_stream(frame, s)
