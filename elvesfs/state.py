"""In-memory state of open and staged inodes, and of open handles (never persisted)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import trio


@dataclass
class InodeState:
    """What the daemon knows about an inode beyond LMDB while it is open, staged or sealing.

    Invariant: `fd` is not None exactly when the inode's current content lives in its
    staging file (whose length is `size`); otherwise the content is its sealed layout.
    """

    ino: int
    fd: int | None = None
    size: int = 0
    mtime_ns: int | None = None  # set while newer than the stored inode
    ctime_ns: int | None = None
    handles: int = 0
    writers: int = 0
    sealing: bool = False
    abort: threading.Event = field(default_factory=threading.Event)
    seal_done: trio.Event | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def staged(self) -> bool:
        return self.fd is not None

    @property
    def idle(self) -> bool:
        """Nothing in memory that LMDB lacks: the state can be dropped."""
        return (self.fd is None and not self.handles and not self.sealing
                and self.mtime_ns is None and not self.lock.locked())


@dataclass
class Handle:
    """An open file handle."""

    ino: int
    writable: bool
    flags: int
    flushed: bool = False  # closed by the application, RELEASE not yet received


@dataclass
class DirHandle:
    """An open directory handle with a snapshot of its entries for stable readdir offsets."""

    ino: int
    entries: list[tuple[bytes, int]] | None = None
