"""A power cut between syncs: the store goes back, whole, to its last sync point.

A real power cut cannot be made here, so the tests build the data.mdb a cut can leave
behind from what the kernel holds: LMDB commits without syncing, and the kernel writes
dirty pages in any order, so on disk any mix of the synced file and newer pages is
possible. The two extremes: every newer page written but the meta pages (the pin must
have kept the synced tree intact), and only the newest meta page written (the sync
point must be put back)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import lmdb
import pytest

from conftest import lmdb_info, write_random
from elvesfs import syncpoint
from elvesfs.db import Database
from elvesfs.errors import StoreCorruptError

N = 600


def _value(i: int, gen: int) -> bytes:
    return random.Random(i * 1000 + gen).randbytes(300 + (i * 37) % 5000)


def _fill(db: Database, gen: int, keys) -> None:
    table = db.t["chunks"]
    for start in range(0, len(keys), 50):  # many commits, as the daemon makes them
        with db.write() as txn:
            for i in keys[start:start + 50]:
                txn.put(i.to_bytes(8, "big"), _value(i, gen), db=table)


def _later_commits(db: Database) -> None:
    """What happens after a sync: deletions free pages of the synced tree (LMDB would
    reuse them), rewrites and new keys take pages."""
    table = db.t["chunks"]
    with db.write() as txn:
        for i in range(0, N, 3):
            txn.delete(i.to_bytes(8, "big"), db=table)
    _fill(db, 2, list(range(1, N, 3)))
    _fill(db, 2, list(range(N, N + N // 2)))


def _contents(root: str) -> dict[bytes, bytes]:
    env = lmdb.open(root, readonly=True, lock=False, max_dbs=20, subdir=True)
    try:
        table = env.open_db(b"chunks", create=False)
        with env.begin(db=table) as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def _crash(db: Database) -> None:
    """The daemon's end without a clean close (what a power cut leaves of it)."""
    db._pin = None
    db.env.close()


def _page(raw: bytes, n: int, psize: int = 4096) -> bytes:
    return raw[n * psize:(n + 1) * psize]


@pytest.fixture
def synced(tmp_path):
    """A store with N values committed and synced; returns (root, db, data.mdb as synced)."""
    root = str(tmp_path / "store")
    os.makedirs(root)
    db = Database(root)
    _fill(db, 1, list(range(N)))
    db.sync()
    with open(os.path.join(root, "data.mdb"), "rb") as f:
        image = f.read()
    return root, db, image


def _expected_synced() -> dict[bytes, bytes]:
    return {i.to_bytes(8, "big"): _value(i, 1) for i in range(N)}


def test_the_synced_tree_is_intact_under_later_commits(synced, tmp_path):
    """Every page written after the sync reached the disk, the meta pages did not: the
    synced meta must still describe an intact tree (no page of it reused)."""
    root, db, image = synced
    _later_commits(db)
    with open(os.path.join(root, "data.mdb"), "rb") as f:
        now = f.read()
    cut = str(tmp_path / "cut")
    os.makedirs(cut)
    with open(os.path.join(cut, "data.mdb"), "wb") as f:
        f.write(_page(image, 0) + _page(image, 1) + now[2 * 4096:])
    assert _contents(cut) == _expected_synced()
    _crash(db)


def test_after_a_power_cut_the_store_goes_back_to_its_last_sync(synced, monkeypatch):
    """Only the newest meta page reached the disk: opening the store after the machine
    came back puts the sync point back; everything synced reads back exactly."""
    root, db, image = synced
    synced_txn = db._synced
    _later_commits(db)
    data = os.path.join(root, "data.mdb")
    with open(data, "rb") as f:
        now = f.read()
    newest = max((0, 1), key=lambda n: syncpoint.meta_txnid(_page(now, n)) or -1)
    _crash(db)
    torn = bytearray(image)
    torn[newest * 4096:(newest + 1) * 4096] = _page(now, newest)
    with open(data, "wb") as f:
        f.write(torn)
    # What LMDB alone opens is the newest meta page's tree, whose pages are missing (in a
    # child: reading past data.mdb's end through the map is a SIGBUS).
    probe = subprocess.run([sys.executable, "-c", "import sys, tests.test_syncpoint as t; "
                            "sys.exit(0 if t._contents(sys.argv[1]) == t._expected_synced() "
                            "else 3)", root], cwd=os.path.dirname(os.path.dirname(__file__)),
                           capture_output=True)
    assert probe.returncode != 0
    monkeypatch.setattr(syncpoint, "boot_id", lambda: b"another boot\0\0\0\0\0")
    # read-only commands (stats, scrub, salvage) cannot put the sync point back: they
    # refuse the store and say what to run, instead of reading the torn tree
    with pytest.raises(StoreCorruptError, match="elvesfs fsck"):
        Database(root, readonly=True)
    db = Database(root)
    try:
        assert db.rolled_back == synced_txn
        assert _table(db) == _expected_synced()
        _fill(db, 3, list(range(5)))  # and the store takes new commits
    finally:
        db.close()
    assert _contents(root)[(0).to_bytes(8, "big")] == _value(0, 3)
    ro = Database(root, readonly=True)  # closed cleanly since: readable as it is
    try:
        assert _table(ro)[(0).to_bytes(8, "big")] == _value(0, 3)
    finally:
        ro.close()


