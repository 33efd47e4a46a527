"""The LMDB environment: one file holds every table of a store, so a seal commits atomically.

On-disk layout of a store directory::

    STORE/data.mdb, lock.mdb   LMDB environment (tables below); while mounted data.mdb
                               runs up to GROW_AHEAD past LMDB's last page (allocated
                               zeros, cut off again at close; see prepare_growth)
    STORE/staging/<ino>        staging files of inodes being written (plain sparse files)
    STORE/daemon.lock          fcntl lock held by the one daemon serving the store
    STORE/reserve              RESERVE allocated bytes given back on a full disk, so that
                               the transactions which free space (unlink, rename over a
                               file) can still commit; allocated again once space is back
    STORE/elvesfs.log          daemon log
    STORE/syncpoint            the meta page of the last sync (see syncpoint.py): what a
                               store goes back to after a power cut

Tables (all keys big-endian so cursors iterate in numeric order):

    meta       b"format" -> b"elvesfs-2" (an elvesfs-1 store is upgraded when first
               opened for writing);  b"next_ino" -> u64;  b"synced" -> u64, the count
               of sync marks (see Database._mark)
    inodes     ino u64 -> packed attributes (see namespace.INODE)
    dentries   parent u64 + name -> child ino u64
    symlinks   ino -> target bytes
    xattrs     ino + name -> value
    layouts    ino -> extent array (see layout.py)
    staging    ino -> staging record (see staging.py)
    fstats     ino -> JSON per-file ingest statistics
    chunks     chunk id (16 bytes) -> codec frame
    refs       chunk id -> chunk record (refcount, sizes, reference chunk, flags, delta
               users; see chunkstore.py)
    zero       chunk id -> b"" for chunks whose refcount is 0 (garbage, collected by the sealer)
    orphans    chunk id -> b"" for chunks held only by the delta chunks that use them (their
               files are gone); the sealer codes those users without them, then collects them
    tindex     xxh3-64(tensor name, dtype, piece size) + piece index u32 -> chunk id of the
               latest stored piece of that tensor: the reference candidate for XOR delta
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import threading
from typing import Callable, Iterator, Sequence, TypeVar

import lmdb

from .errors import StoreCorruptError, StoreFullError
from .syncpoint import SyncPoints, meta_txnid, pending, read_meta, recover

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = b"elvesfs-2"  # elvesfs-1: chunk records without deps, no orphans table (upgraded)
FORMAT_V1 = b"elvesfs-1"
NEW_IN_V2 = ("orphans",)
TABLES = ("meta", "inodes", "dentries", "symlinks", "xattrs", "layouts", "staging", "tindex",
          "fstats", "chunks", "refs", "zero", "orphans")
MIN_MAP = 1 << 30
RESERVE = 8 << 20
FULL_BELOW = 1 << 20  # free bytes under which a failed commit is taken for a full disk
GROW_AHEAD = 128 << 20  # data.mdb is allocated, and cached, this far past LMDB's last page
GROW_STEP = 16 << 20  # ... topped up once this much of it has been used
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (the os module lacks it); None where libc has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def _map_size(path: str) -> int:
    """Size the map to the disk (the store can never outgrow it), grown at each mount."""
    disk = shutil.disk_usage(path).total
    try:
        used = os.path.getsize(os.path.join(path, "data.mdb"))
    except OSError:
        used = 0
    return max(MIN_MAP, disk + used, used * 2)


class Database:
    """An LMDB environment with elvesfs' named tables and translated errors."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._pin: lmdb.Transaction | None = None  # the snapshot of the last sync
        self._synced = 0  # its transaction id
        self.syncpoints = SyncPoints(path)
        if readonly and pending(path) is not None:
            # the newest commits may be torn, and a read-only open cannot put the sync
            # point back: reading the tree as it is could return garbage or SIGBUS
            raise StoreCorruptError(
                f"store {path} was open when the machine went down; mount it or run "
                f"`elvesfs fsck {path}` first (either puts it back to its last sync point)")
        self.rolled_back = None if readonly else recover(path)
        try:
            self.env = lmdb.open(path, map_size=_map_size(path), max_dbs=len(TABLES) + 1,
                                 subdir=True, readonly=readonly, sync=False, metasync=False,
                                 readahead=True, max_readers=512, lock=True,
                                 create=not readonly)
        except lmdb.Error as exc:
            raise StoreCorruptError(f"cannot open store {path}: {exc}") from exc
        self.t = {name: self.env.open_db(name.encode(), create=not readonly) for name in TABLES} \
            if not readonly else self._open_readonly()
        self._reserve = os.path.join(path, "reserve")
        self._reserve_ok = False  # allocated; set back to False when given back
        self._data = os.path.join(path, "data.mdb")
        self._grown = 0  # data.mdb is allocated and cached up to this offset
        self._wb_lock = threading.Lock()
        self._waiting = 0  # writers waiting for LMDB's writer lock (see write_batch)
        self._turn = threading.Condition()
        if not readonly:
            # the state found is this run's first sync point, pinned before any commit:
            # until it is saved, a power cut goes back to the last run's sync point,
            # whose tree no snapshot pins any more
            self.sync(mark=False)
            self._check_format()
            self.refill_reserve()
            self.sync(mark=True)  # what the last run's last commit freed is reusable

    def _open_readonly(self) -> dict:
        """The tables; a store of an earlier format lacks the newer ones (a read-only
        open cannot upgrade it), which are left out."""
        out = {}
        for name in TABLES:
            try:
                out[name] = self.env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:
                if name not in NEW_IN_V2:
                    raise
        return out

    def _check_format(self) -> None:
        with self.write() as txn:
            fmt = txn.get(b"format", db=self.t["meta"])
            if fmt is None:
                txn.put(b"format", FORMAT, db=self.t["meta"])
            elif fmt == FORMAT_V1:
                self._upgrade_from_v1(txn)
            elif fmt != FORMAT:
                raise StoreCorruptError(f"store {self.path} has format {fmt!r}, expected {FORMAT!r}")

    def _upgrade_from_v1(self, txn: lmdb.Transaction) -> None:
        """elvesfs-1 -> 2: chunk records gain their count of delta chunks and the orphans
        table is filled (one scan and rewrite of the chunk records, in the same
        transaction as the new format mark)."""
        from .chunkstore import ChunkStore  # chunkstore builds on this module
        n = ChunkStore(self).upgrade_records(txn)
        txn.put(b"format", FORMAT, db=self.t["meta"])
        log.info("store %s upgraded from %s to %s (%d chunk records)", self.path,
                 FORMAT_V1.decode(), FORMAT.decode(), n)

    @contextlib.contextmanager
    def read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read-only snapshot; cheap, usable from any thread (py-lmdb uses MDB_NOTLS).

        With `buffers`, get() returns views into the map instead of copies: they are
        valid only until the transaction ends."""
        with self.env.begin(write=False, buffers=buffers) as txn:
            yield txn

    @contextlib.contextmanager
    def write(self, queue: bool = True) -> Iterator[lmdb.Transaction]:
        """A write transaction; LMDB allows one at a time, so callers keep them short.
        `queue`: see _begin_write."""
        try:
            with self._begin_write(queue) as txn:
                yield txn
        except lmdb.MapFullError as exc:
            raise StoreFullError(f"store map is full ({exc}); remount to grow it") from exc
        except lmdb.DiskError as exc:
            raise StoreFullError(f"no space left for the store: {exc}") from exc
        except lmdb.Error as exc:
            if "No space left" in str(exc) or "ENOSPC" in str(exc) or self._disk_full():
                raise StoreFullError(f"no space left for the store: {exc}") from exc
            raise

    def _begin_write(self, queue: bool = True) -> lmdb.Transaction:
        """LMDB's write transaction; `queue`: counted as waiting until it has the writer
        lock, so that a batch writer holding it hands it over (see write_batch)."""
        if not queue:
            return self.env.begin(write=True)
        with self._turn:
            self._waiting += 1
        try:
            return self.env.begin(write=True)
        finally:
            with self._turn:
                self._waiting -= 1
                self._turn.notify_all()

    def write_batch(self, items: Sequence[T], fn: Callable[[lmdb.Transaction, T], None]
                    ) -> None:
        """fn(txn, item) for every item, in as few write transactions as other writers
        allow: whenever one waits for LMDB's writer lock, the items done so far are
        committed and it goes first. For bulk work that need not commit as one (a seal's
        new chunks, which no layout uses until the seal installs its own): a metadata
        request on the event loop waited up to 30-60 ms behind a 16 MiB batch before
        (`create` + `stat` every 2 ms during `cp` + `elvesfs sync` of 1 GiB)."""
        i = 0
        while i < len(items):
            with self._turn:  # let the writers that asked first go
                self._turn.wait_for(lambda: self._waiting == 0, timeout=1.0)
            with self.write(queue=False) as txn:
                while i < len(items):
                    fn(txn, items[i])
                    i += 1
                    if self._waiting:
                        break

    def write_freeing(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """fn(txn) in a write transaction that frees space (unlink, rename over a file).
        On a full disk LMDB may still need a few new pages to commit it: the reserve is
        given back and the transaction run again, so a full disk never stops `rm`.
        fn must have no effect outside the transaction before it returns."""
        try:
            with self.write() as txn:
                return fn(txn)
        except StoreFullError:
            if not self._give_back_reserve():
                raise
        log.warning("disk full: gave back the store's %d MiB reserve to free space",
                    RESERVE >> 20)
        with self.write() as txn:
            return fn(txn)

    def _give_back_reserve(self) -> bool:
        """Free the reserve's blocks; whether it had any."""
        self._reserve_ok = False
        try:
            had = os.stat(self._reserve).st_blocks > 0
            os.truncate(self._reserve, 0)
            return had
        except OSError:
            return False

    def refill_reserve(self) -> None:
        """Allocate the reserve again when it is missing and the disk has room for it."""
        if self._reserve_ok:
            return
        try:
            fd = os.open(self._reserve, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("cannot create the store's reserve file: %s", exc)
            return
        try:
            if os.fstat(fd).st_blocks * 512 < RESERVE and \
                    shutil.disk_usage(self.path).free > 2 * RESERVE:
                os.posix_fallocate(fd, 0, RESERVE)
            self._reserve_ok = os.fstat(fd).st_blocks * 512 >= RESERVE
        except OSError as exc:
            log.warning("cannot allocate the store's reserve: %s", exc)
        finally:
            os.close(fd)

    def _disk_full(self) -> bool:
        """Whether the store's disk is (nearly) full: LMDB reports a write that ran out of
        space part-way through a commit as EIO, not ENOSPC."""
        try:
            return shutil.disk_usage(self.path).free < FULL_BELOW
        except OSError:
            return False

    def sync(self, mark: bool = False, clean: bool = False) -> None:
        """Flush committed transactions to disk (fsync): the durability point.

        Also the store's new sync point (see syncpoint.py): the snapshot synced stays
        pinned by a read transaction until the next sync, so that no later commit
        reuses its pages, and its meta page is saved, so that after a power cut the
        store goes back to it whole. `mark`: commit a sync mark first (see _mark), for
        the syncs after which freed space should be reusable (not every fsync's).
        `clean`: the point is saved as a clean close (nothing is committed after it)."""
        with self._wb_lock:
            if mark:
                self._mark()
            pin, meta = self._snapshot()
            try:
                self.env.sync(True)
                # Only a saved point moves the pin: until then the old pin keeps the
                # tree of the point a power cut would go back to.
                if pin is not None and meta is not None and (clean or pin.id() != self._synced):
                    self.syncpoints.save(pin.id(), meta, clean=clean)
                    pin, self._pin, self._synced = self._pin, pin, pin.id()
            finally:
                if pin is not None:  # the old pin, or a new one not needed
                    pin.abort()

    def commits_since_sync(self) -> int:
        """Commits since the last sync point (each holds the pages it freed until the
        next one)."""
        return self.env.info()["last_txnid"] - self._synced

    def _mark(self) -> None:
        """Commit a sync mark when anything was committed since the last sync: LMDB keeps
        the pages a commit frees from reuse while a snapshot of that very commit lives,
        so pinning the mark instead lets the next commits reuse what the last one freed
        (deleted files' space). Best effort: on a full disk the pin takes the last commit."""
        if self.readonly or self.env.info()["last_txnid"] == self._synced:
            return
        try:
            with self.write() as txn:
                n = txn.get(b"synced", db=self.t["meta"])
                n = int.from_bytes(n, "big") + 1 if n else 1
                txn.put(b"synced", n.to_bytes(8, "big"), db=self.t["meta"])
        except StoreFullError as exc:
            log.debug("no sync mark: %s", exc)

    def _snapshot(self) -> tuple[lmdb.Transaction | None, bytes | None]:
        """(a read transaction on the newest commit, that commit's meta page), taken
        under the writer lock so that no commit slips in between."""
        if self.readonly:
            return None, None
        writer = self._begin_write()
        try:
            pin = self.env.begin(write=False)
            psize = self.env.stat()["psize"]
            meta = next((m for m in read_meta(self._data, psize) if meta_txnid(m) == pin.id()),
                        None)
        finally:
            writer.abort()
        if meta is None:
            log.warning("store %s: no meta page of transaction %d in data.mdb; the sync "
                        "point stays at %d", self.path, pin.id(), self._synced)
        return pin, meta

    def prepare_growth(self) -> None:
        """Allocate data.mdb up to GROW_AHEAD past LMDB's last page and bring that range
        into the page cache as zeros: run beside the commits of a seal (a helper thread).

        LMDB appends a seal's frames to data.mdb in one writer thread, the critical path
        of a large write. Appending to a file allocates each page in the write path
        (and grows the file page by page); writing into pages already cached and
        allocated is a plain copy. Measured on `cp` + `elvesfs sync` of 1 GiB: 0.80x
        the time into fresh stores, 0.92x in bench_fs.py; the committer's kernel copy
        from ~18 % to ~1.4 % of all samples (see README). LMDB ignores the file's
        length past its last page (no MDB_WRITEMAP) and a crash leaves only zeros
        there; close() cuts them off. Best effort: a nearly full disk, or any error,
        only skips it."""
        end = self.used_bytes()
        start = max(self._grown, end)
        target = end + GROW_AHEAD
        if target - start < GROW_STEP:
            return
        try:
            if shutil.disk_usage(self.path).free < 4 * GROW_AHEAD:
                return
            fd = os.open(self._data, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.posix_fallocate(fd, start, target - start)
                # readahead of allocated, unwritten blocks fills the cache with zeros, no
                # I/O; the kernel caps each call at the device's readahead (>= 128 KiB)
                for off in range(start, target, 128 << 10):
                    os.posix_fadvise(fd, off, 128 << 10, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
            self._grown = target
        except OSError as exc:
            log.debug("cannot allocate data.mdb ahead: %s", exc)

    def start_write_back(self) -> None:
        """Start writing data.mdb's dirty pages, without waiting: run beside the commits
        of a seal (a helper thread, after each batch), so that the seal's final sync()
        finds little left to write.

        Commits do not sync (sync=False): without this, a seal's ~1 GiB of frames stays
        dirty in the page cache (under the kernel's background threshold) and the final
        fsync writes all of it while the CPUs idle (that fsync took 0.47-0.68 s of a
        2.9 s `cp` + `elvesfs sync` of 1 GiB, 0.02 s with this; docs/MEASUREMENTS.md).
        Any dirty page may go early, pages that commits reused and the meta pages too: no
        commit rewrites a page of the synced tree (sync() pins it), and a meta page on
        disk before its tree is undone after a power cut by the sync point (see
        syncpoint.py). Best effort: sync() still writes everything."""
        if _sync_file_range is None:
            return
        with self._wb_lock:
            end = self.used_bytes()
            try:
                fd = os.open(self._data, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                log.debug("cannot open data.mdb to write it back: %s", exc)
                return
            try:
                if _sync_file_range(fd, 0, end, SYNC_FILE_RANGE_WRITE):
                    log.debug("sync_file_range of data.mdb: %s", os.strerror(ctypes.get_errno()))
            finally:
                os.close(fd)

    def live_bytes(self) -> int:
        """Bytes of the pages that hold the tables now: used_bytes() less the pages LMDB
        has free for the next commits (deleted data, pages a pinned snapshot holds)."""
        with self.env.begin() as txn:
            stats = [txn.stat(db) for db in self.t.values()] + [self.env.stat()]
        pages = sum(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"] for st in stats)
        return (pages + 2) * self.env.stat()["psize"]  # + the two meta pages

    def allocated_bytes(self) -> int:
        """Bytes data.mdb takes on disk (LMDB's pages and the tail allocated ahead)."""
        try:
            return os.stat(self._data).st_blocks * 512
        except OSError:
            return 0

    def used_bytes(self) -> int:
        """Bytes the environment occupies on disk (allocated pages, not the sparse map)."""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def close(self) -> None:
        """Sync and close the environment; cut data.mdb back to LMDB's last page."""
        used = 0 if self.readonly else self.used_bytes()
        if not self.readonly:
            self.sync(clean=True)
            with self._wb_lock:
                if self._pin is not None:
                    self._pin.abort()
                    self._pin = None
        self.env.close()
        try:  # the zeros past LMDB's last page (this run's or a crashed one's)
            if used and os.path.getsize(self._data) > used:
                os.truncate(self._data, used)
        except OSError as exc:
            log.warning("cannot trim %s to %d bytes: %s", self._data, used, exc)
