"""A small canonical Huffman coder for byte streams (numba kernels), used for the
low-entropy streams (float exponents, ELF's top plane) where zstd's LZ stage costs
ratio and speed. Stored form: 128 bytes of 4-bit code lengths (symbol 2i in the low
nibble), then the MSB-first bit stream. Code lengths are limited to MAXLEN bits."""
from __future__ import annotations


import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .errors import FrameError

MAXLEN = 12
_JIT = dict(cache=True, nogil=True)


def code_lengths(hist: np.ndarray, maxlen: int = MAXLEN) -> np.ndarray:
    """Huffman code lengths (uint8[256]) limited to ``maxlen`` bits: rare symbols' counts
    are raised to a growing floor until the longest code fits (close to package-merge)."""
    return _code_lengths(np.asarray(hist, np.int64), maxlen)


@njit(**_JIT)
def _stable_order(f, sym):
    """sym sorted by f[sym], ties in sym's order: argsort(kind="mergesort")'s result,
    by an LSD radix sort on f's bytes (no data-dependent branches: a comparison sort
    of ~100 symbols spends most of its time in branch mispredictions, ~4x slower)."""
    m = sym.shape[0]
    a = np.empty(m, np.int64)
    b = np.empty(m, np.int64)
    mx = np.int64(0)
    for k in range(m):
        a[k] = sym[k]
        mx = max(mx, np.int64(f[sym[k]]))
    cnt = np.empty(256, np.int64)
    shift = 0
    while shift < 64 and (mx >> shift) > 0:
        cnt[:] = 0
        for k in range(m):
            cnt[(np.int64(f[a[k]]) >> shift) & 255] += 1
        tot = 0
        for d in range(256):
            c = cnt[d]
            cnt[d] = tot
            tot += c
        for k in range(m):
            d = (np.int64(f[a[k]]) >> shift) & 255
            b[cnt[d]] = a[k]
            cnt[d] += 1
        a, b = b, a
        shift += 8
    return a


@njit(**_JIT)
def _huff_build(f, order, lens):
    """Code lengths into ``lens`` of the m >= 2 symbols ``order`` (sorted by f, ties
    by symbol), two-queue method."""
    m = order.shape[0]
    w = np.zeros(2 * m, np.int64)
    parent = np.zeros(2 * m, np.int64)
    for k in range(m):
        w[k] = f[order[k]]
    nxt = m  # next internal node
    i = 0  # next leaf
    j = m  # next internal node to consume
    for _ in range(m - 1):  # the two lightest nodes (no array per step: ~2x faster)
        if i < m and (j >= nxt or w[i] <= w[j]):
            a = i
            i += 1
        else:
            a = j
            j += 1
        if i < m and (j >= nxt or w[i] <= w[j]):
            b = i
            i += 1
        else:
            b = j
            j += 1
        w[nxt] = w[a] + w[b]
        parent[a] = nxt
        parent[b] = nxt
        nxt += 1
    depth = np.zeros(2 * m, np.int64)
    for k in range(nxt - 2, -1, -1):
        depth[k] = depth[parent[k]] + 1
    for k in range(m):
        lens[order[k]] = depth[k]


@njit(**_JIT)
def _code_lengths(f, maxlen):
    """Rare symbols' counts are raised to a growing floor until the longest code fits.
    The floored counts' order comes from f's in one pass (the floored symbols, all at
    the floor, first by symbol; then the others in f's order): one sort per call."""
    lens = np.zeros(f.shape[0], np.uint8)  # any alphabet size (codec.wide: up to 4096)
    sym = np.flatnonzero(f > 0)
    m = sym.shape[0]
    if m == 0:
        return lens
    if m == 1:
        lens[sym[0]] = 1
        return lens
    order = _stable_order(f, sym)
    _huff_build(f, order, lens)
    if lens.max() <= maxlen:
        return lens
    total = f.sum()
    floor = max(np.int64(1), total >> (maxlen + 1))
    g = f.copy()
    order2 = np.empty(m, np.int64)
    while True:
        for s in range(f.shape[0]):
            g[s] = max(f[s], floor) if f[s] > 0 else 0
        q = 0
        for k in range(m):
            if f[sym[k]] <= floor:
                order2[q] = sym[k]
                q += 1
        for k in range(m):
            if f[order[k]] > floor:
                order2[q] = order[k]
                q += 1
        lens[:] = 0
        _huff_build(g, order2, lens)
        if lens.max() <= maxlen:
            return lens
        floor += max(np.int64(1), floor >> 2)


