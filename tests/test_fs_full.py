"""A full disk: ENOSPC at write time, nothing already stored is lost, the store stays consistent."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Mount, _run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs to hold the store (needs root, as the FUSE tests do)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def full_mount(tmp_path, small_disk):
    """A live mount whose store is on the small disk; unmounted even on failure."""
    m = Mount(tmp_path)
    m.store = small_disk / "store"
    try:
        yield m.mount()
    finally:
        m.cleanup()


def fill_until_enospc(path: Path) -> None:
    """Write random MiBs to `path` until the store's disk is full: ENOSPC at write time."""
    with pytest.raises(OSError) as e:
        with open(path, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
                f.flush()
    assert e.value.errno == errno.ENOSPC


def assert_fsck_clean(store: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "elvesfs.cli", "fsck", str(store)],
                       capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def test_disk_full_gives_enospc_and_loses_nothing(full_mount):
    m = full_mount
    keep = os.urandom(8 << 20)
    (m.path / "keep").write_bytes(keep)
    m.sync()
    fill_until_enospc(m.path / "big")
    os.unlink(m.path / "big")
    assert hashlib.sha256((m.path / "keep").read_bytes()).digest() == \
        hashlib.sha256(keep).digest()
    (m.path / "after").write_bytes(b"space is back")  # the mount still works
    m.sync()
    m.remount()
    assert (m.path / "keep").read_bytes() == keep
    assert (m.path / "after").read_bytes() == b"space is back"
    m.umount()
    assert_fsck_clean(m.store)


def test_space_of_a_removed_file_is_free_when_unlink_returns(full_mount):
    """As on ext4: once unlink of a closed file returns, its space is usable; the data
    does not wait for the kernel's FORGET, which comes asynchronously."""
    m = full_mount
    for round_ in range(3):
        fill_until_enospc(m.path / "fill")
        os.unlink(m.path / "fill")
        data = os.urandom(4 << 20)  # no sleep, no sync: the space must be back now
        (m.path / "next").write_bytes(data)
        assert (m.path / "next").read_bytes() == data, f"round {round_}"
        os.unlink(m.path / "next")
    m.umount()
    assert_fsck_clean(m.store)


def _fill_compressible(path: Path) -> bytes:
    """Write log-like lines (they code ~10x smaller) to `path` until ENOSPC; returns what
    the file holds: every byte a write reported written."""
    line = b"step %08d loss 0.%06d lr 2e-5 grad-norm 1.0 tokens 4096 elapsed 0.25s\n"
    done = bytearray()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        i = 0
        while True:
            block = b"".join(line % (i + k, (i + k) * 7919 % 1000000) for k in range(16384))
            i += 16384
            view = memoryview(block)
            while view:
                try:
                    n = os.write(fd, view)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    return bytes(done)
                done += view[:n]
                view = view[n:]
    finally:
        os.close(fd)


def test_kill9_on_a_full_disk_then_mount_serves_the_unsealed_file(full_mount):
    """A file that could not be sealed for want of space when the daemon died (kill -9,
    a power cut) stays staged: the next mount comes up anyway, reads it back exact, and
    seals it once a deletion has made room. Before, recovery's failed seal stopped the
    mount ("no space left"), so nobody could delete anything to make room."""
    m = full_mount
    spare = os.urandom(12 << 20)
    (m.path / "spare").write_bytes(spare)
    m.sync()
    log = _fill_compressible(m.path / "train.log")
    assert len(log) > 8 << 20
    m.kill9()
    m.mount()
    assert "stays staged" in m.log()
    assert (m.path / "train.log").read_bytes() == log
    assert (m.path / "spare").read_bytes() == spare
    # no room yet: sync and umount say so (the file stays, durable, in staging)
    r = _run_cli("sync", str(m.path), check=False)
    assert r.returncode == 1 and "1 closed file(s) could not be sealed" in r.stderr
    r = _run_cli("umount", str(m.path), check=False)
    assert r.returncode == 0 and "1 file(s) could not be sealed" in r.stderr, r.stderr
    m.pid = None
    m.mount()
    assert (m.path / "train.log").read_bytes() == log
    os.unlink(m.path / "spare")  # room for the log's chunks (~1/10 of its size)
    # freeing the chunks retries the seal on its own: no sync, no close needed
    for _ in range(200):
        if not os.listdir(m.store / "staging"):
            break
        time.sleep(0.05)
    assert not os.listdir(m.store / "staging"), "still staged: " + m.log()[-3000:]
    m.sync()
    m.remount()
    assert (m.path / "train.log").read_bytes() == log
    assert os.stat(m.path / "train.log").st_blocks * 512 < len(log) // 4
    m.umount()
    assert_fsck_clean(m.store)
