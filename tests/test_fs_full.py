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


def test_disk_full_gives_enospc_and_loses_nothing(tmp_path, small_disk):
    m = Mount(tmp_path)
    m.store = small_disk / "store"
    try:
        m.mount()
        keep = os.urandom(8 << 20)
        (m.path / "keep").write_bytes(keep)
        m.sync()
        with pytest.raises(OSError) as e:
            with open(m.path / "big", "wb") as f:
                for _ in range(64):
                    f.write(os.urandom(1 << 20))
                    f.flush()
        assert e.value.errno == errno.ENOSPC
        os.unlink(m.path / "big")
        assert hashlib.sha256((m.path / "keep").read_bytes()).digest() == \
            hashlib.sha256(keep).digest()
        (m.path / "after").write_bytes(b"space is back")  # the mount still works
        m.sync()
        m.remount()
        assert (m.path / "keep").read_bytes() == keep
        assert (m.path / "after").read_bytes() == b"space is back"
        m.umount()
        r = subprocess.run([sys.executable, "-m", "elvesfs.cli", "fsck", str(m.store)],
                           capture_output=True, text=True, cwd=str(ROOT))
        assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    finally:
        m.cleanup()
