"""A sealed file's layout: which stored chunk holds each byte range.

On disk (table `layouts`, value) a layout is a packed array of extents, one per
chunk, in file order::

    end   u64 little-endian   file offset one past the extent's last byte
    id    16 bytes            chunk id (xxh3-128 of the raw bytes); all zero = hole

Extent i covers [end[i-1], end[i]) (end[-1] = 0). A hole reads as zeros and
references no chunk, so sparse files stay sparse in the store.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np

EXTENT = np.dtype([("end", "<u8"), ("id", "V16")])
HOLE = bytes(16)


@dataclass(frozen=True)
class Layout:
    """An immutable extent array with fast offset lookup."""

    ext: np.ndarray  # dtype EXTENT

    @classmethod
    def empty(cls) -> "Layout":
        return cls(np.zeros(0, dtype=EXTENT))

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Layout":
        if len(raw) % EXTENT.itemsize:
            raise ValueError("layout record has a partial extent")
        return cls(np.frombuffer(raw, dtype=EXTENT))

    @classmethod
    def build(cls, extents: list[tuple[int, bytes]]) -> "Layout":
        arr = np.zeros(len(extents), dtype=EXTENT)
        if extents:
            arr["end"] = [e for e, _ in extents]
            arr["id"] = [i for _, i in extents]
        return cls(arr)

    def to_bytes(self) -> bytes:
        return self.ext.tobytes()

    @cached_property
    def _ends(self) -> list[int]:
        """The extents' ends as Python ints: a read looks extents up several times per
        request, and numpy's per-element access costs microseconds each."""
        return self.ext["end"].tolist()

    @property
    def size(self) -> int:
        return self._ends[-1] if len(self.ext) else 0

    def __len__(self) -> int:
        return len(self.ext)

    def start(self, i: int) -> int:
        return self._ends[i - 1] if i > 0 else 0

    def end(self, i: int) -> int:
        return self._ends[i]

    def length(self, i: int) -> int:
        """Bytes of the file that extent `i` holds."""
        return self._ends[i] - self.start(i)

    @cached_property
    def _ids(self) -> bytes:
        """The ids packed (16 bytes each): slicing them is ~10x cheaper than numpy's
        per-element access, and a read request asks for a dozen."""
        return self.ext["id"].tobytes()

    def chunk_id(self, i: int) -> bytes:
        if not 0 <= i < len(self.ext):
            raise IndexError(f"extent {i} of {len(self.ext)}")
        return self._ids[16 * i:16 * i + 16]

    def find(self, offset: int) -> int:
        """Index of the extent containing `offset` (len(self) if past the end)."""
        return bisect.bisect_right(self._ends, offset)

    def starts_at(self, offset: int) -> bool:
        """Whether an extent starts at `offset` (a tail-staged file's base must)."""
        i = self.find(offset)
        return i < len(self) and self.start(i) == offset

    def chunk_ids(self, off: int, size: int) -> list[bytes]:
        """Ids of the chunks that hold bytes [off, off + size), holes excluded."""
        i, end = self.find(off), min(off + size, self.size)
        out = []
        while i < len(self) and self.start(i) < end:
            cid = self.chunk_id(i)
            if cid != HOLE:
                out.append(cid)
            i += 1
        return out

    def ids(self) -> list[bytes]:
        """Chunk ids in file order, holes excluded, repeats kept (one reference each)."""
        return [bytes(x) for x in self.ext["id"] if bytes(x) != HOLE]
