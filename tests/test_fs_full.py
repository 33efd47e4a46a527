"""A full disk: ENOSPC at write time, nothing already stored is lost, the store stays consistent."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Mount

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


def test_disk_full_gives_enospc_and_loses_nothing(tmp_path, small_disk):
    m = Mount(tmp_path)
    m.store = small_disk / "store"
    try:
        m.mount()
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
    finally:
        m.cleanup()


def test_space_of_a_removed_file_is_free_when_unlink_returns(tmp_path, small_disk):
    """As on ext4: once unlink of a closed file returns, its space is usable; the data
    does not wait for the kernel's FORGET, which comes asynchronously."""
    m = Mount(tmp_path)
    m.store = small_disk / "store"
    try:
        m.mount()
        for round_ in range(3):
            fill_until_enospc(m.path / "fill")
            os.unlink(m.path / "fill")
            data = os.urandom(4 << 20)  # no sleep, no sync: the space must be back now
            (m.path / "next").write_bytes(data)
            assert (m.path / "next").read_bytes() == data, f"round {round_}"
            os.unlink(m.path / "next")
        m.umount()
        assert_fsck_clean(m.store)
    finally:
        m.cleanup()
