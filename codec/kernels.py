"""numba kernels (njit, cache=True, nogil=True): every per-element loop lives here.

All kernels take and return numpy arrays; none allocates Python objects, so they run
with the GIL released and worker threads encode/decode in parallel.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True)


from .huffman import entropy_bits, histogram  # noqa: E402,F401  (four-counter byte histogram)


@njit(**_JIT)
def lane_hist8(a):
    """(8, 256) byte histograms of the lanes i % 8 of ``a`` (the shuffle probe: sums
    of its rows give the lanes of strides 1, 2 and 4)."""
    h = np.zeros((8, 256), np.int64)
    n = a.shape[0]
    m = n - n % 8
    for i in range(0, m, 8):
        for j in range(8):
            h[j, a[i + j]] += 1
    for i in range(m, n):
        h[i % 8, a[i]] += 1
    return h


@njit(**_JIT)
def _bits_mm(h, n):
    """Order-0 bits per symbol of histogram ``h`` (n symbols) with the Miller-Madow
    correction: small samples read as less random than they are."""
    s = 0.0
    used = 0
    for c in h:
        if c > 0:
            s += c * np.log2(c)
            used += 1
    return np.log2(n) - s / n + (used - 1) / (2.0 * n * np.log(2.0))


@njit(**_JIT)
def best_stride(h8, min_gain, wider_gain, random_bits):
    """The stride k (1, 2, 4 or 8) whose lanes have the lowest mean order-0 entropy,
    given the byte histograms of the lanes i % 8 of a sample (lane j of stride k sums
    the rows j, j + k, ...). A stride must save ``min_gain`` bits per byte over k = 1,
    and a wider one ``wider_gain`` more over a narrower one. A sample of at least
    ``random_bits`` per byte is taken as random (compressed, encrypted): k = 1 at once."""
    total = 0
    for c in h8[0]:
        total += c
    if total == 0:
        return 1
    n8 = total * 8
    whole = np.zeros(256, np.int64)
    for j in range(8):
        whole += h8[j]
    best_k = 1
    best = _bits_mm(whole, n8)
    if best >= random_bits:
        return 1
    best -= min_gain
    for k in (2, 4, 8):
        hk = lane_bits(h8, k).mean()
        if hk < best - (wider_gain if best_k > 1 else 0.0):
            best_k, best = k, hk
    return best_k


@njit(**_JIT)
def lane_bits(h8, k):
    """Order-0 bits per byte (Miller-Madow) of each lane j of stride k, from the
    histograms of the lanes i % 8 (see best_stride)."""
    total = 0
    for c in h8[0]:
        total += c
    out = np.full(k, 8.0)
    if total == 0:
        return out
    lane = np.zeros(256, np.int64)
    for j in range(k):
        lane[:] = 0
        for r in range(j, 8, k):
            lane += h8[r]
        out[j] = _bits_mm(lane, total * 8 // k)
    return out


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
def elf_symbols(t, u, sbit, outlier, out):
    """ELF's joint symbols q << 1 | sign (codec.wide; the sign is bit ``sbit`` of the
    raw bits ``u``); outliers are written as 0."""
    for i in range(t.shape[0]):  # branchless: vectorizes
        s = np.uint16((np.uint64(u[i]) >> np.uint64(sbit)) & np.uint64(1)) & \
            np.uint16(outlier[i] ^ np.uint8(1))
        out[i] = (np.uint16(t[i]) << np.uint16(1)) | s


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


# ---- float16 without numpy's (slow, scalar) half conversions ---------------------------
_F16_SCALE = np.array([2.0 ** (e - 25) if e else 2.0 ** -24 for e in range(32)])


@njit(inline="always", **_JIT)
def f16_to_f64(h):
    """Exact value of the float16 with bits ``h`` (finite or inf/NaN)."""
    h = np.int64(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 31:
        v = np.inf if m == 0 else np.nan
    elif e == 0:
        v = m * _F16_SCALE[0]
    else:
        v = (1024 + m) * _F16_SCALE[e]
    return -v if h & 0x8000 else v


@njit(inline="always", **_JIT)
def f32bits_to_f16(f):
    """numpy's float32 -> float16 cast (round half to even) on the bits, for finite
    values (overflow gives inf)."""
    f = np.int64(f)
    sgn = (f >> 16) & 0x8000
    fe = f & 0x7F800000
    if fe >= 0x47800000:
        return np.uint16(sgn | 0x7C00)
    if fe <= 0x38000000:  # float16 subnormal (or zero)
        if fe < 0x33000000:
            return np.uint16(sgn)
        shift = 126 - (fe >> 23)
        sig = 0x800000 + (f & 0x7FFFFF)
        q = sig >> shift
        rem = sig & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        if rem > half or (rem == half and (q & 1)):
            q += 1
        return np.uint16(sgn | q)
    e = (fe >> 23) - 112
    m = f & 0x7FFFFF
    q = m >> 13
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (q & 1)):
        q += 1
    return np.uint16(sgn | ((e << 10) + q))


@njit(inline="always", **_JIT)
def f64_to_f16(x, s32, s32u):
    """Bits of float16(float32(x)) -- what ``np.float32(x).astype(np.float16)`` gives;
    s32/s32u: a 1-element float32 scratch array and its uint32 view."""
    s32[0] = x
    return f32bits_to_f16(s32u[0])


@njit(**_JIT)
def _quant_f16(u, step, inv_step, qmax, bound, t, rec, outlier, err):
    """Per value: t (q), rec (float16 bits the decoder produces: q*step -> float32 ->
    float16; verbatim for outliers), outlier flag, error (0 for outliers)."""
    s32 = np.empty(1, np.float32)
    s32u = s32.view(np.uint32)
    for i in range(u.shape[0]):
        v = f16_to_f64(u[i])
        a = abs(v)
        ok = a < 1e300  # false for NaN and inf
        if ok:
            qf = np.floor(a * inv_step + 0.5)
            if qf > qmax:
                ok = False
            else:
                q = np.int64(qf)
                r = q * step
                if u[i] & 0x8000:
                    r = -r
                hb = f64_to_f16(r, s32, s32u)
                e = abs(f16_to_f64(hb) - v)
                if e <= bound:
                    t[i] = q
                    rec[i] = hb
                    outlier[i] = 0
                    err[i] = e
                else:
                    ok = False
        if not ok:
            t[i] = 0
            rec[i] = u[i]
            outlier[i] = 1
            err[i] = 0.0


@njit(**_JIT)
def f16_quant_table(step, inv_step, qmax, bound):
    """_quant_f16 of all 65536 bit patterns, for elf_quantize_f16 (qmax < 2^15): (entries
    rec bits | q << 16 | outlier << 31, errors). Depends on the grid only: callers cache it."""
    pat = np.arange(65536).astype(np.uint16)
    tt = np.empty(65536, np.int64)
    tr = np.empty(65536, np.uint16)
    to = np.empty(65536, np.uint8)
    te = np.empty(65536, np.float64)
    _quant_f16(pat, step, inv_step, min(qmax, 32767.0), bound, tt, tr, to, te)
    pk = np.empty(65536, np.uint32)
    for j in range(65536):
        pk[j] = np.uint32(tr[j]) | (np.uint32(tt[j]) << np.uint32(16)) | \
            (np.uint32(to[j]) << np.uint32(31))
    return pk, te


@njit(**_JIT)
def elf_quantize_f16(u, step, inv_step, qmax, bound, t, rec, outlier, pk, te):
    """elf_quantize for float16 bits ``u``, with the bound checked on the float16 the
    decoder reconstructs. With ``pk, te`` (f16_quant_table of this grid; empty arrays:
    none) one 256 KiB table lookup per value, else per value arithmetic. rec: uint16
    bits (outliers verbatim). Returns (qbits, max_error, n_outliers)."""
    n = u.shape[0]
    maxerr = 0.0
    qhi = np.int64(0)
    nout = 0
    if pk.shape[0] == 65536:
        used = np.zeros(65536, np.uint8)
        for i in range(n):
            e = pk[u[i]]
            used[u[i]] = 1
            rec[i] = np.uint16(e & np.uint32(0xFFFF))
            t[i] = (e >> np.uint32(16)) & np.uint32(0x7FFF)
            o = np.uint8(e >> np.uint32(31))
            outlier[i] = o
            nout += o
        for j in range(65536):  # largest error and q of the patterns in use
            if used[j] and not pk[j] >> np.uint32(31):
                maxerr = max(maxerr, te[j])
                qhi = max(qhi, np.int64((pk[j] >> np.uint32(16)) & np.uint32(0x7FFF)))
    else:
        err = np.empty(n, np.float64)
        _quant_f16(u, step, inv_step, qmax, bound, t, rec, outlier, err)
        for i in range(n):
            if outlier[i]:
                nout += 1
            else:
                if err[i] > maxerr:
                    maxerr = err[i]
                if t[i] > qhi:
                    qhi = t[i]
    qbits = 0
    while (np.int64(1) << qbits) <= qhi:
        qbits += 1
    return qbits, maxerr, nout


@njit(**_JIT)
def f16_lut(qbits, step):
    """float16 bits of every t = sign << qbits | q (q*step -> float32 -> float16, as
    encoded); empty for qbits < 0."""
    if qbits < 0:
        return np.empty(0, np.uint16)
    s32 = np.empty(1, np.float32)
    s32u = s32.view(np.uint32)
    qmask = (np.int64(1) << qbits) - 1
    lut = np.empty(np.int64(2) << qbits, np.uint16)
    for v in range(lut.shape[0]):
        r = np.float64(v & qmask) * step
        if (v >> qbits) & 1:
            r = -r
        lut[v] = f64_to_f16(r, s32, s32u)
    return lut


@njit(**_JIT)
def elf_unplanes2_f16(p0, p1, lut, out):
    """elf_unplanes_f16 for two complete planes (the native bound: qbits 10), straight
    from the decoded streams: one table lookup per value (``lut`` from f16_lut; its
    length, a power of two, masks t)."""
    tmask = np.uint64(lut.shape[0] - 1)
    for i in range(out.shape[0]):
        out[i] = lut[((np.uint64(p0[i]) << np.uint64(8)) | np.uint64(p1[i])) & tmask]


@njit(**_JIT)
def elf_unplanes_f16(planes, have, nplanes, qbits, step, out):
    """elf_unplanes writing float16 bits (q*step -> float32 -> float16, as encoded);
    through a table of every sign+q when qbits is small (always for the native bound)."""
    n = out.shape[0]
    missing_bits = 8 * (nplanes - have)
    mid = np.uint64(0)
    if missing_bits > 0:
        mid = np.uint64(1) << np.uint64(missing_bits - 1)
    qmask = (np.uint64(1) << np.uint64(qbits)) - np.uint64(1)
    s32 = np.empty(1, np.float32)
    s32u = s32.view(np.uint32)
    use_lut = qbits <= 16 and n >= (np.int64(4) << qbits)
    lut = f16_lut(qbits if use_lut else -1, step)
    tmask = (np.uint64(2) << np.uint64(qbits)) - np.uint64(1)
    for i in range(n):
        v = np.uint64(0)
        for j in range(have):
            v |= np.uint64(planes[j, i]) << np.uint64(8 * (nplanes - 1 - j))
        if missing_bits > 0:
            v |= mid
        if use_lut:
            out[i] = lut[v & tmask]
            continue
        q = v & qmask
        r = np.float64(q) * step
        if (v >> np.uint64(qbits)) & np.uint64(1):
            r = -r
        out[i] = f64_to_f16(r, s32, s32u)


# ---- byte planes of 2- and 4-byte elements (one pass, no stacking) ----------------------
@njit(**_JIT)
def split_u16(w, out):
    for i in range(w.shape[0]):
        x = w[i]
        out[0, i] = x >> 8
        out[1, i] = x & 0xFF


@njit(**_JIT)
def merge_u16(p0, p1, out):
    """Inverse of split_u16; an empty p1 (reduced fidelity) reads as 0x80."""
    if p1.shape[0] == 0:
        for i in range(out.shape[0]):
            out[i] = (np.uint16(p0[i]) << 8) | np.uint16(0x80)
    else:
        for i in range(out.shape[0]):
            out[i] = (np.uint16(p0[i]) << 8) | np.uint16(p1[i])


@njit(**_JIT)
def split_u32(w, out):
    for i in range(w.shape[0]):
        x = w[i]
        out[0, i] = x >> 24
        out[1, i] = (x >> 16) & 0xFF
        out[2, i] = (x >> 8) & 0xFF
        out[3, i] = x & 0xFF


@njit(**_JIT)
def merge_u32(p0, p1, p2, p3, out):
    for i in range(out.shape[0]):
        out[i] = ((np.uint32(p0[i]) << 24) | (np.uint32(p1[i]) << 16) | (np.uint32(p2[i]) << 8)
                  | np.uint32(p3[i]))


@njit(**_JIT)
def merge_unsub_u32(p0, p1, p2, p3, ref, out):
    """out[i] = ref[i] + unzigzag(the u32 whose bytes, high to low, are p0..p3[i]),
    wrapping: the sub transform's decode in one pass over its planes (no merged array
    and no numpy temporaries)."""
    for i in range(out.shape[0]):
        z = ((np.uint32(p0[i]) << 24) | (np.uint32(p1[i]) << 16) | (np.uint32(p2[i]) << 8)
             | np.uint32(p3[i]))
        out[i] = ref[i] + ((z >> np.uint32(1)) ^ (np.uint32(0) - (z & np.uint32(1))))


@njit(**_JIT)
def merge_unsub_u16(p0, p1, ref, out):
    """merge_unsub_u32 for 2-byte elements."""
    for i in range(out.shape[0]):
        z = (np.uint16(p0[i]) << np.uint16(8)) | np.uint16(p1[i])
        out[i] = ref[i] + ((z >> np.uint16(1)) ^ (np.uint16(0) - (z & np.uint16(1))))


@njit(**_JIT)
def elf_unplanes3(p0, p1, p2, qbits, step, out):
    """elf_unplanes for the common case of three complete planes (F32), straight from
    the decoded streams."""
    qmask = (np.uint32(1) << np.uint32(qbits)) - np.uint32(1)
    sb = np.uint32(qbits)
    for i in range(out.shape[0]):
        v = (np.uint32(p0[i]) << 16) | (np.uint32(p1[i]) << 8) | np.uint32(p2[i])
        r = np.float64(v & qmask) * step
        if (v >> sb) & np.uint32(1):
            r = -r
        out[i] = r



@njit(**_JIT)
def elf_unplanes2(p0, p1, qbits, step, out):
    """elf_unplanes for two complete planes (F32/F64 at bounds around 1e-4), straight
    from the decoded streams."""
    qmask = (np.uint32(1) << np.uint32(qbits)) - np.uint32(1)
    sb = np.uint32(qbits)
    for i in range(out.shape[0]):
        v = (np.uint32(p0[i]) << np.uint32(8)) | np.uint32(p1[i])
        r = np.float64(v & qmask) * step
        if (v >> sb) & np.uint32(1):
            r = -r
        out[i] = r


# ---- statistics -------------------------------------------------------------------
@njit(**_JIT)
def equal_neighbours(a):
    """How many a[i] == a[i - 1]: runs show up as more than the order-0 rate sum(p^2)."""
    c = 0
    for i in range(1, a.shape[0]):
        c += a[i] == a[i - 1]
    return c


# ---- context classes of a delta (by the reference's exponent) -----------------------
@njit(**_JIT)
def ref_classes(ref, shift, emask, lut, cls, counts):
    """cls[i] = lut[exponent field of ref[i]]; counts[c] = how many of class c."""
    for c in range(counts.shape[0]):
        counts[c] = 0
    for i in range(ref.shape[0]):
        c = lut[(ref[i] >> shift) & emask]
        cls[i] = c
        counts[c] += 1


@njit(**_JIT)
def class_starts(counts):
    """Where each class begins in the grouped order (exclusive prefix sum of counts)."""
    pos = np.zeros(counts.shape[0], np.int64)
    for c in range(1, counts.shape[0]):
        pos[c] = pos[c - 1] + counts[c - 1]
    return pos


@njit(**_JIT)
def group_by_class(vals, cls, counts, out):
    """Stable counting sort of vals by class: class 0's values first, in order."""
    pos = class_starts(counts)
    for i in range(vals.shape[0]):
        c = cls[i]
        out[pos[c]] = vals[i]
        pos[c] += 1


