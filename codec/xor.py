"""XOR delta (ZipLLM's BitX): code ``data XOR reference`` (same dtype and length: the
same tensor in a previous checkpoint or base model) with the planes layout of the dtype.
Lossless. The frame records xxh3_64 of the reference, so decoding against a missing or
wrong reference raises FrameError instead of returning wrong bytes."""
from __future__ import annotations

import struct

import numpy as np

from .base import Codec, Encoded, as_bytes_view, register
from .errors import FrameError
from .frame import hash64
from .planes import decode_planes, encode_planes

_P = struct.Struct("<QB")  # reference hash, planes layout


def _u8(b) -> np.ndarray:
    if isinstance(b, np.ndarray):
        return np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return np.frombuffer(b, np.uint8)


def _xor(mv, ref, dt):
    size = dt.itemsize if dt else 1
    ut = np.dtype(f"<u{size}") if size in (1, 2, 4, 8) else np.uint8
    return np.bitwise_xor(_u8(mv).view(ut), _u8(ref).view(ut))


@register
class XorCodec(Codec):
    codec_id = "xor"

    def __init__(self, dtype=None, reference=None, level: int = 3):
        super().__init__(dtype)
        self.reference = reference
        self.level = int(level)

    def get_config(self):  # the reference is data, not configuration
        return {"id": self.codec_id, "dtype": self.dtype, "level": self.level}

    def _encode(self, mv, dt):
        if self.reference is None:
            raise ValueError("XorCodec needs reference=<bytes of the same length>")
        ref = as_bytes_view(self.reference)
        if ref.nbytes != mv.nbytes:
            raise ValueError(f"reference has {ref.nbytes} bytes, data {mv.nbytes}")
        d = _xor(mv, ref, dt)
        layout_params, streams = encode_planes(d.view(np.uint8), dt, self.level)
        return Encoded(streams=streams, params=_P.pack(hash64(ref), layout_params[0]),
                       needs_reference=True)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        try:
            rh, layout = _P.unpack(header.params)
        except struct.error:
            raise FrameError("xor frame: bad parameters") from None
        ref = as_bytes_view(reference)
        if ref.nbytes != header.raw_size or hash64(ref) != rh:
            raise FrameError(f"xor frame: wrong reference ({ref.nbytes} bytes, checksum mismatch"
                             f" or length != {header.raw_size}); pass the exact chunk it was "
                             "encoded against")

        class _H:  # the planes view of this header
            params = bytes([layout])
            raw_size = header.raw_size
            streams = header.streams
        d = decode_planes(_H, frame, dt, None)
        return _xor(d, ref, dt)
