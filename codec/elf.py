"""ELF (exponent-less float, Elves): bounded-error coding of F32/F16/F64.

For |w| below the threshold (1: so 1+|w| has a constant exponent) store q =
round(|w| / step) with the sign; decode w' = sign * q * step (exact in the element
type for power-of-two steps). Values at/above the threshold, NaN and inf -- and any
value whose reconstruction would break the bound -- are outliers, kept verbatim with
their positions, so the bound holds for every value; the largest error is measured at
encode time and recorded in the frame.

Grids (param ``grid``):
  * "pow2" -- ELF proper: step = 2^-k, k = the fewest mantissa bits of 1+|w| that keep
    the bound (native: k = 23 for F32, 10 for F16, 52 for F64; error <= 2^-(k+1)).
    Rounding to nearest == reconstructing at the midpoint of the dropped range.
  * "uniform" (default for a numeric bound) -- step = 2*bound (less a rounding margin):
    the widest cells the bound allows (what SZ-style quantizers use), about 0.5 bit per
    value smaller than the power-of-two grid on average.

Streams, most significant first: outlier positions (u32 deltas), outlier values (raw
element bytes), then planes q0, q1, ... of t = sign << qbits | q, right-aligned, most
significant byte first. ``fidelity`` (decode) = fraction bits of q wanted; the missing
low planes read as the midpoint of their range.
"""
from __future__ import annotations

import math
import struct

import numpy as np

from . import kernels
from .base import Codec, Encoded, register
from .errors import FrameError
from .frame import hash64
from .zstd_codec import code_stream, decode_stream

_P = struct.Struct("<BBBd")  # grid, qbits, nplanes, step
GRID_POW2, GRID_UNIFORM = 0, 1
NP = {"F32": np.float32, "F64": np.float64, "F16": np.float16}
TIE = 1.005  # a high-entropy plane takes Huffman only 0.5 % below zstd (fp16's low
# byte: zstd decodes it ~1.4x faster for 0.24 % more bytes; the general rule is 0.2 %)


def native_bound(dt) -> float:
    return 2.0 ** -(dt.mbits + 1)


def plan(dt, bound, grid=None):
    """(grid, step, bound) for ``bound`` (float or "native")."""
    if bound == "native":
        k = dt.mbits
        return GRID_POW2, 2.0 ** -k, 2.0 ** -(k + 1)
    b = float(bound)
    if grid is None:
        grid = "uniform"
    if grid == "uniform":
        # margin for rounding the reconstruction to the element type (values < 2)
        step = 2.0 * (b - 2.0 ** -(dt.mbits + 1))
        if step > 0 and step < 2.0:
            return GRID_UNIFORM, step, b
    k = max(-8, math.ceil(-math.log2(b) - 1))
    return GRID_POW2, 2.0 ** -k, b


