"""Sync points: how a store survives a power cut although LMDB's commits do not sync.

elvesfs commits with LMDB's MDB_NOSYNC (a commit only writes into the page cache) and
makes commits durable with Database.sync() (fsync, `elvesfs sync`, the end of a seal,
every 5 s). Between syncs the kernel writes dirty pages of data.mdb in any order, so
after a power cut the newest meta page on disk may describe a tree whose pages never
reached the disk. Two things make the last sync a state the store can always go back to:

1. Database holds a read transaction on the snapshot of the last sync (its pin). LMDB
   never reuses a page that a live snapshot can reach, so whatever later commits write,
   the synced tree stays intact on disk.
2. Each sync saves that snapshot's meta page here, with the machine's boot id. When a
   store is opened that the machine went down with (no clean close, last saved under
   another boot), the saved meta page is written back over both of data.mdb's meta
   pages: LMDB then opens the synced tree, and what was committed after it is dropped.
   A daemon killed while the machine stays up needs nothing: the kernel still holds
   every page it wrote, and LMDB's commits are atomic against a process dying.

On-disk format of STORE/syncpoint: two slots of SLOT bytes. A sync writes the slot that
does not hold the newest valid sync point, then fdatasyncs, and only then lets go of
the pin of that point: whenever the machine goes down, the newest valid sync point
(the new one, or the one before it if the new one was torn) has its tree intact. A
slot, little-endian::

    MAGIC (8) | txnid u64 | boot id (16) | clean u8 | pad (3) | page size u32 |
    meta page (page size bytes) | xxh3-64 of everything before it (8)

The valid slot with the larger txnid is the last sync point.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import uuid
from dataclasses import dataclass

import xxhash

log = logging.getLogger(__name__)

MAGIC = b"ELVSYNC1"
SLOT = 1 << 16  # room for LMDB page sizes up to 64 KiB
_HEAD = struct.Struct("<8sQ16sB3xI")
# LMDB 0.9 meta page: a 16-byte page header (pgno u64, pad u16, flags u16, ...) and
# MDB_meta (magic u32, version u32, ..., last_pg u64 at 136, txnid u64 at 144)
_PGNO = struct.Struct("<Q")
_FLAGS_AT, P_META = 10, 0x08
_MAGIC_AT, LMDB_MAGIC = 16, 0xBEEFC0DE
_TXNID_AT = 144


@dataclass(frozen=True)
class SyncPoint:
    """One saved sync point."""

    txnid: int
    boot: bytes
    clean: bool  # saved by a clean close: nothing was committed after it
    meta: bytes  # LMDB's meta page of that transaction


@functools.cache
def boot_id() -> bytes:
    """This boot's id (changes at every boot; read once: every sync records it);
    16 zero bytes where the kernel has none. The environment variable ELVESFS_BOOT_ID
    (a UUID) stands in for it: tests that cut the power (tests/crashfs.py) reboot
    nothing but the daemon."""
    try:
        if os.environ.get("ELVESFS_BOOT_ID"):
            return uuid.UUID(os.environ["ELVESFS_BOOT_ID"]).bytes
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def meta_txnid(page: bytes) -> int | None:
    """The transaction id of an LMDB meta page; None if `page` is not one."""
    if len(page) < _TXNID_AT + 8:
        return None
    flags = struct.unpack_from("<H", page, _FLAGS_AT)[0]
    magic = struct.unpack_from("<I", page, _MAGIC_AT)[0]
    if not flags & P_META or magic != LMDB_MAGIC:
        return None
    return struct.unpack_from("<Q", page, _TXNID_AT)[0]


def read_meta(data_path: str, psize: int) -> list[bytes]:
    """data.mdb's two meta pages as they are now (page cache, or disk before a mount)."""
    with open(data_path, "rb") as f:
        raw = f.read(2 * psize)
    return [raw[:psize], raw[psize:2 * psize]]


class SyncPoints:
    """The store's syncpoint file: the meta page of the last sync, in two slots."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "syncpoint")
        self._next: int | None = None  # the slot the next save writes

    def _slots(self) -> list[SyncPoint | None]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(2 * SLOT)
        except FileNotFoundError:
            return [None, None]
        return [self._parse(raw[i * SLOT:(i + 1) * SLOT]) for i in (0, 1)]

    def last(self) -> SyncPoint | None:
        """The newest valid sync point; None if there is none (a new store, or one
        made by an elvesfs without sync points)."""
        found = [p for p in self._slots() if p is not None]
        return max(found, key=lambda p: p.txnid) if found else None

    @staticmethod
    def _parse(slot: bytes) -> SyncPoint | None:
        if len(slot) < _HEAD.size:
            return None
        magic, txnid, boot, clean, psize = _HEAD.unpack_from(slot)
        end = _HEAD.size + psize
        if magic != MAGIC or end + 8 > len(slot):
            return None
        if xxhash.xxh3_64_intdigest(slot[:end]) != struct.unpack_from("<Q", slot, end)[0]:
            return None  # a slot torn by a crash while it was written: the other one holds
        meta = slot[_HEAD.size:end]
        if meta_txnid(meta) != txnid:
            return None
        return SyncPoint(txnid, boot, bool(clean), meta)

    def save(self, txnid: int, meta: bytes, clean: bool) -> None:
        """Record `meta` (transaction `txnid`, already durable in data.mdb) durably."""
        if self._next is None:  # never the slot of the newest valid point
            slots = self._slots()
            newest = max((i for i in (0, 1) if slots[i] is not None),
                         key=lambda i: slots[i].txnid, default=1)
            self._next = 1 - newest
        body = _HEAD.pack(MAGIC, txnid, boot_id(), int(clean), len(meta)) + meta
        slot = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, slot, self._next * SLOT)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._next = 1 - self._next


def pending(root: str) -> tuple[SyncPoint, int | None] | None:
    """(the sync point, the newest transaction on disk) if the machine went down with
    the store open and commits after that point may be torn: recover() must run
    before anything reads the store."""
    data = os.path.join(root, "data.mdb")
    point = SyncPoints(root).last()
    if point is None or point.clean or point.boot == boot_id() or not os.path.exists(data):
        return None
    newest = max((t for t in map(meta_txnid, read_meta(data, len(point.meta)))
                  if t is not None), default=None)
    if newest is not None and newest <= point.txnid:
        return None  # nothing was committed after the sync point
    return point, newest


def recover(root: str) -> int | None:
    """Before LMDB opens a store: if the machine went down with it open, put the last
    sync point's meta page back into data.mdb. Returns the transaction id the store
    went back to, or None when nothing was needed (or possible)."""
    found = pending(root)
    if found is None:
        return None
    point, newest = found
    psize = len(point.meta)
    data = os.path.join(root, "data.mdb")
    fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
    try:
        for slot in (0, 1):
            os.pwrite(fd, _PGNO.pack(slot) + point.meta[_PGNO.size:], slot * psize)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("store %s: the machine went down with it open; back to its last sync point "
                "(transaction %d, newest on disk %s): what was not fsync'd before it is lost",
                root, point.txnid, newest)
    return point.txnid