@njit(**_JIT)
def ungroup_by_class(grouped, cls, counts, out):
    """Inverse of group_by_class."""
    pos = class_starts(counts)
    for i in range(out.shape[0]):
        c = cls[i]
        out[i] = grouped[pos[c]]
        pos[c] += 1


@njit(**_JIT)
def bucket_counts(higher, nb, counts):
    """counts[b] = how many min(higher[i], nb - 1) == b (from the four-counter
    histogram: a single counter array serialises on runs of one bucket)."""
    h = histogram(higher)
    for b in range(nb):
        counts[b] = 0
    for v in range(256):
        counts[min(v, nb - 1)] += h[v]


@njit(inline="always")
def _slots4(higher, i, top, pos):
    """Buckets of elements i..i+3 and their positions: pos read once per bucket and
    adjusted for earlier elements of the same bucket (runs of one bucket would
    otherwise wait on a store to pos for every element)."""
    b0 = min(np.int64(higher[i]), top)
    b1 = min(np.int64(higher[i + 1]), top)
    b2 = min(np.int64(higher[i + 2]), top)
    b3 = min(np.int64(higher[i + 3]), top)
    q0 = pos[b0]
    q1 = pos[b1] + (b1 == b0)
    q2 = pos[b2] + (b2 == b0) + (b2 == b1)
    q3 = pos[b3] + (b3 == b0) + (b3 == b1) + (b3 == b2)
    pos[b0] = q0 + 1
    pos[b1] = q1 + 1
    pos[b2] = q2 + 1
    pos[b3] = q3 + 1
    return b0, b1, b2, b3, q0, q1, q2, q3


