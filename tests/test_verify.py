"""Chunk verification shared by fsck and scrub (elvesfs/verify.py)."""

from __future__ import annotations

import pytest

from elvesfs.chunkstore import ChunkStore
from elvesfs.db import Database
from elvesfs.verify import check_chunks, chunk_count, chunk_ids


@pytest.fixture
def db(tmp_path):
    (tmp_path / "store").mkdir()
    d = Database(str(tmp_path / "store"))
    yield d
    d.close()


@pytest.mark.parametrize("batch", [1, 3, 10, 11, 4096])
def test_chunk_ids_walks_every_chunk_once_across_batches(db, batch):
    """Ids are read a batch per snapshot (bounded memory); each batch resumes after the
    last id of the one before: none skipped, none twice, at any batch size."""
    chunks = ChunkStore(db)
    ids = sorted(bytes([i]) * 16 for i in range(1, 11))
    with db.write() as txn:
        for cid in ids:
            chunks.add(txn, cid, b"frame", 5)
    assert chunk_count(db) == 10
    assert list(chunk_ids(db, batch=batch)) == ids


def test_chunk_ids_of_an_empty_store(db):
    assert list(chunk_ids(db)) == [] and list(check_chunks(db, ChunkStore(db))) == []
