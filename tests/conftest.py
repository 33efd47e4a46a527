"""Fixtures that mount elvesfs for real: the daemon is its own process, always unmounted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "elvesfs.cli", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=str(ROOT))
    if check and r.returncode:
        raise AssertionError(f"elvesfs {' '.join(args)} failed: {r.stderr}")
    return r


def _is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Mount:
    """A live elvesfs mount on a temporary mountpoint with its own store."""

    def __init__(self, tmp: Path, options: tuple[str, ...] = ()) -> None:
        self.store = tmp / "store"
        self.path = tmp / "mnt"
        self.path.mkdir(exist_ok=True)
        self.options = options
        self.pid: int | None = None

    def mount(self, *extra: str) -> "Mount":
        _run_cli("mount", str(self.path), "--store", str(self.store), *self.options, *extra)
        self.pid = int((self.store / "daemon.lock").read_text().strip())
        return self

    def sync(self) -> None:
        _run_cli("sync", str(self.path), timeout=600)

    def umount(self) -> None:
        _run_cli("umount", str(self.path), timeout=600)
        self.pid = None

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill9(self) -> None:
        """Kill the daemon without any chance to clean up, and detach the dead mount."""
        assert self.pid
        os.kill(self.pid, signal.SIGKILL)
        for _ in range(200):
            try:
                os.kill(self.pid, 0)
                time.sleep(0.02)
            except ProcessLookupError:
                break
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        self.pid = None

    def log(self) -> str:
        try:
            return (self.store / "elvesfs.log").read_text()
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Unmount even after a failure: polite first, then lazy, then kill our daemon by PID."""
        if _is_mounted(str(self.path)):
            r = subprocess.run([sys.executable, "-m", "elvesfs.cli", "umount", str(self.path),
                                "--timeout", "60"], capture_output=True, timeout=120)
            if r.returncode and _is_mounted(str(self.path)):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def make_mount(tmp_path: Path):
    """Factory: make_mount(*options) -> a mounted Mount, cleaned up after the test."""
    made: list[Mount] = []

    def factory(*options: str, sub: str = "m") -> Mount:
        d = tmp_path / f"{sub}{len(made)}"
        d.mkdir()
        m = Mount(d, options)
        made.append(m)
        return m.mount()

    yield factory
    for m in made:
        m.cleanup()


@pytest.fixture
def mnt(make_mount) -> Mount:
    """One mounted, empty elvesfs with a lossless policy."""
    return make_mount()


def pytest_configure(config):
    if shutil.which("fusermount3") is None:
        raise pytest.UsageError("fusermount3 not found: apt-get install fuse3")
