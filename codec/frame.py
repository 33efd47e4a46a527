"""The frame format: a self-describing, versioned, checksummed container.

Layout (all little-endian)::

    0   4s  magic  b"ELVC"
    4   u8  version (FORMAT_VERSION)
    5   u8  codec id          (raw 0, zstd 1, planes 2, elf 3, xor 4)
    6   u8  dtype id          (0 = opaque bytes; see codec.dtypes)
    7   u8  flags             (bit0 lossy, bit1 needs reference)
    8   u64 raw size in bytes
    16  f64 error bound       (NaN = none)
    24  f64 max error measured at encode time (NaN = none)
    32  u64 xxh3_64 of the decoded bytes (what decode must return)
    40  u16 params length P
    42  u8  number of streams S
    43  u8  reserved (0)
    44  P bytes codec parameters
        S stream entries: u8 name length, name (ascii), u8 method (0 raw, 1 zstd,
        2 constant byte, 3 huffman), u64 stored length, u64 decoded length, u64 xxh3_64 of the
        stored bytes
        u64 xxh3_64 of every header byte before it
    then the S stored streams, in table order (most significant first).

A frame must be exactly header + sum(stored lengths) bytes long.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import xxhash

from .errors import FrameError

MAGIC = b"ELVC"
FORMAT_VERSION = 1
FLAG_LOSSY = 1
FLAG_NEEDS_REF = 2

CODEC_IDS = {"raw": 0, "zstd": 1, "planes": 2, "elf": 3, "xor": 4}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

METHOD_RAW, METHOD_ZSTD, METHOD_CONST, METHOD_HUF = 0, 1, 2, 3
METHOD_NAMES = {METHOD_RAW: "raw", METHOD_ZSTD: "zstd", METHOD_CONST: "const", METHOD_HUF: "huffman"}

_FIXED = struct.Struct("<4sBBBBQddQHBB")
_ENTRY = struct.Struct("<BQQQ")
_U64 = struct.Struct("<Q")


def hash64(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass
class Stream:
    """One coded stream: ``stored`` are the bytes in the frame; ``raw_len`` is its
    decoded length; ``method`` says how to get from one to the other."""

    name: str
    method: int
    raw_len: int
    stored: object  # bytes-like
    stored_len: int = 0
    checksum: int = 0
    offset: int = 0  # in the frame (set by parse)


@dataclass
class Header:
    codec: str
    version: int
    dtype_id: int
    flags: int
    raw_size: int
    bound: float | None
    max_error: float | None
    content_hash: int
    params: bytes
    streams: list[Stream] = field(default_factory=list)
    header_size: int = 0

    @property
    def lossy(self) -> bool:
        return bool(self.flags & FLAG_LOSSY)

    @property
    def needs_reference(self) -> bool:
        return bool(self.flags & FLAG_NEEDS_REF)


def _opt(x: float | None) -> float:
    return math.nan if x is None else float(x)


def pack(codec: str, dtype_id: int, raw_size: int, params: bytes, streams: list[Stream],
         content_hash: int, *, lossy: bool = False, needs_reference: bool = False,
         bound: float | None = None, max_error: float | None = None) -> bytes:
    if len(streams) > 255 or len(params) > 65535:
        raise ValueError("too many streams or parameters for one frame")
    flags = (FLAG_LOSSY if lossy else 0) | (FLAG_NEEDS_REF if needs_reference else 0)
    parts = [_FIXED.pack(MAGIC, FORMAT_VERSION, CODEC_IDS[codec], dtype_id, flags, raw_size,
                         _opt(bound), _opt(max_error), content_hash, len(params),
                         len(streams), 0), bytes(params)]
    for s in streams:
        name = s.name.encode("ascii")
        mv = memoryview(s.stored).cast("B")
        parts.append(bytes([len(name)]) + name)
        parts.append(_ENTRY.pack(s.method, mv.nbytes, s.raw_len, hash64(mv)))
    head = b"".join(parts)
    return b"".join([head, _U64.pack(hash64(head))] + [s.stored for s in streams])


def parse(frame) -> Header:
    """Parse and verify the header (not the streams' contents)."""
    mv = memoryview(frame).cast("B")
    n = mv.nbytes
    if n < _FIXED.size + 8:
        raise FrameError(f"frame truncated: {n} bytes is shorter than the {_FIXED.size + 8}-byte "
                         "minimum header; the stored chunk is damaged or not a codec frame")
    (magic, version, cid, dtype_id, flags, raw_size, bound, max_error, content_hash,
     plen, nstreams, _res) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FrameError(f"not a codec frame: bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise FrameError(f"frame format version {version} is not supported by this codec library "
                         f"(supports {FORMAT_VERSION}); upgrade the codec package")
    pos = _FIXED.size
    try:
        params = bytes(mv[pos:pos + plen])
        if len(params) != plen:
            raise IndexError
        pos += plen
        streams = []
        for _ in range(nstreams):
            ln = mv[pos]
            name = bytes(mv[pos + 1:pos + 1 + ln]).decode("ascii", "replace")
            pos += 1 + ln
            method, stored_len, raw_len, ck = _ENTRY.unpack_from(mv, pos)
            pos += _ENTRY.size
            streams.append(Stream(name, method, raw_len, None, stored_len, ck))
        (hh,) = _U64.unpack_from(mv, pos)
    except (IndexError, struct.error):
        raise FrameError(f"frame truncated inside its header ({n} bytes); the stored chunk is "
                         "damaged") from None
    if hash64(mv[:pos]) != hh:
        raise FrameError("frame header checksum mismatch: the chunk's header is corrupt")
    pos += 8
    header_size = pos
    if cid not in CODEC_NAMES:
        raise FrameError(f"unknown codec id {cid} in frame; upgrade the codec package")
    for s in streams:
        if s.method not in METHOD_NAMES:
            raise FrameError(f"stream {s.name!r} has unknown coding method {s.method}")
        s.offset = pos
        pos += s.stored_len
    if pos != n:
        what = "truncated" if pos > n else "has trailing bytes"
        raise FrameError(f"frame {what}: header says {pos} bytes, got {n}; the stored chunk is "
                         "damaged")
    return Header(CODEC_NAMES[cid], version, dtype_id, flags, raw_size,
                  None if math.isnan(bound) else bound,
                  None if math.isnan(max_error) else max_error,
                  content_hash, params, streams, header_size)


def stream_view(frame, s: Stream) -> memoryview:
    """The stored bytes of stream ``s``, checksum verified."""
    mv = memoryview(frame).cast("B")[s.offset:s.offset + s.stored_len]
    if hash64(mv) != s.checksum:
        raise FrameError(f"stream {s.name!r} checksum mismatch: its stored bytes are corrupt",
                         damaged=(s.name,))
    return mv
