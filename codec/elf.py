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

Two layouts of the quantized values (param ``nplanes``):
  * planes (nplanes >= 1): streams, most significant first: outlier positions (u32
    deltas), outlier values (raw element bytes), then planes q0, q1, ... of t = sign <<
    qbits | q, right-aligned, most significant byte first. ``fidelity`` (decode) =
    fraction bits of q wanted; the missing low planes read as the midpoint of their range.
  * joint (nplanes = 0; written for chunks of >= JOINT_MIN elements whose sign + q take
    9 to 12 bits: fp16 at its native bound, bounds around 1e-3): the outlier streams, then one
    stream ``qsym`` of symbols q << 1 | sign in codec.wide's Huffman form (stored raw in
    the frame: the frame checksums it, this codec decodes it). Byte planes lose up to
    half a bit per value there (fp16's top plane holds the sign and two rare bits: ~1
    bit of entropy, 1.5 bits of Huffman code); one symbol per value does not, and
    decodes with one table lookup per value. Always read whole (``fidelity`` ignored);
    not written when streams are to be protected (frame.protect guards the leading
    streams: here that would be all of them), see api.encode.
"""
from __future__ import annotations

import math
import struct
from functools import lru_cache

import numpy as np

from . import huffman, kernels, wide
from .base import Codec, Encoded, register
from .errors import FrameError
from .frame import METHOD_RAW, Stream, hash64
from .huffman import entropy_bits
from .zstd_codec import code_stream, decode_stream

_P = struct.Struct("<BBBd")  # grid, qbits, nplanes, step
GRID_POW2, GRID_UNIFORM = 0, 1
NP = {"F32": np.float32, "F64": np.float64, "F16": np.float16}
JOINT_MIN = 1 << 15  # elements: below, the joint layout's code table (~0.4 KiB) costs
# more than it saves
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


def _encode(mv, dt, bound, level, grid=None, joint: bool | str = True):
    g, step, b = plan(dt, bound, grid)
    u = np.frombuffer(mv, dt.uint)
    n = u.shape[0]
    t, outl, rec_u, qbits, maxerr, nout = _quantize(u, dt, step, b)
    idx = np.flatnonzero(outl).astype(np.uint32) if nout else np.empty(0, np.uint32)
    rec_u[idx] = u[idx]  # verbatim bits (NaN payloads, -0.0, inf)
    if not maxerr <= b:
        raise AssertionError(f"ELF internal error: max error {maxerr} > bound {b}")
    deltas = np.diff(idx, prepend=np.uint32(0)).astype("<u4") if idx.size else np.empty(0, "<u4")
    streams = [code_stream("outlier_pos", deltas.view(np.uint8), level),
               code_stream("outlier_val", u[idx].view(np.uint8), level)]
    nplanes = (1 + qbits + 7) // 8
    sbit = dt.itemsize * 8 - 1
    qs, sure = _joint_stream(t, u, sbit, outl, qbits, n) if joint else (None, False)
    if qs is None or (not sure and joint != "always"):
        if qs is not None and t.dtype == np.uint16:
            np.right_shift(t, 1, out=t)  # _joint_stream made t the symbols q << 1 | sign
        pl = np.empty((nplanes, n), np.uint8)
        kernels.elf_planes(t, (u >> sbit).astype(np.uint8), outl, qbits, nplanes, pl)
        planes = [code_stream(f"q{j}", pl[j], level, tie=TIE) for j in range(nplanes)]
        if qs is None or sum(len(p.stored) for p in planes) <= len(qs.stored):
            qs = None
            streams += planes
    if qs is not None:
        streams.append(qs)
        nplanes = 0
    return Encoded(streams=streams, params=_P.pack(g, qbits, nplanes, step), lossy=True,
                   bound=b, max_error=float(maxerr), content_hash=hash64(rec_u))


def _quantize(u: np.ndarray, dt, step: float, b: float):
    """(q per value, outlier flags, the decoder's reconstruction bits (outliers not yet
    verbatim), qbits, max error, outliers) of the raw bits ``u`` on the grid ``step``
    with bound ``b``. q is uint16 where it fits (fp16 grids: also the joint symbols'
    buffer, see _joint_stream)."""
    n = u.shape[0]
    qmax1 = max(0, math.floor(1.0 / step - 0.5))  # threshold 1: 1+|w| keeps its exponent
    qmax2 = max(qmax1, 2 ** (dt.mbits + 1) - 1)
    t = np.empty(n, np.uint16 if qmax2 < 1 << 15 else np.int64)
    outl = np.empty(n, np.uint8)
    if dt.name == "F16":
        # all in one numba pass on the bits: the bound is checked on the float16 the
        # decoder will produce (q*step -> float32 -> float16)
        rec_u = np.empty(n, np.uint16)

        def quant(qmax):
            pk, te = _f16_table(step, float(qmax), b) if n >= 16384 and qmax < 1 << 15 \
                else (_NONE_U32, _NONE_F64)
            return kernels.elf_quantize_f16(u, step, 1.0 / step, float(qmax), b, t, rec_u, outl,
                                            pk, te)
    else:
        x = u.view(NP[dt.name])
        rec = np.empty(n, x.dtype)
        rec_u = rec.view(dt.uint)
        sign = (u >> (dt.itemsize * 8 - 1)).astype(np.uint8)

        def quant(qmax):
            return kernels.elf_quantize(x, sign, step, 1.0 / step, float(qmax), b, t, rec, outl)
    qbits, maxerr, nout = quant(qmax1)
    if nout > max(16, n // 64) and qmax2 > qmax1:  # many values >= 1 (e.g. norm weights)
        qbits, maxerr, nout = quant(qmax2)
    return t, outl, rec_u, qbits, maxerr, nout


_NONE_U32, _NONE_F64 = np.empty(0, np.uint32), np.empty(0, np.float64)


@lru_cache(maxsize=16)
def _f16_table(step: float, qmax: float, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """kernels.f16_quant_table of one grid: 2 ms to build, reused by every large fp16
    chunk coded on that grid (read-only: shared by threads)."""
    pk, te = kernels.f16_quant_table(step, 1.0 / step, qmax, bound)
    pk.flags.writeable = te.flags.writeable = False
    return pk, te


def _joint_stream(t, u, sbit: int, outl, qbits: int, n: int) -> tuple[Stream | None, bool]:
    """(the ``qsym`` stream of the joint layout or None where it does not apply (few
    elements, sign + q not 9..12 bits), whether it is sure to beat the planes). Not
    sure: larger than the planes' entropy bound (a dominant symbol: a constant or
    sparse tensor, where whole-bit codes are poor; a near-uniform low byte, where the
    12-bit code limit and the table cost more than the planes' raw low plane)."""
    if n < JOINT_MIN or not 8 < 1 + qbits <= wide.MAXBITS:  # (one plane: the same code)
        return None, False
    sym = t if t.dtype == np.uint16 else np.empty(n, np.uint16)  # in place where q fits
    # (the caller shifts it back if it codes the planes after all)
    kernels.elf_symbols(t, u, sbit, outl, sym)
    size, lens, h = wide.plan(sym, 2 << qbits)
    body = wide.encode(sym, lens)
    return Stream("qsym", METHOD_RAW, body.shape[0], body), size <= _planes_bound(h, qbits)


