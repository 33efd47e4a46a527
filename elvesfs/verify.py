"""Verifying stored chunks, shared by `elvesfs fsck --verify-data` (offline) and
`elvesfs scrub` (online, beside a running daemon).

A chunk is checked with the chain of chunks it is a delta of, all from one read
snapshot, so a daemon that re-codes chunks meanwhile (alone <-> delta) cannot make a
sound chunk look damaged; chunk ids are walked a batch per snapshot and checked in
worker threads, so memory stays bounded and no read transaction stays open long.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from codec import frame as codec_frame

from .cache import ChunkCache
from .chunkstore import MAX_DELTA_DEPTH, PROTECTED, ChunkRecord, ChunkStore
from .coding import decode_chunk
from .db import Database
from .errors import StoreCorruptError
from .layout import Layout
from .namespace import Namespace, ROOT_INO, U64


def chunk_count(db: Database) -> int:
    with db.read() as txn:
        return txn.stat(db.t["refs"])["entries"]


def chunk_ids(db: Database, batch: int = 4096):
    """Every chunk id, read a batch per snapshot: memory stays bounded on a store of
    millions of chunks, and no read transaction stays open while they are checked."""
    last = b""
    while True:
        with db.read() as txn:
            cur = txn.cursor(db=db.t["refs"])
            if not cur.set_range(last):
                return
            ids = []
            for k in cur.iternext(values=False):
                if k == last:
                    continue
                ids.append(bytes(k))
                if len(ids) == batch:
                    break
        if not ids:
            return
        yield from ids
        last = ids[-1]


REFERENCE_CACHE = 256 << 20  # decoded references kept for the deltas checked later


def check_chunks(db: Database, chunks: ChunkStore, workers: int | None = None):
    """(chunk id, ChunkCheck) of every chunk, checked in worker threads (the decoders
    and checksums release the GIL) with a bounded window of chunks in flight. Chunks
    that deltas are coded against are kept decoded in a bounded LRU once verified: a
    checkpoint series' base is then decoded once, not once per delta of it."""
    workers = workers or os.cpu_count() or 1
    refs = ChunkCache(REFERENCE_CACHE)
    window: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="elvesfs-check") as pool:
        for cid in chunk_ids(db):
            window.append((cid, pool.submit(check_chunk, db, chunks, cid, refs)))
            if len(window) >= 4 * workers:
                done, fut = window.popleft()
                yield done, fut.result()
        while window:
            done, fut = window.popleft()
            yield done, fut.result()


@dataclass
class ChunkCheck:
    """What verifying one chunk found."""

    mendable: tuple[str, ...] = ()  # protected streams with damage their parity repairs
    error: str | None = None  # why the chunk does not decode and verify


def check_chunk(db: Database, chunks: ChunkStore, cid: bytes,
                refs: ChunkCache | None = None) -> ChunkCheck:
    """Decode and verify a chunk (and the chain of references it is a delta against) from
    one snapshot of the store, so a daemon that re-codes chunks meanwhile (online scrub)
    cannot make a sound chunk look damaged. A chunk freed meanwhile checks clean.
    ``refs``: references verified earlier (chunk contents never change under their id)."""
    with db.read() as txn:
        rec = chunks.record(txn, cid)
        frame = txn.get(cid, db=db.t["chunks"])
        if rec is None and frame is None:
            return ChunkCheck()
        if rec is None or frame is None:
            return ChunkCheck(error=f"chunk {cid.hex()} has {'no data' if rec else 'no record'}")
        out = ChunkCheck()
        if rec.flags & PROTECTED:
            out.mendable = tuple(codec_frame.mend(frame)[1])
        try:
            _decode_in(txn, chunks, db, cid, rec, frame, refs)
        except Exception as exc:
            out.error = str(exc)
        return out


def _decode_in(txn, chunks: ChunkStore, db: Database, cid: bytes, rec: ChunkRecord,
               frame, refs: ChunkCache | None, hops: int = 0) -> bytes | memoryview:
    """Decode a chunk within ``txn``, first the chain of references it is a delta of
    (from ``refs`` where one was verified already; the chunk itself is always decoded)."""
    if hops > 4 * MAX_DELTA_DEPTH:  # the sealer never builds such a chain: a loop
        raise StoreCorruptError(f"delta chain through {cid.hex()} is too long")
    ref = None
    if rec.is_delta:
        ref = refs.get(rec.ref) if refs is not None else None
        if ref is None:
            rrec = chunks.record(txn, rec.ref)
            if rrec is None:
                raise StoreCorruptError(f"its reference chunk {rec.ref.hex()} is missing")
            ref = _decode_in(txn, chunks, db, rec.ref, rrec, chunks.frame(txn, rec.ref), refs,
                             hops + 1)
    data = decode_chunk(cid, frame, rec.flags, ref)
    if refs is not None and rec.deps:
        refs.put(cid, data)
    return data


def damaged_files(db: Database, ns: Namespace, bad: set[bytes]) -> list[tuple[int, str, int]]:
    """(inode, path, how many of its chunks are bad) of every file holding a bad chunk."""
    if not bad:
        return []
    with db.read() as txn:
        hit = {}
        for k, v in txn.cursor(db=db.t["layouts"]):
            n = sum(c in bad for c in Layout.from_bytes(v).ids())
            if n:
                hit[U64.unpack(k)[0]] = n
        paths = _paths(ns, txn, set(hit))
    return [(ino, paths.get(ino, f"<inode {ino}>"), n) for ino, n in sorted(hit.items())]


def _paths(ns: Namespace, txn, inodes: set[int]) -> dict[int, str]:
    """A path of each of ``inodes`` (one of its names, for a hard-linked file)."""
    parent_of: dict[int, tuple[int, bytes]] = {}
    for parent, name, ino in ns.all_dentries(txn):
        parent_of.setdefault(ino, (parent, name))
    out = {}
    for ino in inodes:
        parts, cur, seen = [], ino, set()
        while cur != ROOT_INO and cur in parent_of and cur not in seen:
            seen.add(cur)
            cur, name = parent_of[cur]
            parts.append(os.fsdecode(name))
        if cur == ROOT_INO:
            out[ino] = "/" + "/".join(reversed(parts))
    return out
