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

from .accounting import stored_share
from .chunkstore import ChunkStore
from .db import Database
from .mounts import store_of
from .namespace import Inode, Namespace, key


def file_stats(db: Database, ino: int, name: str) -> dict:
    """One file's numbers: sizes, ratio, savings by dedup/delta/codec, policy, max error."""
    chunks = ChunkStore(db)
    ns = Namespace(db)
    with db.read() as txn:
        node = ns.get(txn, ino)
        share = stored_share(txn, db.t, chunks, ino)
        raw = txn.get(key(ino), db=db.t["fstats"])
        staged = txn.get(key(ino), db=db.t["staging"]) is not None
    seal = json.loads(raw) if raw else {}
    out = {
        "path": name, "inode": ino, "logical": node.size, "stored": int(share),
        "ratio": round(node.size / share, 3) if share else None,
        "state": "staged" if staged else "sealed",
        "format": seal.get("format"), "policy": seal.get("policy", "lossless"),
        "max_error": seal.get("max_error") if seal.get("lossy_bytes") else 0.0,
        "lossy_bytes": seal.get("lossy_bytes", 0),
        "dedup_saved": seal.get("dedup_bytes", 0),
        "delta_raw": seal.get("delta_raw", 0),
        "delta_saved": seal.get("delta_raw", 0) - seal.get("delta_stored", 0),
        "hole_bytes": seal.get("hole_bytes", 0),
        "tensors": seal.get("tensors", 0),
        "codecs": {c: {"raw": r, "stored": s} for c, (r, s) in seal.get("codecs", {}).items()},
    }
    return out


def store_stats(db: Database) -> dict:
    """Whole-store numbers: logical bytes of all files vs bytes the store really holds."""
    chunks = ChunkStore(db)
    logical = files = 0
    codecs: dict[str, list[int]] = {}
    dedup = delta_raw = delta_saved = lossy = 0
    with db.read() as txn:
        for _, v in txn.cursor(db=db.t["inodes"]):
            node = Inode.unpack(0, v)
            if statmod.S_ISREG(node.mode) and node.nlink:
                logical += node.size
                files += 1
        n, raw, stored = chunks.totals(txn)
        for _, v in txn.cursor(db=db.t["fstats"]):
            s = json.loads(v)
            dedup += s.get("dedup_bytes", 0)
            delta_raw += s.get("delta_raw", 0)
            delta_saved += s.get("delta_raw", 0) - s.get("delta_stored", 0)
            lossy += s.get("lossy_bytes", 0)
            for c, (r, st) in s.get("codecs", {}).items():
                acc = codecs.setdefault(c, [0, 0])
                acc[0] += r
                acc[1] += st
    return {
        "files": files, "logical": logical, "chunks": n, "unique_raw": raw, "stored": stored,
        "ratio": round(logical / stored, 3) if stored else None,
        "dedup_saved": max(0, logical - raw), "delta_raw": delta_raw, "delta_saved": delta_saved,
        "lossy_bytes": lossy,
        "codecs": {c: {"raw": r, "stored": s} for c, (r, s) in codecs.items()},
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
                  f"{(s['ratio'] or 0):>6.2f} {_human(s['dedup_saved']):>10} "
                  f"{_human(s['delta_saved']):>10} {s['policy']:>10} "
                  f"{s['max_error'] or 0:>8.2g}  {s['path']}")
    w = whole
    print(f"store: {w['files']} files, logical {_human(w['logical'])}, stored "
          f"{_human(w['stored'])} in {w['chunks']} chunks (ratio {w['ratio'] or 0:.2f}x), "
          f"saved by dedup {_human(w['dedup_saved'])}, by delta {_human(w['delta_saved'])}; "
          f"LMDB file {_human(w['db_bytes'])}")
    for c, v in sorted(w["codecs"].items()):
        print(f"  codec {c:>8}: {_human(v['raw'])} -> {_human(v['stored'])}")
    return 0
