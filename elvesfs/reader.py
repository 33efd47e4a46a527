"""Rebuilds file bytes from a layout: fetch, verify and decode chunks, through the LRU cache.

Everything here is synchronous and thread-safe; the FUSE layer calls it from worker
threads so that decoding never runs on the event loop.
"""

from __future__ import annotations

import threading

import numpy as np

from .cache import ChunkCache
from .chunkstore import ChunkStore
from .coding import decode_chunk
from .db import Database
from .errors import StoreCorruptError
from .layout import HOLE, Layout


class ChunkReader:
    """Decoded-chunk access with single-flight decoding (one decode per chunk at a time)."""

    def __init__(self, db: Database, chunks: ChunkStore, cache: ChunkCache) -> None:
        self.db = db
        self.chunks = chunks
        self.cache = cache
        self._inflight: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, cid: bytes) -> bytes | memoryview:
        """The decoded bytes of chunk `cid`, read-only (ChunkCorruptError on a bad checksum)."""
        data = self.cache.get(cid)
        if data is not None:
            return data
        with self._lock:
            ev = self._inflight.get(cid)
            owner = ev is None
            if owner:
                ev = self._inflight[cid] = threading.Event()
        if not owner:
            ev.wait(60)
            data = self.cache.get(cid)
            if data is not None:
                return data
        try:
            data = self._decode(cid)
            self.cache.put(cid, data)
            return data
        finally:
            if owner:
                with self._lock:
                    self._inflight.pop(cid, None)
                ev.set()

    def _decode(self, cid: bytes) -> bytes | memoryview:
        # Record and frame from one snapshot: the sealer re-codes chunks in place (alone
        # <-> delta) while files are read. Decoded straight from the map (no copy of the
        # frame), inside the transaction.
        with self.db.read(buffers=True) as txn:
            rec = self.chunks.record(txn, cid)
            if rec is None:
                raise StoreCorruptError(f"chunk {cid.hex()} is missing; run `elvesfs fsck`")
            reference = self.get(rec.ref) if rec.is_delta else None
            return decode_chunk(cid, self.chunks.frame(txn, cid), rec.flags, reference)

    def cached_range(self, layout: Layout, off: int, size: int) -> bytes | memoryview | None:
        """The bytes if every chunk they need is cached (a fast path for the event loop)."""
        parts = []
        i = layout.find(off)
        end = min(off + size, layout.size)
        pos = off
        while pos < end:
            cid = layout.chunk_id(i)
            start, stop = layout.start(i), layout.end(i)
            if cid == HOLE:
                data = None
                parts.append(bytes(min(stop, end) - pos))
            else:
                data = self.cache.get(cid)
                if data is None:
                    return None
                parts.append(memoryview(data)[pos - start:min(stop, end) - start])
            pos = min(stop, end)
            i += 1
        return _joined(parts)

    def read_range(self, layout: Layout, off: int, size: int) -> bytes | memoryview:
        """Bytes [off, off+size) of a sealed file, clipped to its size."""
        parts = []
        end = min(off + size, layout.size)
        pos = off
        i = layout.find(off)
        while pos < end:
            cid = layout.chunk_id(i)
            start, stop = layout.start(i), layout.end(i)
            take_end = min(stop, end)
            if cid == HOLE:
                parts.append(bytes(take_end - pos))
            else:
                data = self.get(cid)
                if len(data) != stop - start:
                    raise StoreCorruptError(f"chunk {cid.hex()} decodes to {len(data)} bytes, "
                                            f"layout expects {stop - start}")
                parts.append(memoryview(data)[pos - start:take_end - start])
            pos = take_end
            i += 1
        return _joined(parts)

    def copy_to_fd(self, layout: Layout, fd: int, start: int = 0, end: int | None = None
                   ) -> None:
        """Write a sealed file's extents from the one holding `start` to the one holding
        `end - 1` into `fd` at their offsets (holes stay holes): to stage a rewrite."""
        if end is not None and end <= start:
            return
        first = layout.find(start)
        last = len(layout) if end is None else min(layout.find(end - 1) + 1, len(layout))
        for i in range(first, last):
            cid = layout.chunk_id(i)
            if cid == HOLE:
                continue
            data = self.get(cid)
            os_pwrite_all(fd, data, layout.start(i))


def _joined(parts: list) -> bytes | memoryview:
    """The parts as one buffer; a single part as it is, a view of its cached chunk
    (pyfuse3 copies the reply into the kernel from any buffer: no 1 MiB copy into fresh
    memory per read, and the view keeps the chunk alive however the cache evicts).
    Several are joined by numpy, which copies without the GIL (``b"".join`` holds it:
    ~0.5 ms per 1 MiB read that the event loop, sending the previous reply, waits for)."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([np.frombuffer(p, np.uint8) for p in parts]).data


def os_pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    """pwrite that loops over short writes."""
    import os
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, off)
        mv = mv[n:]
        off += n
