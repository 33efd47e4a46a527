"""`elvesfs fsck`: check an unmounted store against its invariants, and repair with --repair.

Checks, in order:
1. directory entries name existing inodes; link counts match entries; inodes
   that no entry reaches are moved to /lost+found (repair);
2. staging records have staging files and vice versa;
3. every layout names existing chunks (a missing chunk becomes a hole on repair,
   and the file is reported as damaged) and sealed sizes match layouts;
4. every chunk's refcount equals its references (layouts + delta chunks) and its
   deps the delta chunks among them; the garbage list holds exactly the
   unreferenced chunks, the orphans list those held only by delta chunks;
5. with --verify-data, every chunk decodes and matches its checksum.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from collections import Counter
from dataclasses import replace

from .chunkstore import ChunkRecord, ChunkStore
from .coding import mend_chunk
from .daemon import lock_store
from .db import Database
from .errors import CliError
from .layout import HOLE, Layout
from .mounts import default_store, mounts
from .namespace import Inode, Namespace, ROOT_INO, U64, key
from .staging import record_base
from .verify import check_chunks, chunk_count, damaged_files

log = logging.getLogger(__name__)


class Fsck:
    """One check (and optional repair) pass over a store that no daemon serves."""

    def __init__(self, root: str, repair: bool, verify: bool, progress: bool) -> None:
        self.root, self.repair, self.verify, self.progress = root, repair, verify, progress
        self.db = Database(root)
        self.ns = Namespace(self.db)
        self.chunks = ChunkStore(self.db)
        self.t = self.db.t
        self.problems: list[str] = []
        self.damaged: list[int] = []
        self.bad_chunks: set[bytes] = set()  # chunks that do not decode and verify

    def problem(self, msg: str, repairable: bool = True) -> None:
        self.problems.append(msg)
        log.warning("%s%s", msg, " (repaired)" if self.repair and repairable else "")

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="chunk", disable=not self.progress,
                    file=sys.stderr, leave=False)

    def run(self) -> int:
        self.check_namespace()
        self.check_staging()
        self.check_layouts_and_refs()
        if self.verify:
            self.verify_chunks()
            self.report_damaged_files()
        if self.repair:
            with self.db.write() as txn:
                self.chunks.collect(txn, limit=1 << 62)
        self.db.close()
        return len(self.problems)

    # -- 1. namespace -------------------------------------------------------------
    def check_namespace(self) -> None:
        with self.db.write() as txn:
            inodes = {U64.unpack(k)[0]: Inode.unpack(U64.unpack(k)[0], v)
                      for k, v in txn.cursor(db=self.t["inodes"])}
            if ROOT_INO not in inodes:
                self.problem("root directory is missing")
                return
            links: Counter[int] = Counter()
            subdirs: Counter[int] = Counter()
            for parent, name, ino in list(self.ns.all_dentries(txn)):
                if ino not in inodes or parent not in inodes:
                    self.problem(f"entry {name!r} in directory {parent} names missing inode {ino}")
                    if self.repair:
                        self.ns.unlink(txn, parent, name)
                    continue
                links[ino] += 1
                if inodes[ino].is_dir:
                    subdirs[parent] += 1
            staged = {int.from_bytes(k, "big") for k, _ in txn.cursor(db=self.t["staging"])}
            for ino, node in inodes.items():
                if ino == ROOT_INO:
                    want = 2 + subdirs[ino]
                elif node.is_dir:
                    want = 2 + subdirs[ino] if links[ino] else 0
                else:
                    want = links[ino]
                if node.nlink == 0 and links[ino] == 0:
                    continue  # an orphan: the next mount deletes it
                if links[ino] == 0 and ino != ROOT_INO:
                    self.problem(f"inode {ino} has nlink {node.nlink} but no directory entry")
                    if self.repair:
                        self._to_lost_found(txn, ino, node)
                    continue
                if node.nlink != want:
                    self.problem(f"inode {ino} has nlink {node.nlink}, expected {want}")
                    if self.repair:
                        node.nlink = want
                        self.ns.put(txn, node)
            self.staged = staged

    def _to_lost_found(self, txn, ino: int, node: Inode) -> None:
        lf = self.ns.lookup(txn, ROOT_INO, b"lost+found")
        if lf is None:
            d = self.ns.new_inode(txn, stat.S_IFDIR | 0o700, 0, 0)
            self.ns.link(txn, ROOT_INO, b"lost+found", d.ino)
            root = self.ns.get(txn, ROOT_INO)
            root.nlink += 1
            self.ns.put(txn, root)
            lf = d.ino
        self.ns.link(txn, lf, f"#{ino}".encode(), ino)
        node.nlink = 2 if node.is_dir else 1
        self.ns.put(txn, node)

    # -- 2. staging -------------------------------------------------------------------
    def check_staging(self) -> None:
        sdir = os.path.join(self.root, "staging")
        files = set()
        if os.path.isdir(sdir):
            files = {int(n) for n in os.listdir(sdir) if n.isdigit()}
        with self.db.write() as txn:
            for ino in sorted(self.staged - files):
                self.problem(f"staging record of inode {ino} has no staging file")
                if self.repair:  # the file keeps its sealed content (and size: below)
                    txn.delete(key(ino), db=self.t["staging"])
                    self.staged.discard(ino)
        for ino in sorted(files - self.staged):
            self.problem(f"staging file {ino} has no record (left over)")
            if self.repair:
                os.unlink(os.path.join(sdir, str(ino)))
        for ino in sorted(self.staged & files):
            self._check_tail(ino, os.path.join(sdir, str(ino)))

    def _check_tail(self, ino: int, path: str) -> None:
        """A tail-staged file's record must name a chunk boundary of its sealed layout
        (staging.py); else its content below the base is unknown: repair keeps the file's
        last sealed content."""
        with self.db.read() as txn:
            value = txn.get(key(ino), db=self.t["staging"])
            raw = txn.get(key(ino), db=self.t["layouts"])
        try:
            base = record_base(value)
        except ValueError as exc:
            problem = str(exc)
        else:
            lay = Layout.from_bytes(raw) if raw else Layout.empty()
            if not base or lay.starts_at(base) or (
                    os.path.getsize(path) < base):  # a truncate was under way: fine
                return
            problem = f"base {base} is not a chunk boundary of its sealed layout"
        self.problem(f"staging record of inode {ino}: {problem}")
        if self.repair:  # the file keeps its sealed content (and size: see the layouts)
            with self.db.write() as txn:
                txn.delete(key(ino), db=self.t["staging"])
            os.unlink(path)
            self.staged.discard(ino)

    # -- 3 + 4. layouts and reference counts -------------------------------------------
    def check_layouts_and_refs(self) -> None:
        want: Counter[bytes] = Counter()
        with self.db.write() as txn:
            for k, v in list(txn.cursor(db=self.t["layouts"])):
                ino = U64.unpack(k)[0]
                node = self.ns.find(txn, ino)
                if node is None:
                    self.problem(f"layout of missing inode {ino}")
                    if self.repair:
                        txn.delete(k, db=self.t["layouts"])
                    continue
                lay = Layout.from_bytes(v)
                missing = [i for i in range(len(lay)) if lay.chunk_id(i) != HOLE
                           and self.chunks.record(txn, lay.chunk_id(i)) is None]
                if missing:
                    self.damaged.append(ino)
                    self.problem(f"inode {ino}: {len(missing)} chunks missing (data lost; "
                                 f"repair turns them into zero-filled holes)")
                    if self.repair:
                        ext = lay.ext.copy()
                        for i in missing:
                            ext["id"][i] = HOLE
                        lay = Layout(ext)
                        txn.put(k, lay.to_bytes(), db=self.t["layouts"])
                if ino not in self.staged and lay.size != node.size:
                    self.problem(f"inode {ino}: size {node.size} but layout holds {lay.size}")
                    if self.repair:
                        node.size = lay.size
                        self.ns.put(txn, node)
                want.update(lay.ids())
            deps = self.chunks.count_deps(txn)
            want.update(deps)
            for cid, v in list(txn.cursor(db=self.t["refs"])):
                rec = ChunkRecord.unpack(v)
                if txn.get(cid, db=self.t["chunks"]) is None:
                    self.problem(f"chunk {cid.hex()} has a record but no data")
                    continue
                should = replace(rec, refcount=want[cid], deps=deps.get(cid, 0))
                if rec != should:
                    self.problem(f"chunk {cid.hex()} refcount {rec.refcount} ({rec.deps} "
                                 f"from deltas), references {should.refcount} "
                                 f"({should.deps} from deltas)")
                    if self.repair:
                        txn.put(cid, should.pack(), db=self.t["refs"])
                orphan = should.is_orphan
                if orphan != (txn.get(cid, db=self.t["orphans"]) is not None):
                    self.problem(f"chunk {cid.hex()} is {'' if orphan else 'not '}an orphan "
                                 f"(held only by delta chunks) but {'not ' if orphan else ''}"
                                 "listed as one")
                    if self.repair and orphan:
                        txn.put(cid, b"", db=self.t["orphans"])
                    elif self.repair:
                        txn.delete(cid, db=self.t["orphans"])
                in_zero = txn.get(cid, db=self.t["zero"]) is not None
                if (want[cid] == 0) != in_zero:
                    if want[cid] == 0:
                        self.problem(f"unreferenced chunk {cid.hex()} not marked as garbage")
                        if self.repair:
                            txn.put(cid, b"", db=self.t["zero"])
                    elif self.repair:
                        txn.delete(cid, db=self.t["zero"])
            for cid, _ in list(txn.cursor(db=self.t["chunks"])):
                if txn.get(cid, db=self.t["refs"]) is None:
                    self.problem(f"chunk data {cid.hex()} without a record")
                    if self.repair:
                        txn.delete(cid, db=self.t["chunks"])
            for cid in self.chunks.orphans(txn):
                if txn.get(cid, db=self.t["refs"]) is None:
                    self.problem(f"orphan list names missing chunk {cid.hex()}")
                    if self.repair:
                        txn.delete(cid, db=self.t["orphans"])

    # -- 5. data ------------------------------------------------------------------------
    def verify_chunks(self) -> None:
        with self._bar(chunk_count(self.db), "verifying chunks") as bar:
            for cid, c in check_chunks(self.db, self.chunks):
                if c.mendable:
                    self.problem(f"chunk {cid.hex()}: protected stream(s) "
                                 f"{', '.join(c.mendable)} damaged, repairable (a stripe of the "
                                 "stream, its parity or copy)")
                    if self.repair:
                        mend_chunk(self.db, cid)
                if c.error:
                    self.problem(f"chunk {cid.hex()} does not verify: {c.error}",
                                 repairable=False)
                    self.bad_chunks.add(cid)
                bar.update(1)

    def report_damaged_files(self) -> None:
        """Name the files whose reads hit a chunk that does not verify (a delta of such
        a chunk fails too, so it is among them), and what recovers their data."""
        for ino, path, n in damaged_files(self.db, self.ns, self.bad_chunks):
            self.damaged.append(ino)
            self.problem(f"file {path}: {n} chunk(s) do not verify, reads of them fail with "
                         f"EIO; `elvesfs salvage --store {self.root} {path} OUT` writes out "
                         "what it still holds", repairable=False)


def resolve_store(target: str) -> str:
    """A store directory, or the default store of an unmounted mountpoint."""
    if os.path.exists(os.path.join(target, "data.mdb")):
        return os.path.abspath(target)
    if os.path.realpath(target) in mounts():
        raise CliError(f"{target} is mounted; unmount it before fsck")
    cand = default_store(target)
    if os.path.exists(os.path.join(cand, "data.mdb")):
        return cand
    raise CliError(f"{target} is neither a store nor the mountpoint of a default store; "
                   "pass the store directory that was mounted with --store (while mounted, "
                   "`mount -t fuse.elvesfs` shows it as elvesfs:STORE)")


def main(a: argparse.Namespace) -> int:
    root = resolve_store(a.target)
    lock_fd = lock_store(root)  # refuses to run while a daemon serves the store
    try:
        f = Fsck(root, a.repair, a.verify_data, progress=sys.stderr.isatty())
        n = f.run()
    finally:
        os.close(lock_fd)
    if n == 0:
        print(f"elvesfs fsck: {root}: clean")
        return 0
    if not a.repair:
        verb = "found (run with --repair to fix)"
    else:
        verb = "found, the others repaired" if f.damaged else "repaired"
    print(f"elvesfs fsck: {root}: {n} problems {verb}"
          + (f"; {len(set(f.damaged))} file(s) damaged beyond repair (named above)"
             if f.damaged else ""))
    return 0 if a.repair and not f.damaged else 1
