"""Who pays for which stored bytes: a chunk shared by N references charges 1/N to each.

So the shares of all files add up to the store's chunk bytes, and `du -s` of the
whole mount agrees with the store's real use. A delta chunk also passes on its
share of the reference chunk it needs.
"""

from __future__ import annotations

from collections import Counter

import lmdb

from .chunkstore import ChunkStore
from .layout import Layout
from .namespace import key


def layout_of(txn: lmdb.Transaction, t: dict, ino: int) -> Layout:
    raw = txn.get(key(ino), db=t["layouts"])
    return Layout.from_bytes(raw) if raw else Layout.empty()


def stored_share(txn: lmdb.Transaction, t: dict, chunks: ChunkStore, ino: int) -> float:
    """Stored bytes charged to inode `ino`."""
    share = 0.0
    for cid, n in Counter(layout_of(txn, t, ino).ids()).items():
        rec = chunks.record(txn, cid)
        if rec is None or rec.refcount == 0:
            continue
        # a delta chunk passes its share on along its chain: each chunk it references
        # is charged to its users in proportion, so the shares of all files add up to
        # the store's total
        weight = n / rec.refcount
        share += rec.stored * weight
        while rec.is_delta:
            rec = chunks.record(txn, rec.ref)
            if rec is None or not rec.refcount:
                break
            weight /= rec.refcount
            share += rec.stored * weight
    return share
