"""Legacy torch.save (pre-1.6): five pickles, then each storage as u64 numel + raw bytes."""

from __future__ import annotations

import struct

from . import FormatError, Segment, Window, assemble, dtype_itemsize, role_for
from .pickle_walk import PList, find_storages, walk

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_PICKLE = 256 * 1024 * 1024
_FIRST_WINDOW = 1 << 20


def looks_legacy(head: bytes) -> bool:
    """The first pickle of a legacy file is torch's magic number."""
    if not head.startswith(b"\x80"):
        return False
    try:
        root, _ = walk(head, max_ops=16)
    except Exception:  # noqa: BLE001 - a sniff never raises
        return False
    return root == MAGIC_NUMBER and not isinstance(root, bool)


def _next_pickle(w: Window, pos: int, size: int, budget: list[int]) -> tuple[object, int]:
    """Walk the pickle at pos, growing the read window until STOP (bounded by the cap)."""
    n = min(_FIRST_WINDOW, size - pos)
    while True:
        if n <= 0:
            raise FormatError(f"expected a pickle at {pos}, found end of file")
        raw = w.pread(pos, n)
        try:
            root, end = walk(raw)
        except FormatError:
            if n >= size - pos or n >= budget[0]:
                raise
            n = min(2 * n, size - pos, budget[0])
            continue
        budget[0] -= end
        if budget[0] < 0:
            raise FormatError(f"pickles exceed {MAX_PICKLE} bytes")
        return root, pos + end


def parse(w: Window, size: int) -> list[Segment]:
    """Walk magic, protocol, sys_info, the object and the key list; then step over storages."""
    budget = [MAX_PICKLE]
    magic, pos = _next_pickle(w, 0, size, budget)
    if magic != MAGIC_NUMBER:
        raise FormatError("bad magic number")
    proto, pos = _next_pickle(w, pos, size, budget)
    if proto != PROTOCOL_VERSION:
        raise FormatError(f"unsupported legacy protocol {proto!r}")
    _sys_info, pos = _next_pickle(w, pos, size, budget)
    root, pos = _next_pickle(w, pos, size, budget)
    keys, pos = _next_pickle(w, pos, size, budget)
    if not isinstance(keys, PList) or not all(isinstance(k, str) for k in keys.elems):
        raise FormatError("storage key list is not a list of strings")
    refs = find_storages(root)
    tensors: list[Segment] = []
    for key in keys.elems:
        ref = refs.get(key)
        if ref is None:
            raise FormatError(f"storage {key!r} is not referenced by the object pickle")
        (numel,) = struct.unpack("<Q", w.pread(pos, 8))
        isz = dtype_itemsize(ref.dtype)
        if isz is None or numel != ref.numel:
            raise FormatError(f"storage {key!r}: {numel} elements on disk, pickle says {ref.numel} {ref.dtype}")
        pos += 8
        nbytes = numel * isz
        if pos + nbytes > size:
            raise FormatError(f"storage {key!r} runs past the end of the file")
        if nbytes:
            tensors.append(Segment(pos, nbytes, "tensor", ref.path, ref.dtype, ref.shape, role_for(ref.path)))
        pos += nbytes
    return assemble(size, tensors)
