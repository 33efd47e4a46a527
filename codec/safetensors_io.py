"""Minimal safetensors reader/writer (8-byte LE header length + JSON header + data)
for the CLI and the benchmark. Never executes anything from the file."""
from __future__ import annotations

import json
import mmap
import struct


def read_header(buf) -> tuple[dict, int]:
    mv = memoryview(buf)
    if mv.nbytes < 8:
        raise ValueError("not a safetensors file: shorter than 8 bytes")
    (hlen,) = struct.unpack_from("<Q", mv, 0)
    if hlen > mv.nbytes - 8 or hlen > 100 << 20:
        raise ValueError("not a safetensors file: bad header length")
    header = json.loads(bytes(mv[8:8 + hlen]))
    return header, 8 + hlen


def tensors(buf):
    """Yield (name, dtype, shape, memoryview of the raw bytes) in file order."""
    header, base = read_header(buf)
    mv = memoryview(buf)
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    items.sort(key=lambda kv: kv[1]["data_offsets"][0])
    for name, v in items:
        s, e = v["data_offsets"]
        yield name, v["dtype"], tuple(v["shape"]), mv[base + s:base + e]


def open_file(path):
    """mmap a file read-only (returns a buffer)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def write(path, named: list[tuple[str, str, tuple, bytes]]):
    """Write (name, dtype, shape, bytes) tensors as a safetensors file."""
    header, off = {}, 0
    for name, dtype, shape, data in named:
        n = memoryview(data).nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, _, _, data in named:
            f.write(data)
