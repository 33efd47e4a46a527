"""Legacy torch.save (pre-1.6): five pickles, then each storage as u64 numel + raw bytes."""

from __future__ import annotations

import struct

from . import FormatError, Segment, Window, assemble, dtype_itemsize, role_for
from .pickle_walk import PickleTruncated, PList, find_storages, walk

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_PICKLE = 256 * 1024 * 1024
_FIRST_WINDOW = 1 << 16


def looks_legacy(head: bytes) -> bool:
    """The first pickle of a legacy file is torch's magic number (any pickle protocol)."""
    try:
        root, _ = walk(head, max_ops=16)
    except Exception:  # noqa: BLE001 - a sniff never raises
        return False
    return root == MAGIC_NUMBER and not isinstance(root, bool)


class _Prefix:
    """A growing in-memory copy of the file's head, where all the legacy pickles live."""

    def __init__(self, w: Window, size: int) -> None:
        self.w = w
        self.limit = min(size, MAX_PICKLE)
        self.buf = w.pread(0, min(_FIRST_WINDOW, self.limit))

    def next_pickle(self, pos: int) -> tuple[object, int]:
        """Walk the pickle at pos, doubling the copy until its STOP is inside (or the cap)."""
        while True:
            if pos >= len(self.buf) and len(self.buf) >= self.limit:
                raise FormatError(f"expected a pickle at {pos}, found the end (or the {MAX_PICKLE}-byte cap)")
            try:
                root, end = walk(self.buf[pos:])
                return root, pos + end
            except PickleTruncated:
                if len(self.buf) >= self.limit:
                    raise
            n = min(2 * len(self.buf), self.limit)
            self.buf += self.w.pread(len(self.buf), n - len(self.buf))


def parse(w: Window, size: int) -> list[Segment]:
    """Walk magic, protocol, sys_info, the object and the key list; then step over storages."""
    head = _Prefix(w, size)
    magic, pos = head.next_pickle(0)
    if magic != MAGIC_NUMBER:
        raise FormatError("bad magic number")
    proto, pos = head.next_pickle(pos)
    if proto != PROTOCOL_VERSION:
        raise FormatError(f"unsupported legacy protocol {proto!r}")
    _sys_info, pos = head.next_pickle(pos)
    root, pos = head.next_pickle(pos)
    keys, pos = head.next_pickle(pos)
    if not isinstance(keys, PList) or not all(isinstance(k, str) for k in keys.elems):
        raise FormatError("storage key list is not a list of strings")
    refs = find_storages(root)
    tensors: list[Segment] = []
    for key in keys.elems:
        ref = refs.get(key)
        if ref is None:
            raise FormatError(f"storage {key!r} is not referenced by the object pickle")
        (count,) = struct.unpack("<Q", w.pread(pos, 8))
        nbytes = count * (1 if ref.untyped else (dtype_itemsize(ref.dtype) or 0))
        if nbytes != ref.nbytes or count > size:
            raise FormatError(f"storage {key!r}: {count} on disk, pickle says {ref.nbytes} bytes of {ref.dtype}")
        pos += 8
        if pos + nbytes > size:
            raise FormatError(f"storage {key!r} runs past the end of the file")
        if nbytes:
            tensors.append(Segment(pos, nbytes, "tensor", ref.path, ref.dtype, ref.shape, role_for(ref.path)))
        pos += nbytes
    return assemble(size, tensors)
