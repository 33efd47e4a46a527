"""zstd: per-thread compressor objects, per-stream coding (raw / zstd / constant) and
the plain ``zstd`` codec."""
from __future__ import annotations

import threading

import numpy as np
import zstandard as zstd

from . import huffman, kernels
from .base import Codec, register
from .errors import FrameError
from .frame import METHOD_CONST, METHOD_HUF, METHOD_RAW, METHOD_ZSTD, Stream, hash64, stream_view

_tls = threading.local()

#: below this order-0 entropy a stream is Huffman-coded unless zstd wins on a sample
LOW_ENTROPY = 5.0
PROBE = 1 << 14
#: equal-neighbour rate above sum(p^2) from which a low-entropy stream is probed with zstd
RUN_EXCESS = 0.01


def compressor(level: int) -> zstd.ZstdCompressor:
    """A compressor private to the calling thread (zstd contexts are not thread-safe)."""
    cache = getattr(_tls, "c", None)
    if cache is None:
        cache = _tls.c = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstd.ZstdCompressor(level=level, write_content_size=True,
                                               write_checksum=False)
    return c


def decompressor() -> zstd.ZstdDecompressor:
    d = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = zstd.ZstdDecompressor()
    return d


def entropy(hist: np.ndarray) -> float:
    """Order-0 entropy in bits per byte."""
    return float(huffman.entropy_bits(np.asarray(hist, np.int64)))


