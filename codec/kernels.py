"""numba kernels (njit, cache=True, nogil=True): every per-element loop lives here.

All kernels take and return numpy arrays; none allocates Python objects, so they run
with the GIL released and worker threads encode/decode in parallel.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def histogram(a):
    h = np.zeros(256, np.int64)
    for i in range(a.shape[0]):
        h[a[i]] += 1
    return h


# ---- lossless float layouts -------------------------------------------------------
# F32 "fields": exponent byte | sign + mantissa bits 22..16 | mantissa 15..8 | 7..0
@njit(**_JIT)
def split_f32(w, out):
    for i in range(w.shape[0]):
        x = w[i]
        out[0, i] = (x >> 23) & 0xFF
        out[1, i] = ((x >> 24) & 0x80) | ((x >> 16) & 0x7F)
        out[2, i] = (x >> 8) & 0xFF
        out[3, i] = x & 0xFF


@njit(**_JIT)
def merge_f32(p0, p1, p2, p3, out):
    """Inverse of split_f32. Missing planes (length 0) are filled with the midpoint of
    the dropped range (reduced-fidelity read)."""
    n = out.shape[0]
    h2 = p2.shape[0] != 0
    h3 = p3.shape[0] != 0
    for i in range(n):
        b1 = np.uint32(p1[i])
        x = ((b1 & 0x80) << 24) | (np.uint32(p0[i]) << 23) | ((b1 & 0x7F) << 16)
        if h2:
            x |= np.uint32(p2[i]) << 8
            if h3:
                x |= np.uint32(p3[i])
            else:
                x |= np.uint32(0x80)
        else:
            x |= np.uint32(0x8000)
        out[i] = x


# BF16 "fields": exponent byte | sign + 7 mantissa bits
@njit(**_JIT)
def split_bf16(w, out):
    for i in range(w.shape[0]):
        x = w[i]
        out[0, i] = (x >> 7) & 0xFF
        out[1, i] = ((x >> 8) & 0x80) | (x & 0x7F)


@njit(**_JIT)
def merge_bf16(p0, p1, out):
    for i in range(out.shape[0]):
        b1 = np.uint16(p1[i])
        out[i] = ((b1 & 0x80) << 8) | (np.uint16(p0[i]) << 7) | (b1 & 0x7F)


# generic byte planes, most significant byte first: a is (n, w) uint8 little-endian
@njit(**_JIT)
def split_bytes(a, out):
    n, w = a.shape
    for j in range(w):
        src = w - 1 - j
        for i in range(n):
            out[j, i] = a[i, src]


@njit(**_JIT)
def merge_bytes(planes, nplanes, out):
    """planes is (w, n); only the first ``nplanes`` are valid; the missing ones get the
    midpoint of the dropped range (0x80, then 0x00)."""
    n, w = out.shape
    for j in range(w):
        dst = w - 1 - j
        if j < nplanes:
            for i in range(n):
                out[i, dst] = planes[j, i]
        else:
            v = 0x80 if j == nplanes else 0
            for i in range(n):
                out[i, dst] = v


# ---- XOR / difference deltas -----------------------------------------------------
@njit(**_JIT)
def xor_into(a, b, out):
    for i in range(a.shape[0]):
        out[i] = a[i] ^ b[i]


# ---- ELF -----------------------------------------------------------------------------
@njit(**_JIT)
def elf_quantize(x, signbits, step, inv_step, qmax, bound, t, rec, outlier):
    """x: float32/float64 values; signbits: 0/1 per value (from the raw bits, so -0.0 and
    NaN keep their sign). Writes t = sign << qbits | q, the reconstruction rec (same
    dtype as x) and an outlier flag per value. Returns (qbits_needed, max_error,
    n_outliers)."""
    n = x.shape[0]
    maxerr = 0.0
    qhi = np.int64(0)
    nout = 0
    for i in range(n):
        v = np.float64(x[i])
        a = abs(v)
        ok = a < 1e300  # false for NaN and inf
        q = np.int64(0)
        if ok:
            qf = np.floor(a * inv_step + 0.5)
            if qf > qmax:
                ok = False
            else:
                q = np.int64(qf)
                r = q * step
                if signbits[i]:
                    r = -r
                rec[i] = r
                e = abs(np.float64(rec[i]) - v)
                if not (e <= bound):
                    ok = False
                elif e > maxerr:
                    maxerr = e
        if ok:
            t[i] = q
            outlier[i] = 0
            if q > qhi:
                qhi = q
        else:
            t[i] = 0
            rec[i] = x[i]
            outlier[i] = 1
            nout += 1
    qbits = 0
    while (np.int64(1) << qbits) <= qhi:
        qbits += 1
    return qbits, maxerr, nout


@njit(**_JIT)
def elf_planes(t, signbits, outlier, qbits, nplanes, out):
    """Pack sign << qbits | q, right-aligned, into nplanes byte planes, MSB first.
    Outliers are written as 0."""
    for i in range(t.shape[0]):
        v = np.uint64(t[i])
        if outlier[i] == 0 and signbits[i]:
            v |= np.uint64(1) << np.uint64(qbits)
        for j in range(nplanes):
            out[j, i] = (v >> np.uint64(8 * (nplanes - 1 - j))) & np.uint64(0xFF)


@njit(**_JIT)
def elf_unplanes(planes, have, nplanes, qbits, step, out):
    """Inverse of elf_planes for the first ``have`` planes; missing low bits take the
    midpoint of their range. out: float32/float64."""
    n = out.shape[0]
    missing_bits = 8 * (nplanes - have)
    mid = np.uint64(0)
    if missing_bits > 0:
        mid = np.uint64(1) << np.uint64(missing_bits - 1)
    qmask = (np.uint64(1) << np.uint64(qbits)) - np.uint64(1)
    for i in range(n):
        v = np.uint64(0)
        for j in range(have):
            v |= np.uint64(planes[j, i]) << np.uint64(8 * (nplanes - 1 - j))
        if missing_bits > 0:
            v |= mid
        q = v & qmask
        r = np.float64(q) * step
        if (v >> np.uint64(qbits)) & np.uint64(1):
            r = -r
        out[i] = r


@njit(**_JIT)
def scatter(out, idx, vals):
    for i in range(idx.shape[0]):
        out[idx[i]] = vals[i]


@njit(**_JIT)
def max_abs_err(a, b):
    m = 0.0
    for i in range(a.shape[0]):
        x = np.float64(a[i])
        y = np.float64(b[i])
        if x != x or y != y:
            continue
        e = abs(x - y)
        if e > m:
            m = e
    return m