@njit(**_JIT)
def group_by_bucket(vals, higher, counts, out):
    """group_by_class with class min(higher[i], len(counts) - 1), computed on the fly."""
    nb = counts.shape[0]
    pos = np.zeros(nb, np.int64)
    for b in range(1, nb):
        pos[b] = pos[b - 1] + counts[b - 1]
    top = nb - 1
    n = vals.shape[0]
    m = n - n % 4
    for i in range(0, m, 4):
        _, _, _, _, q0, q1, q2, q3 = _slots4(higher, i, top, pos)
        out[q0] = vals[i]
        out[q1] = vals[i + 1]
        out[q2] = vals[i + 2]
        out[q3] = vals[i + 3]
    for i in range(m, n):
        b = min(np.int64(higher[i]), top)
        out[pos[b]] = vals[i]
        pos[b] += 1


@njit(**_JIT)
def _group_cursors(counts):
    """(start, end) of each group in a grouped array, as unsigned read cursors."""
    n = counts.shape[0]
    pos = np.zeros(n, np.uint64)
    end = np.zeros(n, np.uint64)
    end[0] = counts[0]
    for b in range(1, n):
        pos[b] = end[b - 1]
        end[b] = pos[b] + np.uint64(counts[b])
    return pos, end


@njit(**_JIT)
def ungroup_by_bucket(grouped, higher, counts, out):
    """Inverse of group_by_bucket. ``counts`` come from the frame (the bucket streams'
    lengths), not from ``higher``: returns False, having read nothing out of bounds,
    when they disagree (a corrupt frame). Unsigned cursors, one element at a time:
    numba adds no negative-index fix-ups, and on this CPU it beats _slots4 (~10 %)."""
    nb = counts.shape[0]
    pos, end = _group_cursors(counts)
    if end[nb - 1] != grouped.shape[0]:
        return False
    top = np.uint64(nb - 1)
    one = np.uint64(1)
    for i in range(out.shape[0]):
        b = min(np.uint64(higher[i]), top)
        p = pos[b]
        if p >= end[b]:
            return False
        out[i] = grouped[p]
        pos[b] = p + one
    return True