def code_stream(name: str, data, level: int = 3, *, analyse: bool = True,
                hist: np.ndarray | None = None, tie: float = 1.002) -> Stream:
    """Code one byte stream with the cheapest of constant / huffman / zstd / raw.
    ``data`` is a 1-d uint8 array or bytes-like; raw streams are stored without a copy.

    Low-entropy streams (exponents): canonical Huffman, unless zstd does better on a
    64 KiB probe (runs, repeats). High-entropy streams (mantissas): one fast zstd pass
    (level <= 1) to catch repeats, else raw. ``hist``: the byte histogram of ``data``
    when the caller has it (int64[256]; saves a pass). ``tie``: how much smaller
    Huffman must be than zstd on a high-entropy stream to be taken (zstd's decoder is
    faster there)."""
    a = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    n = a.shape[0]
    if n == 0:
        return Stream(name, METHOD_RAW, 0, b"")
    if not analyse:
        c = compressor(level).compress(a)
        return Stream(name, METHOD_ZSTD, n, c) if len(c) < n else Stream(name, METHOD_RAW, n, a)
    bh = None
    if n >= 2 * huffman.BLOCK:
        bh = huffman.block_hist(a, huffman.BLOCK)
        h = bh.sum(axis=0)
    else:
        h = kernels.histogram(a) if hist is None else hist
    if h.dtype != np.int64:
        h = h.astype(np.int64)
    top, cnt, H = huffman.hist_stats(h)
    if cnt == n:
        return Stream(name, METHOD_CONST, n, bytes([top]))
    if n < 4096:  # small streams: the smallest of zstd, Huffman (compact table), raw
        c = compressor(level).compress(a)
        if n >= 64 and H < 7.5:
            est, lens = huffman.estimate2(h)
            if est < len(c) and est < n:
                return Stream(name, METHOD_HUF, n, huffman.encode(a, lens))
        return Stream(name, METHOD_ZSTD, n, c) if len(c) < n else Stream(name, METHOD_RAW, n, a)
    # High-entropy streams (mantissas): a whole-stream fast zstd pass (GB/s on such
    # bytes; it catches repeats a sample misses, e.g. repeated embedding rows) against
    # the exact Huffman size from the histograms. Low-entropy streams (exponents):
    # Huffman, unless zstd wins clearly on four spread 16 KiB slices (only probed when
    # the stream shows runs, repeats in its middle 16 KiB, or a dominant byte). zstd wins
    # near-ties (its decoder is faster on high-entropy bytes).
    plan = None
    if H < LOW_ENTROPY and n > 4 * PROBE:
        plan = est, lens, block = huffman.plan_blocks(a, h, bh)
        # zstd beats Huffman on low-entropy bytes through runs, repeats (e.g. repeated
        # rows), or where Huffman's whole bits per symbol are far above the entropy (one
        # dominant byte); none of them (one probe for repeats): no further probes
        if est <= 1.03 * n * H / 8 + 1024 and not _has_runs(a, h, n) and \
                not _zstd_wins_probe(a[(n - PROBE) // 2:(n + PROBE) // 2], level):
            return Stream(name, METHOD_HUF, n, huffman.encode(a, lens, block))
        probes = np.linspace(0, n - PROBE, min(4, n // PROBE)).astype(np.int64)
        if not _zstd_wins_probe([a[o:o + PROBE] for o in probes], level):
            return Stream(name, METHOD_HUF, n, huffman.encode(a, lens, block))
    c = compressor(min(level, 1)).compress(a)
    # near-ties go to zstd when the Huffman codes are long (fp16 sign+exponent+2 bits,
    # mantissas): its decoder is faster there; exponent planes take the smaller
    tie = 1.0 if H < LOW_ENTROPY else tie
    if H < 7.98 and _huffman_may_win(h, bh, n, tie, min(len(c), n - 64), H):
        # (above 7.98, Huffman saves < 0.25 % and zstd's decoder is faster)
        est, lens, block = plan or huffman.plan_blocks(a, h, bh)
        if est < n - 64 and est * tie < len(c):
            return Stream(name, METHOD_HUF, n, huffman.encode(a, lens, block))
    if len(c) < n - 64:
        return Stream(name, METHOD_ZSTD, n, c)
    return Stream(name, METHOD_RAW, n, a)


def _zstd_wins_probe(probes, level: int) -> bool:
    """Whether zstd (level <= 1) codes the probe(s) 2 % smaller than Huffman."""
    zs = hs = 0
    for p in probes if isinstance(probes, list) else [probes]:
        zs += len(compressor(min(level, 1)).compress(p))
        hs += huffman.estimate2(kernels.histogram(p))[0]
    return zs < 0.98 * hs


def _has_runs(a, h, n: int) -> bool:
    """Whether equal neighbours are more frequent than independent symbols would make
    them (sum p^2) by RUN_EXCESS: the sign of zero runs (sparse optimizer state) or
    repeats that zstd codes better than Huffman."""
    p = h.astype(np.float64) / n
    return kernels.equal_neighbours(a) > (float(p @ p) + RUN_EXCESS) * (n - 1)


def _huffman_may_win(h, bh, n: int, tie: float, limit: int, H: float | None = None) -> bool:
    """Whether the entropy bound (per block when there are blocks: Huffman can never
    do better than it) leaves Huffman a chance to beat ``limit`` bytes; saves planning
    code tables for mantissa planes that end up raw or zstd. ``H``: entropy(h) when the
    caller has it."""
    if bh is None:
        bound = n * (entropy(h) if H is None else H) / 8
    else:
        bound = sum(float(hk.sum()) * entropy(hk) for hk in bh) / 8
    return bound * tie < limit


def as_is_or(s: Stream, mv) -> dict:
    """The fields of a one-stream encoding of ``mv`` (raw and zstd frames); when the
    stream is ``mv`` stored raw, its checksum is the content checksum: hashed once, not
    twice (and decode checks it once: Header.stored_as_is)."""
    if s.method != METHOD_RAW:
        return dict(streams=[s])
    s.checksum = hash64(mv)
    return dict(streams=[s], content_hash=s.checksum)


def decode_stream(frame, s: Stream):
    """The decoded bytes of stream ``s`` (a bytes-like of length s.raw_len)."""
    mv = stream_view(frame, s)
    if s.method == METHOD_RAW:
        if mv.nbytes != s.raw_len:
            raise FrameError(f"stream {s.name!r}: raw length mismatch", damaged=(s.name,))
        return mv
    if s.method == METHOD_CONST:
        if mv.nbytes != 1:
            raise FrameError(f"stream {s.name!r}: bad constant stream", damaged=(s.name,))
        return np.full(s.raw_len, mv[0], np.uint8)
    if s.method == METHOD_HUF:
        return huffman.decode(mv, s.raw_len)
    if s.raw_len == 0:
        raise FrameError(f"stream {s.name!r}: empty zstd stream", damaged=(s.name,))
    try:
        out = decompressor().decompress(mv, max_output_size=s.raw_len)
    except zstd.ZstdError as e:
        raise FrameError(f"stream {s.name!r}: zstd data corrupt ({e})", damaged=(s.name,)) from None
    if len(out) != s.raw_len:
        raise FrameError(f"stream {s.name!r}: decoded {len(out)} bytes, header says {s.raw_len}",
                         damaged=(s.name,))
    return out


@register
class ZstdCodec(Codec):
    """Plain zstd over the raw bytes (any dtype)."""

    codec_id = "zstd"

    def __init__(self, dtype=None, level: int = 3):
        super().__init__(dtype)
        self.level = int(level)

    def get_config(self):
        return {"id": self.codec_id, "dtype": self.dtype, "level": self.level}

    def _encode(self, mv, dt):
        # opaque bytes and multi-byte types: zstd at the asked level (it bails out fast
        # on incompressible input), raw if that does not pay; 1-byte element types
        # (int8, fp8) also try Huffman/constant
        analyse = dt is not None and dt.itemsize == 1 and mv.nbytes >= 4096
        return as_is_or(code_stream("bytes", mv, self.level, analyse=analyse), mv)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        (s,) = header.streams
        return decode_stream(frame, s)
