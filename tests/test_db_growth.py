"""data.mdb is allocated ahead of LMDB's last page while a store is open for writing
(Database.prepare_growth) and cut back at close: the store's contents never depend on
it, a crash that leaves it behind costs nothing, and a closed store holds no zeros."""

from __future__ import annotations

import mmap
import os
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from elvesfs import db as dbmod
from elvesfs.db import Database


def _fill(d: Database, n: int, size: int = 256 << 10, seed: int = 0) -> dict[bytes, bytes]:
    """n random values in the chunks table, one transaction each."""
    rng = random.Random(seed)
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


KPF_DIRTY, KPF_WRITEBACK = 1 << 4, 1 << 8  # /proc/kpageflags (admin-guide/mm/pagemap)


def _dirty_pages(path: Path, start: int, end: int) -> int:
    """How many pages of bytes [start, end) of `path` are dirty or under write-back in
    the page cache: their frames from /proc/self/pagemap (the file mapped and each page
    touched), their flags from /proc/kpageflags (both need root)."""
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    a = np.frombuffer(m, np.uint8)
    dirty = 0
    try:
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            for off in range(start - start % page, end, page):
                int(a[off])  # map the page
                pm.seek((a.ctypes.data + off) // page * 8)
                entry = struct.unpack("<Q", pm.read(8))[0]
                pfn = entry & ((1 << 55) - 1)
                if entry >> 63 and pfn:
                    kf.seek(pfn * 8)
                    if struct.unpack("<Q", kf.read(8))[0] & (KPF_DIRTY | KPF_WRITEBACK):
                        dirty += 1
    finally:
        del a
        m.close()
    return dirty


@pytest.mark.skipif(os.geteuid() != 0, reason="page flags (/proc/kpageflags) need root")
def test_write_back_sends_appended_pages_to_disk(tmp_path: Path):
    """Pages that commits appended are written soon after start_write_back, without any
    fsync: left alone, the kernel keeps dirty pages for 30 s (dirty_expire_centisecs)
    unless the machine has more dirty data than its background threshold."""
    d = Database(str(tmp_path))
    start = d.used_bytes()
    _fill(d, 128)  # 32 MiB in 128 commits, none synced
    end = d.used_bytes()
    d.start_write_back()
    deadline = time.monotonic() + 10
    while (left := _dirty_pages(tmp_path / "data.mdb", start, end)) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == 0
    d.close()


def test_write_back_sends_reused_pages_and_keeps_the_synced_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each early write-back sends every dirty page of the store file, pages that later
    commits reused included (a store with deletions gets the same head start as a new
    one); the synced tree is never among them, since the sync pins it: its pages stay
    as synced until the next sync, whatever was deleted. A failed call is only logged."""
    assert dbmod._sync_file_range is not None  # Linux libc: the real call is there
    real = dbmod._sync_file_range
    sent: list[tuple[int, int]] = []
    fail = [False]

    def recorder(fd: int, off: int, n: int, flags: int) -> int:
        assert flags == dbmod.SYNC_FILE_RANGE_WRITE
        if fail[0]:
            return -1
        sent.append((off, off + n))
        return real(fd, off, n, flags)
    monkeypatch.setattr(dbmod, "_sync_file_range", recorder)
    d = Database(str(tmp_path))
    vals = _fill(d, 80)
    d.sync()
    with d.write() as txn:  # free a third of the synced tree's pages ...
        for k in list(vals)[::3]:
            txn.delete(k, db=d.t["chunks"])
            del vals[k]
    d.sync(mark=True)  # ... which the next pin lets later commits reuse
    end = d.used_bytes()
    vals.update(_fill(d, 40, seed=2))
    assert d.used_bytes() - end < 20 * (256 << 10)  # freed pages were reused
    fail[0] = True
    d.start_write_back()
    fail[0] = False
    d.start_write_back()
    assert sent == [(0, d.used_bytes())]
    deadline = time.monotonic() + 10
    while (left := _dirty_pages(tmp_path / "data.mdb", 0, d.used_bytes())) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == 0
    d.close()
    assert _read_all(tmp_path) == vals
