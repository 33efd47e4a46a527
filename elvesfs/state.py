"""In-memory state of open and staged inodes, and of open handles (never persisted)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import trio

from .policy import Policy


MAX_AHEAD = 256  # out-of-order writes a pre-seal tracks before it gives up on a file


@dataclass
class Preseal:
    """Progress of coding a file's prefix while it is being written (see Sealer.preseal).

    Invariant: `pieces` are the final plan of [0, pos) as long as no write landed below
    `claimed` (the end of what a pre-seal has read); such a write drops the Preseal.
    A pre-seal reads only below `written`, the end of the gap-free prefix: FUSE may
    deliver concurrent writes out of order, and a late first write into a gap is not
    a rewrite."""

    policy: Policy  # what the pre-seal coded with; the final seal reuses it only if equal
    pos: int = 0
    claimed: int = 0
    written: int = 0  # [0, written) has been written with no gap
    ahead: dict = field(default_factory=dict)  # start -> end of writes beyond `written`
    pieces: list = field(default_factory=list)
    running: bool = False
    done: trio.Event = field(default_factory=trio.Event)

    def wrote(self, off: int, end: int) -> bool:
        """Record the write [off, end); False if writes are too scattered to follow."""
        if off > self.written:
            self.ahead[off] = max(self.ahead.get(off, off), end)
            return len(self.ahead) <= MAX_AHEAD
        self.written = max(self.written, end)
        while self.ahead:  # writes that arrived early now join the prefix
            start = min(self.ahead)
            if start > self.written:
                break
            self.written = max(self.written, self.ahead.pop(start))
        return True


@dataclass
class InodeState:
    """What the daemon knows about an inode beyond LMDB while it is open, staged or sealing.

    Invariant: `fd` is not None exactly when the inode's current content lives in its
    staging file (whose length is `size`), below `base` in its sealed layout (a tail-
    staged file: see staging.py); otherwise the content is its sealed layout.
    """

    ino: int
    fd: int | None = None
    size: int = 0
    base: int = 0  # while staged: [0, base) is the sealed layout's (tail staging)
    mtime_ns: int | None = None  # set while newer than the stored inode
    ctime_ns: int | None = None
    handles: int = 0
    writers: int = 0
    direct_writers: int = 0  # open handles whose writes bypass the kernel page cache
    mixed: bool = False  # a page-cache handle was opened while a direct writer was open
    sealing: bool = False
    abort: threading.Event = field(default_factory=threading.Event)
    seal_done: trio.Event | None = None
    preseal: Preseal | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def staged(self) -> bool:
        return self.fd is not None

    @property
    def idle(self) -> bool:
        """Nothing in memory that LMDB lacks: the state can be dropped."""
        return (self.fd is None and not self.handles and not self.sealing
                and self.mtime_ns is None and not self.lock.locked()
                and not (self.preseal is not None and self.preseal.running))


class InodeStates(dict[int, InodeState]):
    """The in-memory states by inode number: an entry lives while its inode is open,
    staged, sealing or has attributes newer than LMDB's, and goes once idle."""

    def of(self, ino: int) -> InodeState:
        """The inode's state, created empty if it has none."""
        st = self.get(ino)
        if st is None:
            st = self[ino] = InodeState(ino)
        return st

    def release(self, ino: int) -> None:
        """Forget the inode's state if nothing in it is newer than LMDB."""
        st = self.get(ino)
        if st is not None and st.idle:
            del self[ino]


@dataclass
class Handle:
    """An open file handle."""

    ino: int
    writable: bool
    flags: int
    flushed: bool = False  # closed by the application, RELEASE not yet received
    direct: bool = False  # opened with direct_io: its writes bypass the kernel page cache


@dataclass
class DirHandle:
    """An open directory handle with a snapshot of its entries for stable readdir offsets."""

    ino: int
    entries: list[tuple[bytes, int]] | None = None
