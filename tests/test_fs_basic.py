"""Basic POSIX behaviour through a real mount, and bytes that survive a remount."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from conftest import lmdb_info


def test_write_read_remount(mnt):
    data = os.urandom(3_000_000) + bytes(1_000_000) + b"tail"
    p = mnt.path / "blob.bin"
    p.write_bytes(data)
    assert p.read_bytes() == data
    mnt.sync()
    assert p.read_bytes() == data
    mnt.remount()
    assert hashlib.sha256(p.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert p.stat().st_size == len(data)


def test_dedup_shows_in_du(mnt):
    data = os.urandom(2_000_000)
    (mnt.path / "a").write_bytes(data)
    (mnt.path / "b").write_bytes(data)
    mnt.sync()
    a, b = (mnt.path / "a").stat(), (mnt.path / "b").stat()
    # each file is charged half of the shared chunks: together about one copy
    assert a.st_blocks == b.st_blocks
    assert abs((a.st_blocks + b.st_blocks) * 512 - len(data)) < 0.05 * len(data)


def test_partial_rewrite_of_sealed_file(mnt):
    p = mnt.path / "f"
    data = bytearray(os.urandom(1_000_000))
    p.write_bytes(data)
    mnt.sync()
    with open(p, "r+b") as f:
        f.seek(500_000)
        f.write(b"X" * 1000)
    data[500_000:501_000] = b"X" * 1000
    assert p.read_bytes() == data
    mnt.remount()
    assert p.read_bytes() == data


def test_unlink_open_file_stays_readable(mnt):
    p = mnt.path / "gone"
    data = os.urandom(300_000)
    p.write_bytes(data)
    mnt.sync()
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert f.read() == data


def test_errors(mnt):
    with pytest.raises(OSError) as e:
        (mnt.path / ("x" * 256)).write_bytes(b"")
    assert e.value.errno == errno.ENAMETOOLONG
    (mnt.path / "d").mkdir()
    (mnt.path / "d" / "f").write_bytes(b"1")
    with pytest.raises(OSError) as e:
        os.rmdir(mnt.path / "d")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        os.stat(mnt.path / "nope")


def test_seal_threads_yield_the_cpu_to_the_fuse_loop(mnt):
    """The seal's coding threads run below the event loop's CPU priority (a metadata
    request during a large `cp` waits less behind them), under their own names."""
    from elvesfs.threads import CODER_NICE, COMMITTER_NICE
    (mnt.path / "f").write_bytes(os.urandom(6 << 20))
    mnt.sync()
    threads: dict[str, set[int]] = {}
    main = None
    for tid in os.listdir(f"/proc/{mnt.pid}/task"):
        with open(f"/proc/{mnt.pid}/task/{tid}/stat") as f:
            stat = f.read()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        nice = int(stat[stat.rindex(")") + 2:].split()[16])  # field 19 of proc(5)
        threads.setdefault(comm, set()).add(nice)
        if int(tid) == mnt.pid:
            main = nice
    assert main is not None  # the main thread, the FUSE loop, keeps the daemon's nice
    if main >= 19:
        pytest.skip("the daemon runs at nice 19: no thread can go lower")
    assert threads.get("elvesfs-code") == {min(19, main + CODER_NICE)}, threads
    assert threads.get("elvesfs-commit") == {min(19, main + COMMITTER_NICE)}, threads


def test_a_handle_opened_for_writing_and_not_written_commits_nothing(make_mount,
                                                                     monkeypatch):
    """Closing it has nothing to persist (`touch` of an existing file without a time
    change, a `.lock` file reopened): no transaction, so it never waits behind a seal's
    commits for LMDB's writer lock."""
    monkeypatch.setenv("ELVESFS_SYNC_INTERVAL", "3600")  # no periodic sync mark meanwhile
    m = make_mount()
    p = m.path / "f"
    p.write_bytes(os.urandom(100_000))
    m.sync()
    before = lmdb_info(m.store)["last_txnid"]
    for _ in range(5):
        with open(p, "r+b"):
            pass
    assert lmdb_info(m.store)["last_txnid"] == before
    with open(p, "r+b") as f:  # a written handle still persists size and times
        f.write(b"x")
    assert lmdb_info(m.store)["last_txnid"] > before
