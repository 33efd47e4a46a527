"""Canonical Huffman coding of one wide symbol per element (an alphabet of up to 4096),
decoded straight into element values through a table.

Why: ELF's narrow grids (fp16 at its native bound: sign + 10 bits) split into byte
planes lose up to half a bit per element: the top plane holds the sign and two rare
magnitude bits, whose entropy (~1 bit) Huffman cannot reach with whole-bit codes of
three or four common symbols (1.5 bits). One symbol per element (sign and magnitude
together) codes within ~1.5 % of the joint entropy (1.1 % of it is the 12-bit code
limit; MiniLM fp16), and decodes with one table lookup per element that yields the
finished value (no planes to merge).

Stored form (little-endian u32 words; the element count comes from the caller)::

    w[0]        alphabet size A (symbols 0..A-1, 1 <= A <= 4096) | table bits L << 16
    w[1..4]     word counts of the four sub-streams
    then        ceil(A / 8) words of 4-bit code lengths, symbol s in bits 4*(s % 8) of
                word s // 8 (0 = unused)
    then        the four sub-streams back to back: MSB-first bit streams of the
                canonical codes (lengths <= L = 12) of elements [kq, (k+1)q), q = ceil(n/4)

The decoder is the byte streams' single-symbol loop (huffman._decode4s: the four
sub-streams in one loop, five lookups of <= 12 bits per 64-bit window) writing
values[symbol], and checks everything it reads: a complete prefix code, the word
counts, no sub-stream reading past its end.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .errors import FrameError
from .huffman import _canonical, _code_lengths, _decode4s, _enc_part, build_table1, histogram

MAXBITS = 12  # symbols of up to 12 bits; codes of up to L = 12 bits
L = 12
_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def _size(h, lens):
    """Stored bytes of a stream with these counts and code lengths, at most 16 over (each
    sub-stream's last word is counted whole, and as if each had one)."""
    bits = 0
    for s in range(h.shape[0]):
        bits += h[s] * lens[s]
    return 4 * (5 + (h.shape[0] + 7) // 8 + (bits + 31) // 32 + 4)


def plan(sym: np.ndarray, a: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(stored size (_size: at most 16 bytes over), code lengths, histogram) of ``sym``
    (values < a)."""
    h = histogram(sym, a)  # (huffman's, over a symbols)
    used = np.flatnonzero(h)
    a = int(used[-1]) + 1 if used.size else 1
    h = np.ascontiguousarray(h[:a])
    if used.size <= 1:  # one symbol: give it a 1-bit code (a complete code needs two)
        lens = np.zeros(max(a, 2), np.uint8)
        lens[0 if a == 1 else a - 1] = 1
        lens[1 if a == 1 else 0] = 1
        h = np.concatenate([h, np.zeros(lens.shape[0] - a, np.int64)])
    else:
        lens = _code_lengths(h, L)
    return int(_size(h, lens)), lens, h


def encode(sym: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The stored form of ``sym`` (uint16, values < len(lens)) with code lengths from
    plan()."""
    a = lens.shape[0]
    n = sym.shape[0]
    buf = np.empty(5 + (a + 7) // 8 + n * L // 32 + 12, np.uint32)  # + partial and slack words
    m = _encode(sym, lens.astype(np.int64), buf)
    return buf.view(np.uint8)[:4 * m]


@njit(**_JIT)
def _encode(sym, lens, buf):
    a = lens.shape[0]
    buf[0] = np.uint32(a) | (np.uint32(L) << np.uint32(16))
    pos = 5
    nw = (a + 7) // 8
    for w in range(nw):
        buf[pos + w] = 0
    for s in range(a):
        buf[pos + s // 8] |= np.uint32(lens[s] & 15) << np.uint32(4 * (s % 8))
    pos += nw
    codes = _canonical(lens)
    tab = np.empty(a, np.uint64)
    for s in range(a):
        tab[s] = (np.uint64(lens[s]) << np.uint64(32)) | np.uint64(codes[s])
    n = sym.shape[0]
    q = (n + 3) // 4
    for j in range(4):
        lo = min(j * q, n)
        hi = min(lo + q, n)
        w0 = pos
        pos = _enc_part(sym, lo, hi, tab, buf, pos)
        buf[1 + j] = pos - w0
    return pos


def decode(stored, vlut: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Decode ``stored`` into ``out`` (len(out) elements): out[i] = vlut[symbol i].
    ``vlut`` covers every symbol the stream may hold (a symbol past it is an error)."""
    b = np.frombuffer(stored, np.uint8)
    if b.shape[0] < 20 or b.shape[0] % 4:
        raise FrameError("wide huffman stream: truncated")
    words = b.view("<u4") if b.ctypes.data % 4 == 0 else b.copy().view("<u4")
    err = _decode(words, vlut, out)
    if err:
        raise FrameError(("wide huffman stream: bad header", "wide huffman stream: bad code "
                          "lengths", "wide huffman stream: truncated")[err - 1])
    return out


@njit(**_JIT)
def _decode(w, vlut, out):
    """0, or an error code: 1 bad header, 2 bad code lengths, 3 truncated sub-stream."""
    a = np.int64(w[0] & np.uint32(0xFFFF))
    tl = np.int64(w[0] >> np.uint32(16))
    if a < 1 or a > vlut.shape[0] or tl != L:
        return 1
    nw = (a + 7) // 8
    if 5 + nw > w.shape[0]:
        return 1
    lens = np.zeros(a, np.int64)
    kraft = 0
    for s in range(a):
        ln = np.int64((w[5 + s // 8] >> np.uint32(4 * (s % 8))) & np.uint32(15))
        if ln > L:
            return 2
        lens[s] = ln
        if ln:
            kraft += np.int64(1) << (L - ln)
    if kraft != np.int64(1) << L:
        return 2
    tab = build_table1(lens, _canonical(lens), L)
    counts = np.empty(4, np.int64)
    for j in range(4):
        counts[j] = w[1 + j]
    body = w[5 + nw:]
    if counts.sum() != body.shape[0]:
        return 1
    return 3 if _decode4s(body, counts, out.shape[0], tab, L, vlut, out) else 0