@njit(**_JIT)
def unsub_gather(g, ref, shift, emask, lut, counts, out):
    """out[i] = ref[i] + unzigzag(the next value of element i's class in the
    class-grouped g), wrapping; the class is lut[exponent field of ref[i]], computed
    here (no class array). ``counts`` come from the frame's stream lengths: returns
    False when a class size is wrong (corrupt frame or wrong reference). No check per
    element: g holds 2n values (the values, then slack the caller never fills), so a
    class that overruns by up to n stays in bounds; each class's end position is
    checked once at the end. Unsigned indices: numba adds no negative-index fix-ups."""
    n = out.shape[0]
    ncls = counts.shape[0]
    pos, end = _group_cursors(counts)
    if end[ncls - 1] != n or g.shape[0] < 2 * n:
        return False
    one = np.uint64(1)
    sh = np.uint64(shift)
    em = np.uint64(emask)
    for i in range(n):
        r = np.uint64(ref[i])
        c = np.uint64(lut[(r >> sh) & em])
        p = pos[c]  # < start of class c + i <= 2n - 1
        z = np.uint64(g[p])
        pos[c] = p + one
        out[i] = r + ((z >> one) ^ (np.uint64(0) - (z & one)))
    for c in range(ncls):
        if pos[c] != end[c]:
            return False
    return True


