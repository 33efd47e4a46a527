"""Sealing: turn a staging file into deduplicated, coded chunks and a layout, atomically.

Pipeline (runs in a worker thread, never on the event loop)::

    plan pieces   planner.py: formats.parse -> tensor segments split at <= 4 MiB
                  (element aligned) + everything else content-defined chunked
                  (FastCDC, ~256 KiB) + holes of sparse files as hole extents
    code pieces   thread pool: read, hash (xxh3-128), dedup lookup, pick a
                  reference for XOR delta, codec/'s selector encodes
    commit        new chunks in batches (refcount 0 until referenced, so a crash
                  leaves only garbage), then ONE transaction installs the layout,
                  increfs the new chunks, decrefs the old layout, sets the size,
                  records the file's statistics and drops the staging record.

Memory stays bounded by the window of pieces in flight (a few x 4 MiB).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterator

import xxhash

from . import formats
from .chunkstore import MAX_DELTA_DEPTH, NO_REF, PROTECTED, ChunkStore
from .coding import Encoded, chunk_id, encode_chunk, frame_dtype, recode_chunk
from .db import Database
from .errors import StoreCorruptError
from .layout import HOLE, Layout
from .namespace import Namespace, key
from .planner import Piece, Planner, Presealed
from .policy import Policy
from .reader import ChunkReader
from .staging import Staging
from .threads import CODER_NICE, COMMITTER_NICE, background

log = logging.getLogger(__name__)

BATCH_BYTES = 16 << 20
GROUP_BYTES = 4 << 20  # bytes of pieces per coding task


@dataclass
class SealStats:
    """What one seal did; stored as JSON in table `fstats` and shown by `elvesfs stats`."""

    format: str = "plain"
    policy: str = "lossless"
    logical: int = 0
    chunks: int = 0
    new_raw: int = 0
    new_stored: int = 0
    dedup_bytes: int = 0
    delta_raw: int = 0
    delta_stored: int = 0
    hole_bytes: int = 0
    tensors: int = 0
    lossy_bytes: int = 0
    max_error: float = 0.0
    codecs: dict = field(default_factory=dict)  # codec -> [raw, stored]
    seconds: float = 0.0
    note: str = ""
    dup_in_flight: int = 0  # coded twice in one seal, stored once (counted as dedup)

    def add(self, enc: Encoded, is_delta: bool) -> None:
        self.add_chunk(enc.raw, len(enc.frame), enc.codec, is_delta, enc.max_error)

    def add_chunk(self, n: int, frame: int, codec: str, is_delta: bool,
                  max_error: float | None) -> None:
        """Count one new chunk of `n` raw bytes stored as a `frame`-byte frame."""
        self.new_raw += n
        self.new_stored += frame
        raw, stored = self.codecs.get(codec, (0, 0))
        self.codecs[codec] = [raw + n, stored + frame]
        if is_delta:
            self.delta_raw += n
            self.delta_stored += frame
        if max_error is not None:
            self.lossy_bytes += n
            self.max_error = max(self.max_error, max_error)


@dataclass
class _Result:
    piece: Piece
    cid: bytes
    enc: Encoded | None  # None: the chunk was already stored (dedup, or a pre-seal)
    ref: bytes = NO_REF
    added: bool = False  # set by the committer: the chunk was new to the store


def tensor_key(p: Piece) -> bytes:
    """Key of table `tindex`: same-named tensor piece of the same dtype and size."""
    h = xxhash.xxh3_64_digest(f"{p.name}\0{p.dtype}\0{p.length}".encode())
    return h + struct.pack(">I", p.index)


class Sealer:
    """Seals staging files into the store; one seal at a time (the caller serialises)."""

    def __init__(self, db: Database, ns: Namespace, chunks: ChunkStore, staging: Staging,
                 reader: ChunkReader, workers: int | None = None, delta: bool = True) -> None:
        self.db, self.ns, self.chunks, self.staging, self.reader = db, ns, chunks, staging, reader
        self.pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2,
                                       thread_name_prefix="elvesfs-code",
                                       initializer=background("elvesfs-code", CODER_NICE))
        self.committer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="elvesfs-commit",
            initializer=background("elvesfs-commit", COMMITTER_NICE))
        # the store file's upkeep beside the commits: written back early, allocated ahead
        self.upkeep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elvesfs-upkeep",
                                         initializer=background("elvesfs-upkeep", CODER_NICE))
        self._upkeeping: Future | None = None
        self.planner = Planner()
        self.delta = delta
        self._pins: dict[int, set[bytes]] = {}  # inode -> pre-sealed chunks not yet referenced
        self._pins_lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.committer.shutdown(wait=True)
        self.upkeep.shutdown(wait=True)

    # -- piece coding (pool threads) -------------------------------------------
    def _reference(self, p: Piece, protect: bool = False) -> tuple[bytes, bytes | None]:
        """The newest stored version of this tensor piece that may serve as a reference.

        The index names the latest version; if that one already ends a chain of
        MAX_DELTA_DEPTH deltas, walk back along its chain to the newest version that
        does not (with depth 1: the last version stored alone), so reads stay bounded.
        A protected piece (`protect`) only takes a protected reference: a delta is no
        safer than the chunk it is decoded against. An orphaned version (its files
        deleted, kept only for the deltas that use it) is no reference either: it is
        about to be freed (rebase_orphans, run after every drop, codes its users
        without it; it stays only where that failed), and a new delta would keep it."""
        if not (self.delta and p.name and p.dtype):
            return bytes(16), None
        with self.db.read() as txn:
            ref = txn.get(tensor_key(p), db=self.db.t["tindex"])
            rec = self.chunks.record(txn, ref) if ref else None
            while rec is not None and self.chunks.depth(txn, ref) >= MAX_DELTA_DEPTH:
                ref = rec.ref
                rec = self.chunks.record(txn, ref)
            if rec is None or rec.raw != p.length or rec.orphaned or \
                    (protect and not rec.flags & PROTECTED):
                return bytes(16), None
        try:
            return ref, self.reader.get(ref)
        except Exception:  # a damaged reference only costs compression
            log.warning("reference chunk %s unreadable; coding without delta", ref.hex())
            return bytes(16), None

    def _code_group(self, fd: int, group: list[Piece], policy: Policy) -> list[_Result]:
        """Hash a group of pieces, look them all up in one transaction, code the new ones.

        Grouping (a few MiB per task) keeps per-chunk overhead (task, transaction) small
        next to the hashing and coding of ~64 KiB CDC chunks."""
        datas, cids = [], []
        for p in group:
            if p.pre is not None:  # stored by a pre-seal: no read, no hash
                datas.append(None)
                cids.append(p.pre.cid)
                continue
            data = p.data if p.data is not None else os.pread(fd, p.length, p.offset)
            p.data = None  # pieces outlive their coding (a pre-seal's results): their
            # views would keep each 8 MiB CDC window alive until the step ends
            if len(data) != p.length:
                raise OSError(f"staging file shrank while sealing at {p.offset}")
            datas.append(data)
            cids.append(chunk_id(data, policy.chunk_seed(p.dtype, p.role)))
        with self.db.read() as txn:
            known = [self.chunks.record(txn, cid) is not None for cid in cids]
        out = []
        for p, data, cid, hit in zip(group, datas, cids, known):
            if hit:
                out.append(_Result(p, cid, None))
                continue
            if data is None and p.pre.kept:  # the sealed file's own chunk: referenced
                raise StoreCorruptError(  # by its layout, so only damage removes it
                    f"chunk {cid.hex()}, which the sealed file still references, is "
                    f"missing from the store; run `elvesfs fsck`")
            if data is None:  # a pre-sealed chunk is gone (cannot happen while pinned)
                log.warning("pre-sealed chunk %s missing; coding it again", cid.hex())
                p = replace(p, pre=None)
                data = os.pread(fd, p.length, p.offset)
            ref_id, ref = self._reference(p, policy.protect)
            enc = encode_chunk(memoryview(data), p.dtype, p.role, policy, ref, cid)
            if not enc.needs_reference:  # the selector found coding alone smaller
                ref_id = bytes(16)
            out.append(_Result(p, enc.cid, enc, ref_id))
        return out

    # -- the seal ---------------------------------------------------------------
    def seal(self, ino: int, policy: Policy, abort: threading.Event,
             resume: list[Presealed] | None = None) -> SealStats | None:
        """Seal inode `ino`'s staging file; None if aborted (a writer came back).

        `resume`: what pre-seals of this file stored under the same policy."""
        t0 = time.monotonic()
        fd = os.open(self.staging.path(ino), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            kept = self._kept(ino, size, policy)
            if kept is not None:
                fmt, note = "plain", "tail staged"
                pieces = self.planner.plan_tail(fd, size, *kept)
            else:
                fmt, note, pieces = self.planner.plan(fd, size, resume)
            stats = SealStats(format=fmt, policy=str(policy), logical=size, note=note)
            extents = self._code_all(fd, pieces, policy, stats, abort)
        finally:
            os.close(fd)
        if extents is None:
            return None
        stats.seconds = round(time.monotonic() - t0, 3)
        stats.dedup_bytes += stats.dup_in_flight
        self._install(ino, Layout.build(extents), size, stats)
        # The staging file is the only copy until the new layout is on disk: flush LMDB
        # before deleting it, or a power loss could keep neither.
        self.db.sync()
        self.staging.remove_file(ino)
        log.info("sealed inode %d: %s %d bytes -> %d new stored (%.2fs)", ino, fmt, size,
                 stats.new_stored, stats.seconds)
        return stats

    # -- tail staging: a write at the end of a sealed file copies only its end ----------
    def tail_base(self, ino: int, layout: Layout, at: int) -> int:
        """Where the staging copy of sealed file `ino` may start for a first write at
        `at` (0: copy it all): the start of the chunk holding `at`, in a file sealed as
        plain bytes, whose chunks below it the seal can keep (see staging.py)."""
        if len(layout) < 2:
            return 0
        base = layout.start(layout.find(min(at, layout.size - 1)))
        if base == 0 or self._sealed_as(ino) is None:
            return 0
        return base

    def _sealed_as(self, ino: int) -> dict | None:
        """The statistics of the seal that made `ino`'s layout, if it was plain bytes."""
        with self.db.read() as txn:
            raw = txn.get(key(ino), db=self.db.t["fstats"])
        rec = json.loads(raw) if raw else None
        return rec if rec and rec.get("format") == "plain" else None

    def _kept(self, ino: int, size: int, policy: Policy
              ) -> tuple[list[tuple[int, int, bytes]], int] | None:
        """For a tail-staged file: (the sealed extents below its base, base), or None.

        A file that may have become a model file (a resumed download), or whose policy
        changed since its last seal, is coded whole: its base is copied in first."""
        with self.db.read() as txn:
            base = self.staging.base(txn, ino)
            raw = txn.get(key(ino), db=self.db.t["layouts"]) if base else None
        if not base:
            return None
        if size < base:  # a truncate below the base was under way: the staging file
            with self.db.write() as txn:  # holds [0, size) (fill_base with `cut`)
                self.staging.mark(txn, ino)
            return None
        layout = Layout.from_bytes(raw) if raw else Layout.empty()
        if not layout.starts_at(base):
            raise StoreCorruptError(f"inode {ino}'s staging base {base} is not a chunk "
                                    f"boundary of its sealed layout; run `elvesfs fsck`")
        sealed = self._sealed_as(ino)
        head = bytes(self.reader.read_range(layout, 0, min(64, base)))
        if (sealed is None or sealed.get("policy") != str(policy)
                or formats.may_be_model(head, size)):
            self.fill_base(ino, layout, base)
            return None
        kept = [(layout.start(j), layout.length(j), layout.chunk_id(j))
                for j in range(layout.find(base))]
        return kept, base

    def fill_base(self, ino: int, layout: Layout, base: int, cut: int | None = None) -> None:
        """Copy a tail-staged file's sealed bytes below `base` into its staging file,
        durably, then record that the staging file holds it all (see staging.py).

        `cut`: a truncate to below the base: only [0, cut) is copied, and the file is cut
        before the record changes (a crash in between leaves a staging file shorter than
        its base, which _kept then takes as whole)."""
        end = base if cut is None else cut
        fd = os.open(self.staging.path(ino), os.O_WRONLY | os.O_CLOEXEC)
        try:
            self.reader.copy_to_fd(layout, fd, end=end)
            if cut is not None:
                os.ftruncate(fd, cut)
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.db.write() as txn:
            self.staging.mark(txn, ino)
        log.info("inode %d: copied its sealed %d bytes below the staged tail", ino, end)

    def _code_all(self, fd: int, pieces: Iterator[Piece], policy: Policy, stats: SealStats,
                  abort: threading.Event, results: list[_Result] | None = None
                  ) -> list[tuple[int, bytes]] | None:
        """Code every piece (pool threads) and store new chunks (committer thread).

        Batches of new chunks are committed by a second thread while coding goes on,
        so the coders never wait for LMDB. Returns the extents, or None if aborted.
        """
        window: list[Future] = []  # each: the results of one group of pieces
        extents: list[tuple[int, bytes]] = []
        batch: list[_Result] = []
        batch_bytes = 0
        limit = 2 * self.pool._max_workers + 2  # groups in flight: bounds memory
        tindex: dict[bytes, bytes] = {}
        commits: list[Future] = []
        group: list[Piece] = []
        group_bytes = 0

        def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                commits.append(self.committer.submit(self._commit_batch, batch, stats))
                if self._upkeeping is None or self._upkeeping.done():
                    self._upkeeping = self.upkeep.submit(self._store_upkeep)
            batch, batch_bytes = [], 0
            while len(commits) > 2:  # bound the frames waiting to be committed
                commits.pop(0).result()

        def take(r: _Result) -> None:
            nonlocal batch_bytes
            if results is not None:
                results.append(r)
            extents.append((r.piece.offset + r.piece.length, r.cid))
            pre = r.piece.pre
            fresh = r.enc is not None or (pre is not None and pre.added)
            if r.piece.name:
                stats.tensors += r.piece.index == 0
                # Index every fresh piece: the next version of this tensor is coded
                # against it (see _reference). A lossily coded piece is a fine reference
                # too: a delta against its decoded bytes still reconstructs exactly.
                if fresh:
                    tindex[tensor_key(r.piece)] = r.cid
            if r.enc is None and pre is not None and pre.added:  # new, stored earlier
                stats.add_chunk(pre.length, pre.stored, pre.codec, pre.delta, pre.max_error)
            elif r.enc is None:
                stats.dedup_bytes += r.piece.length
            else:
                batch.append(r)
                batch_bytes += len(r.enc.frame)

        def drain_one() -> None:
            for r in window.pop(0).result():
                take(r)
            if batch_bytes >= BATCH_BYTES:
                flush()

        def submit() -> None:
            nonlocal group, group_bytes
            if group:
                window.append(self.pool.submit(self._code_group, fd, group, policy))
            group, group_bytes = [], 0
            while len(window) >= limit or (window and window[0].done()):
                drain_one()

        try:
            for p in pieces:
                if abort.is_set():
                    break
                if p.hole:
                    submit()
                    while window:
                        drain_one()
                    extents.append((p.offset + p.length, HOLE))
                    stats.hole_bytes += p.length
                    continue
                group.append(p)
                group_bytes += p.length
                if group_bytes >= GROUP_BYTES:
                    submit()
            submit()
            while window:
                drain_one()
            flush()
        finally:
            for f in window:
                f.cancel()
            for c in commits:  # chunks of an aborted seal stay as garbage (refcount 0)
                c.result()
        if abort.is_set():
            return None
        stats.chunks = len(extents)
        self._tindex = tindex
        return extents

    def _store_upkeep(self) -> None:
        """Send what the commits wrote to disk early and keep the store file allocated
        ahead of them (see Database): both take work off the seal's critical path."""
        self.db.start_write_back()
        self.db.prepare_growth()

    def _commit_batch(self, batch: list[_Result], stats: SealStats) -> None:
        """Store new chunks with refcount 0 (committer thread; one batch at a time).

        A delta's reference was stored when the piece was coded, and nothing collects
        chunks while a seal runs (one sealer): were it gone all the same, add() raises
        StoreCorruptError and the file stays staged, rather than a frame that cannot be
        decoded being stored as if it needed no reference."""
        def store(txn, r: _Result) -> None:
            if self.chunks.add(txn, r.cid, r.enc.frame, r.enc.raw, r.ref, r.enc.flags):
                r.added = True
                stats.add(r.enc, r.ref != NO_REF)
            else:
                stats.dup_in_flight += r.enc.raw

        self.db.write_batch(batch, store)

    def _install(self, ino: int, layout: Layout, size: int, stats: SealStats) -> None:
        with self.db.write() as txn:
            inode = self.ns.find(txn, ino)
            if inode is None:  # deleted meanwhile: the new chunks stay garbage
                self.staging.forget(txn, ino)
                return
            for cid, n in Counter(layout.ids()).items():
                self.chunks.incref(txn, cid, n)
            self._release_layout(txn, ino)
            txn.put(key(ino), layout.to_bytes(), db=self.db.t["layouts"])
            inode.size = size
            self.ns.put(txn, inode)
            txn.put(key(ino), json.dumps(stats.__dict__).encode(), db=self.db.t["fstats"])
            for k, cid in self._tindex.items():
                txn.put(k, cid, db=self.db.t["tindex"])
            self.staging.forget(txn, ino)

    # -- pre-seal: code a file's prefix while it is still being written --------------
    def preseal(self, ino: int, fd: int, pos: int, end: int, policy: Policy
                ) -> tuple[int, list[Presealed]]:
        """Code and store the whole CDC windows of [pos, end) of a file being written.

        Returns (next window start, what was stored). The chunks are pinned against
        garbage collection until unpin(ino): they have refcount 0 until the final seal
        references them. Caller holds the seal limiter (one store writer at a time)."""
        done = [pos]
        results: list[_Result] = []
        stats = SealStats()
        pieces = self.planner.prefix_pieces(fd, pos, end, done)
        self._code_all(fd, pieces, policy, stats, threading.Event(), results)
        out = [self._presealed(r) for r in results]
        with self._pins_lock:
            self._pins.setdefault(ino, set()).update(p.cid for p in out)
        return done[0], out

    @staticmethod
    def _presealed(r: _Result) -> Presealed:
        p, enc = r.piece, r.enc
        return Presealed(p.offset, p.length, r.cid, r.added,
                         len(enc.frame) if enc else 0, enc.codec if enc else "",
                         enc.max_error if enc else None, r.ref != bytes(16),
                         (p.dtype, p.name, p.role, p.index) if p.name is not None else None)

    def unpin(self, ino: int) -> None:
        """The pre-sealed chunks of `ino` are referenced or abandoned: collectable again."""
        with self._pins_lock:
            self._pins.pop(ino, None)

    def _pinned(self) -> set[bytes]:
        with self._pins_lock:
            return set().union(*self._pins.values()) if self._pins else set()

    # -- deletion and garbage -----------------------------------------------------
    def _release_layout(self, txn, ino: int) -> None:
        """Decref every chunk of the inode's layout and delete the layout."""
        old = txn.get(key(ino), db=self.db.t["layouts"])
        if old:
            for cid, n in Counter(Layout.from_bytes(old).ids()).items():
                self.chunks.decref(txn, cid, n)
            txn.delete(key(ino), db=self.db.t["layouts"])

    def drop(self, ino: int, keep_inode: bool = False) -> None:
        """Free an inode with no links and no users: its staged bytes first (that frees
        space even on a full disk, where the transaction below may then fail: the inode
        stays an orphan, which the next drop or recovery deletes), then its layout,
        staging record and attributes, and the inode row unless `keep_inode` (the kernel
        still knows the inode)."""
        self.staging.remove_file(ino)

        def free(txn) -> None:
            self._release_layout(txn, ino)
            txn.delete(key(ino), db=self.db.t["fstats"])
            self.staging.forget(txn, ino)
            if not keep_inode:
                self.ns.delete_inode(txn, ino)
        self.db.write_freeing(free)

    def collect(self) -> tuple[int, int]:
        """Delete garbage chunks (refcount 0), then code the users of orphaned chunks
        without them and delete those too; stale tensor-index entries are skipped on use."""
        n, b = self._collect_garbage()
        if self.rebase_orphans():
            n2, b2 = self._collect_garbage()
            n, b = n + n2, b + b2
        return n, b

    def rebase_orphans(self) -> int:
        """Re-code the delta users of every orphan (a chunk kept only by the deltas coded
        against it: its files were deleted) so that the orphan can be freed: the user
        that differs most from it (its largest delta: most likely the newest version,
        which later versions resemble most) is stored alone, the others as deltas of
        that one where it pays. Returns how many orphans were released. A failure
        (e.g. a damaged frame) leaves that orphan in place: it costs space, not data."""
        with self.db.read() as txn:
            todo = self.chunks.orphans(txn)
            users = self.chunks.users(txn, set(todo)) if todo else {}
        done = recoded = 0
        for cid in todo:
            try:
                n = self._rebase(cid, users.get(cid, []))
            except Exception:
                log.exception("could not re-code the users of orphaned chunk %s; it stays",
                              cid.hex())
                continue
            done += n > 0
            recoded += n
        if done:
            log.info("re-coded %d chunks without the %d orphaned chunks they were deltas of",
                     recoded, done)
        return done

    def _rebase(self, orphan: bytes, users: list) -> int:
        """Re-code the users (chunk id, record) of one orphan; returns how many."""
        with self.db.read() as txn:
            rec = self.chunks.record(txn, orphan)
        if rec is None or not rec.is_orphan or not users:
            return 0  # no users while deps says so: out of step, fsck repairs that
        users.sort(key=lambda u: u[1].stored, reverse=True)
        base_id, base_rec = users[0]
        base = self.reader.get(base_id)
        self._recode(base_id, base_rec.flags, base, None)
        for cid, r in users[1:]:
            usable = base_rec.flags & PROTECTED or not r.flags & PROTECTED
            self._recode(cid, r.flags, self.reader.get(cid),
                         (base_id, base) if usable else None)
        return len(users)

    def _recode(self, cid: bytes, flags: int, data, ref: tuple[bytes, bytes] | None) -> None:
        """Store chunk `cid` (decoded: `data`) coded alone or against `ref`, in place."""
        with self.db.read(buffers=True) as txn:  # its header only: no copy of the frame
            dtype = frame_dtype(self.chunks.frame(txn, cid))
        frame, needs_ref = recode_chunk(data, dtype, flags, ref[1] if ref else None)
        with self.db.write() as txn:
            self.chunks.recode(txn, cid, frame, ref[0] if ref and needs_ref else NO_REF)

    def _collect_garbage(self) -> tuple[int, int]:
        total_n = total_b = 0
        keep = self._pinned()
        while True:  # deleting frees space, and on a full disk may need the reserve
            n, b = self.db.write_freeing(
                lambda txn: self.chunks.collect(txn, limit=2000, keep=keep))
            total_n += n
            total_b += b
            if n < 2000:
                break
        if total_n:
            log.info("collected %d garbage chunks (%d bytes)", total_n, total_b)
        return total_n, total_b
