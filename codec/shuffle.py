"""Byte shuffle (Blosc's filter) for opaque bytes made of fixed-width records: the
bytes of a file we do not parse that holds arrays of floats or ints (ONNX, .npy,
HDF5, a raw dump of weights).

Byte j of every k-byte group goes to lane j and each lane is coded on its own (zstd,
Huffman, raw or a constant byte, as ``code_stream`` picks): the sign+exponent bytes of
floats, or the high bytes of small ints, then code to a few bits each instead of
diluting one zstd literal table with near-random mantissa bytes. A chunk may start
anywhere inside a record (content-defined chunks do): lanes are then rotated, which
costs nothing, since each lane is coded by itself.

Format: params = k (one byte) + the last n % k bytes of the chunk, verbatim; streams
byte{k-1} .. byte0 (lane k-1 first), n // k bytes each. ``probe`` picks k (or none)
from a sample's per-lane byte entropies.
"""
from __future__ import annotations

import numpy as np

from . import huffman, kernels
from . import zstd_codec as zc
from .base import Codec, register
from .errors import FrameError
from .dtypes import BY_NAME
from .frame import METHOD_HUF, METHOD_RAW, Stream
from .planes import L_BYTES, split
from .zstd_codec import code_stream, decode_stream

STRIDES = (2, 4, 8)
MIN_GAIN = 0.25  # bits per byte the lanes must save over the whole sample's entropy
WIDER_GAIN = 0.05  # and a wider stride over a narrower one
RANDOM_BITS = 7.95  # a sample this random (compressed, encrypted bytes) is not probed
RAW_ENTROPY = 7.95  # lanes whose sample has this order-0 entropy are stored raw
UINT = {2: BY_NAME["U16"], 4: BY_NAME["U32"], 8: BY_NAME["U64"]}  # record types to split
PROBE_SLICE = 8 * 1024  # two slices of this many bytes make the probe's sample


def _lane_names(k: int) -> list[str]:
    return [f"byte{k - 1 - j}" for j in range(k)]


def sample_lanes(mv) -> np.ndarray:
    """Byte histograms (8, 256) of the lanes i % 8 of a sample of ``mv``: two slices
    (at 1/4 and 3/4 of the chunk, 8-byte aligned so the lanes line up), or all of a
    small chunk."""
    a = np.frombuffer(mv, np.uint8)
    n = a.shape[0]
    if n < 4 * PROBE_SLICE:
        return kernels.lane_hist8(a[:n - n % 8])
    starts = [(n // 4) & ~7, (3 * n // 4 - PROBE_SLICE) & ~7]
    return sum(kernels.lane_hist8(a[s:s + PROBE_SLICE]) for s in starts)


def probe(mv, h8: np.ndarray | None = None) -> int:
    """The stride whose lanes are the most predictable, or 1 when no stride saves
    MIN_GAIN bits per byte over the bytes taken together (order 0)."""
    h8 = sample_lanes(mv) if h8 is None else h8
    return int(kernels.best_stride(h8, MIN_GAIN, WIDER_GAIN, RANDOM_BITS))


def _code_lane(name: str, lane: np.ndarray, level: int) -> Stream:
    """One low- or mid-entropy lane of a chunk without repeats: Huffman (the sign and
    exponent byte of floats, the high bytes of ints) without code_stream's zstd
    trials, unless the lane shows runs (sparse data): then the full analysis."""
    n = lane.shape[0]
    h = kernels.histogram(lane).astype(np.int64)
    top, cnt, H = huffman.hist_stats(h)
    if cnt < n and n >= 2 * zc.PROBE and H < zc.LOW_ENTROPY and not zc._has_runs(lane, h, n):
        est, lens = huffman.estimate2(h)
        if est < n - 64:
            return Stream(name, METHOD_HUF, n, huffman.encode(lane, lens))
    return code_stream(name, lane, level, hist=h)


def shuffle_streams(mv, k: int, level: int) -> tuple[bytes, list]:
    """(params, streams) of ``mv`` shuffled with stride ``k``, each lane coded by
    ``code_stream`` (all its trials)."""
    return _shuffle(mv, k, level, None)


def shuffle_streams_fast(mv, k: int, level: int, h8: np.ndarray) -> tuple[bytes, list]:
    """shuffle_streams for a chunk known to hold no repeats: lanes whose sample
    (``h8``, from sample_lanes) is near-random are stored raw without a look at the
    rest (a mantissa byte: nothing to gain), the others take Huffman unless they show
    runs (_code_lane)."""
    return _shuffle(mv, k, level, kernels.lane_bits(h8, k))


def _shuffle(mv, k: int, level: int, bits) -> tuple[bytes, list]:
    a = np.frombuffer(mv, np.uint8)
    m = a.shape[0] - a.shape[0] % k
    planes, names = split(a[:m], UINT[k], L_BYTES)  # the planes codec's byte planes
    streams = []
    for p, name in enumerate(names):  # plane p holds byte k - 1 - p of a record
        if bits is None:
            streams.append(code_stream(name, planes[p], level))
        elif bits[k - 1 - p] >= RAW_ENTROPY and m // k >= 2 * zc.PROBE:
            streams.append(Stream(name, METHOD_RAW, m // k, planes[p]))
        else:
            streams.append(_code_lane(name, planes[p], level))
    return bytes([k]) + a[m:].tobytes(), streams


def unshuffle(header, frame) -> np.ndarray:
    """The chunk's bytes from a shuffle frame (FrameError when its tables disagree)."""
    if not header.params or header.params[0] not in STRIDES:
        raise FrameError("shuffle frame: bad stride parameter")
    k, tail = header.params[0], header.params[1:]
    n = header.raw_size
    m = n - n % k
    if len(tail) != n % k or [s.name for s in header.streams] != _lane_names(k):
        raise FrameError("shuffle frame: the stream table does not match its stride")
    planes = []
    for s in header.streams:
        if s.raw_len != m // k:
            raise FrameError(f"shuffle frame: stream {s.name!r} has {s.raw_len} bytes, "
                             f"expected {m // k}", damaged=(s.name,))
        p = np.frombuffer(decode_stream(frame, s), np.uint8)
        if p.flags.writeable:  # one numba signature for the merge kernels
            p.setflags(write=False)
        planes.append(p)
    out = np.empty(n, np.uint8)
    if k == 2:
        kernels.merge_u16(planes[0], planes[1], out[:m].view("<u2"))
    elif k == 4:
        kernels.merge_u32(planes[0], planes[1], planes[2], planes[3], out[:m].view("<u4"))
    else:
        kernels.merge_bytes(np.stack(planes), k, out[:m].reshape(-1, k))
    out[m:] = np.frombuffer(tail, np.uint8)
    return out


@register
class ShuffleCodec(Codec):
    """Byte shuffle with stride ``stride`` (2, 4 or 8), then each lane coded alone."""

    codec_id = "shuffle"

    def __init__(self, dtype=None, stride: int = 4, level: int = 3):
        super().__init__(dtype)
        if stride not in STRIDES:
            raise ValueError(f"shuffle stride must be one of {STRIDES}, not {stride!r}")
        self.stride = int(stride)
        self.level = int(level)

    def get_config(self):
        return {"id": self.codec_id, "dtype": self.dtype, "stride": self.stride,
                "level": self.level}

    def _encode(self, mv, dt):
        params, streams = shuffle_streams(mv, self.stride, self.level)
        return dict(streams=streams, params=params)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        return unshuffle(header, frame)
