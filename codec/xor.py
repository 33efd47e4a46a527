"""Delta against a reference (same dtype and length: the same tensor in a previous
checkpoint or base model), coded with the planes layout. Lossless. Two transforms:

  xor  ``data XOR reference`` (ZipLLM's BitX), then the dtype's planes layout;
  sub  for 2/4/8-byte elements: the wrapping integer difference of the raw bits,
       zigzag-mapped (small changes of either sign -> small unsigned numbers), then
       byte planes, most significant first. On float weights and Adam moments a few
       dozen steps apart this beats XOR by 5-10% (a change that carries into a higher
       mantissa bit flips many bits under XOR, but is a small number as a difference).

The encoder tries both on a sample and keeps the smaller. The frame records xxh3_64 of
the reference, so decoding against a missing or wrong reference raises FrameError
instead of returning wrong bytes."""
from __future__ import annotations

import struct

import numpy as np

from .base import Codec, Encoded, as_bytes_view, register
from .errors import FrameError
from .frame import hash64
from .planes import decode_planes, encode_planes

_P = struct.Struct("<QB")  # reference hash, planes layout
_P2 = struct.Struct("<QBB")  # reference hash, planes layout, transform (0 xor, 1 sub)
T_XOR, T_SUB = 0, 1
SAMPLE = 1 << 16  # elements tried with each transform


def _u8(b) -> np.ndarray:
    if isinstance(b, np.ndarray):
        return np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return np.frombuffer(b, np.uint8)


def _utype(dt) -> np.dtype:
    size = dt.itemsize if dt else 1
    return np.dtype(f"<u{size}") if size in (1, 2, 4, 8) else np.dtype(np.uint8)


def _xor(mv, ref, dt):
    ut = _utype(dt)
    return np.bitwise_xor(_u8(mv).view(ut), _u8(ref).view(ut))


def _sub(mv, ref, dt) -> np.ndarray:
    """zigzag(data - reference) on the raw bits, wrapping."""
    ut = _utype(dt)
    bits = ut.itemsize * 8
    d = _u8(mv).view(ut) - _u8(ref).view(ut)  # wraps modulo 2^bits
    sd = d.view(np.dtype(f"<i{ut.itemsize}"))
    return ((d << ut.type(1)) ^ (sd >> (bits - 1)).view(ut)).astype(ut, copy=False)


def _unsub(z: np.ndarray, ref, ut: np.dtype) -> np.ndarray:
    """Inverse of _sub: reference + unzigzag(z), wrapping."""
    z = z.view(ut)
    d = (z >> ut.type(1)) ^ (ut.type(0) - (z & ut.type(1)))
    return _u8(ref).view(ut) + d


def _plane_size(arr: np.ndarray, dt, level: int) -> int:
    _, streams = encode_planes(arr.view(np.uint8), dt, level)
    return sum(len(x.stored) for x in streams)


def _pick_transform(mv, ref, dt, level: int) -> int:
    """The smaller transform on a sample (sub only for 2/4/8-byte elements)."""
    ut = _utype(dt)
    if ut.itemsize == 1:
        return T_XOR
    n = min(SAMPLE, mv.nbytes // ut.itemsize)
    if n == 0:
        return T_XOR
    step = ut.itemsize * n
    mid = (mv.nbytes // 2) // ut.itemsize * ut.itemsize
    lo = max(0, min(mid, mv.nbytes - step))
    a, r = mv[lo:lo + step], ref[lo:lo + step]
    x = _plane_size(_xor(a, r, dt), dt, level)
    s = _plane_size(_sub(a, r, dt), _bytes_dtype(ut), level)
    return T_SUB if s < x else T_XOR


def _bytes_dtype(ut: np.dtype):
    """A dtype descriptor that makes planes use plain byte planes of this width."""
    from .dtypes import BY_NAME
    return BY_NAME[{1: "U8", 2: "U16", 4: "U32", 8: "U64"}[ut.itemsize]]


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
        t = _pick_transform(mv, ref, dt, self.level)
        if t == T_SUB:
            d, pdt = _sub(mv, ref, dt), _bytes_dtype(_utype(dt))
        else:
            d, pdt = _xor(mv, ref, dt), dt
        layout_params, streams = encode_planes(d.view(np.uint8), pdt, self.level)
        return Encoded(streams=streams, params=_P2.pack(hash64(ref), layout_params[0], t),
                       needs_reference=True)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        try:
            if len(header.params) == _P.size:
                (rh, layout), t = _P.unpack(header.params), T_XOR
            else:
                rh, layout, t = _P2.unpack(header.params)
        except struct.error:
            raise FrameError("xor frame: bad parameters") from None
        if t not in (T_XOR, T_SUB):
            raise FrameError(f"xor frame: unknown transform {t}")
        ref = as_bytes_view(reference)
        if ref.nbytes != header.raw_size or hash64(ref) != rh:
            raise FrameError(f"xor frame: wrong reference ({ref.nbytes} bytes, checksum mismatch"
                             f" or length != {header.raw_size}); pass the exact chunk it was "
                             "encoded against")

        class _H:  # the planes view of this header
            params = bytes([layout])
            raw_size = header.raw_size
            streams = header.streams
        if t == T_SUB:
            ut = _utype(dt)
            z = decode_planes(_H, frame, _bytes_dtype(ut), None)
            return _unsub(np.ascontiguousarray(z).reshape(-1).view(np.uint8), ref, ut)
        d = decode_planes(_H, frame, dt, None)
        return _xor(d, ref, dt)