@njit(**_JIT)
def joint_hist(higher, vals, nb):
    """(nb, 256) histogram of vals by bucket min(higher, nb - 1)."""
    h = np.zeros((nb, 256), np.int64)
    top = nb - 1
    for i in range(vals.shape[0]):
        h[min(np.int64(higher[i]), top), vals[i]] += 1
    return h



# ---- sub+ctx encode: one pass from (data, reference) to coded-ready planes ---------
@njit(**_JIT)
def exponent_hist(ref, shift, emask):
    """Histogram of the exponent field of ``ref`` (four counters: exponents repeat, a
    single counter array would serialise on them)."""
    h = np.zeros((4, emask + 1), np.int64)
    sh = np.uint64(shift)
    em = np.uint64(emask)
    n = ref.shape[0]
    m = n - n % 4
    for i in range(0, m, 4):
        h[0, (np.uint64(ref[i]) >> sh) & em] += 1
        h[1, (np.uint64(ref[i + 1]) >> sh) & em] += 1
        h[2, (np.uint64(ref[i + 2]) >> sh) & em] += 1
        h[3, (np.uint64(ref[i + 3]) >> sh) & em] += 1
    for i in range(m, n):
        h[0, (np.uint64(ref[i]) >> sh) & em] += 1
    return h[0] + h[1] + h[2] + h[3]


@njit(inline="always")
def _zigzag_delta(x, r, mask, sign):
    """zigzag((x - r) mod 2^bits) for unsigned x, r (bits: popcount(mask))."""
    d = (np.uint64(x) - np.uint64(r)) & mask
    return ((d << np.uint64(1)) & mask) ^ ((np.uint64(0) - (d >> sign)) & mask)


#: ctx_group4's histogram rows: (class, plane * 4 + bucket, byte) int32 or int64, 256
#: counters padded to 264 (rows 4 KiB apart alias in the store buffer: ~60 % slower)
HIST_ROW = 264
HIST_CLASS = 16 * HIST_ROW
#: row offset of bucket min(byte, 3), per value of the higher byte
_BUCKET_ROW = (np.minimum(np.arange(256), 3) * HIST_ROW).astype(np.uint32)


@njit(**_JIT)
def ctx_group4(data, ref, lut, counts, g, hist):
    """ctx_split for F32 and 4 buckets, except that the class-grouped values go to
    ``g`` (uint32) whole: one store instead of four scattered byte stores;
    planes_by_bucket4 then makes the planes in a sequential pass (~15 % faster than
    scattering bytes). ``hist``: the flat (NCLASSES, 16, HIST_ROW) histogram array.
    The exponent field and the row strides are constants, and a bucket's row comes
    from a table (not min/multiply): ~35 % fewer instructions per element, ~35 %
    faster. 32-bit arithmetic, unsigned indices."""
    pos = class_starts(counts).astype(np.uint64)
    bk = _BUCKET_ROW
    one = np.uint32(1)
    ff = np.uint32(0xFF)
    for i in range(data.shape[0]):
        r = ref[i]
        c = np.uint32(lut[(r >> np.uint32(23)) & ff])
        d = np.uint32(data[i] - r)
        z = np.uint32(np.uint32(d << one) ^ np.uint32(np.uint32(0) - (d >> np.uint32(31))))
        p = pos[c]
        pos[c] = p + np.uint64(1)
        g[p] = z
        b0 = z >> np.uint32(24)
        b1 = (z >> np.uint32(16)) & ff
        b2 = (z >> np.uint32(8)) & ff
        base = c * np.uint32(HIST_CLASS)
        hist[base + b0] += 1
        hist[base + np.uint32(4 * HIST_ROW) + bk[b0] + b1] += 1
        hist[base + np.uint32(8 * HIST_ROW) + bk[b1] + b2] += 1
        hist[base + np.uint32(12 * HIST_ROW) + bk[b2] + (z & ff)] += 1


