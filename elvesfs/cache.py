"""A byte-bounded LRU cache of decoded chunks, shared by reader threads."""

from __future__ import annotations

import threading
from collections import OrderedDict


class ChunkCache:
    """Holds at most `capacity` bytes of decoded chunks; evicts least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._d: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, cid: bytes) -> bytes | memoryview | None:
        with self._lock:
            data = self._d.get(cid)
            if data is None:
                self.misses += 1
                return None
            self._d.move_to_end(cid)
            self.hits += 1
            return data

    def put(self, cid: bytes, data: bytes | memoryview) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            old = self._d.pop(cid, None)
            if old is not None:
                self.used -= len(old)
            self._d[cid] = data
            self.used += len(data)
            while self.used > self.capacity:
                _, ev = self._d.popitem(last=False)
                self.used -= len(ev)

    def __contains__(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._d

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.used = 0