def test_a_killed_daemon_loses_no_commit(synced):
    """Same boot: the kernel kept every page the daemon wrote, so nothing goes back."""
    root, db, _ = synced
    _later_commits(db)
    before = _table(db)
    _crash(db)
    _assert_opens_unchanged(root, before)


def _table(db: Database) -> dict[bytes, bytes]:
    with db.read() as txn:
        return dict(txn.cursor(db=db.t["chunks"]))


def _assert_opens_unchanged(root: str, before: dict[bytes, bytes]) -> None:
    db = Database(root)
    try:
        assert db.rolled_back is None
        assert _table(db) == before
    finally:
        db.close()


def test_a_clean_close_is_kept_across_a_reboot(synced, monkeypatch):
    root, db, _ = synced
    _later_commits(db)
    before = _table(db)
    db.close()
    monkeypatch.setattr(syncpoint, "boot_id", lambda: b"another boot\0\0\0\0\0")
    _assert_opens_unchanged(root, before)


def test_a_torn_syncpoint_slot_falls_back_to_the_other(synced):
    root, db, _ = synced
    first = db._synced
    _fill(db, 4, [1])
    db.sync()
    second = db._synced
    assert second > first
    points = syncpoint.SyncPoints(root)
    assert points.last().txnid == second
    slot = [p.txnid if p else None for p in points._slots()].index(second)
    with open(points.path, "r+b") as f:  # a crash while that slot was written
        f.seek(slot * syncpoint.SLOT + 100)
        f.write(b"\xff" * 16)
    assert points.last().txnid == first
    _crash(db)


def test_sync_without_new_commits_writes_no_syncpoint(synced):
    root, db, _ = synced
    path = syncpoint.SyncPoints(root).path
    before = os.stat(path).st_mtime_ns
    db.sync()
    db.sync()
    assert os.stat(path).st_mtime_ns == before
    shutil.copy(path, path + ".copy")  # the file stays readable
    assert syncpoint.SyncPoints(root).last().txnid == db._synced
    db.close()


def test_a_save_never_overwrites_the_newest_point(synced):
    """Sync points of any parity (a sync mark makes gaps of two): the two slots always
    hold the two newest, so a save torn by a crash leaves the one before it."""
    root, db, _ = synced
    points = syncpoint.SyncPoints(root)
    seen = [db._synced]
    for i in range(4):
        _fill(db, 5, [i])
        db.sync()
        seen.append(db._synced)
        assert sorted(p.txnid for p in points._slots()) == seen[-2:]
    db.close()


def test_a_burst_of_small_commits_keeps_the_store_file_small(mnt):
    """Through a mount: each create or unlink is a commit that copies a few pages, and
    the sync point's snapshot keeps the pages they free from reuse until the next sync.
    The daemon syncs after every few hundred commits, so a burst (6000 commits here, in
    well under the 5 s sync interval) reuses pages instead of growing data.mdb by
    ~200 MiB."""
    d = mnt.path / "many"
    d.mkdir()
    for i in range(3000):
        (d / f"f{i}").touch()
    for i in range(3000):
        (d / f"f{i}").unlink()
    assert (mnt.store / "data.mdb").stat().st_size < 48 << 20
    assert not any(d.iterdir())


def test_space_freed_by_a_removal_is_reused_before_the_next_periodic_sync(make_mount,
                                                                          monkeypatch):
    """The last removal of a burst ends with a sync point, so the next writes reuse the
    pages it freed at once: until a sync point moves past them, the pinned snapshot
    still reaches them. With the periodic sync out of the way (an hour), a file written
    right after deleting one of the same size must take its place, not grow data.mdb."""
    monkeypatch.setenv("ELVESFS_SYNC_INTERVAL", "3600")
    m = make_mount()
    size = 24 << 20
    write_random(m.path / "a", size)
    m.sync()
    before = lmdb_info(m.store)["last_pgno"]
    st = os.statvfs(m.path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    (m.path / "a").unlink()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # df drops once the chunks are freed
        st = os.statvfs(m.path)
        if used - (st.f_blocks - st.f_bfree) * st.f_frsize > size // 2:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the removed file's chunks were not freed within 30 s")
    time.sleep(0.5)  # the sync point follows the free in the same task
    write_random(m.path / "b", size)
    m.sync()
    grown = (lmdb_info(m.store)["last_pgno"] - before) * 4096
    assert grown < size // 3, f"data.mdb grew by {grown >> 20} MiB for a file that replaced one"


@pytest.mark.parametrize("raw,expected", [("2.5", 2.5), ("3600", 3600.0), ("abc", 5.0),
                                          ("0", 5.0), ("-1", 5.0), ("nan", 5.0), ("inf", 5.0)])
def test_the_sync_interval_comes_from_the_environment(monkeypatch, raw, expected):
    """ELVESFS_SYNC_INTERVAL sets the periodic sync; a value that is not a positive
    number of seconds is reported and the default kept (not a daemon dying on import)."""
    from elvesfs import daemon
    monkeypatch.setenv("ELVESFS_SYNC_INTERVAL", raw)
    assert daemon._env_seconds("ELVESFS_SYNC_INTERVAL", 5.0) == expected
