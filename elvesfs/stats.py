"""`elvesfs stats`: logical vs stored size per file and per store, and where the savings come from.

Reads the store's LMDB read-only, so it works while the daemon runs (LMDB allows
readers in other processes) and never reads file data through the mount.
"""

from __future__ import annotations

import argparse
import json
import os
import stat as statmod
import sys

from codec.errors import FrameError
from codec.frame import codec_name

from .accounting import layout_of, stored_share
from .chunkstore import ChunkRecord, ChunkStore
from .db import Database
from .errors import StoreCorruptError
from .layout import HOLE
from .mounts import store_of
from .namespace import Inode, Namespace, key


def file_stats(db: Database, ino: int, name: str) -> dict:
    """One file's numbers: sizes, ratio, savings by dedup/delta/codec, policy, max error.
    Codecs and deltas are how its chunks are stored now (re-coding after a deletion
    turns deltas into chunks stored alone; ``seal`` keeps what its seal coded); dedup,
    policy and error are its seal's."""
    chunks = ChunkStore(db)
    ns = Namespace(db)
    with db.read() as txn:
        node = ns.get(txn, ino)
        share = stored_share(txn, db.t, chunks, ino)
        raw = txn.get(key(ino), db=db.t["fstats"])
        staged = txn.get(key(ino), db=db.t["staging"]) is not None
        cids = set(layout_of(txn, db.t, ino).ids()) - {HOLE}
        now, _ = _breakdown(txn, chunks, ((c, chunks.record(txn, c)) for c in cids))
    seal = json.loads(raw) if raw else {}
    out = {
        "path": name, "inode": ino, "logical": node.size, "stored": int(share),
        "ratio": round(node.size / share, 3) if share else None,
        "state": "staged" if staged else "sealed",
        "format": seal.get("format"), "policy": seal.get("policy", "lossless"),
        "max_error": seal.get("max_error") if seal.get("lossy_bytes") else 0.0,
        "lossy_bytes": seal.get("lossy_bytes", 0),
        "dedup_saved": seal.get("dedup_bytes", 0),
        "hole_bytes": seal.get("hole_bytes", 0),
        "tensors": seal.get("tensors", 0),
        **now,
        # what the seal did (its deltas may since have been re-coded alone)
        "seal": {"delta_raw": seal.get("delta_raw", 0),
                 "delta_saved": seal.get("delta_raw", 0) - seal.get("delta_stored", 0),
                 "codecs": {c: {"raw": r, "stored": st}
                            for c, (r, st) in seal.get("codecs", {}).items()}},
    }
    return out


def _breakdown(txn, chunks: ChunkStore, records) -> tuple[dict, tuple[int, int, int]]:
    """({raw and stored bytes per codec, and of the deltas}, (chunks, raw, stored)) of
    the live chunks among ``records`` ((id, record or None) pairs; each chunk whole)."""
    codecs: dict[str, dict] = {}
    n = raw = stored = delta_raw = delta_stored = 0
    for cid, rec in records:
        if rec is None or not rec.refcount:
            continue
        n, raw, stored = n + 1, raw + rec.raw, stored + rec.stored
        try:
            name = codec_name(chunks.frame(txn, cid))
        except (StoreCorruptError, FrameError):  # stats still report; fsck says why
            name = "unreadable"
        acc = codecs.setdefault(name, {"raw": 0, "stored": 0})
        acc["raw"] += rec.raw
        acc["stored"] += rec.stored
        if rec.is_delta:
            delta_raw += rec.raw
            delta_stored += rec.stored
    return ({"delta_raw": delta_raw, "delta_saved": delta_raw - delta_stored, "codecs": codecs},
            (n, raw, stored))


def store_stats(db: Database) -> dict:
    """Whole-store numbers: logical bytes of all files vs bytes the store really holds."""
    chunks = ChunkStore(db)
    logical = files = lossy = 0
    with db.read() as txn:
        for _, v in txn.cursor(db=db.t["inodes"]):
            node = Inode.unpack(0, v)
            if statmod.S_ISREG(node.mode) and node.nlink:
                logical += node.size
                files += 1
        for _, v in txn.cursor(db=db.t["fstats"]):
            lossy += json.loads(v).get("lossy_bytes", 0)
        now, (n, raw, stored) = _breakdown(txn, chunks, (
            (bytes(k), ChunkRecord.unpack(v)) for k, v in txn.cursor(db=db.t["refs"])))
    return {
        "files": files, "logical": logical, "chunks": n, "unique_raw": raw, "stored": stored,
        "ratio": round(logical / stored, 3) if stored else None,
        "dedup_saved": max(0, logical - raw), "lossy_bytes": lossy, **now,
        "db_bytes": db.used_bytes(),
    }


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _walk(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        for d, _, files in os.walk(path):
            for f in sorted(files):
                p = os.path.join(d, f)
                if os.path.isfile(p) and not os.path.islink(p):
                    yield p
    elif os.path.isfile(path):
        yield path


def main(a: argparse.Namespace) -> int:
    paths = a.paths or ([] if a.store else ["."])
    store = a.store
    if store is None:
        store = store_of(paths[0])
    db = Database(store, readonly=True)
    try:
        files = []
        for p in paths:
            for f in _walk(p):
                files.append(file_stats(db, os.stat(f).st_ino, f))
        whole = store_stats(db)
    finally:
        db.env.close()
    if a.json:
        json.dump({"files": files, "store": whole}, sys.stdout, indent=1)
        print()
        return 0
    if files:
        print(f"{'logical':>10} {'stored':>10} {'ratio':>6} {'dedup':>10} {'delta':>10} "
              f"{'policy':>10} {'max err':>8}  path")
        for s in files:
            print(f"{_human(s['logical']):>10} {_human(s['stored']):>10} "
                  f"{_ratio(s['ratio']):>6} {_human(s['dedup_saved']):>10} "
                  f"{_human(s['delta_saved']):>10} {s['policy']:>10} "
                  f"{s['max_error'] or 0:>8.2g}  {s['path']}")
    w = whole
    count = f"{w['files']} file{'' if w['files'] == 1 else 's'}"
    print(f"store: {count}, logical {_human(w['logical'])}, stored "
          f"{_human(w['stored'])} in {w['chunks']} chunks (ratio {_ratio(w['ratio'], 'x')}), "
          f"saved by dedup {_human(w['dedup_saved'])}, by delta {_human(w['delta_saved'])}; "
          f"LMDB file {_human(w['db_bytes'])}")
    for c, v in sorted(w["codecs"].items()):
        print(f"  codec {c:>8}: {_human(v['raw'])} -> {_human(v['stored'])}")
    return 0


def _ratio(r: float | None, unit: str = "") -> str:
    """A ratio for people: '-' where nothing is stored (an empty file or store)."""
    return f"{r:.2f}{unit}" if r else "-"
