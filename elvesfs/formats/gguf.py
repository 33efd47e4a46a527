"""GGUF (llama.cpp's model files, common in Hugging Face caches).

Layout (little-endian, versions 2 and 3)::

    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count x  (string key, u32 value type, value)        # metadata; we only read
                                                            # general.alignment
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)
    padding to `alignment` (general.alignment, default 32), then the data section;
    each tensor's bytes start at data section + offset.

A string is a u64 length and that many UTF-8 bytes; an array value is a u32 item type,
a u64 count and the items. Tensors of plain element types (F32, F16, BF16, F64, ints)
become typed tensor segments (planes, ELF, XOR deltas); quantized ones (Q4_K, ...)
become tensor segments named by their ggml type, which ingest stores as opaque bytes
cut on the tensor's boundaries. Anything inconsistent raises FormatError (the file is
then stored as plain bytes).
"""

from __future__ import annotations

import struct

from . import FormatError, Segment, Window, assemble

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_HEADER = 128 << 20  # metadata + tensor infos (a 256k-token vocabulary is ~20 MiB)
MAX_COUNT = 1 << 24  # tensors, key-values, array items: far above any real model
MAX_DIMS = 8
MAX_NAME = 1 << 20  # a key or tensor name (values are skipped, never read whole)
DEFAULT_ALIGNMENT = 32
_READ = 1 << 20

# ggml type id -> (name, elements per block, bytes per block); the plain element types
# use the safetensors dtype names the codecs know
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
PLAIN_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})

# metadata value type -> fixed size in bytes (8 = string and 9 = array are special)
_VALUE_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def looks_gguf(head: bytes) -> bool:
    """Magic and a version this parser reads (v1's 32-bit counts are not supported)."""
    return len(head) >= 8 and head[:4] == MAGIC and struct.unpack_from("<I", head, 4)[0] in VERSIONS


class _Cursor:
    """Sequential reads of the header through a Window, 1 MiB at a time, never past
    MAX_HEADER or the file's end; values it only skips are never read."""

    def __init__(self, w: Window, size: int) -> None:
        self.w, self.size = w, size
        self.pos = 0
        self.buf, self.start = b"", 0

    def skip(self, n: int) -> int:
        """Move past n bytes without reading them; returns where they end."""
        end = self.pos + n
        if end > min(self.size, MAX_HEADER):
            raise FormatError(f"header runs past {'the file' if end > self.size else 'its cap'} "
                              f"(needs {end} bytes)")
        self.pos = end
        return end

    def take(self, n: int) -> bytes:
        if n > MAX_NAME:
            raise FormatError(f"a {n}-byte name or key")
        start = self.pos
        end = self.skip(n)
        self.pos = start
        if end > self.start + len(self.buf):
            self.start = self.pos
            self.buf = self.w.pread(self.pos, min(max(n, _READ), self.size - self.pos))
        out = self.buf[self.pos - self.start:end - self.start]
        self.pos = end
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def count(self, what: str) -> int:
        n = self.u64()
        if n > MAX_COUNT:
            raise FormatError(f"{what} count {n} is implausible")
        return n

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        """Move past a metadata value (read only its lengths: memory stays bounded)."""
        if vtype in _VALUE_SIZE:
            self.skip(_VALUE_SIZE[vtype])
        elif vtype == _STRING:
            self.skip(self.u64())
        elif vtype == _ARRAY and depth == 0:
            itype, n = self.u32(), self.count("array item")
            if itype in _VALUE_SIZE:
                self.skip(n * _VALUE_SIZE[itype])
            else:
                for _ in range(n):
                    self.skip_value(itype, depth + 1)
        else:
            raise FormatError(f"unknown metadata value type {vtype}")


def header(w: Window, size: int) -> tuple[int, list[tuple[str, tuple[int, ...], int, int]]]:
    """(data section offset, [(name, dims, ggml type, offset)]) from the header."""
    c = _Cursor(w, size)
    if c.take(4) != MAGIC or c.u32() not in VERSIONS:
        raise FormatError("not a GGUF v2/v3 file")
    ntensors, nkv = c.count("tensor"), c.count("key-value")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(nkv):
        key, vtype = c.string(), c.u32()
        if key == b"general.alignment":
            if vtype != _UINT32:
                raise FormatError("general.alignment is not a u32")
            alignment = c.u32()
            if alignment == 0 or alignment & (alignment - 1):
                raise FormatError(f"alignment {alignment} is not a power of two")
        else:
            c.skip_value(vtype)
    infos = []
    for _ in range(ntensors):
        name = c.string()
        ndims = c.u32()
        if ndims > MAX_DIMS:
            raise FormatError(f"tensor with {ndims} dimensions")
        dims = tuple(c.u64() for _ in range(ndims))
        gtype, offset = c.u32(), c.u64()
        try:
            infos.append((name.decode("utf-8"), dims, gtype, offset))
        except UnicodeDecodeError:
            raise FormatError("tensor name is not UTF-8") from None
    data = -(-c.pos // alignment) * alignment
    for name, _dims, _t, offset in infos:
        if offset % alignment:
            raise FormatError(f"tensor {name!r}: offset {offset} not aligned to {alignment}")
    return data, infos


def tensor_segments(data: int, infos, size: int) -> list[Segment]:
    """Tensor segments of a file of `size` bytes (FormatError if one does not fit)."""
    out = []
    for name, dims, gtype, offset in infos:
        if gtype not in GGML_TYPES:
            raise FormatError(f"tensor {name!r}: unknown ggml type {gtype}")
        tname, block, nbytes = GGML_TYPES[gtype]
        numel = 1
        for d in dims:
            numel *= d
        if numel % block:
            raise FormatError(f"tensor {name!r}: {numel} elements, not whole {tname} blocks")
        length = numel // block * nbytes
        start = data + offset
        if start + length > size:
            raise FormatError(f"tensor {name!r} ends at {start + length}, past the file ({size})")
        if length:
            out.append(Segment(start, length, "tensor", name,
                               tname if tname in PLAIN_TYPES else f"GGML_{tname}",
                               tuple(reversed(dims)), "weight"))
    return out


def parse(w: Window, size: int) -> list[Segment]:
    data, infos = header(w, size)
    if data > size:
        raise FormatError(f"data section starts at {data}, past the file ({size})")
    return assemble(size, tensor_segments(data, infos, size))


def promised_size(f, available: int) -> int | None:
    """The size a GGUF header promises (the end of its last tensor), once the whole
    header is within the first `available` bytes; else None."""
    w = Window(f, available)
    try:
        data, infos = header(w, available)
        segs = tensor_segments(data, infos, 1 << 62)
    except FormatError:
        return None
    return max([data] + [s.offset + s.length for s in segs])

