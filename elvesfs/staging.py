"""Staging files: where written data lives until it is sealed into the chunk store.

A staged inode has a plain sparse file STORE/staging/<ino> and a record in table
`staging` (key ino). The staging file's length is the file's logical size. The record
says where the rest of the content is:

    b"1"                    the staging file holds the *whole* current content
    b"T" + u64 base (BE)    "tail staged": bytes [0, base) are those of the inode's
                            sealed layout (still installed: only a seal replaces it),
                            the staging file holds [base, size) at the same offsets
                            and a hole below

Tail staging is how a write at the end of a large sealed file (an append to a log)
avoids copying the whole file: only its last chunk is copied (fs.py _stage), and the
seal reuses the layout's chunks below `base` (Sealer.seal). A write below `base`
first copies the rest in and records b"1" (fs.py _fill_base). Either way recovery
needs nothing else: at mount every staged inode is sealed again.

The record is committed before the first byte of new data is written, but after the
file holds a complete (fsynced) copy of the sealed content it replaces (of [base,
size) when tail staged); a file without a record is a copy a crash interrupted, and
recovery deletes it. The seal deletes the record in the same transaction that
installs the new layout, and only then removes the file.
"""

from __future__ import annotations

import os
import threading

import lmdb

from .db import Database
from .errors import StoreCorruptError
from .namespace import key


def record_base(value: bytes) -> int:
    """The base a staging record names (0: the staging file holds the whole content)."""
    value = bytes(value)
    if value == b"1":
        return 0
    if len(value) != 9 or value[:1] != b"T" or value[1:] == bytes(8):
        raise ValueError(f"damaged record {value!r}")
    return int.from_bytes(value[1:], "big")


class Staging:
    """Creates, finds and removes staging files and their records."""

    def __init__(self, db: Database, root: str) -> None:
        self.db = db
        self.dir = os.path.join(root, "staging")
        os.makedirs(self.dir, exist_ok=True)
        # Which staging files' directory entries are durable, so that fsync syncs the
        # directory once per file, not every time: each file the daemon creates or
        # opens gets a serial (`_serial`, ino -> serial), and `_durable` holds the
        # serial whose entry a directory sync covered. Serials, not a set of inodes: a
        # file removed and created again while a sync runs must not count as synced.
        self._lock = threading.Lock()
        self._next = 0
        self._serial: dict[int, int] = {}
        self._durable: dict[int, int] = {}

    def _opened(self, ino: int) -> None:
        with self._lock:
            self._next += 1
            self._serial[ino] = self._next

    def path(self, ino: int) -> str:
        return os.path.join(self.dir, str(ino))

    def create(self, txn: lmdb.Transaction, ino: int) -> int:
        """Open (creating, empty) the staging file of `ino`; returns an O_RDWR fd."""
        self.mark(txn, ino)
        return self.create_file(ino)

    def create_file(self, ino: int) -> int:
        """Create (empty) the staging file of `ino` without its record yet."""
        fd = os.open(self.path(ino), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._opened(ino)
        return fd

    def mark(self, txn: lmdb.Transaction, ino: int, base: int = 0) -> None:
        """Commit (with the caller's transaction) that `ino`'s content is its staging
        file, above `base` if tail staged (see the module doc)."""
        value = b"T" + base.to_bytes(8, "big") if base else b"1"
        txn.put(key(ino), value, db=self.db.t["staging"])

    def base(self, txn: lmdb.Transaction, ino: int) -> int:
        """Where the staging file's content starts: 0, or the base of a tail-staged file."""
        value = txn.get(key(ino), db=self.db.t["staging"])
        try:
            return record_base(value) if value is not None else 0
        except ValueError as exc:
            raise StoreCorruptError(f"staging record of inode {ino}: {exc}") from None

    def stray_files(self, txn: lmdb.Transaction) -> list[int]:
        """Staging files without a record: copies a crash interrupted (safe to delete)."""
        marked = set(self.staged(txn))
        out = []
        for name in os.listdir(self.dir):
            if name.isdigit() and int(name) not in marked:
                out.append(int(name))
        return out

    def open_existing(self, ino: int) -> int:
        """Open a staging file found at mount (its entry may not be durable: a kill -9)."""
        fd = os.open(self.path(ino), os.O_RDWR | os.O_CLOEXEC)
        self._opened(ino)
        return fd

    def forget(self, txn: lmdb.Transaction, ino: int) -> None:
        """Drop the record (in the caller's transaction); remove the file after commit."""
        txn.delete(key(ino), db=self.db.t["staging"])

    def remove_file(self, ino: int) -> None:
        with self._lock:
            self._serial.pop(ino, None)
            self._durable.pop(ino, None)
        try:
            os.unlink(self.path(ino))
        except FileNotFoundError:
            pass

    def staged(self, txn: lmdb.Transaction) -> list[int]:
        """Inodes with a staging record (to recover at mount)."""
        return [int.from_bytes(k, "big") for k, _ in txn.cursor(db=self.db.t["staging"])]

    def sync_entry(self, ino: int) -> None:
        """Make the directory entry of `ino`'s staging file durable (for fsync): a
        directory sync the first time, nothing once one has covered this file (a file
        this object did not create or open is synced every time)."""
        with self._lock:
            serial = self._serial.get(ino)
            if serial is not None and self._durable.get(ino) == serial:
                return
        self.sync_dir()
        with self._lock:
            if serial is not None and self._serial.get(ino) == serial:
                self._durable[ino] = serial

    def sync_dir(self) -> None:
        """Make the staging directory's entries durable (after creating a file)."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
