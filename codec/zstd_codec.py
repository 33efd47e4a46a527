"""zstd: per-thread compressor objects, per-stream coding (raw / zstd / constant) and
the plain ``zstd`` codec."""
from __future__ import annotations

import math
import threading

import numpy as np
import zstandard as zstd

from . import huffman, kernels
from .base import Codec, register
from .errors import FrameError
from .frame import METHOD_CONST, METHOD_HUF, METHOD_RAW, METHOD_ZSTD, Stream, stream_view

_tls = threading.local()

#: above this order-0 entropy (bits per byte) a stream is stored raw without trying zstd
RAW_ENTROPY = 7.97


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
    n = int(hist.sum())
    if n == 0:
        return 0.0
    p = hist[hist > 0] / n
    return float(-(p * np.log2(p)).sum())


def code_stream(name: str, data, level: int = 3, *, analyse: bool = True) -> Stream:
    """Code one byte stream with the cheapest of constant / huffman / zstd / raw.
    ``data`` is a 1-d uint8 array or bytes-like; raw streams are stored without a copy.

    Low-entropy streams (exponents): canonical Huffman, unless zstd does better on a
    64 KiB probe (runs, repeats). High-entropy streams (mantissas): one fast zstd pass
    (level <= 1) to catch repeats, else raw."""
    a = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    n = a.shape[0]
    if n == 0:
        return Stream(name, METHOD_RAW, 0, b"")
    if not analyse:
        c = compressor(level).compress(a)
        return Stream(name, METHOD_ZSTD, n, c) if len(c) < n else Stream(name, METHOD_RAW, n, a)
    h = kernels.histogram(a)
    top = int(h.argmax())
    if h[top] == n:
        return Stream(name, METHOD_CONST, n, bytes([top]))
    H = entropy(h)
    if n < 4096:  # small streams: the Huffman table costs more than it saves
        c = compressor(level).compress(a)
        return Stream(name, METHOD_ZSTD, n, c) if len(c) < n else Stream(name, METHOD_RAW, n, a)
    if H > 7.5:
        c = compressor(min(level, 1)).compress(a)
        best = min(len(c), n - 64)
        if H < 7.995:  # Benford-skewed high mantissa bits: Huffman still gains a little
            est, lens = huffman.estimate(h)
            if est < best:
                return Stream(name, METHOD_HUF, n, huffman.encode(a, lens))
        return Stream(name, METHOD_ZSTD, n, c) if len(c) < n - 64 else Stream(name, METHOD_RAW, n, a)
    est, lens = huffman.estimate(h)
    probe = a[:65536]
    zp = len(compressor(level).compress(probe))
    hp = huffman.estimate(kernels.histogram(probe))[0] if probe.shape[0] < n else est
    if zp < hp:
        c = compressor(level).compress(a)
        if len(c) < min(est, n):
            return Stream(name, METHOD_ZSTD, n, c)
    if est < n:
        return Stream(name, METHOD_HUF, n, huffman.encode(a, lens))
    return Stream(name, METHOD_RAW, n, a)


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
        s = code_stream("bytes", mv, self.level, analyse=mv.nbytes >= 4096)
        return dict(streams=[s])

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        (s,) = header.streams
        return decode_stream(frame, s)
