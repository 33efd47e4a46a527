"""Tail staging: the first write at the end of a large sealed file (an append to a log,
a resumed download) copies only the file's last chunk into staging, and the seal keeps
the chunks below. Checked through a real mount against the same operations applied to
bytes in memory, across seals, remounts and kill -9."""

from __future__ import annotations

import json
import mmap
import os
import random

import pytest

from conftest import _run_cli, fsck_clean

MiB = 1 << 20
MAX_CHUNK = 1 << 20  # planner.CDC max_size: what a tail copy holds at most


def staged_bytes(m, path) -> int:
    """Disk space of the file's staging file (0 if it is not staged)."""
    try:
        return (m.store / "staging" / str(os.stat(path).st_ino)).stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def file_stats(path) -> dict:
    r = _run_cli("stats", "--json", str(path))
    return json.loads(r.stdout)["files"][0]


def test_append_to_a_sealed_file_copies_only_its_tail(mnt):
    log_ = mnt.path / "metrics.jsonl"
    want = bytearray(os.urandom(24 * MiB))
    log_.write_bytes(want)
    mnt.sync()
    for i in range(3):
        line = b'{"step": %d, "loss": 0.25}\n' % i
        with open(log_, "ab") as f:
            f.write(line)
            f.flush()
            assert 0 < staged_bytes(mnt, log_) <= MAX_CHUNK + 64 * 1024
            with open(log_, "rb") as r:  # a read across the base, while staged
                r.seek(len(want) - 100)
                assert r.read() == bytes(want[-100:]) + line
        want += line
        assert log_.read_bytes() == want
        mnt.sync()
        assert staged_bytes(mnt, log_) == 0
        assert file_stats(log_)["format"] == "plain"
    mnt.remount()
    assert log_.read_bytes() == want
    assert os.stat(log_).st_size == len(want)
    fsck_clean(mnt)


def test_writes_and_truncates_below_the_base_of_a_tail_staged_file(mnt):
    p = mnt.path / "f"
    want = bytearray(os.urandom(12 * MiB))
    p.write_bytes(want)
    mnt.sync()
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"tail", len(want))         # tail staged
        want += b"tail"
        assert staged_bytes(mnt, p) <= MAX_CHUNK + 64 * 1024
        os.pwrite(fd, b"head", 10)                # below the base: the rest is copied in
        want[10:14] = b"head"
        assert os.pread(fd, len(want) + 10, 0) == want
    finally:
        os.close(fd)
    mnt.sync()
    assert p.read_bytes() == want
    # a truncate below the base of a tail-staged file, then growing it again
    with open(p, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"more")
        want += b"more"
        f.flush()
        f.truncate(5 * MiB + 3)
        del want[5 * MiB + 3:]
        f.truncate(6 * MiB)
        want += bytes(6 * MiB - len(want))
        f.seek(0)
        assert f.read() == want
    mnt.sync()
    assert p.read_bytes() == want
    # O_TRUNC of a tail-staged file
    with open(p, "ab") as f:
        f.write(b"x")
    with open(p, "wb") as f:
        f.write(b"new")
    mnt.sync()
    assert p.read_bytes() == b"new"
    mnt.remount()
    assert p.read_bytes() == b"new"
    fsck_clean(mnt)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_truncates_and_reads_across_seals(mnt, seed):
    """Random operations on a file that is sealed between rounds (so each round's first
    write stages it again, mostly tail staged), compared with the same operations on a
    bytearray; some rounds write through a shared mmap."""
    rng = random.Random(seed)
    p = mnt.path / "f"
    want = bytearray(rng.randbytes(rng.randrange(3 * MiB, 9 * MiB)))
    p.write_bytes(want)
    for _ in range(14):
        mnt.sync()
        with open(p, "r+b") as f:
            for _ in range(rng.randrange(1, 6)):
                op = rng.random()
                size = len(want)
                if op < 0.35:                        # append
                    data = rng.randbytes(rng.randrange(1, 300_000))
                    f.seek(0, os.SEEK_END)
                    f.write(data)
                    want += data
                elif op < 0.55:                      # overwrite near the end
                    off = rng.randrange(max(0, size - 2 * MiB), size + 1)
                    data = rng.randbytes(rng.randrange(1, 100_000))
                    f.seek(off)
                    f.write(data)
                    want[off:off + len(data)] = data
                elif op < 0.65:                      # overwrite anywhere
                    off = rng.randrange(0, size + 1)
                    data = rng.randbytes(rng.randrange(1, 10_000))
                    f.seek(off)
                    f.write(data)
                    want[off:off + len(data)] = data
                elif op < 0.8:                       # truncate, shrink or grow
                    n = max(0, size + rng.randrange(-3 * MiB, MiB))
                    f.truncate(n)
                    if n < size:
                        del want[n:]
                    else:
                        want += bytes(n - size)
                elif op < 0.9 and size > 0:          # a shared mmap write
                    f.flush()
                    with mmap.mmap(f.fileno(), size) as mm:
                        off = rng.randrange(0, size)
                        data = rng.randbytes(min(size - off, rng.randrange(1, 5000)))
                        mm[off:off + len(data)] = data
                        mm.flush()
                    want[off:off + len(data)] = data
                f.flush()
                off = rng.randrange(0, len(want) + 1)  # a read anywhere, while staged
                n = rng.randrange(0, 3 * MiB)
                f.seek(off)
                assert f.read(n) == want[off:off + n]
        assert p.read_bytes() == want
    mnt.sync()
    mnt.remount()
    assert p.read_bytes() == want
    fsck_clean(mnt)