def _planes_bound(h: np.ndarray, qbits: int) -> float:
    """Bytes below which the two byte planes cannot code the symbols counted in ``h``,
    repeats aside (which zstd finds): the top plane (few symbols) at its whole-bit
    Huffman size, the low plane at its order-0 entropy."""
    s = np.arange(h.shape[0])
    t = ((s & 1) << qbits) | (s >> 1)
    h0, h1 = (np.bincount(p, weights=h, minlength=256).astype(np.int64) for p in (t >> 8, t & 255))
    top = float((h0 * huffman.code_lengths(h0, huffman.MAXLEN2)).sum()) if (h0 > 0).sum() > 1 else 0.0
    return (top + float(h.sum()) * entropy_bits(h1)) / 8


@lru_cache(maxsize=64)
def _joint_values(name: str, qbits: int, step: float) -> np.ndarray:
    """The element bits of every joint symbol q << 1 | sign (as the encoder's
    reconstruction: q * step in float64, negated for sign 1, cast to the element type)."""
    s = np.arange(np.int64(2) << qbits)
    if name == "F16":
        v = kernels.f16_lut(qbits, step)[((s & 1) << qbits) | (s >> 1)]
    else:
        r = (s >> 1).astype(np.float64) * step
        r = np.where(s & 1, -r, r)
        ft = np.float32 if name == "F32" else np.float64
        v = r.astype(ft).view(np.uint32 if name == "F32" else np.uint64)
    v.flags.writeable = False  # shared by every decode (and thread) of this grid
    return v


def _decode(header, frame, dt, fidelity):
    if dt is None or dt.name not in NP:
        raise FrameError("ELF frame with a non-float dtype")
    try:
        g, qbits, nplanes, step = _P.unpack(header.params)
    except struct.error:
        raise FrameError("ELF frame: bad parameters") from None
    n = header.raw_size // dt.itemsize
    if nplanes == 0:
        if len(header.streams) != 3 or 1 + qbits > wide.MAXBITS:
            raise FrameError("ELF frame: stream table does not match its parameters")
        out = np.empty(n, dt.uint)
        wide.decode(decode_stream(frame, header.streams[2]),
                    _joint_values(dt.name, qbits, step), out)
        return _patch_outliers(out, frame, header.streams[0], header.streams[1], dt, n)
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
    elif dt.name in ("F32", "F64") and have == nplanes == 2:  # bounds around 1e-4
        out = np.empty(n, NP[dt.name])
        kernels.elf_unplanes2(decoded[0], decoded[1], qbits, step, out)
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
    return _patch_outliers(out, frame, pos_s, val_s, dt, n)


def _patch_outliers(out: np.ndarray, frame, pos_s, val_s, dt, n: int) -> np.ndarray:
    """``out`` with the outliers' verbatim bits put back at their positions."""
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

    def __init__(self, dtype=None, bound="native", level: int = 3, grid=None,
                 joint: bool | str = True):
        """``joint``: True = the joint layout where it applies and is smaller; False =
        byte planes always (frames whose leading streams are to be protected);
        "always" = joint wherever it applies (tests, measurements)."""
        super().__init__(dtype)
        self.bound = bound
        self.level = int(level)
        self.grid = grid
        self.joint = joint if joint == "always" else bool(joint)

    def get_config(self):
        return {"id": self.codec_id, "dtype": self.dtype, "bound": self.bound,
                "level": self.level, "grid": self.grid, "joint": self.joint}

    def _encode(self, mv, dt):
        if dt is None or dt.name not in NP:
            raise ValueError(f"ELF codes F32/F16/F64 only, not {self.dtype!r}")
        return _encode(mv, dt, self.bound, self.level, self.grid, self.joint)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        return _decode(header, frame, dt, fidelity)
