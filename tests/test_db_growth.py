"""data.mdb is allocated ahead of LMDB's last page while a store is open for writing
(Database.prepare_growth) and cut back at close: the store's contents never depend on
it, a crash that leaves it behind costs nothing, and a closed store holds no zeros."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from elvesfs import db as dbmod
from elvesfs.db import Database


def _fill(d: Database, n: int, size: int = 256 << 10, seed: int = 0) -> dict[bytes, bytes]:
    """n random values in the chunks table, one transaction each."""
    rng = __import__("random").Random(seed)
    vals = {}
    for i in range(n):
        k, v = rng.randbytes(16), rng.randbytes(size)
        with d.write() as txn:
            txn.put(k, v, db=d.t["chunks"])
        vals[k] = v
    return vals


def _read_all(path: Path) -> dict[bytes, bytes]:
    d = Database(str(path), readonly=True)
    try:
        with d.read() as txn:
            return dict(txn.cursor(db=d.t["chunks"]))
    finally:
        d.close()


def test_growth_is_allocated_ahead_and_trimmed_at_close(tmp_path: Path):
    d = Database(str(tmp_path))
    data = tmp_path / "data.mdb"
    vals = _fill(d, 8)
    used = d.used_bytes()
    d.prepare_growth()
    assert os.path.getsize(data) == used + dbmod.GROW_AHEAD
    d.prepare_growth()  # nothing left to do: no change
    assert os.path.getsize(data) == used + dbmod.GROW_AHEAD
    vals.update(_fill(d, 8, seed=1))  # LMDB writes into the allocated range
    assert d.used_bytes() > used
    assert os.path.getsize(data) == used + dbmod.GROW_AHEAD
    used = d.used_bytes()
    d.close()
    assert os.path.getsize(data) == used  # no zeros left in a closed store
    assert _read_all(tmp_path) == vals


def test_growth_left_by_a_crash_is_harmless(tmp_path: Path):
    d = Database(str(tmp_path))
    vals = _fill(d, 6)
    d.sync()
    d.prepare_growth()
    size = os.path.getsize(tmp_path / "data.mdb")
    used = d.used_bytes()
    # a crash: the environment is never closed, the file keeps its allocated zeros
    d.env.close()
    assert os.path.getsize(tmp_path / "data.mdb") == size > used
    assert _read_all(tmp_path) == vals  # read-only: opens as it is
    d = Database(str(tmp_path))  # the next writer works, then trims what it finds
    vals.update(_fill(d, 2, seed=2))
    used = d.used_bytes()
    d.close()
    assert os.path.getsize(tmp_path / "data.mdb") == used
    assert _read_all(tmp_path) == vals


def test_no_growth_on_a_nearly_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    d = Database(str(tmp_path))
    _fill(d, 2)
    before = os.path.getsize(tmp_path / "data.mdb")
    free = dbmod.shutil.disk_usage(str(tmp_path))

    def nearly_full(path):
        return free._replace(free=4 * dbmod.GROW_AHEAD - 1)
    monkeypatch.setattr(dbmod.shutil, "disk_usage", nearly_full)
    d.prepare_growth()
    assert os.path.getsize(tmp_path / "data.mdb") == before
    d.close()


def test_committed_pages_are_sent_to_disk_once_each(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    """start_write_back hands every committed byte of data.mdb to the kernel's write-back
    once, in order, in steps of at least WRITE_BACK_STEP; a failed call is retried."""
    assert dbmod._sync_file_range is not None  # Linux libc: the real call is there
    real = dbmod._sync_file_range
    sent: list[tuple[int, int, int]] = []
    fail = [False]

    def recorder(fd: int, off: int, n: int, flags: int) -> int:
        if fail[0]:
            return -1
        sent.append((off, n, flags))
        return real(fd, off, n, flags)  # the real call must accept these arguments
    monkeypatch.setattr(dbmod, "_sync_file_range", recorder)
    d = Database(str(tmp_path))
    vals = _fill(d, 4)  # 1 MiB: under the step, nothing sent yet
    d.start_write_back()
    assert sent == []
    vals.update(_fill(d, 80, seed=1))
    d.start_write_back()
    assert sent == [(0, d.used_bytes(), dbmod.SYNC_FILE_RANGE_WRITE)]
    first = d.used_bytes()
    vals.update(_fill(d, 80, seed=2))
    fail[0] = True
    d.start_write_back()  # fails: the range stays pending
    fail[0] = False
    vals.update(_fill(d, 80, seed=3))
    d.start_write_back()
    assert sent[1] == (first, d.used_bytes() - first, dbmod.SYNC_FILE_RANGE_WRITE)
    assert len(sent) == 2
    d.close()
    assert _read_all(tmp_path) == vals
