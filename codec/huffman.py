"""A small canonical Huffman coder for byte streams (numba kernels), used for the
low-entropy streams (float exponents, ELF's top plane) where zstd's LZ stage costs
ratio and speed. Stored form: 128 bytes of 4-bit code lengths (symbol 2i in the low
nibble), then the MSB-first bit stream. Code lengths are limited to MAXLEN bits."""
from __future__ import annotations

import heapq

import numpy as np
from numba import njit

from .errors import FrameError

MAXLEN = 12
_JIT = dict(cache=True, nogil=True)


def code_lengths(hist: np.ndarray, maxlen: int = MAXLEN) -> np.ndarray:
    f = np.asarray(hist, np.int64).copy()
    while True:
        lens = _lengths(f)
        if lens.max() <= maxlen:
            return lens
        f = np.where(f > 0, (f >> 1) | 1, 0)


def _lengths(f) -> np.ndarray:
    lens = np.zeros(256, np.uint8)
    sym = [int(i) for i in np.flatnonzero(f)]
    if len(sym) == 1:
        lens[sym[0]] = 1
        return lens
    heap = [(int(f[s]), s, (s,)) for s in sym]
    heapq.heapify(heap)
    tie = 256
    while len(heap) > 1:
        fa, _, a = heapq.heappop(heap)
        fb, _, b = heapq.heappop(heap)
        for s in a + b:
            lens[s] += 1
        heapq.heappush(heap, (fa + fb, tie, a + b))
        tie += 1
    return lens


def canonical(lens: np.ndarray) -> np.ndarray:
    codes = np.zeros(256, np.uint32)
    code = 0
    prev = 0
    for ln, s in sorted((int(lens[s]), s) for s in range(256) if lens[s]):
        code <<= ln - prev
        codes[s] = code
        code += 1
        prev = ln
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
    """(stored size in bytes, code lengths) for a stream with this histogram."""
    lens = code_lengths(hist)
    bits = int((hist.astype(np.int64) * lens).sum())
    return 128 + (bits + 7) // 8, lens


def encode(a: np.ndarray, lens: np.ndarray) -> bytes:
    codes = canonical(lens)
    out = np.empty(128 + a.shape[0] * MAXLEN // 8 + 16, np.uint8)
    l2 = lens.astype(np.uint8)
    out[:128] = (l2[0::2] & 15) | ((l2[1::2] & 15) << 4)
    m = _encode(a, codes, lens.astype(np.int64), out[128:])
    return out[:128 + m]


def decode(stored, n: int) -> np.ndarray:
    b = np.frombuffer(stored, np.uint8)
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
