"""safetensors: u64 LE header length, JSON header, then the data section."""

from __future__ import annotations

import json
import math
import os
import struct

from . import DTYPE_BITS, FormatError, Segment, Window, assemble, role_for

MAX_HEADER = 100 * 1024 * 1024


def looks_safetensors(head: bytes, size: int) -> bool:
    """Cheap sniff: a sane header length followed by a JSON object."""
    if len(head) < 9 or size < 10:
        return False
    (n,) = struct.unpack_from("<Q", head, 0)
    return 2 <= n <= min(size - 8, MAX_HEADER) and head[8:9] == b"{"


def promised_size(f, available: int) -> int | None:
    """The file size a safetensors header promises (8 + header + the end of its last
    tensor), once the header is all within the first `available` bytes; else None."""
    head = os.pread(f.fileno(), 9, 0)
    if not looks_safetensors(head, 1 << 62):
        return None
    (n,) = struct.unpack_from("<Q", head, 0)
    if 8 + n > available:
        return None
    try:
        header = json.loads(os.pread(f.fileno(), n, 8))
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offs, list) or len(offs) != 2 or not all(map(_is_int, offs))):
            return None
        end = max(end, offs[1])
    return 8 + n + end


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse(w: Window, size: int) -> list[Segment]:
    """Validate the header as strictly as safetensors does, except gaps become bytes."""
    (n,) = struct.unpack("<Q", w.pread(0, 8))
    if n > size - 8 or n > MAX_HEADER:
        raise FormatError(f"header length {n} out of range")
    raw = w.pread(8, n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    base = 8 + n
    data_len = size - base
    tensors: list[Segment] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise FormatError("__metadata__ is not an object")
            continue
        if not isinstance(info, dict):
            raise FormatError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise FormatError(f"tensor {name!r}: bad dtype")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise FormatError(f"tensor {name!r}: bad shape")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise FormatError(f"tensor {name!r}: bad data_offsets")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise FormatError(f"tensor {name!r}: offsets {begin}..{end} outside data ({data_len})")
        bits = DTYPE_BITS.get(dtype)
        if bits is not None:
            nbits = math.prod(shape) * bits
            if nbits % 8 or nbits // 8 != end - begin:
                raise FormatError(f"tensor {name!r}: {end - begin} bytes for {dtype}{shape}")
        if end > begin:
            tensors.append(
                Segment(base + begin, end - begin, "tensor", name, dtype, tuple(shape), role_for(name))
            )
    tensors.sort(key=lambda s: s.offset)
    for a, b in zip(tensors, tensors[1:]):
        if b.offset < a.offset + a.length:
            raise FormatError(f"tensors {a.name!r} and {b.name!r} overlap")
    return assemble(size, tensors)
