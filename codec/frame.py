"""The frame format: a self-describing, versioned, checksummed container.

Two layouts, told apart by the version byte after the magic; both decode, v2 is written
(as version 3 when the frame carries parity streams: see "Protected streams").

**v2 (compact, written now)**: small chunks (a 768-byte LayerNorm bias) paid ~115
header bytes in v1; v2 spends ~40 there. Varints are unsigned LEB128 (7 bits per byte,
low groups first, high bit = more follows, at most 10 bytes)::

    0   4s  magic  b"ELVC"
    4   u8  version 2
    5   u8  codec id (bits 0..3: raw 0, zstd 1, planes 2, elf 3, xor 4, shuffle 5) | flags << 4
            (bit4 lossy, bit5 needs reference, bit6 bound follows, bit7 max error follows)
    6   u8  dtype id          (0 = opaque bytes; see codec.dtypes)
    7   varint raw size in bytes
        varint params length P, then P bytes of codec parameters
        [f64 error bound]      if bit6
        [f64 max error]        if bit7 (measured at encode time)
        u8  number of streams S
        S stream entries: u8 name code (an index into STREAM_NAMES; 255 = u8 length and
        the ascii name follow), u8 method (0 raw, 1 zstd, 2 constant byte, 3 huffman),
        varint stored length, varint decoded length, C-byte checksum of the stored bytes
        C-byte checksum of the decoded bytes (what decode must return)
        C-byte checksum of every header byte before it
    then the S stored streams, in table order (most significant first).

    Checksums are xxh3_64; C = 8 (the whole hash) when the raw size is >= 64 KiB, else
    C = 4 (its low 32 bits). A 32-bit check misses a random corruption with
    probability 2^-32, and a damaged stream must pass both its own check and the
    content check to go unnoticed; on large frames 4 more bytes per check cost nothing.

**v1 (the first version, still decoded)**::

    0   4s  magic  b"ELVC"
    4   u8  version 1
    5   u8  codec id
    6   u8  dtype id
    7   u8  flags             (bit0 lossy, bit1 needs reference)
    8   u64 raw size in bytes
    16  f64 error bound       (NaN = none)
    24  f64 max error measured at encode time (NaN = none)
    32  u64 xxh3_64 of the decoded bytes (what decode must return)
    40  u16 params length P
    42  u8  number of streams S
    43  u8  reserved (0)
    44  P bytes codec parameters
        S stream entries: u8 name length, name (ascii), u8 method, u64 stored length,
        u64 decoded length, u64 xxh3_64 of the stored bytes
        u64 xxh3_64 of every header byte before it
    then the S stored streams, in table order.

A frame must be exactly header + sum(stored lengths) bytes long (all little-endian).

**Protected streams** (written by ``protect``): the most significant streams (sign and
exponent) carry redundancy, stored after all the other streams: a flipped exponent bit
wrecks a weight, a flipped low-mantissa bit barely moves it (noisy-storage coding).
``parse`` takes the redundant streams out of the stream list and hangs each on its
stream, so codecs never see them and a frame without them reads exactly as before;
``stream_view`` falls back on them when a stream fails its checksum. Two kinds:

- ``X^``, the **parity** of stream ``X`` (written now; such frames have version 3, the
  v2 layout, so that readers that predate parity refuse them instead of misreading
  them). Method raw; its stored bytes::

      u8  k, the number of stripes X's stored bytes are cut into (see ``_stripes``)
      k x u32  low 32 bits of the xxh3_64 of each stripe (padded like the XOR's rows)
      m bytes  the XOR of the k stripes, m = ceil(len(X) / k) (short stripes padded
               with zeros)

  Stripe i is X[i*m : (i+1)*m]. When X fails its checksum and exactly one stripe fails
  its own, that stripe is the parity XOR the others (then X's checksum must hold).
  It costs ~1/k of X, not all of it, and survives damage within one stripe (bit rot,
  a bad sector), not damage to two. Below two minimum stripes, k = 1: a copy.
- ``X~``, a second **copy** of ``X`` (same method, lengths and checksum; what protected
  frames carried before parity, v2): read when ``X`` is damaged, whatever the damage.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, replace

import numpy as np
import xxhash

from .errors import FrameError

MAGIC = b"ELVC"
FORMAT_VERSION = 2
PARITY_VERSION = 3  # the v2 layout with parity streams (older readers refuse it)
SUPPORTED_VERSIONS = (1, 2, 3)
FLAG_LOSSY = 1
FLAG_NEEDS_REF = 2
_V2_BOUND, _V2_MAXERR = 4, 8  # v2 flag bits (after the lossy / reference bits)

CODEC_IDS = {"raw": 0, "zstd": 1, "planes": 2, "elf": 3, "xor": 4, "shuffle": 5}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

METHOD_RAW, METHOD_ZSTD, METHOD_CONST, METHOD_HUF = 0, 1, 2, 3
METHOD_NAMES = {METHOD_RAW: "raw", METHOD_ZSTD: "zstd", METHOD_CONST: "const", METHOD_HUF: "huffman"}

#: v2 stream name codes: the names the codecs write (append only; never reorder)
STREAM_NAMES = ("bytes", "exponent", "sign+mant_hi", "mant_mid", "mant_lo", "sign+mant",
                *(f"byte{j}" for j in range(8)), "outlier_pos", "outlier_val",
                *(f"q{j}" for j in range(8)),
                *(f"c{c}.byte{j}" for c in range(8) for j in range(8)), "qsym")
_NAME_CODE = {nm: i for i, nm in enumerate(STREAM_NAMES)}
_NAME_LITERAL = 255
WIDE_FROM = 1 << 16  # v2: raw sizes from here on get 64-bit checksums

_FIXED = struct.Struct("<4sBBBBQddQHBB")
_ENTRY = struct.Struct("<BQQQ")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


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
    check_bits: int = 64  # width of ``checksum`` (v2 frames under WIDE_FROM: 32)
    backup: "Stream | None" = None  # a protected stream's copy (set by parse)
    parity: "Stream | None" = None  # a protected stream's parity (set by parse)

    @property
    def protected(self) -> bool:
        return self.backup is not None or self.parity is not None


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
    check_bits: int = 64  # width of ``content_hash``

    @property
    def lossy(self) -> bool:
        return bool(self.flags & FLAG_LOSSY)

    @property
    def needs_reference(self) -> bool:
        return bool(self.flags & FLAG_NEEDS_REF)

    def content_ok(self, data) -> bool:
        """Whether ``data`` matches the recorded checksum of the decoded bytes."""
        return _trunc(hash64(data), self.check_bits) == self.content_hash

    def stored_as_is(self) -> bool:
        """Whether the decoded bytes are one raw stream whose checksum is the content
        checksum: decoding it verified them already (the raw frame, zstd that did not pay)."""
        return (self.codec in ("raw", "zstd") and len(self.streams) == 1
                and self.streams[0].method == METHOD_RAW
                and self.streams[0].raw_len == self.raw_size
                and self.streams[0].checksum == self.content_hash)


def _trunc(h: int, bits: int) -> int:
    return h & ((1 << bits) - 1)


def _opt(x: float | None) -> float:
    return math.nan if x is None else float(x)


_SMALL = [bytes([i]) for i in range(128)]


def varint(x: int) -> bytes:
    """Unsigned LEB128: small numbers (most lengths) in one or two bytes."""
    if 0 <= x < 0x80:
        return _SMALL[x]
    if not 0 <= x < 1 << 64:
        raise ValueError(f"varint out of range: {x}")
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def read_varint(mv, pos: int) -> tuple[int, int]:
    """(value, next position); IndexError when the bytes run out."""
    x = shift = 0
    for i in range(10):
        b = mv[pos + i]
        x |= (b & 0x7F) << shift
        if b < 0x80:
            return x, pos + i + 1
        shift += 7
    raise FrameError("frame header has an overlong varint: the chunk's header is corrupt")


def pack(codec: str, dtype_id: int, raw_size: int, params: bytes, streams: list[Stream],
         content_hash: int, *, lossy: bool = False, needs_reference: bool = False,
         bound: float | None = None, max_error: float | None = None,
         version: int = FORMAT_VERSION) -> bytes:
    """The frame of these streams (``version`` 1 only to make old-format test data)."""
    if len(streams) > 255 or len(params) > 65535:
        raise ValueError("too many streams or parameters for one frame")
    flags = (FLAG_LOSSY if lossy else 0) | (FLAG_NEEDS_REF if needs_reference else 0)
    if version == 1:
        head = _head_v1(codec, dtype_id, raw_size, params, streams, content_hash, flags,
                        bound, max_error)
        return b"".join([head, _U64.pack(hash64(head))] + [s.stored for s in streams])
    if version not in (2, PARITY_VERSION):
        raise ValueError(f"cannot write frame version {version}")
    c = 8 if raw_size >= WIDE_FROM else 4
    if bound is not None:
        flags |= _V2_BOUND
    if max_error is not None:
        flags |= _V2_MAXERR
    parts = [MAGIC, bytes([version, CODEC_IDS[codec] | flags << 4, dtype_id]), varint(raw_size),
             varint(len(params)), bytes(params)]
    if bound is not None:
        parts.append(_F64.pack(bound))
    if max_error is not None:
        parts.append(_F64.pack(max_error))
    parts.append(bytes([len(streams)]))
    for s in streams:
        mv = memoryview(s.stored).cast("B")
        code = _NAME_CODE.get(s.name)
        if code is None:
            name = s.name.encode("ascii")
            parts.append(bytes([_NAME_LITERAL, len(name)]) + name)
            parts.append(_SMALL[s.method])
        else:
            parts.append(bytes((code, s.method)))
        ck = s.checksum or hash64(mv)  # a codec may pass the hash it already has
        parts += [varint(mv.nbytes), varint(s.raw_len), _trunc(ck, 8 * c).to_bytes(c, "little")]
    parts.append(_trunc(content_hash, 8 * c).to_bytes(c, "little"))
    head = b"".join(parts)
    return b"".join([head, _trunc(hash64(head), 8 * c).to_bytes(c, "little")] +
                    [s.stored for s in streams])


def _head_v1(codec, dtype_id, raw_size, params, streams, content_hash, flags, bound,
             max_error) -> bytes:
    parts = [_FIXED.pack(MAGIC, 1, CODEC_IDS[codec], dtype_id, flags, raw_size,
                         _opt(bound), _opt(max_error), content_hash, len(params),
                         len(streams), 0), bytes(params)]
    for s in streams:
        name = s.name.encode("ascii")
        mv = memoryview(s.stored).cast("B")
        parts.append(bytes([len(name)]) + name)
        parts.append(_ENTRY.pack(s.method, mv.nbytes, s.raw_len, hash64(mv)))
    return b"".join(parts)


def codec_name(frame) -> str:
    """The codec of a frame from its first six bytes (both versions keep the codec id
    in byte 5), without parsing or checking the rest: for scans of many frames."""
    mv = memoryview(frame).cast("B")
    if mv.nbytes < 6 or bytes(mv[:4]) != MAGIC or mv[4] not in SUPPORTED_VERSIONS:
        raise FrameError("not an elvesfs codec frame")
    return CODEC_NAMES.get(mv[5] & 0x0F, f"#{mv[5] & 0x0F}")


def parse(frame) -> Header:
    """Parse and verify the header (not the streams' contents)."""
    mv = memoryview(frame).cast("B")
    n = mv.nbytes
    if n < 16:
        raise FrameError(f"frame truncated: {n} bytes is shorter than any header; the stored "
                         "chunk is damaged or not a codec frame")
    if bytes(mv[:4]) != MAGIC:
        raise FrameError(f"not a codec frame: bad magic {bytes(mv[:4])!r} (expected {MAGIC!r})")
    version = mv[4]
    if version not in SUPPORTED_VERSIONS:
        raise FrameError(f"frame format version {version} is not supported by this codec library "
                         f"(supports {SUPPORTED_VERSIONS}); upgrade the codec package")
    try:
        h, pos = (_parse_v1 if version == 1 else _parse_v2)(mv)
    except (IndexError, struct.error):
        raise FrameError(f"frame truncated inside its header ({n} bytes); the stored chunk is "
                         "damaged") from None
    if h.codec not in CODEC_IDS:
        raise FrameError(f"unknown codec id {h.codec} in frame; upgrade the codec package")
    for s in h.streams:
        if s.method not in METHOD_NAMES:
            raise FrameError(f"stream {s.name!r} has unknown coding method {s.method}")
        s.offset = pos
        pos += s.stored_len
    if pos != n:
        what = "truncated" if pos > n else "has trailing bytes"
        raise FrameError(f"frame {what}: header says {pos} bytes, got {n}; the stored chunk is "
                         "damaged")
    _link_guards(h)
    return h


COPY = "~"  # suffix of a protected stream's copy (frames written before parity)
PARITY = "^"  # suffix of a protected stream's parity
PARITY_STRIPES = 8  # at most this many stripes: parity costs ~1/8 of the stream
PARITY_STRIPE_MIN = 4096  # and stripes of at least this many bytes (smaller: one, a copy)


def _link_guards(h: Header) -> None:
    """Take the ``X~`` copies and ``X^`` parities out of ``h.streams`` and hang each on
    its stream ``X``. The other streams keep their order, and streams that share a name
    (the buckets of a split xor plane) all stay: ``protect`` only guards streams whose
    name is unique in their frame."""
    if not any(s.name[-1:] in (COPY, PARITY) for s in h.streams):
        return
    plain = [s for s in h.streams if s.name[-1:] not in (COPY, PARITY)]
    by_name: dict[str, Stream] = {}
    for s in plain:
        by_name.setdefault(s.name, s)
    for g in h.streams:
        if g.name[-1:] not in (COPY, PARITY):
            continue
        s = by_name.get(g.name[:-1])
        if g.name.endswith(COPY):
            if s is None or (s.method, s.raw_len, s.stored_len, s.checksum) != \
                    (g.method, g.raw_len, g.stored_len, g.checksum):
                raise FrameError(f"stream copy {g.name!r} matches no stream of the frame")
            s.backup = g
        elif g.name.endswith(PARITY):
            if s is None or g.method != METHOD_RAW or g.raw_len != g.stored_len:
                raise FrameError(f"stream parity {g.name!r} matches no stream of the frame")
            s.parity = g
    h.streams = plain


def _stripes(n: int) -> int:
    """Stripes of a protected stream of n stored bytes: PARITY_STRIPES, fewer when they
    would be shorter than PARITY_STRIPE_MIN, one (a copy) below two of those."""
    return max(1, min(PARITY_STRIPES, n // PARITY_STRIPE_MIN))


def _rows(data, k: int) -> np.ndarray:
    """``data`` as k rows of m = ceil(len / k) bytes, the last padded with zeros."""
    a = np.frombuffer(data, np.uint8)
    m = -(-a.size // k)
    rows = np.zeros((k, m), np.uint8)
    rows.reshape(-1)[:a.size] = a
    return rows


def _stripe_checks(rows: np.ndarray) -> list[int]:
    return [_trunc(hash64(r), 32) for r in rows]


def parity(data) -> bytes:
    """The stored bytes of the parity stream of a stream whose stored bytes are ``data``."""
    k = _stripes(memoryview(data).nbytes)
    rows = _rows(data, k)
    return bytes([k]) + struct.pack(f"<{k}I", *_stripe_checks(rows)) + \
        np.bitwise_xor.reduce(rows, axis=0).tobytes()


def _rebuild(mv: memoryview, s: Stream) -> bytes | None:
    """Stream ``s``'s stored bytes rebuilt from its parity; None when the parity is
    damaged, or not exactly one stripe of ``s`` is, or the result fails s's checksum."""
    p = s.parity
    if p is None or p.stored_len < 5 or not _intact(mv, p):
        return None
    pb = mv[p.offset:p.offset + p.stored_len]
    k, n = pb[0], s.stored_len
    m = -(-n // k) if k else 0
    if k == 0 or p.stored_len != 1 + 4 * k + m:
        return None
    rows = _rows(mv[s.offset:s.offset + n], k)
    checks = struct.unpack_from(f"<{k}I", pb, 1)
    bad = [i for i, c in enumerate(_stripe_checks(rows)) if c != checks[i]]
    if len(bad) != 1:
        return None
    rows[bad[0]] = np.frombuffer(pb, np.uint8, offset=1 + 4 * k)
    rows[bad[0]] = np.bitwise_xor.reduce(rows, axis=0)  # the parity XOR the other stripes
    out = rows.reshape(-1)[:n].tobytes()
    return out if _trunc(hash64(out), s.check_bits) == s.checksum else None


def protect(frame, elements: int) -> bytes:
    """``frame`` with a parity for each of its most significant streams: the leading
    streams (the table is most significant first) up to the first that holds one byte
    per element (the sign+exponent plane; ELF: the outliers and the top plane; a delta:
    the top byte of every class, with sub+blocks the widths too). A frame without such
    a stream (opaque bytes), or whose streams are all leading ones (one zstd stream,
    ELF's joint layout), comes back as it is; except a delta, whose every byte is as
    significant as the next (sub+blocks of deltas under 8 bits: top bytes only)."""
    h = parse(frame)
    if elements <= 0 or any(s.protected for s in h.streams) or h.version != FORMAT_VERSION:
        return bytes(frame)
    mv = memoryview(frame).cast("B")
    lead, covered = [], 0
    for s in h.streams:
        lead.append(s)
        covered += s.raw_len
        if covered >= elements:
            break
    names = [s.name for s in h.streams]
    all_lead = len(lead) == len(h.streams)
    whole_delta = all_lead and h.codec == "xor"  # guarded whole (see above)
    if (not whole_delta and (covered < elements or all_lead)) or \
            len(h.streams) + len(lead) > 255 or any(names.count(s.name) > 1 for s in lead):
        return bytes(frame)
    streams = [replace(s, stored=mv[s.offset:s.offset + s.stored_len]) for s in h.streams]
    for s in streams[:len(lead)]:
        par = parity(s.stored)
        streams.append(Stream(s.name + PARITY, METHOD_RAW, len(par), par))
    return pack(h.codec, h.dtype_id, h.raw_size, h.params, streams, h.content_hash,
                lossy=h.lossy, needs_reference=h.needs_reference, bound=h.bound,
                max_error=h.max_error, version=PARITY_VERSION)


def _check_header(mv, pos: int, c: int) -> int:
    """Verify the c-byte header checksum at ``pos``; the position after it."""
    if pos + c > mv.nbytes:
        raise IndexError
    if _trunc(hash64(mv[:pos]), 8 * c) != int.from_bytes(mv[pos:pos + c], "little"):
        raise FrameError("frame header checksum mismatch: the chunk's header is corrupt")
    return pos + c


def _parse_v2(mv) -> tuple[Header, int]:
    cid, flags, dtype_id = mv[5] & 15, mv[5] >> 4, mv[6]
    raw_size, pos = read_varint(mv, 7)
    c = 8 if raw_size >= WIDE_FROM else 4
    plen, pos = read_varint(mv, pos)
    params = bytes(mv[pos:pos + plen])
    if len(params) != plen:
        raise IndexError
    pos += plen
    bound = max_error = None
    if flags & _V2_BOUND:
        (bound,), pos = _F64.unpack_from(mv, pos), pos + 8
    if flags & _V2_MAXERR:
        (max_error,), pos = _F64.unpack_from(mv, pos), pos + 8
    nstreams, pos = mv[pos], pos + 1
    streams = []
    for _ in range(nstreams):
        code, pos = mv[pos], pos + 1
        if code == _NAME_LITERAL:
            ln = mv[pos]
            name = bytes(mv[pos + 1:pos + 1 + ln]).decode("ascii", "replace")
            pos += 1 + ln
        else:
            name = STREAM_NAMES[code] if code < len(STREAM_NAMES) else f"#{code}"
        method, pos = mv[pos], pos + 1
        stored_len, pos = read_varint(mv, pos)
        raw_len, pos = read_varint(mv, pos)
        ck, pos = int.from_bytes(mv[pos:pos + c], "little"), pos + c
        streams.append(Stream(name, method, raw_len, None, stored_len, ck, check_bits=8 * c))
    content, pos = int.from_bytes(mv[pos:pos + c], "little"), pos + c
    pos = _check_header(mv, pos, c)
    h = Header(CODEC_NAMES.get(cid, cid), mv[4], dtype_id, flags & 3, raw_size, bound, max_error,
               content, params, streams, pos, check_bits=8 * c)
    return h, pos


def _parse_v1(mv) -> tuple[Header, int]:
    (_magic, _version, cid, dtype_id, flags, raw_size, bound, max_error, content_hash,
     plen, nstreams, _res) = _FIXED.unpack_from(mv, 0)
    pos = _FIXED.size
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
    pos = _check_header(mv, pos, 8)
    h = Header(CODEC_NAMES.get(cid, cid), 1, dtype_id, flags, raw_size,
               None if math.isnan(bound) else bound,
               None if math.isnan(max_error) else max_error,
               content_hash, params, streams, pos)
    return h, pos


def mend(frame) -> tuple[bytes, list[str]]:
    """(``frame`` with every damaged copy or parity of a protected stream rewritten from
    the intact stream, or the damaged stream from its intact copy or parity; the names
    of the streams mended): what a scrub writes back, so the next damage to the same
    stream is survivable again. Damage beyond repair is left as it is."""
    h = parse(frame)
    mv = memoryview(frame).cast("B")
    out, names = None, []
    for s in h.streams:
        fixes = _fixes(mv, s)
        if fixes:
            if out is None:
                out = bytearray(mv)
            for at, data in fixes:
                out[at:at + len(data)] = data
            names.append(s.name)
    return (bytes(out) if out is not None else bytes(mv)), names


def _fixes(mv: memoryview, s: Stream) -> list[tuple[int, bytes]]:
    """(offset, bytes) writes that mend stream ``s`` and its guards in frame ``mv``."""
    ok = _intact(mv, s)
    good = mv[s.offset:s.offset + s.stored_len] if ok else None
    if good is None and s.backup is not None and _intact(mv, s.backup):
        good = mv[s.backup.offset:s.backup.offset + s.backup.stored_len]
    if good is None and s.parity is not None:
        good = _rebuild(mv, s)
    if good is None:
        return []
    fixes = [] if ok else [(s.offset, bytes(good))]
    if s.backup is not None and not _intact(mv, s.backup):
        fixes.append((s.backup.offset, bytes(good)))
    if s.parity is not None and not _intact(mv, s.parity):
        par = parity(good)
        if len(par) == s.parity.stored_len:  # (a parity of other stripes: left alone)
            fixes.append((s.parity.offset, par))
    return fixes


def _intact(mv: memoryview, s: Stream) -> bool:
    """Whether stream ``s``'s stored bytes in the frame ``mv`` match their checksum."""
    return _trunc(hash64(mv[s.offset:s.offset + s.stored_len]), s.check_bits) == s.checksum


def stream_view(frame, s: Stream) -> memoryview:
    """The stored bytes of stream ``s``, checksum verified (a protected stream that fails
    its checksum: its copy's if that one is intact, or rebuilt from its parity)."""
    mv = memoryview(frame).cast("B")
    for x in (s, s.backup):
        if x is not None and _intact(mv, x):
            return mv[x.offset:x.offset + x.stored_len]
    rebuilt = _rebuild(mv, s)
    if rebuilt is not None:
        return memoryview(rebuilt)
    raise FrameError(f"stream {s.name!r} checksum mismatch: its stored bytes are corrupt",
                     damaged=(s.name,))