def canonical(lens: np.ndarray) -> np.ndarray:
    return _canonical(np.asarray(lens, np.int64))


@njit(**_JIT)
def _canonical(lens):
    """Canonical codes: by (length, symbol), consecutive within a length."""
    codes = np.zeros(lens.shape[0], np.uint32)
    code = 0
    for ln in range(1, 33):
        for s in range(lens.shape[0]):
            if lens[s] == ln:
                codes[s] = code
                code += 1
        code <<= 1
    return codes


@njit(**_JIT)
def _encode(a, codes, lens, out):
    acc = np.uint64(0)
    nb = 0
    pos = 0
    for i in range(a.shape[0]):
        s = a[i]
        ln = lens[s]
        acc = (acc << np.uint64(ln)) | np.uint64(codes[s])
        nb += ln
        if nb >= 32:
            nb -= 32
            v = acc >> np.uint64(nb)
            out[pos] = (v >> np.uint64(24)) & np.uint64(0xFF)
            out[pos + 1] = (v >> np.uint64(16)) & np.uint64(0xFF)
            out[pos + 2] = (v >> np.uint64(8)) & np.uint64(0xFF)
            out[pos + 3] = v & np.uint64(0xFF)
            pos += 4
    while nb > 0:
        if nb >= 8:
            nb -= 8
            out[pos] = (acc >> np.uint64(nb)) & np.uint64(0xFF)
        else:
            out[pos] = (acc << np.uint64(8 - nb)) & np.uint64(0xFF)
            nb = 0
        pos += 1
    return pos


@njit(**_JIT)
def _decode(src, n, dsym, dlen, L, out):
    """Returns the number of bytes consumed (> len(src) means the stream was short)."""
    acc = np.uint64(0)
    nb = 0
    pos = 0
    nin = src.shape[0]
    mask = np.uint64((1 << L) - 1)
    for i in range(n):
        if nb < L:
            if pos + 4 <= nin:
                v = ((np.uint64(src[pos]) << np.uint64(24)) | (np.uint64(src[pos + 1]) << np.uint64(16))
                     | (np.uint64(src[pos + 2]) << np.uint64(8)) | np.uint64(src[pos + 3]))
            else:
                v = np.uint64(0)
                for k in range(4):
                    v <<= np.uint64(8)
                    if pos + k < nin:
                        v |= np.uint64(src[pos + k])
            acc = (acc << np.uint64(32)) | v
            pos += 4
            nb += 32
        peek = (acc >> np.uint64(nb - L)) & mask
        out[i] = dsym[peek]
        nb -= dlen[peek]
    return pos - nb // 8


def estimate(hist: np.ndarray) -> tuple[int, np.ndarray]:
    """(stored size in bytes, code lengths) for a stream with this histogram (v2 form)."""
    return estimate2(hist)


def estimate_v1(hist: np.ndarray) -> tuple[int, np.ndarray]:
    lens = code_lengths(hist)
    bits = int((hist.astype(np.int64) * lens).sum())
    return 128 + (bits + 7) // 8, lens


