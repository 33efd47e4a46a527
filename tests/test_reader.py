"""The chunk reader against a store that the sealer changes underneath it."""

from __future__ import annotations

import numpy as np
import pytest

import codec
from elvesfs.cache import ChunkCache
from elvesfs.chunkstore import ChunkStore
from elvesfs.coding import chunk_id
from elvesfs.db import Database
from elvesfs.reader import ChunkReader


@pytest.fixture
def store(tmp_path):
    (tmp_path / "store").mkdir()
    db = Database(str(tmp_path / "store"))
    yield db, ChunkStore(db)
    db.close()


def _weights(seed: int, base: np.ndarray | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(1 << 16) * 0.02).astype(np.float32)
    return (w if base is None else base + w * 1e-3).astype(np.float32).tobytes()


@pytest.mark.parametrize("direction", ["alone_to_delta", "delta_to_alone"])
def test_a_chunk_recoded_while_it_is_read_reads_back_exact(store, direction):
    """Re-coding (rebase after a deletion) swaps a chunk's frame and record in one
    transaction while readers run: a reader that took the record before the swap and
    the frame after it decoded a delta frame without its reference (EIO) or the
    reverse. Record and frame must come from one snapshot."""
    db, chunks = store
    base_bytes = _weights(0)
    user_bytes = _weights(1, np.frombuffer(base_bytes, np.float32))
    base, user = chunk_id(base_bytes), chunk_id(user_bytes)
    alone = codec.encode(user_bytes, "F32")
    delta = codec.encode(user_bytes, "F32", reference=base_bytes)
    assert codec.inspect(delta).needs_reference and not codec.inspect(alone).needs_reference
    first, then = ((alone, None), (delta, base)) if direction == "alone_to_delta" \
        else ((delta, base), (alone, None))
    with db.write() as txn:
        chunks.add(txn, base, codec.encode(base_bytes, "F32"), len(base_bytes))
        chunks.incref(txn, base)
        chunks.add(txn, user, first[0], len(user_bytes), ref=first[1] or bytes(16))
        chunks.incref(txn, user)

    reader = ChunkReader(db, chunks, ChunkCache(64 << 20))
    real_record = chunks.record
    swapped = []

    def record_then_recode(txn, cid):
        rec = real_record(txn, cid)
        if cid == user and not swapped:  # the sealer commits right after the lookup
            swapped.append(True)
            with db.write() as w:
                chunks.recode(w, user, then[0], then[1] or bytes(16))
        return rec

    chunks.record = record_then_recode
    assert bytes(reader.get(user)) == user_bytes
    assert swapped
    reader.cache = ChunkCache(64 << 20)  # and read again from the new coding
    assert bytes(reader.get(user)) == user_bytes