@njit(**_JIT)
def ctx_split(data, ref, shift, emask, lut, counts, planes, hist):
    """The encoder's side of unsub_gather in one pass: z = zigzag(data - ref) (wrapping),
    its bytes (most significant first) into the class-grouped byte planes (class
    lut[exponent field of ref]; stable, group_by_class's order), and
    hist[c, j * nb + b, byte] += 1 per plane j, where b = min(the element's next
    higher byte, nb - 1) (0 on the top plane): the streams' histograms without
    passes over the planes. Pad hist's rows (264, not 256 counters): rows 4 KiB apart
    alias in the store buffer and cost ~60 %."""
    size = planes.shape[0]
    nb = np.uint64(hist.shape[1] // size)
    top = nb - np.uint64(1)
    pos = class_starts(counts).astype(np.uint64)
    sh = np.uint64(shift)
    em = np.uint64(emask)
    sign = np.uint64(8 * size - 1)
    mask = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(64 - 8 * size)
    for i in range(data.shape[0]):
        r = np.uint64(ref[i])
        c = np.uint64(lut[(r >> sh) & em])
        z = _zigzag_delta(data[i], r, mask, sign)
        p = pos[c]
        pos[c] = p + np.uint64(1)
        prev = np.uint64(0)
        for j in range(size):
            v = (z >> np.uint64(8 * (size - 1 - j))) & np.uint64(0xFF)
            planes[j, p] = v
            hist[c, np.uint64(j) * nb + min(prev, top), v] += 1
            prev = v


@njit(**_JIT)
def buckets_pay(jh, min_n):
    """xor._buckets_pay's rule on a (nb, 256) histogram by bucket, in one call (the same
    float operations in the same order, so the same decisions): splitting must save,
    by the parts' order-0 entropy, more than 1 % plus 150 bytes per extra stream."""
    nb = jh.shape[0]
    whole = np.zeros(256, np.int64)
    for b in range(nb):
        for v in range(256):
            whole[v] += jh[b, v]
    n = whole.sum()
    if n < min_n:
        return False
    one = np.float64(n) * entropy_bits(whole)
    parts = 0.0
    for b in range(nb):
        parts += np.float64(jh[b].sum()) * entropy_bits(jh[b])
    return (one - parts) / 8 > 0.01 * np.float64(n) + np.float64(150 * (nb - 1))


@njit(**_JIT)
def planes_by_bucket4(g, off, split, starts, out):
    """Byte planes (most significant first) of the class-grouped uint32 values ``g``
    (class c at off[c]:off[c + 1]); plane j of class c in bucket order where
    split[c, j] (bucket: min(the element's byte j - 1, 3), stable: group_by_bucket's
    order; bucket b from starts[c, j, b]), in element order elsewhere. One pass for
    split_u32 and every group_by_bucket; unsigned cursors (no negative-index fix-ups)."""
    ff = np.uint32(0xFF)
    three = np.uint32(3)
    one = np.uint64(1)
    cur = np.empty((4, 4), np.uint64)
    for c in range(off.shape[0] - 1):
        for j in range(4):
            for b in range(4):
                cur[j, b] = starts[c, j, b]
        s1 = split[c, 1] != 0
        s2 = split[c, 2] != 0
        s3 = split[c, 3] != 0
        if not (s1 or s2 or s3):  # split_u32 on the class (its own loop is ~15x faster)
            split_u32(g[off[c]:off[c + 1]], out[:, off[c]:off[c + 1]])
            continue
        for i in range(np.uint64(off[c]), np.uint64(off[c + 1])):
            z = g[i]
            b0 = z >> np.uint32(24)
            b1 = (z >> np.uint32(16)) & ff
            b2 = (z >> np.uint32(8)) & ff
            b3 = z & ff
            out[0, i] = b0
            if s1:
                k = min(b0, three)
                p = cur[1, k]
                out[1, p] = b1
                cur[1, k] = p + one
            else:
                out[1, i] = b1
            if s2:
                k = min(b1, three)
                p = cur[2, k]
                out[2, p] = b2
                cur[2, k] = p + one
            else:
                out[2, i] = b2
            if s3:
                k = min(b2, three)
                p = cur[3, k]
                out[3, p] = b3
                cur[3, k] = p + one
            else:
                out[3, i] = b3


# ---- selector: order-0 estimate of xor (sub) against planes on a sample ----------
@njit(**_JIT)
def sub_vs_raw_bits(x, r, bits):
    """(entropy bits of the byte planes of zigzag(x - r), of the byte planes of x):
    order-0 sizes of the reference delta and of the data itself, one pass, for
    unsigned element arrays ``x``, ``r`` of ``bits``-bit elements."""
    size = bits // 8
    hz = np.zeros((size, 256), np.int64)
    hx = np.zeros((size, 256), np.int64)
    one = np.uint64(1)
    mask = np.uint64(0xFFFFFFFFFFFFFFFF) if bits == 64 else (one << np.uint64(bits)) - one
    top = np.uint64(bits - 1)
    for i in range(x.shape[0]):
        a = np.uint64(x[i])
        d = (a - np.uint64(r[i])) & mask
        z = ((d << one) & mask) ^ (mask if (d >> top) & one else np.uint64(0))
        for k in range(size):
            sh = np.uint64(8 * k)
            hz[k, (z >> sh) & np.uint64(255)] += 1
            hx[k, (a >> sh) & np.uint64(255)] += 1
    bz = 0.0
    bx = 0.0
    n = x.shape[0]
    for k in range(size):
        bz += entropy_bits(hz[k]) * n
        bx += entropy_bits(hx[k]) * n
    return bz, bx


@njit(**_JIT)
def sub_vs_raw_bits4(x, r):
    """sub_vs_raw_bits for uint32 elements (32-bit arithmetic: about twice as fast)."""
    hz = np.zeros((4, 256), np.int32)
    hx = np.zeros((4, 256), np.int32)
    m = np.uint32(255)
    for i in range(x.shape[0]):
        a = x[i]
        d = np.uint32(a - r[i])
        z = np.uint32(np.uint32(d << np.uint32(1)) ^ np.uint32(np.uint32(0) - (d >> np.uint32(31))))
        hz[0, z & m] += 1
        hz[1, (z >> np.uint32(8)) & m] += 1
        hz[2, (z >> np.uint32(16)) & m] += 1
        hz[3, (z >> np.uint32(24)) & m] += 1
        hx[0, a & m] += 1
        hx[1, (a >> np.uint32(8)) & m] += 1
        hx[2, (a >> np.uint32(16)) & m] += 1
        hx[3, (a >> np.uint32(24)) & m] += 1
    bz = 0.0
    bx = 0.0
    n = x.shape[0]
    for k in range(4):
        bz += entropy_bits(hz[k]) * n
        bx += entropy_bits(hx[k]) * n
    return bz, bx


@njit(**_JIT)
def buckets_pay_all(h, min_n):
    """split[j, c] = buckets_pay(h[j, c], min_n) for every lower plane j >= 1 and class c
    of a (size, classes, nb, 256) histogram (plane 0 is never split): one call."""
    split = np.zeros((h.shape[0], h.shape[1]), np.bool_)
    for j in range(1, h.shape[0]):
        for c in range(h.shape[1]):
            split[j, c] = buckets_pay(h[j, c], min_n)
    return split


@njit(**_JIT)
def bucket_starts(off, h, nbuckets):
    """starts[c, j, b] (uint64) of xor._bucket_starts for a (size, classes, nb, 256)
    histogram with nb > 1: off[c] plus the elements of the class's earlier buckets."""
    size = h.shape[0]
    nc = h.shape[1]
    nb = h.shape[2]
    starts = np.empty((nc, size, nbuckets), np.uint64)
    for c in range(nc):
        for j in range(size):
            s = np.int64(off[c])
            for b in range(nbuckets):
                starts[c, j, b] = np.uint64(s)
                if b < nb:
                    t = np.int64(0)
                    for v in range(h.shape[3]):
                        t += h[j, c, b, v]
                    s += t
    return starts


# ---- xor's scaled reference (T_SCALED) -------------------------------------------------

_F32_MIN_NORMAL = 2.0 ** -126
_F32_MAX = 3.4028234663852886e38


@njit(**_JIT)
def scale_ref4(bits, vals, scale, out_bits, out_vals):
    """out = float32(float64(ref) * scale) for every element that is a normal float32
    whose product is a normal float32; every other element (zero, subnormal, inf, NaN,
    a product out of range) is copied as it is. ``bits``/``vals`` and
    ``out_bits``/``out_vals`` are uint32 and float32 views of the same two arrays. No
    operand or result is ever subnormal, so flush-to-zero or denormals-are-zero modes
    (which a library built with -ffast-math may set in the process) cannot change the
    result: the encoder and the decoder always compute the same reference. Branchless
    (selects, so that it vectorizes), and no conversion ever sees a subnormal (1.0
    stands in where the value is discarded): subnormals cost a microcode assist each,
    ~5x the whole kernel on an Adam state where decayed moments get that small."""
    one32 = np.float32(1.0)
    for i in range(bits.shape[0]):
        b = bits[i]
        e = (b >> np.uint32(23)) & np.uint32(255)
        normal = (e != 0) & (e != 255)
        v = vals[i] if normal else one32
        p = np.float64(v) * scale
        a = abs(p)
        ok = normal & (a >= _F32_MIN_NORMAL) & (a <= _F32_MAX)
        f = np.float32(p if ok else 1.0)
        out_vals[i] = f if ok else vals[i]


@njit(**_JIT)
def sub_bit_lengths4(x, r):
    """Sum over elements of the bit length of zigzag(x - r) (uint32 bits, wrapping): a
    cheap proxy of the coded size of the sub transform's delta."""
    total = 0
    for i in range(x.shape[0]):
        d = np.uint32(x[i] - r[i])
        z = np.uint32(np.uint32(d << np.uint32(1)) ^ np.uint32(np.uint32(0) - (d >> np.uint32(31))))
        n = 0
        while z:
            z >>= np.uint32(1)
            n += 1
        total += n
    return total


# ---- xor's sub+blocks (T_SUB_BLOCKS): deltas grouped by their block's width ----------


@njit(**_JIT)
def block_widths(z, block, step):
    """Class of each block of ``block`` zigzag deltas: the bit length of its largest
    (that of the OR of all) divided by ``step``, rounded up (0: all zero)."""
    n = z.shape[0]
    nblk = (n + block - 1) // block
    w = np.empty(nblk, np.uint8)
    for b in range(nblk):
        m = np.uint32(0)
        for i in range(b * block, min(n, (b + 1) * block)):
            m |= np.uint32(z[i])
        bl = 0
        while m:
            m >>= np.uint32(1)
            bl += 1
        w[b] = (bl + step - 1) // step
    return w


@njit(**_JIT)
def group_blocks(z, w, block, pos, g):
    """g = the deltas class-major, blocks in order within a class (``pos``: each
    class's start, advanced)."""
    n = z.shape[0]
    for b in range(w.shape[0]):
        k = w[b]
        p = pos[k]
        s = b * block
        e = min(n, s + block)
        for i in range(s, e):
            g[p + i - s] = z[i]
        pos[k] = p + e - s


@njit(**_JIT)
def blocks_hist(z, w, block, size, ncls):
    """hist[class, byte j (0 = lowest), 256]: the byte histograms of the deltas of each
    block class (what sub+blocks codes; summed over classes: what plain sub codes)."""
    h = np.zeros((ncls, size, 256), np.int64)
    n = z.shape[0]
    for b in range(w.shape[0]):
        k = w[b]
        for i in range(b * block, min(n, (b + 1) * block)):
            v = np.uint32(z[i])
            for j in range(size):
                h[k, j, (v >> np.uint32(8 * j)) & np.uint32(255)] += 1
    return h


@njit(**_JIT)
def blocks_by_class(w, ncls):
    """(the block indices ordered by class, stable; each class's first position in it)."""
    counts = np.zeros(ncls + 1, np.int64)
    for b in range(w.shape[0]):
        counts[w[b] + 1] += 1
    for k in range(ncls):
        counts[k + 1] += counts[k]
    start = counts[:ncls].copy()
    order = np.empty(w.shape[0], np.int64)
    for b in range(w.shape[0]):
        k = w[b]
        order[start[k]] = b
        start[k] += 1
    return order, counts


@njit(**_JIT)
def _unzig(z):
    """The signed delta (wrapping uint32) of a zigzag-coded one."""
    return (z >> np.uint32(1)) ^ (np.uint32(0) - (z & np.uint32(1)))


@njit(**_JIT)
def unsub_block_class(blocks, block, p0, p1, p2, p3, k, out):
    """out += unzigzag(delta) over the blocks of one sub+blocks class (``blocks``: their
    indices, in order; ``out`` holds the reference), the deltas straight from the
    class's ``k`` >= 1 byte planes (most significant first; planes past k are not
    read). No grouped copy of the deltas: each plane is read once, in order. In place
    and with unsigned indices (numba adds no negative-index fix-ups to them), so the
    loops vectorize: ~10x faster than with signed indices or a separate reference
    array, which LLVM cannot prove apart from ``out``. uint32 arithmetic, stored
    (wrapping) as the element type."""
    n = np.uint64(out.shape[0])
    bs = np.uint64(block)
    q = np.uint64(0)
    for bi in range(blocks.shape[0]):
        s = np.uint64(blocks[bi]) * bs
        m = min(n, s + bs) - s
        if k == 1:
            for j in range(m):
                out[s + j] = np.uint32(out[s + j]) + _unzig(np.uint32(p0[q + j]))
        elif k == 2:
            for j in range(m):
                z = (np.uint32(p0[q + j]) << np.uint32(8)) | np.uint32(p1[q + j])
                out[s + j] = np.uint32(out[s + j]) + _unzig(z)
        elif k == 3:
            for j in range(m):
                z = (np.uint32(p0[q + j]) << np.uint32(16)) \
                    | (np.uint32(p1[q + j]) << np.uint32(8)) | np.uint32(p2[q + j])
                out[s + j] = np.uint32(out[s + j]) + _unzig(z)
        else:
            for j in range(m):
                z = (np.uint32(p0[q + j]) << np.uint32(24)) \
                    | (np.uint32(p1[q + j]) << np.uint32(16)) \
                    | (np.uint32(p2[q + j]) << np.uint32(8)) | np.uint32(p3[q + j])
                out[s + j] = np.uint32(out[s + j]) + _unzig(z)
        q += m


@njit(**_JIT)
def merge_add_u32(p0, p1, p2, p3, out):
    """merge_unsub_u32 in place: ``out`` holds the reference (a separate reference
    array that LLVM cannot prove apart from ``out`` keeps the loop scalar, ~5x slower)."""
    for i in range(np.uint64(out.shape[0])):
        z = ((np.uint32(p0[i]) << 24) | (np.uint32(p1[i]) << 16) | (np.uint32(p2[i]) << 8)
             | np.uint32(p3[i]))
        out[i] = out[i] + ((z >> np.uint32(1)) ^ (np.uint32(0) - (z & np.uint32(1))))



@njit(**_JIT)
def hist_bits_rows(h):
    """Order-0 coded bits of each row of a 2-d histogram (its count times its entropy)."""
    out = np.zeros(h.shape[0])
    for i in range(h.shape[0]):
        out[i] = entropy_bits(h[i]) * h[i].sum()
    return out


@njit(**_JIT)
def ratio_mode(x, r, key_shift):
    """(median of the commonest bin, its count) of data / reference over the elements
    where both are normal float32 (``x``, ``r``: uint32 bits), the ratios binned by
    their float32 bits >> key_shift; (1.0, 0) when there is none."""
    n = x.shape[0]
    q = np.empty(n)
    m = 0
    xf = x.view(np.float32)
    rf = r.view(np.float32)
    for i in range(n):
        ex = (x[i] >> np.uint32(23)) & np.uint32(255)
        er = (r[i] >> np.uint32(23)) & np.uint32(255)
        if ex != 0 and ex != 255 and er != 0 and er != 255:
            v = np.float64(xf[i]) / np.float64(rf[i])
            q[m] = v
            m += 1
    if m == 0:
        return 1.0, 0
    q = np.sort(q[:m])  # ascending: the float32 bits of each sign are monotonic, so
    keys = q.astype(np.float32).view(np.uint32) >> np.uint32(key_shift)  # bins are runs
    best, best_start, start = 0, 0, 0
    for i in range(1, m + 1):
        if i == m or keys[i] != keys[start]:
            if i - start > best:
                best, best_start = i - start, start
            start = i
    return q[best_start + best // 2], best


@njit(**_JIT)
def sub_zigzag(x, r, out, bits):
    """out = zigzag(x - r), wrapping at ``bits`` (16 or 32; uint16/uint32 elements):
    the sub transform in one pass (numpy's takes five, with temporaries)."""
    mask = np.uint32((1 << bits) - 1)
    top = np.uint32(bits - 1)
    for i in range(np.uint64(out.shape[0])):
        d = np.uint32(np.uint32(x[i]) - np.uint32(r[i])) & mask
        out[i] = (np.uint32(d << np.uint32(1)) ^ (np.uint32(0) - (d >> top))) & mask
