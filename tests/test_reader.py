"""The chunk reader against a store that the sealer changes underneath it, and what the
sealer never stores."""

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


def _recoded_on_lookup(db, chunks, direction: str) -> tuple[bytes, bytes, list]:
    """A store with a base chunk and a user chunk coded alone or as a delta of it, whose
    ``chunks.record`` re-codes the user the other way (as rebase does after a deletion)
    right after its first lookup (after the list it returns is cleared, the next one
    re-codes it back). Returns (user id, user bytes, [True] once swapped)."""
    base_bytes = _weights(0)
    user_bytes = _weights(1, np.frombuffer(base_bytes, np.float32))
    base, user = chunk_id(base_bytes), chunk_id(user_bytes)
    alone = codec.encode(user_bytes, "F32")
    delta = codec.encode(user_bytes, "F32", reference=base_bytes)
    assert codec.inspect(delta).needs_reference and not codec.inspect(alone).needs_reference
    codings = [(alone, bytes(16)), (delta, base)]
    if direction == "delta_to_alone":
        codings.reverse()
    with db.write() as txn:
        chunks.add(txn, base, codec.encode(base_bytes, "F32"), len(base_bytes))
        chunks.incref(txn, base)
        chunks.add(txn, user, codings[0][0], len(user_bytes), ref=codings[0][1])
        chunks.incref(txn, user)
    real_record = chunks.record
    swapped: list = []

    def record_then_recode(txn, cid):
        rec = real_record(txn, cid)
        if cid == user and not swapped:  # the sealer commits right after the lookup
            swapped.append(True)
            codings.reverse()  # to the other coding (and back, the next time)
            with db.write() as w:
                chunks.recode(w, user, *codings[0])
        return rec

    chunks.record = record_then_recode
    return user, user_bytes, swapped


@pytest.mark.parametrize("direction", ["alone_to_delta", "delta_to_alone"])
def test_a_chunk_recoded_while_it_is_read_reads_back_exact(store, direction):
    """Re-coding (rebase after a deletion) swaps a chunk's frame and record in one
    transaction while readers run: a reader that took the record before the swap and
    the frame after it decoded a delta frame without its reference (EIO) or the
    reverse. Record and frame must come from one snapshot."""
    db, chunks = store
    user, user_bytes, swapped = _recoded_on_lookup(db, chunks, direction)
    reader = ChunkReader(db, chunks, ChunkCache(64 << 20))
    assert bytes(reader.get(user)) == user_bytes
    assert swapped
    reader.cache = ChunkCache(64 << 20)  # and read again from the new coding
    assert bytes(reader.get(user)) == user_bytes


@pytest.mark.parametrize("direction", ["alone_to_delta", "delta_to_alone"])
def test_a_chunk_recoded_while_it_is_scrubbed_checks_clean(store, direction):
    """`elvesfs scrub` and `salvage` run beside the daemon: a chunk re-coded under them
    must not look damaged (record, frame and reference from one snapshot)."""
    from elvesfs.salvage import Salvager
    from elvesfs.verify import check_chunk
    db, chunks = store
    user, user_bytes, swapped = _recoded_on_lookup(db, chunks, direction)
    assert check_chunk(db, chunks, user).error is None and swapped
    swapped.clear()  # re-code it back, under the salvager this time
    s = Salvager(db)
    s.chunks = chunks
    data, damage = s.chunk(user)
    assert swapped and damage is None and bytes(data) == user_bytes


def test_salvage_survives_a_decoder_failure(store, monkeypatch):
    """Damaged data may make a decoder fail in ways other than FrameError: salvage marks
    that chunk lost and goes on with the rest of the file."""
    import elvesfs.salvage as sv
    db, chunks = store
    data = _weights(3)
    cid = chunk_id(data)
    with db.write() as txn:
        chunks.add(txn, cid, codec.encode(data, "F32"), len(data))
        chunks.incref(txn, cid)

    def broken(*a, **k):
        raise IndexError("index 7 is out of bounds")
    monkeypatch.setattr(sv, "decode_chunk", broken)
    got, damage = sv.Salvager(db).chunk(cid)
    assert got is None and damage.outcome == "lost" and "IndexError" in damage.reason


def test_a_delta_whose_reference_is_gone_is_not_stored(tmp_path):
    """The committer never stores a delta frame without its reference (it could not be
    decoded): the seal fails with StoreCorruptError and the file stays staged."""
    from elvesfs.coding import Encoded
    from elvesfs.daemon import open_store
    from elvesfs.errors import StoreCorruptError
    from elvesfs.ingest import SealStats, _Result
    base_bytes = _weights(0)
    user_bytes = _weights(1, np.frombuffer(base_bytes, np.float32))
    frame = codec.encode(user_bytes, "F32", reference=base_bytes)
    assert codec.inspect(frame).needs_reference
    root = tmp_path / "store"
    root.mkdir()
    st = open_store(str(root))
    try:
        cid = chunk_id(user_bytes)
        enc = Encoded(cid, frame, len(user_bytes), 0, "xor", None, needs_reference=True)
        r = _Result(None, cid, enc, chunk_id(base_bytes))  # the base was never stored
        with pytest.raises(StoreCorruptError, match="missing chunk"):
            st.sealer._commit_batch([r], SealStats())
        with st.db.read() as txn:
            assert st.chunks.record(txn, cid) is None
    finally:
        st.close()