def encode_v1(a: np.ndarray, lens: np.ndarray) -> bytes:
    """The v1 form (one MSB-first stream; kept for tests of old frames)."""
    codes = canonical(lens)
    out = np.empty(128 + a.shape[0] * MAXLEN // 8 + 16, np.uint8)
    l2 = lens.astype(np.uint8)
    out[:128] = (l2[0::2] & 15) | ((l2[1::2] & 15) << 4)
    m = _encode(a, codes, lens.astype(np.int64), out[128:])
    return out[:128 + m]


# ---- v2: blocks of four interleaved bit streams, multi-symbol decode tables -------
# Stored form (v2), all u32 little-endian words (4-byte aligned within the stream):
#   word 0   bytes 0xFF (a low nibble of 15 is not a valid v1 code length, so v1
#            decoders reject it and v2 readers dispatch on it), 2 (version), L, 0
#   word 1   number of blocks B;  word 2  symbols per block S (the last takes the rest)
#   B words  each block's size in words
#   blocks:  bytes lo, hi, 0, 0 (the symbol range that has codes); the 4-bit code
#            lengths of symbols lo..hi (symbol lo+2i in the low nibble of byte i),
#            padded to a word; 4 words = the sub-streams' word counts; the four
#            sub-streams (each word holds 32 bits, first bit in its MSB).
# Sub-stream k of a block codes its symbols [k*q, min((k+1)*q, m)), q = ceil(m/4).
# Decoding runs the four sub-streams in one loop (independent dependency chains) with
# a 2^L-entry table that yields up to four symbols per lookup; all blocks are decoded
# in one numba call. Per-block tables follow the drift of exponent statistics along a
# tensor (256 Ki symbols per block, when that is smaller than one table).
MAXLEN2 = 12
V2_MARK = 0xFF


@njit(**_JIT)
def build_table(lens, codes, L):
    """Multi-symbol decode table: entry = up to 4 symbols (byte j = symbol j) | total
    bits << 32 | first symbol's bits << 40 | number of symbols << 48."""
    size = 1 << L
    ssym = np.zeros(size, np.int64)
    slen = np.zeros(size, np.int64)
    for s in range(256):
        ln = lens[s]
        if ln > 0:
            start = np.int64(codes[s]) << (L - ln)
            for j in range(start, start + (np.int64(1) << (L - ln))):
                ssym[j] = s
                slen[j] = ln
    tab = np.zeros(size, np.uint64)
    mask = size - 1
    for p in range(size):
        used = 0
        cnt = 0
        syms = np.uint64(0)
        first = slen[p]
        while cnt < 4:
            idx = (p << used) & mask
            ln = slen[idx]
            if ln == 0 or used + ln > L:
                break
            syms |= np.uint64(ssym[idx]) << np.uint64(8 * cnt)
            used += ln
            cnt += 1
        if cnt == 0:  # not a code word (one-symbol code): consume L bits, emit symbol 0
            used = L
            first = L
            cnt = 1
        tab[p] = syms | (np.uint64(used) << np.uint64(32)) | (np.uint64(first) << np.uint64(40)) \
            | (np.uint64(cnt) << np.uint64(48))
    return tab


@intrinsic
def _store_u32(typingctx, arr, idx, val):
    """arr[idx:idx+4] = val (little-endian u32), one unaligned store; arr is uint8."""
    sig = types.void(arr, idx, val)

    def codegen(context, builder, signature, args):
        a, i, v = args
        ary = context.make_array(signature.args[0])(context, builder, a)
        ptr = builder.gep(ary.data, [i])
        p32 = builder.bitcast(ptr, ir.IntType(32).as_pointer())
        builder.store(builder.trunc(v, ir.IntType(32)) if v.type.width > 32 else v, p32, align=1)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", **_JIT)
def _window3(words, bp):
    """64 valid bits starting at bit ``bp``: words[i..i+2] must exist."""
    i = bp >> 5
    s = np.uint64(bp & 31)
    w = (np.uint64(words[i]) << np.uint64(32)) | np.uint64(words[i + 1])
    return (w << s) | (np.uint64(words[i + 2]) >> (np.uint64(32) - s))


@njit(inline="always", **_JIT)
def _window_safe(words, bp, we):
    i = bp >> 5
    hi = np.uint64(words[i]) if i < we else np.uint64(0)
    lo = np.uint64(words[i + 1]) if i + 1 < we else np.uint64(0)
    return ((hi << np.uint64(32)) | lo) << np.uint64(bp & 31)


@njit(inline="always", **_JIT)
def _step(win, bp, o, out, tab, sh):
    """One lookup in build_table's table: up to four symbols out (one u32 store)."""
    e = tab[win >> sh]
    _store_u32(out, o, e)
    ln = np.int64((e >> np.uint64(32)) & np.uint64(0xFF))
    return win << np.uint64(ln), bp + ln, o + np.int64(e >> np.uint64(48))


@njit(inline="always", **_JIT)
def _step1(win, bp, o, out, tab, sh):
    """One lookup in build_table's table, its first symbol only (a sub-stream's end)."""
    e = tab[win >> sh]
    out[o] = e & np.uint64(0xFF)
    ln = np.int64((e >> np.uint64(40)) & np.uint64(0xFF))
    return win << np.uint64(ln), bp + ln, o + 1


@njit(inline="always", **_JIT)
def _step16(win, bp, o, out, tab, vals, sh):
    """One lookup in a single-symbol table (symbol | code length << 12, u16): one value
    out, the symbol (bytes: ``vals`` None) or vals[symbol] (codec.wide: the element)."""
    e = tab[win >> sh]
    if vals is None:  # (a compile-time branch: numba prunes it per signature)
        out[o] = np.uint8(e & np.uint16(0xFF))
    else:
        out[o] = vals[e & np.uint16(0xFFF)]
    ln = np.uint64(e >> np.uint16(12))
    return win << ln, bp + ln, o + np.uint64(1)


@njit(inline="always", **_JIT)
def _substreams(counts, n):
    """Word ends (w1..w4) and output ends (e0..e3) of a block's four sub-streams."""
    q = (n + 3) // 4
    w1 = counts[0]
    w2 = w1 + counts[1]
    w3 = w2 + counts[2]
    return (w1, w2, w3, w3 + counts[3]), (min(q, n), min(2 * q, n), min(3 * q, n), n)


@njit(inline="always", **_JIT)
def _tail(words, bp, we, o, e, out, tab, sh):
    """The rest of one sub-stream after the interleaved loop (build_table's table),
    reading no word past ``we``; 1 if it needed more bits than it holds."""
    while o + 4 <= e:
        x = _window_safe(words, bp, we)
        x, bp, o = _step(x, bp, o, out, tab, sh)
    while o < e:
        x = _window_safe(words, bp, we)
        x, bp, o = _step1(x, bp, o, out, tab, sh)
    return 1 if bp > 32 * we else 0


@njit(inline="always", **_JIT)
def _tail16(words, bp, we, o, e, out, tab, vals, sh):
    """_tail for a single-symbol table."""
    while o < e:
        x = _window_safe(words, np.int64(bp), we)
        x, bp, o = _step16(x, bp, o, out, tab, vals, sh)
    return 1 if bp > np.uint64(32 * we) else 0


@njit(**_JIT)
def _decode4(words, counts, n, tab, L, out):
    """Returns 0, or 1 if a sub-stream needed more bits than it holds. Bit positions are
    absolute in ``words``; each round reads a fresh 64-bit window per stream (no
    data-dependent branches) and does 4 lookups of <= 12 bits from it, each giving up
    to four symbols (build_table's table: for codes with short words)."""
    sh = np.uint64(64 - L)
    (w1, w2, w3, w4), (e0, e1, e2, e3) = _substreams(counts, n)
    o0, o1, o2, o3 = 0, e0, e1, e2
    b0, b1, b2, b3 = 0, 32 * w1, 32 * w2, 32 * w3
    while (o0 + 20 <= e0 and o1 + 20 <= e1 and o2 + 20 <= e2 and o3 + 20 <= e3
           and (b0 >> 5) + 2 < w1 and (b1 >> 5) + 2 < w2 and (b2 >> 5) + 2 < w3
           and (b3 >> 5) + 2 < w4):
        x0 = _window3(words, b0)
        x1 = _window3(words, b1)
        x2 = _window3(words, b2)
        x3 = _window3(words, b3)
        for _r in range(4):  # 4 lookups of <= 12 bits from each 64-bit window
            x0, b0, o0 = _step(x0, b0, o0, out, tab, sh)
            x1, b1, o1 = _step(x1, b1, o1, out, tab, sh)
            x2, b2, o2 = _step(x2, b2, o2, out, tab, sh)
            x3, b3, o3 = _step(x3, b3, o3, out, tab, sh)
    return (_tail(words, b0, w1, o0, e0, out, tab, sh) | _tail(words, b1, w2, o1, e1, out, tab, sh)
            | _tail(words, b2, w3, o2, e2, out, tab, sh) | _tail(words, b3, w4, o3, e3, out, tab, sh))


@njit(**_JIT)
def build_table1(lens, codes, L):
    """Single-symbol decode table: entry = symbol | code length << 12 (u16: 8 KiB at
    L = 12, a quarter of build_table's, so it stays in L1 next to the output; symbols
    up to 4095: codec.wide builds its tables here too)."""
    tab = np.zeros(1 << L, np.uint16)
    for s in range(lens.shape[0]):
        ln = lens[s]
        if ln > 0:
            start = np.int64(codes[s]) << (L - ln)
            for j in range(start, start + (np.int64(1) << (L - ln))):
                tab[j] = np.uint16(s | (ln << 12))
    return tab


@njit(**_JIT)
def _decode4s(words, counts, n, tab, L, vals, out):
    """_decode4 for codes without short words (one symbol per lookup) with
    build_table1's table, writing vals[symbol]: 5 lookups of <= 12 bits per 64-bit
    window, unsigned positions (no negative-index fix-ups). ~1.3x faster than _decode4
    there."""
    sh = np.uint64(64 - L)
    (w1, w2, w3, w4), (e0, e1, e2, e3) = _substreams(counts, n)
    u1, u2, u3, u4 = np.uint64(w1), np.uint64(w2), np.uint64(w3), np.uint64(w4)
    f0, f1, f2, f3 = np.uint64(e0), np.uint64(e1), np.uint64(e2), np.uint64(e3)
    o0, o1, o2, o3 = np.uint64(0), f0, f1, f2
    b0, b1, b2, b3 = np.uint64(0), np.uint64(32 * w1), np.uint64(32 * w2), np.uint64(32 * w3)
    five = np.uint64(5)
    two = np.uint64(2)
    while (o0 + five <= f0 and o1 + five <= f1 and o2 + five <= f2 and o3 + five <= f3
           and (b0 >> five) + two < u1 and (b1 >> five) + two < u2
           and (b2 >> five) + two < u3 and (b3 >> five) + two < u4):
        x0 = _window3(words, b0)
        x1 = _window3(words, b1)
        x2 = _window3(words, b2)
        x3 = _window3(words, b3)
        for _r in range(5):  # 5 lookups of <= 12 bits from each 64-bit window
            x0, b0, o0 = _step16(x0, b0, o0, out, tab, vals, sh)
            x1, b1, o1 = _step16(x1, b1, o1, out, tab, vals, sh)
            x2, b2, o2 = _step16(x2, b2, o2, out, tab, vals, sh)
            x3, b3, o3 = _step16(x3, b3, o3, out, tab, vals, sh)
    return (_tail16(words, b0, w1, o0, f0, out, tab, vals, sh)
            | _tail16(words, b1, w2, o1, f1, out, tab, vals, sh)
            | _tail16(words, b2, w3, o2, f2, out, tab, vals, sh)
            | _tail16(words, b3, w4, o3, f3, out, tab, vals, sh))


BLOCK = 1 << 18


def _lengths2(hist) -> np.ndarray:
    return code_lengths(hist, MAXLEN2)


@njit(**_JIT)
def _estimate2(hist, maxlen):
    lens = _code_lengths(hist, maxlen)
    bits = 0
    lo = 256
    hi = -1
    for s in range(256):
        if lens[s] > 0:
            bits += hist[s] * lens[s]
            lo = min(lo, s)
            hi = max(hi, s)
    table_words = 1 + (hi - lo + 1 + 7) // 8 + 4
    return 4 * (4 + table_words + (bits + 31) // 32 + 4), lens


def estimate2(hist: np.ndarray) -> tuple[int, np.ndarray]:
    """(stored size in bytes, code lengths) of a one-block v2 stream for this histogram."""
    est, lens = _estimate2(np.asarray(hist, np.int64), MAXLEN2)
    return int(est), lens


def plan_blocks(a: np.ndarray, hist: np.ndarray | None = None, bh=None):
    """(stored size, [code lengths per block], symbols per block): one table for the
    whole stream, or one per BLOCK symbols when that is smaller. ``bh``: the
    block_hist(a, BLOCK) when the caller has it."""
    n = a.shape[0]
    if n < 2 * BLOCK:
        est, lens = estimate2(histogram(a) if hist is None else hist)
        return est, [lens], n
    if bh is None:
        bh = block_hist(a, BLOCK)
    est, lens = estimate2(bh.sum(axis=0) if hist is None else hist)
    tot = 4 * (3 + bh.shape[0])
    ls = []
    for k in range(bh.shape[0]):
        e, ln = estimate2(bh[k])
        tot += e - 16
        ls.append(ln)
    if tot < est:
        return tot, ls, BLOCK
    return est, [lens], n


@njit(**_JIT)
def entropy_bits(h):
    n = 0
    for s in range(h.shape[0]):
        n += h[s]
    if n == 0:
        return 0.0
    e = 0.0
    for s in range(h.shape[0]):
        if h[s] > 0:
            p = h[s] / n
            e -= p * np.log2(p)
    return e


@njit(**_JIT)
def hist_stats(h):
    """(commonest byte (the first of equals, as argmax), its count, entropy_bits(h)) in
    one call: code_stream's questions of every histogram."""
    top = 0
    for s in range(1, h.shape[0]):
        if h[s] > h[top]:
            top = s
    return top, h[top], entropy_bits(h)


@njit(**_JIT)
def block_hist(a, bs):
    nb = (a.shape[0] + bs - 1) // bs
    h = np.zeros((nb, 256), np.int64)
    for k in range(nb):
        h[k] = histogram(a[k * bs:min(a.shape[0], (k + 1) * bs)])
    return h


@njit(**_JIT)
def histogram(a, nsym=256):
    """Histogram of the symbols 0..nsym-1 (bytes; codec.wide: up to 4096); four
    interleaved counters (repeated symbols, e.g. exponents, would otherwise serialise
    on one memory location)."""
    h = np.zeros((4, nsym), np.int32)
    n = a.shape[0]
    m = n - n % 4
    for i in range(0, m, 4):
        h[0, a[i]] += 1
        h[1, a[i + 1]] += 1
        h[2, a[i + 2]] += 1
        h[3, a[i + 3]] += 1
    for i in range(m, n):
        h[0, a[i]] += 1
    out = np.zeros(nsym, np.int64)
    for s in range(nsym):
        out[s] = np.int64(h[0, s]) + h[1, s] + h[2, s] + h[3, s]
    return out


def encode(a: np.ndarray, lens, block: int | None = None) -> np.ndarray:
    """The v2 stored form of ``a``: ``lens`` is one array of code lengths (from
    estimate()) or a list of them, one per ``block`` symbols (from plan_blocks())."""
    n = a.shape[0]
    if isinstance(lens, np.ndarray):
        lens, block = [lens], max(n, 1)
    nb = len(lens)
    L = np.empty((nb, 256), np.int64)
    for k, ln in enumerate(lens):
        ln = np.asarray(ln, np.int64)
        if ln.max() > MAXLEN2:
            ln = _lengths2(histogram(a[k * block:(k + 1) * block if k + 1 < nb else n]))
        L[k] = ln
    buf = np.empty(3 + nb + nb * (1 + 32 + 4 + 8) + n * MAXLEN2 // 32 + 1, np.uint32)
    m = _encode_blocks(a, L, block, buf)
    if m < 0:
        raise ValueError("huffman.encode: a block without code lengths")
    return buf.view(np.uint8)[:4 * m]


@njit(**_JIT)
def _encode_blocks(a, lens, block, buf):
    """encode()'s v2 stream into ``buf`` (u32 words, every one it uses written; one
    word of slack past the end): returns the number of words. One call for every
    block (no Python per block)."""
    n = a.shape[0]
    nb = lens.shape[0]
    b8 = buf.view(np.uint8)
    buf[0] = np.uint32(V2_MARK) | (np.uint32(2) << np.uint32(8)) | (np.uint32(MAXLEN2) << np.uint32(16))
    buf[1] = nb
    buf[2] = block
    pos = 3 + nb
    tab = np.empty(256, np.uint64)
    for k in range(nb):
        ln = lens[k]
        lo = 0
        while lo < 256 and ln[lo] == 0:
            lo += 1
        if lo == 256:
            return -1
        hi = 255
        while ln[hi] == 0:
            hi -= 1
        start = pos
        buf[pos] = np.uint32(lo) | (np.uint32(hi) << np.uint32(8))
        pos += 1
        nbytes = (hi - lo + 2) // 2  # 4-bit lengths of symbols lo..hi
        nw = (nbytes + 3) // 4
        for w in range(nw):
            buf[pos + w] = 0
        for t in range(nbytes):
            x = ln[lo + 2 * t] & 15
            if lo + 2 * t + 1 <= hi:
                x |= (ln[lo + 2 * t + 1] & 15) << 4
            b8[4 * (pos + t // 4) + t % 4] = x
        pos += nw
        codes = _canonical(ln)
        for s in range(256):
            tab[s] = (np.uint64(ln[s]) << np.uint64(32)) | np.uint64(codes[s])
        p0 = k * block
        p1 = (k + 1) * block if k + 1 < nb else n
        q = (p1 - p0 + 3) // 4
        wpos = pos + 4
        for j in range(4):  # the four sub-streams back to back after their counts
            lo_ = min(p0 + j * q, p1)
            hi_ = min(lo_ + q, p1)
            w0 = wpos
            wpos = _enc_part(a, lo_, hi_, tab, buf, wpos)
            buf[pos + j] = wpos - w0
        pos = wpos
        buf[3 + k] = pos - start
    return pos


@njit(**_JIT)
def _enc_part(a, lo, hi, tab, words, wpos):
    """Symbols a[lo:hi] as an MSB-first bit stream of u32 words from words[wpos], with
    tab[s] = length << 32 | code: two symbols per step (<= 24 bits on < 32 pending) and
    a branchless flush: words[wpos] is written on every step (garbage until the word
    fills; one word of slack), ~20 % faster than one symbol and a branch per step."""
    acc = np.uint64(0)
    nb = np.uint64(0)
    m = lo + (hi - lo) // 2 * 2
    M = np.uint64(0xFFFFFFFF)
    for i in range(lo, m, 2):
        e = tab[a[i]]
        f = tab[a[i + 1]]
        lf = f >> np.uint64(32)
        acc = (((acc << (e >> np.uint64(32))) | (e & M)) << lf) | (f & M)
        nb += (e >> np.uint64(32)) + lf
        full = nb >= np.uint64(32)
        nb2 = nb - np.uint64(32)
        words[wpos] = np.uint32((acc >> (nb2 if full else np.uint64(0))) & M)
        wpos += np.int64(full)
        nb = nb2 if full else nb
    for i in range(m, hi):
        e = tab[a[i]]
        acc = (acc << (e >> np.uint64(32))) | (e & M)
        nb += e >> np.uint64(32)
        if nb >= np.uint64(32):
            nb -= np.uint64(32)
            words[wpos] = np.uint32((acc >> nb) & M)
            wpos += 1
    if nb > 0:
        words[wpos] = np.uint32((acc << (np.uint64(32) - nb)) & M)
        wpos += 1
    return wpos


@njit(**_JIT)
def _decode_blocks(w, n, L, out):
    """Decode every block of a v2 stream (w: its u32 words). Returns 0 or an error code:
    1 bad block table, 2 bad code lengths, 3 truncated sub-stream."""
    nw = w.shape[0]
    nb = np.int64(w[1])
    bs = np.int64(w[2])
    if nb < 1 or 3 + nb > nw or (n > 0 and (bs < 1 or (nb - 1) * bs >= n or nb * bs < n)):
        return 1
    pos = 3 + nb
    lens = np.zeros(256, np.int64)
    codes = np.zeros(256, np.uint32)
    for k in range(nb):
        size = np.int64(w[3 + k])
        if size < 5 or pos + size > nw:
            return 1
        m = bs if k + 1 < nb else n - k * bs
        lo = np.int64(w[pos] & np.uint32(0xFF))
        hi = np.int64((w[pos] >> np.uint32(8)) & np.uint32(0xFF))
        if hi < lo:
            return 2
        nlw = (hi - lo + 1 + 7) // 8
        if 1 + nlw + 4 > size:
            return 1
        lens[:] = 0
        for s in range(lo, hi + 1):
            j = s - lo
            word = w[pos + 1 + j // 8]
            lens[s] = np.int64((word >> np.uint32(4 * (j % 8))) & np.uint32(15))
        # complete prefix code (or a lone symbol of length 1), lengths <= L
        kraft = 0
        nsym = 0
        mx = 0
        avg = 0.0
        short = False
        for s in range(256):
            ln = lens[s]
            if ln > 0:
                if ln > L:
                    return 2
                kraft += np.int64(1) << (L - ln)
                nsym += 1
                mx = max(mx, ln)
                avg += ln * 2.0 ** -ln
                if ln <= 5:
                    short = True
        if not (kraft == (np.int64(1) << L) or (nsym == 1 and kraft == (np.int64(1) << (L - 1)))):
            return 2
        code = 0
        for ln in range(1, L + 1):
            for s in range(256):
                if lens[s] == ln:
                    codes[s] = code
                    code += 1
            code <<= 1
        cw = w[pos + 1 + nlw:pos + 1 + nlw + 4]
        tw = np.int64(cw[0]) + np.int64(cw[1]) + np.int64(cw[2]) + np.int64(cw[3])
        if 1 + nlw + 4 + tw != size:
            return 1
        body = w[pos + 5 + nlw:pos + size]
        if short and avg < 7.0 and m >= 4 << L:  # several symbols per lookup pay (and
            # the bigger table they need: not on a few hundred symbols)
            bad = _decode4(body, cw.astype(np.int64), m, build_table(lens, codes, L), L,
                           out[k * bs:k * bs + m])
        else:
            bad = _decode4s(body, cw.astype(np.int64), m, build_table1(lens, codes, L), L,
                            None, out[k * bs:k * bs + m])
        if bad:
            return 3
        pos += size
    if pos != nw:
        return 1
    return 0


def _decode_v2(b: np.ndarray, n: int, out=None) -> np.ndarray:
    if b.shape[0] < 12 or b.shape[0] % 4 or b[1] != 2 or not 1 <= b[2] <= MAXLEN2:
        raise FrameError("huffman stream: bad v2 header")
    words = b.view("<u4") if b.ctypes.data % 4 == 0 else b.copy().view("<u4")
    if out is None:
        out = np.empty(n, np.uint8)
    err = _decode_blocks(words, n, int(b[2]), out)
    if err:
        raise FrameError(("huffman stream: bad block table", "huffman stream: bad code lengths",
                          "huffman stream truncated")[err - 1])
    return out


def decode(stored, n: int, out=None) -> np.ndarray:
    b = np.frombuffer(stored, np.uint8)
    if b.shape[0] >= 1 and b[0] == V2_MARK:
        return _decode_v2(b, n, out)
    return _decode_v1(b, n)


def _decode_v1(b, n: int) -> np.ndarray:
    if b.shape[0] < 128:
        raise FrameError("huffman stream truncated")
    lens = np.empty(256, np.int64)
    lens[0::2] = b[:128] & 15
    lens[1::2] = b[:128] >> 4
    if lens.max() > MAXLEN or lens.max() == 0:
        raise FrameError("huffman stream: bad code lengths")
    kraft = int((np.int64(1) << (MAXLEN - lens[lens > 0])).sum())
    nsym = int((lens > 0).sum())
    if kraft != (1 << MAXLEN) and not (nsym == 1 and kraft == 1 << (MAXLEN - 1)):
        raise FrameError("huffman stream: code lengths are not a complete prefix code")
    codes = canonical(lens)
    L = MAXLEN
    dsym = np.zeros(1 << L, np.uint8)
    dlen = np.full(1 << L, L, np.int64)
    for s in np.flatnonzero(lens):
        ln = int(lens[s])
        start = int(codes[s]) << (L - ln)
        dsym[start:start + (1 << (L - ln))] = s
        dlen[start:start + (1 << (L - ln))] = ln
    out = np.empty(n, np.uint8)
    used = _decode(b[128:], n, dsym, dlen, L, out)
    if used > b.shape[0] - 128:
        raise FrameError("huffman stream truncated")
    return out
