"""LMDB has one writer at a time. A seal's bulk commits (Database.write_batch) hand the
writer lock over to any other writer that waits (a metadata request on the event loop),
so that a `mkdir` during a large `cp` waits for one chunk, not for a 16 MiB batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from elvesfs.db import Database


def _key(i: int) -> bytes:
    return i.to_bytes(8, "big")


def _wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def test_a_waiting_writer_goes_before_the_rest_of_a_batch(tmp_path: Path):
    d = Database(str(tmp_path))
    try:
        n = 50
        seen: list[int] = []
        other_waits = threading.Event()

        def other() -> None:
            other_waits.set()
            with d.write() as txn:
                seen.append(sum(1 for _ in txn.cursor(db=d.t["chunks"])))
                txn.put(b"other", b"1", db=d.t["meta"])

        def store(txn, i: int) -> None:
            txn.put(_key(i), bytes(1000), db=d.t["chunks"])
            if i == 0:  # the other writer asks for the lock while the batch holds it
                threading.Thread(target=other).start()
                assert other_waits.wait(10)
                assert _wait_until(lambda: d._waiting > 0), "the other writer never queued"

        d.write_batch(list(range(n)), store)
        assert _wait_until(lambda: bool(seen))
        # it got in after the first item was committed, long before the batch ended
        assert 1 <= seen[0] < n
        with d.read() as txn:
            assert sum(1 for _ in txn.cursor(db=d.t["chunks"])) == n
            assert txn.get(b"other", db=d.t["meta"]) == b"1"
    finally:
        d.close()


def test_a_batch_alone_is_one_transaction(tmp_path: Path):
    d = Database(str(tmp_path))
    try:
        before = d.env.info()["last_txnid"]
        d.write_batch(list(range(20)), lambda txn, i: txn.put(_key(i), b"x", db=d.t["chunks"]))
        assert d.env.info()["last_txnid"] == before + 1
    finally:
        d.close()
