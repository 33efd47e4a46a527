"""Lossless float (and int) coding by planes: split each element into streams ordered by
significance, code each stream on its own (zstd, or raw when coding does not pay, or a
constant byte when all equal).

Layouts (param byte 0):
  1 ``f32``:  exponent | sign + mantissa 22..16 | mantissa 15..8 | mantissa 7..0
              (the exponent is one whole byte; upcast-bf16 weights have constant zero
              low planes, which cost a few bytes)
  2 ``bf16``: exponent | sign + mantissa 6..0
  0 ``bytes``: byte planes, most significant byte first (F16: sign+exponent+2 mantissa
              bits, then 8 mantissa bits; F64, ints; 1-byte types: a single plane)

``fidelity`` (decode) = mantissa bits wanted: only the shortest prefix of streams that
holds sign, exponent and at least that many mantissa bits is read; the dropped bits are
set to the midpoint of their range. Ignored (exact) for non-float dtypes.
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .base import Codec, register
from .errors import FrameError
from .zstd_codec import code_stream, decode_stream

L_BYTES, L_F32, L_BF16 = 0, 1, 2
F32_NAMES = ("exponent", "sign+mant_hi", "mant_mid", "mant_lo")
F32_MBITS = (0, 7, 15, 23)  # mantissa bits available after reading streams 0..j
BF16_NAMES = ("exponent", "sign+mant")


def layout_for(dt) -> int:
    if dt is None:
        return L_BYTES
    if dt.name == "F32":
        return L_F32
    if dt.name == "BF16":
        return L_BF16
    return L_BYTES


def split(mv, dt, layout: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Planes (nplanes, n) uint8 and their names."""
    if layout == L_F32:
        w = np.frombuffer(mv, "<u4")
        out = np.empty((4, w.shape[0]), np.uint8)
        kernels.split_f32(w, out)
        return out, F32_NAMES
    if layout == L_BF16:
        w = np.frombuffer(mv, "<u2")
        out = np.empty((2, w.shape[0]), np.uint8)
        kernels.split_bf16(w, out)
        return out, BF16_NAMES
    size = dt.itemsize if dt else 1
    a = np.frombuffer(mv, np.uint8)
    if size == 1:
        return a.reshape(1, -1), ("bytes",)
    if size in (2, 4):
        w = a.view(f"<u{size}")
        out = np.empty((size, w.shape[0]), np.uint8)
        (kernels.split_u16 if size == 2 else kernels.split_u32)(w, out)
        return out, tuple(f"byte{size - 1 - j}" for j in range(size))
    a = a.reshape(-1, size)
    out = np.empty((size, a.shape[0]), np.uint8)
    kernels.split_bytes(a, out)
    return out, tuple(f"byte{size - 1 - j}" for j in range(size))


def planes_needed(dt, layout: int, nplanes: int, fidelity) -> int:
    if fidelity is None or dt is None or not dt.is_float:
        return nplanes
    f = max(0, min(int(fidelity), dt.mbits))
    if layout == L_F32:
        cum = F32_MBITS
    elif layout == L_BF16:
        cum = (0, 7)
    else:
        cum = tuple(max(0, 8 * (j + 1) - 1 - dt.ebits) for j in range(nplanes))
    minimum = 2 if layout in (L_F32, L_BF16) else (1 + dt.ebits + 7) // 8
    for j, c in enumerate(cum):
        if c >= f and j + 1 >= minimum:
            return j + 1
    return nplanes


def merge(planes: list, dt, layout: int, n: int) -> np.ndarray:
    """Inverse of split; ``planes`` may be a prefix (reduced fidelity)."""
    empty = np.empty(0, np.uint8)
    empty.setflags(write=False)
    if layout == L_F32:
        p = list(planes) + [empty] * (4 - len(planes))
        out = np.empty(n, np.uint32)
        kernels.merge_f32(p[0], p[1], p[2], p[3], out)
        return out
    if layout == L_BF16:
        out = np.empty(n, np.uint16)
        kernels.merge_bf16(planes[0], planes[1], out)
        return out
    size = dt.itemsize if dt else 1
    if size == 1:
        return planes[0]
    if size == 2:
        out = np.empty(n, "<u2")
        kernels.merge_u16(planes[0], planes[1] if len(planes) > 1 else empty, out)
        return out
    if size == 4 and len(planes) == 4:
        out = np.empty(n, "<u4")
        kernels.merge_u32(planes[0], planes[1], planes[2], planes[3], out)
        return out
    stacked = np.empty((size, n), np.uint8)
    for j, p in enumerate(planes):
        stacked[j] = p
    out = np.empty((n, size), np.uint8)
    kernels.merge_bytes(stacked, len(planes), out)
    return out


def encode_planes(mv, dt, level: int, layout: int | None = None):
    if layout is None:
        layout = layout_for(dt)
    pl, names = split(mv, dt, layout)
    streams = [code_stream(nm, pl[j], level) for j, nm in enumerate(names)]
    return bytes([layout]), streams


def decode_planes(header, frame, dt, fidelity, streams=None):
    """Decode the plane streams of ``header`` (all of them, or the prefix ``fidelity``
    needs). Returns a numpy array of the element bits (or bytes)."""
    streams = header.streams if streams is None else streams
    if len(header.params) < 1:
        raise FrameError("planes frame has no layout parameter")
    layout = header.params[0]
    expected = {L_F32: 4, L_BF16: 2}.get(layout, dt.itemsize if dt else 1)
    if layout not in (L_BYTES, L_F32, L_BF16) or len(streams) != expected:
        raise FrameError(f"planes frame: layout {layout} with {len(streams)} streams is invalid")
    size = dt.itemsize if dt else 1
    n = header.raw_size // size
    k = planes_needed(dt, layout, len(streams), fidelity)
    return merge(decoded_planes(frame, streams[:k], n), dt, layout, n)


def decoded_planes(frame, streams, n: int) -> list:
    """The decoded bytes of plane streams that must each hold n bytes, as read-only
    uint8 arrays (one numba signature for the merge kernels: read-only views of
    zstd/raw streams, arrays from Huffman)."""
    planes = []
    for s in streams:
        if s.raw_len != n:
            raise FrameError(f"stream {s.name!r} has {s.raw_len} bytes, expected {n}")
        p = np.frombuffer(decode_stream(frame, s), np.uint8)
        if p.flags.writeable:
            p.setflags(write=False)
        planes.append(p)
    return planes


@register
class PlanesCodec(Codec):
    """Lossless float/int planes codec (see module doc)."""

    codec_id = "planes"

    def __init__(self, dtype=None, level: int = 3):
        super().__init__(dtype)
        self.level = int(level)

    def get_config(self):
        return {"id": self.codec_id, "dtype": self.dtype, "level": self.level}

    def _encode(self, mv, dt):
        params, streams = encode_planes(mv, dt, self.level)
        return dict(streams=streams, params=params)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        return decode_planes(header, frame, dt, fidelity)