def test_fsynced_append_survives_kill9(make_mount):
    m = make_mount()
    p = m.path / "log"
    want = bytearray(os.urandom(10 * MiB))
    p.write_bytes(want)
    m.sync()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"appended and fsynced\n")
    os.fsync(fd)
    want += b"appended and fsynced\n"
    m.kill9()
    try:
        os.close(fd)
    except OSError:
        pass
    m.mount()
    assert p.read_bytes() == want
    assert "recovery: sealing staged inode" in m.log()
    fsck_clean(m)


def test_a_resumed_download_is_parsed_as_a_model_file(mnt):
    """A download cut short is sealed as plain bytes; appending the rest makes it a
    safetensors file, which the seal must parse again, not keep as plain chunks."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    blob = save({f"w{i}": rng.normal(0, 0.02, (512, 1024)).astype(np.float32)
                 for i in range(6)})
    p = mnt.path / "model.safetensors.incomplete"
    cut = len(blob) // 2
    p.write_bytes(blob[:cut])
    mnt.sync()
    assert file_stats(p)["format"] == "plain"
    with open(p, "ab") as f:
        f.write(blob[cut:])
    mnt.sync()
    assert p.read_bytes() == blob
    st = file_stats(p)
    assert st["format"] == "safetensors" and st["tensors"] == 6
    mnt.remount()
    assert p.read_bytes() == blob
    fsck_clean(mnt)


def test_salvage_and_fsck_of_a_store_left_with_a_tail_staged_file(make_mount, tmp_path):
    """A daemon killed while a file is tail staged: `elvesfs salvage` of the unmounted
    store writes the file out whole (its sealed chunks below the base, its staging file
    above); `elvesfs fsck` finds the store clean, and reports a record whose base is not
    a chunk boundary, which --repair drops (the file keeps its last sealed content)."""
    from elvesfs.db import Database
    from elvesfs.namespace import key

    m = make_mount()
    p = m.path / "log"
    old = os.urandom(10 * MiB)
    p.write_bytes(old)
    m.sync()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"tail")
    os.fsync(fd)
    ino = os.stat(p).st_ino
    m.kill9()
    try:
        os.close(fd)
    except OSError:
        pass
    out = tmp_path / "salvaged"
    r = _run_cli("salvage", "--store", str(m.store), "/log", str(out), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == old + b"tail"
    r = _run_cli("fsck", str(m.store), check=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    db = Database(str(m.store))
    try:
        with db.write() as txn:
            value = txn.get(key(ino), db=db.t["staging"])
            assert value[:1] == b"T"  # tail staged
            base = int.from_bytes(value[1:], "big")
            txn.put(key(ino), b"T" + (base + 1).to_bytes(8, "big"), db=db.t["staging"])
    finally:
        db.close()
    r = _run_cli("fsck", str(m.store), check=False)
    assert r.returncode != 0 and "not a chunk boundary" in r.stderr, r.stdout + r.stderr
    r = _run_cli("fsck", "--repair", str(m.store), check=False)
    assert "not a chunk boundary" in r.stderr, r.stdout + r.stderr
    m.mount()
    assert p.read_bytes() == old
    fsck_clean(m)
