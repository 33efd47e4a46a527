"""Content-addressed chunks with reference counts, in LMDB.

A chunk id is the xxh3-128 digest of the chunk's raw bytes (seeded by the lossy
policy for chunks coded lossily, so a lossy chunk never dedups against a lossless
one). Table `chunks` maps id -> codec frame; table `refs` maps id -> CHUNK record::

    refcount  u64   references from layouts and from delta chunks that use it
    raw       u32   decoded size
    stored    u32   frame size
    ref       16B   id of the reference chunk of an XOR-delta frame, or zeros
    flags     u8    LOSSY: the id is seeded by a lossy policy, so the decoded bytes are
                    verified by the frame's checksums, not against the id;
                    PROTECTED: written under the `protect` policy (its id seeded by
                    policy.PROTECT_SEED; the frame holds parities (or, written
                    before those, copies) of its sign+exponent streams), so only
                    protected chunks serve it as delta references
    deps      u32   how many of the refcount's references are delta chunks (format
                    elvesfs-2; records of elvesfs-1 stores lack it and are rewritten by
                    upgrade_records when the store is first opened for writing)

Invariants: a chunk with refcount 0 is listed in `zero` and is garbage; only the
single sealer thread adds chunks or collects garbage, so a dedup hit can never
race with the deletion of the chunk it found. A delta chunk holds one reference
on its reference chunk, so deleting the file it came from never breaks it. A chunk
whose refcount equals its deps (> 0) is an orphan, listed in `orphans`: held only by
such deltas, its files gone (checkpoint rotation deletes the version later ones were
coded against). It serves no new delta, and the sealer codes its users again
without it (Sealer.rebase_orphans), after which it is garbage. References
form chains (checkpoint 3 -> 2 -> 1) at most MAX_DELTA_DEPTH deltas long, so a read
decodes at most MAX_DELTA_DEPTH + 1 frames; a chain never loops, because a new chunk
can only reference chunks that are already stored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import lmdb

from .db import Database
from .errors import StoreCorruptError

CHUNK = struct.Struct("<QII16sBI")
CHUNK_V1 = struct.Struct("<QII16sB")  # elvesfs-1: no deps
NO_REF = bytes(16)
LOSSY = 1
PROTECTED = 2
MAX_DELTA_DEPTH = 1  # deltas in a chain: 1 = a read needs at most one reference hop


@dataclass
class ChunkRecord:
    """The stored metadata of one chunk."""

    refcount: int
    raw: int
    stored: int
    ref: bytes
    flags: int
    deps: int = 0

    def pack(self) -> bytes:
        return CHUNK.pack(self.refcount, self.raw, self.stored, self.ref, self.flags,
                          self.deps)

    @classmethod
    def unpack(cls, raw: bytes) -> "ChunkRecord":
        """A record of either format (a read-only look at an elvesfs-1 store: deps 0)."""
        return cls(*(CHUNK_V1 if len(raw) == CHUNK_V1.size else CHUNK).unpack(raw))

    @property
    def orphaned(self) -> bool:
        """Held only by delta chunks that use it, if by anything: the files it was
        written for are gone (an orphan when refcount > 0, else garbage)."""
        return self.refcount <= self.deps

    @property
    def is_orphan(self) -> bool:
        """Orphaned and still held (by its delta users): what table `orphans` lists."""
        return self.refcount > 0 and self.orphaned

    @property
    def is_delta(self) -> bool:
        return self.ref != NO_REF


class ChunkStore:
    """Reference-counted chunk table operations; every call takes the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self.t = db.t

    def record(self, txn: lmdb.Transaction, cid: bytes) -> ChunkRecord | None:
        raw = txn.get(cid, db=self.t["refs"])
        return None if raw is None else ChunkRecord.unpack(raw)

    def depth(self, txn: lmdb.Transaction, cid: bytes) -> int:
        """Deltas between chunk `cid` and a standalone frame (0 for a standalone chunk)."""
        n = 0
        rec = self.record(txn, cid)
        while rec is not None and rec.is_delta and n <= MAX_DELTA_DEPTH:
            n += 1
            rec = self.record(txn, rec.ref)
        return n

    def frame(self, txn: lmdb.Transaction, cid: bytes) -> bytes:
        raw = txn.get(cid, db=self.t["chunks"])
        if raw is None:
            raise StoreCorruptError(f"chunk {cid.hex()} is missing from the store; run `elvesfs fsck`")
        return raw

    def add(self, txn: lmdb.Transaction, cid: bytes, frame: bytes, raw: int,
            ref: bytes = NO_REF, flags: int = 0) -> bool:
        """Store a new chunk with refcount 0 (garbage until a layout references it);
        False if it is stored already. Three puts for a chunk without reference: a seal's
        committer makes one call per put, each giving up and taking back the GIL."""
        rec = ChunkRecord(0, raw, len(frame), ref, flags).pack()
        if not txn.put(cid, rec, db=self.t["refs"], overwrite=False):
            return False
        if ref != NO_REF:
            self.incref(txn, ref, delta=True)
        txn.put(cid, frame, db=self.t["chunks"])
        txn.put(cid, b"", db=self.t["zero"])
        return True

    def incref(self, txn: lmdb.Transaction, cid: bytes, n: int = 1,
               delta: bool = False) -> None:
        """Add `n` references (`delta`: from delta chunks that use it)."""
        rec = self.record(txn, cid)
        if rec is None:
            raise StoreCorruptError(f"reference to missing chunk {cid.hex()}")
        if rec.refcount == 0:
            txn.delete(cid, db=self.t["zero"])
        rec.refcount += n
        rec.deps += n if delta else 0
        self._put(txn, cid, rec)

    def decref(self, txn: lmdb.Transaction, cid: bytes, n: int = 1,
               delta: bool = False) -> None:
        rec = self.record(txn, cid)
        if rec is None:
            raise StoreCorruptError(f"release of missing chunk {cid.hex()}")
        rec.refcount = max(0, rec.refcount - n)
        rec.deps = max(0, rec.deps - n) if delta else min(rec.deps, rec.refcount)
        if rec.refcount == 0:
            txn.put(cid, b"", db=self.t["zero"])
        self._put(txn, cid, rec)

    def _put(self, txn: lmdb.Transaction, cid: bytes, rec: ChunkRecord) -> None:
        """Write a record, keeping `orphans` in step with it."""
        txn.put(cid, rec.pack(), db=self.t["refs"])
        if rec.is_orphan:
            txn.put(cid, b"", db=self.t["orphans"])
        else:
            txn.delete(cid, db=self.t["orphans"])

    def orphans(self, txn: lmdb.Transaction) -> list[bytes]:
        return [bytes(k) for k in txn.cursor(db=self.t["orphans"]).iternext(values=False)]

    def users(self, txn: lmdb.Transaction, cids: set[bytes]
              ) -> dict[bytes, list[tuple[bytes, ChunkRecord]]]:
        """The delta chunks coded against each of `cids`, with their records: one scan of
        all records (run only when there are orphans, i.e. after the deletion of a
        version that others were coded against)."""
        out: dict[bytes, list[tuple[bytes, ChunkRecord]]] = {}
        for k, v in txn.cursor(db=self.t["refs"]):
            rec = ChunkRecord.unpack(v)
            if rec.ref in cids:
                out.setdefault(rec.ref, []).append((bytes(k), rec))
        return out

    def recode(self, txn: lmdb.Transaction, cid: bytes, frame: bytes,
               ref: bytes = NO_REF) -> None:
        """Replace a chunk's frame by another coding of the same bytes, against `ref` (or
        alone): the new reference gains a delta user, the old one loses one (and may
        become garbage)."""
        rec = self.record(txn, cid)
        if rec is None:
            raise StoreCorruptError(f"recode of missing chunk {cid.hex()}")
        if ref != NO_REF:
            self.incref(txn, ref, delta=True)
        if rec.is_delta:
            self.decref(txn, rec.ref, delta=True)
        rec.ref, rec.stored = ref, len(frame)
        txn.put(cid, frame, db=self.t["chunks"])
        txn.put(cid, rec.pack(), db=self.t["refs"])

    def collect(self, txn: lmdb.Transaction, limit: int = 10000,
                keep: set[bytes] | frozenset = frozenset()) -> tuple[int, int]:
        """Delete up to `limit` garbage chunks, except those in `keep` (pre-sealed chunks
        of files still being written); returns (chunks, bytes) reclaimed."""
        n = freed = 0
        while n < limit:  # again: freeing a delta chunk can free its reference
            cur = txn.cursor(db=self.t["zero"])
            todo = [c for c in cur.iternext(keys=True, values=False) if c not in keep]
            if not todo:
                break
            for cid in todo:
                if n >= limit:
                    break
                rec = self.record(txn, cid)
                txn.delete(cid, db=self.t["zero"])
                if rec is not None and rec.refcount == 0:
                    txn.delete(cid, db=self.t["chunks"])
                    txn.delete(cid, db=self.t["refs"])
                    txn.delete(cid, db=self.t["orphans"])
                    freed += rec.stored
                    n += 1
                    if rec.is_delta and self.record(txn, rec.ref) is not None:
                        self.decref(txn, rec.ref, delta=True)
        return n, freed

    def count_deps(self, txn: lmdb.Transaction) -> dict[bytes, int]:
        """Delta chunks per reference chunk, from a scan of all records."""
        deps: dict[bytes, int] = {}
        for _, v in txn.cursor(db=self.t["refs"]):
            rec = ChunkRecord.unpack(v)
            if rec.is_delta:
                deps[rec.ref] = deps.get(rec.ref, 0) + 1
        return deps

    def upgrade_records(self, txn: lmdb.Transaction) -> int:
        """Rewrite elvesfs-1 records (no deps) in the current format and list the
        orphans; returns how many records were rewritten."""
        deps = self.count_deps(txn)
        n = 0
        for cid, v in list(txn.cursor(db=self.t["refs"])):
            if len(v) == CHUNK_V1.size:
                rec = ChunkRecord.unpack(v)
                rec.deps = deps.get(bytes(cid), 0)
                self._put(txn, cid, rec)
                n += 1
        return n

    def totals(self, txn: lmdb.Transaction) -> tuple[int, int, int]:
        """(chunks, raw bytes, stored bytes) over all live chunks: a full scan."""
        n = raw = stored = 0
        for _, v in txn.cursor(db=self.t["refs"]):
            rec = ChunkRecord.unpack(v)
            if rec.refcount:
                n += 1
                raw += rec.raw
                stored += rec.stored
        return n, raw, stored