def _encode(mv, dt, bound, level, grid=None):
    g, step, b = plan(dt, bound, grid)
    x = np.frombuffer(mv, NP[dt.name])
    n = x.shape[0]
    u = x.view(dt.uint)
    sign = (u >> (dt.itemsize * 8 - 1)).astype(np.uint8)
    t = np.empty(n, np.int64)
    outl = np.empty(n, np.uint8)
    qmax1 = max(0, math.floor(1.0 / step - 0.5))  # threshold 1: 1+|w| keeps its exponent
    qmax2 = max(qmax1, 2 ** (dt.mbits + 1) - 1)
    if dt.name == "F16":
        # all in one numba pass on the bits: the bound is checked on the float16 the
        # decoder will produce (q*step -> float32 -> float16)
        rec_u = np.empty(n, np.uint16)

        def quant(qmax):
            return kernels.elf_quantize_f16(u, step, 1.0 / step, float(qmax), b, t, rec_u, outl)
    else:
        rec = np.empty(n, x.dtype)
        rec_u = rec.view(dt.uint)

        def quant(qmax):
            return kernels.elf_quantize(x, sign, step, 1.0 / step, float(qmax), b, t, rec, outl)
    qbits, maxerr, nout = quant(qmax1)
    if nout > max(16, n // 64) and qmax2 > qmax1:  # many values >= 1 (e.g. norm weights)
        qbits, maxerr, nout = quant(qmax2)
    idx = np.flatnonzero(outl).astype(np.uint32)
    rec_u[idx] = u[idx]  # verbatim bits (NaN payloads, -0.0, inf)
    if not maxerr <= b:
        raise AssertionError(f"ELF internal error: max error {maxerr} > bound {b}")
    nplanes = (1 + qbits + 7) // 8
    pl = np.empty((nplanes, n), np.uint8)
    kernels.elf_planes(t, sign, outl, qbits, nplanes, pl)
    deltas = np.diff(idx, prepend=np.uint32(0)).astype("<u4") if idx.size else np.empty(0, "<u4")
    streams = [code_stream("outlier_pos", deltas.view(np.uint8), level),
               code_stream("outlier_val", u[idx].view(np.uint8), level)]
    streams += [code_stream(f"q{j}", pl[j], level, tie=TIE) for j in range(nplanes)]
    return Encoded(streams=streams, params=_P.pack(g, qbits, nplanes, step), lossy=True,
                   bound=b, max_error=float(maxerr), content_hash=hash64(rec_u))


def _decode(header, frame, dt, fidelity):
    if dt is None or dt.name not in NP:
        raise FrameError("ELF frame with a non-float dtype")
    try:
        g, qbits, nplanes, step = _P.unpack(header.params)
    except struct.error:
        raise FrameError("ELF frame: bad parameters") from None
    n = header.raw_size // dt.itemsize
    if len(header.streams) != 2 + nplanes or nplanes != (1 + qbits + 7) // 8:
        raise FrameError("ELF frame: stream table does not match its parameters")
    pos_s, val_s, *qs = header.streams
    have = nplanes
    if fidelity is not None:
        pad = 8 * nplanes - 1 - qbits
        f = max(0, min(int(fidelity), qbits))
        have = next(j + 1 for j in range(nplanes) if 8 * (j + 1) - 1 - pad >= f)
    decoded = []
    for j in range(have):
        if qs[j].raw_len != n:
            raise FrameError(f"ELF stream {qs[j].name!r} has a wrong length")
        p = np.frombuffer(decode_stream(frame, qs[j]), np.uint8)
        if p.flags.writeable:  # one numba signature for elf_unplanes3
            p.setflags(write=False)
        decoded.append(p)
    if dt.name == "F32" and have == nplanes == 3:
        out = np.empty(n, np.float32)
        kernels.elf_unplanes3(decoded[0], decoded[1], decoded[2], qbits, step, out)
    elif dt.name == "F16" and have == nplanes == 2 and n >= 4 << qbits:
        out = np.empty(n, np.uint16)  # (the table costs more than it saves below that)
        kernels.elf_unplanes2_f16(decoded[0], decoded[1], kernels.f16_lut(qbits, step), out)
    else:
        planes = np.empty((nplanes, n), np.uint8)
        for j, p in enumerate(decoded):
            planes[j] = p
        if dt.name == "F16":
            out = np.empty(n, np.uint16)
            kernels.elf_unplanes_f16(planes, have, nplanes, qbits, step, out)
        else:
            out = np.empty(n, np.float64 if dt.name == "F64" else np.float32)
            kernels.elf_unplanes(planes, have, nplanes, qbits, step, out)
    deltas = np.frombuffer(decode_stream(frame, pos_s), "<u4")
    vals = np.frombuffer(decode_stream(frame, val_s), dt.uint)
    if deltas.size != vals.size:
        raise FrameError("ELF frame: outlier positions and values disagree")
    idx = np.cumsum(deltas, dtype=np.uint64)
    if idx.size and idx[-1] >= n:
        raise FrameError("ELF frame: outlier position out of range")
    out_u = out.view(dt.uint)
    out_u[idx.astype(np.int64)] = vals
    return out


@register
class ElfCodec(Codec):
    """ELF bounded-error codec. bound: "native" or an absolute error > 0; grid: None
    (pow2 for native, uniform for a number), "pow2" or "uniform"."""

    codec_id = "elf"

    def __init__(self, dtype=None, bound="native", level: int = 3, grid=None):
        super().__init__(dtype)
        self.bound = bound
        self.level = int(level)
        self.grid = grid

    def get_config(self):
        return {"id": self.codec_id, "dtype": self.dtype, "bound": self.bound,
                "level": self.level, "grid": self.grid}

    def _encode(self, mv, dt):
        if dt is None or dt.name not in NP:
            raise ValueError(f"ELF codes F32/F16/F64 only, not {self.dtype!r}")
        return _encode(mv, dt, self.bound, self.level, self.grid)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        return _decode(header, frame, dt, fidelity)
