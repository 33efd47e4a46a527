"""Stopping the daemon by signal, as systemd (SIGTERM) or a developer running
`elvesfs mount --foreground` in a terminal (Ctrl-C: SIGINT) does: it seals what is
staged (files still open too), unmounts and exits 0, leaving nothing for the next
mount to recover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, Mount, _is_mounted, check_store, sha_file, write_random
from elvesfs.mounts import daemon_exited


def _wait_exit(pid: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if daemon_exited(pid):  # gone, or a zombie its parent (init) has not reaped
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} still runs {timeout}s after the signal")


def _staged(m: Mount) -> list[str]:
    return sorted(os.listdir(m.store / "staging"))


def _read_ahead_kb(path) -> int:
    """The kernel read-ahead of the mount on `path` (its backing device's bdi)."""
    dev = os.stat(path).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        return int(f.read())


def test_sigterm_seals_unmounts_and_exits(make_mount):
    m = make_mount()
    if os.geteuid() == 0:  # the read-ahead a mount gets (FUSE's own default: 128 KiB)
        assert _read_ahead_kb(m.path) == 1024
    digest = write_random(m.path / "a.bin", 24 << 20)
    # a file written and still open when the signal comes: as with libfuse's own
    # handlers, the mount is detached at once, so its close fails (ENOTCONN), but what
    # was written before the signal is sealed
    fd = os.open(m.path / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, os.urandom(1 << 20))
    os.kill(m.pid, signal.SIGTERM)
    _wait_exit(m.pid)
    try:
        os.close(fd)
    except OSError:
        pass
    m.pid = None
    assert not _is_mounted(str(m.path))
    assert "signal 15: unmounting" in m.log()
    assert _staged(m) == []  # every file sealed: nothing left to recover
    assert check_store(m.store) == []
    m.mount()
    assert sha_file(m.path / "a.bin") == digest
    assert os.path.getsize(m.path / "open.bin") == 1 << 20


def test_foreground_serves_in_the_callers_process_and_stops_on_ctrl_c(tmp_path):
    """What a systemd service runs (README "Mounting at boot"), stopped as a developer
    stops it in a terminal."""
    m = Mount(tmp_path)
    m.store.mkdir()
    err = open(tmp_path / "stderr.txt", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "elvesfs.cli", "mount", str(m.path),
                             "--store", str(m.store), "--foreground"],
                            cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        end = time.monotonic() + 60
        while not _is_mounted(str(m.path)):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < end, "no mount within 60 s"
            time.sleep(0.05)
        # the command is the daemon: no process of its own in the background
        assert int((m.store / "daemon.lock").read_text().strip()) == proc.pid
        if os.geteuid() == 0:  # the same read-ahead as a background mount (it had 128),
            end = time.monotonic() + 10  # set just after the mount shows in the table
            while _read_ahead_kb(m.path) != 1024 and time.monotonic() < end:
                time.sleep(0.05)
            assert _read_ahead_kb(m.path) == 1024
        digest = write_random(m.path / "a.bin", 8 << 20)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        out = (tmp_path / "stderr.txt").read_text()
        assert "signal 2: unmounting" in out and "unmounted" in out, out  # logs on stderr
        assert not _is_mounted(str(m.path))
        assert _staged(m) == []
        m.mount()
        assert sha_file(m.path / "a.bin") == digest
    finally:
        err.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        m.cleanup()


def test_daemon_exited_counts_a_zombie_as_exited():
    """`elvesfs umount` waits for the daemon with this: a process that has exited but is
    not reaped yet (init reaps a daemon; on some machines over a second later) has
    finished; one that runs has not."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert daemon_exited(p.pid)  # a zombie: exited, not reaped
    p.wait()
    assert daemon_exited(p.pid)  # reaped: gone
    q = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not daemon_exited(q.pid)
    finally:
        q.kill()
        q.wait()
