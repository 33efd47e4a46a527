"""A power cut under a live mount: what was fsync'd (or `elvesfs sync`ed) is all there
after the "reboot", and the store is consistent.

`kill -9` of the daemon (tests/test_fs_crash.py) loses nothing the kernel holds, so it
cannot show that fsync reaches the disk. Here the store lives on tests/crashfs.py, a
passthrough filesystem that keeps written data in memory until fsync and, at the cut,
lets a random half of the unwritten pages reach the disk (the kernel's write-back may
have sent any of them): the mix a real power cut can leave behind. The daemon and
crashfs are then both gone, crashfs starts again on what reached the disk, and elvesfs
mounts the store as after a reboot (another boot id: ELVESFS_BOOT_ID)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import Mount, _is_mounted, fsck_clean

CRASHFS = Path(__file__).with_name("crashfs.py")


class CrashDisk:
    """A crashfs mount over a backing directory: start(), then cut() the power."""

    def __init__(self, tmp: Path) -> None:
        self.backing = tmp / "disk"
        self.path = tmp / "crashfs"
        self.backing.mkdir()
        self.path.mkdir()
        self.proc: subprocess.Popen | None = None

    def start(self, seed: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CRASHFS), str(self.backing), str(self.path)],
            env={**os.environ, "CRASHFS_SEED": str(seed)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"crashfs did not start: {line}{self.proc.stderr.read()}")

    def cut(self) -> str:
        """The power cut: crashfs writes a random part of what is unwritten, and exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        _, err = self.proc.communicate(timeout=60)
        self.proc = None
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        return err

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        if _is_mounted(str(self.path)):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)


@contextlib.contextmanager
def crash_mount(tmp: Path, monkeypatch):
    """(disk, mount): an elvesfs mount whose store lives on a crashfs disk; syncs only
    where the test asks (no periodic sync). Both are torn down even on failure."""
    monkeypatch.setenv("ELVESFS_SYNC_INTERVAL", "3600")
    disk = CrashDisk(tmp)
    m = Mount(tmp)
    m.store = disk.path / "store"
    try:
        yield disk, m
    finally:
        m.cleanup()
        disk.cleanup()


@pytest.fixture
def crashed(tmp_path, monkeypatch):
    with crash_mount(tmp_path, monkeypatch) as dm:
        yield dm


# what scripts/soak.py --power-seeds runs, each on new seeds
SOAKED = ("test_a_power_cut_goes_back_to_the_last_sync_with_everything_fsynced",
          "test_a_power_cut_at_any_moment_of_a_checkpoint_rotation",
          "test_a_power_cut_while_a_large_file_is_written_and_pre_sealed")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors(seed: int) -> bytes:
    import numpy as np
    from safetensors.numpy import save
    rng = np.random.default_rng(seed)
    return save({f"layer{i}.weight": rng.normal(0, 0.02, (256, 512)).astype(np.float32)
                 for i in range(4)})


def _meta_past_sync_point(store: Path) -> bool:
    """Whether data.mdb on the disk has a meta page newer than the last sync point."""
    from elvesfs import syncpoint
    point = syncpoint.SyncPoints(str(store)).last()
    metas = syncpoint.read_meta(str(store / "data.mdb"), len(point.meta))
    return max(t for t in map(syncpoint.meta_txnid, metas) if t is not None) > point.txnid


def _cut(disk: CrashDisk, m: Mount) -> None:
    """The power cut: the daemon and the disk go at once."""
    m.kill9()
    report = disk.cut()
    assert "power cut" in report, report


def _cut_during(disk: CrashDisk, m: Mount, writer, after: float) -> None:
    """Cut the power `after` seconds into `writer`, run in a thread (it must return
    once the mount fails it with ENOTCONN)."""
    t = threading.Thread(target=writer)
    t.start()
    time.sleep(after)
    _cut(disk, m)
    t.join(timeout=60)


def _reboot(disk: CrashDisk, m: Mount, monkeypatch) -> bool:
    """Start the disk again on what reached it and mount the store as after a reboot
    (another boot id). Whether a meta page newer than the last sync point had reached
    data.mdb (so the sync point had to be put back)."""
    disk.start()
    torn = _meta_past_sync_point(m.store)
    monkeypatch.setenv("ELVESFS_BOOT_ID", str(uuid.uuid4()))
    m.mount()
    return torn


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_power_cut_goes_back_to_the_last_sync_with_everything_fsynced(crashed, monkeypatch,
                                                                         seed):
    """What was fsync'd or synced is exact after the cut; what changed after the last
    sync (names, modes, xattrs, a file's unsynced tail) is rolled back as a whole, and
    the store is consistent (our store check and `elvesfs fsck --verify-data`)."""
    disk, m = crashed
    disk.start(seed)
    m.mount()
    rnd = random.Random(seed)
    a = bytearray(rnd.randbytes(2 << 20))
    _write(m.path / "a.bin", bytes(a), fsync=True)
    model = _safetensors(seed)
    (m.path / "dir").mkdir()
    (m.path / "dir" / "model.safetensors").write_bytes(model)
    m.sync()
    fd = os.open(m.path / "a.bin", os.O_RDWR)
    patch = rnd.randbytes(100_000)
    os.pwrite(fd, patch, 1 << 20)  # a rewrite of a sealed file, fsync'd
    os.fsync(fd)
    os.close(fd)
    a[1 << 20:(1 << 20) + len(patch)] = patch
    small = rnd.randbytes(5000)
    _write(m.path / "dir" / "small", small, fsync=True)
    later = rnd.randbytes(1 << 20)
    _write(m.path / "later.bin", later, fsync=False)  # closed: sealed by the sync below
    model2 = _safetensors(seed + 100)
    _write(m.path / "dir" / "model2.safetensors", model2, fsync=False)
    growing = rnd.randbytes(3 << 20)
    gfd = os.open(m.path / "growing", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(gfd, growing)
    os.fsync(gfd)
    m.sync()
    # after the last sync: committed, never synced
    (m.path / "dir2").mkdir()
    os.rename(m.path / "dir" / "small", m.path / "dir2" / "small")
    os.chmod(m.path / "a.bin", 0o600)
    os.setxattr(m.path / "dir" / "model.safetensors", "user.note", b"after the sync")
    (m.path / "new").write_bytes(b"")
    os.write(gfd, rnd.randbytes(1 << 20))
    lfd = os.open(m.path / "late", os.O_CREAT | os.O_WRONLY, 0o644)  # a staging file
    os.write(lfd, rnd.randbytes(300_000))  # created after the sync, never fsync'd
    time.sleep(0.3)
    _cut(disk, m)
    for fd in (gfd, lfd):
        try:
            os.close(fd)
        except OSError:  # ENOTCONN: the daemon is gone
            pass

    torn = _reboot(disk, m, monkeypatch)
    # a meta page newer than the sync point reached the disk: it is put back; if none
    # did (each is one page), LMDB opens the synced tree as it is (the pin kept it)
    assert ("back to its last sync point" in m.log()) == torn
    assert (m.path / "a.bin").read_bytes() == bytes(a)
    assert _sha((m.path / "dir" / "model.safetensors").read_bytes()) == _sha(model)
    assert (m.path / "dir" / "small").read_bytes() == small
    assert (m.path / "later.bin").read_bytes() == later
    assert _sha((m.path / "dir" / "model2.safetensors").read_bytes()) == _sha(model2)
    assert (m.path / "growing").read_bytes()[:3 << 20] == growing
    # the changes after the sync are gone, all of them
    assert sorted(os.listdir(m.path)) == ["a.bin", "dir", "growing", "later.bin"]
    assert os.stat(m.path / "a.bin").st_mode & 0o777 == 0o644
    assert "user.note" not in os.listxattr(m.path / "dir" / "model.safetensors")
    m.sync()
    fsck_clean(m)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_a_power_cut_at_any_moment_of_a_checkpoint_rotation(crashed, monkeypatch, seed):
    """Checkpoints saved one after another (each fsync'd; each a delta of the one before)
    while the oldest are deleted (their users coded again), and the power cut at a
    random moment: seals, deltas, re-coding and garbage collection may all be mid-way.
    Every checkpoint whose fsync returned and that was not deleted is exact; a deleted
    one is gone or exact; everything reads without error; the store is consistent."""
    import numpy as np
    from safetensors.numpy import save

    disk, m = crashed
    disk.start(seed)
    m.mount()
    rng = np.random.default_rng(seed)
    w = {f"layer{i}.weight": rng.normal(0, 0.02, (256, 512)).astype(np.float32)
         for i in range(3)}
    durable: dict[str, str] = {}
    deleted: set[str] = set()

    def writer() -> None:
        try:
            for step in range(1000):
                for v in w.values():  # a small training step: most bits stay
                    v += rng.normal(0, 1e-5, v.shape).astype(np.float32)
                blob = save(w)
                name = f"ckpt-{step}.safetensors"
                fd = os.open(m.path / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                os.write(fd, blob)
                os.fsync(fd)
                durable[name] = _sha(blob)
                os.close(fd)
                if step >= 3:
                    old = f"ckpt-{step - 3}.safetensors"
                    deleted.add(old)
                    os.unlink(m.path / old)
        except OSError:  # the daemon is gone: the power is cut
            return

    _cut_during(disk, m, writer, after=random.Random(seed).uniform(1.0, 4.0))
    assert len(durable) >= 2, "too few checkpoints before the cut to test anything"

    _reboot(disk, m, monkeypatch)
    for name, digest in durable.items():
        p = m.path / name
        if name in deleted and not p.exists():
            continue
        assert _sha(p.read_bytes()) == digest, f"{name} is not what was fsync'd"
    for p in m.path.iterdir():  # whatever else survived reads without error
        p.read_bytes()
    m.sync()
    fsck_clean(m)


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_a_power_cut_while_a_large_file_is_written_and_pre_sealed(crashed, monkeypatch, seed):
    """A file written for seconds (pre-sealed in steps while it grows: chunks committed
    before the file is), fsync'd every 16 MiB, and the power cut at a random moment:
    everything up to the last fsync that returned is exact; the store is consistent."""
    import numpy as np

    disk, m = crashed
    disk.start(seed)
    m.mount()
    rng = np.random.default_rng(seed)
    blocks = [rng.normal(0, 0.02, 1 << 20).astype(np.float32).tobytes() if i % 2 else
              rng.bytes(4 << 20) for i in range(24)]  # 96 MiB: floats and random bytes
    synced = [0]

    def writer() -> None:
        try:
            fd = os.open(m.path / "big", os.O_CREAT | os.O_WRONLY, 0o644)
            for i, b in enumerate(blocks):
                os.write(fd, b)
                time.sleep(0.1)  # a writer slower than the pre-seal's steps
                if i % 4 == 3:
                    os.fsync(fd)
                    synced[0] = (i + 1) * (4 << 20)
            os.close(fd)
        except OSError:  # the daemon is gone: the power is cut
            return

    _cut_during(disk, m, writer, after=random.Random(seed).uniform(2.0, 4.0))
    assert synced[0] >= 16 << 20, "no fsync returned before the cut: nothing to check"

    _reboot(disk, m, monkeypatch)
    data = (m.path / "big").read_bytes()
    assert len(data) >= synced[0]
    assert data[:synced[0]] == b"".join(blocks)[:synced[0]]
    m.sync()
    fsck_clean(m)


def _seed_losing(k: int, n: int) -> int:
    """A CRASHFS_SEED whose cut (with no unwritten pages) undoes the last k of n name
    changes: crashfs draws random.Random(seed).randint(0, n)."""
    return next(s for s in range(10_000) if random.Random(s).randint(0, n) == k)


@pytest.mark.parametrize("lost", [0, 1, 2, 3, 4])
def test_crashfs_undoes_a_suffix_of_the_name_changes_since_the_last_fsync(tmp_path, lost):
    """The power-cut tests are only as good as crashfs: names changed after the last
    fsync are undone newest first (a removed or replaced file comes back whole), the
    ones before it never are."""
    disk = CrashDisk(tmp_path)
    try:
        disk.start(_seed_losing(lost, 4))
        d = disk.path
        for name in ("kept", "gone", "over"):  # written and fsync'd: no unwritten
            _write(d / name, name.encode(), fsync=True)  # pages, the names committed
        changes = [lambda: (d / "new").write_bytes(b""),  # no data: no unwritten pages
                   lambda: (d / "dir").mkdir(),
                   lambda: os.rename(d / "kept", d / "over"),
                   lambda: os.unlink(d / "gone")]
        for change in changes:
            change()
        report = disk.cut()
        assert f"{lost} of 4 uncommitted name changes were lost" in report, report
    finally:
        disk.cleanup()
    b = disk.backing
    names = sorted(p.name for p in b.iterdir())
    expect = {0: ["dir", "new", "over"], 1: ["dir", "gone", "new", "over"],
              2: ["dir", "gone", "kept", "new", "over"], 3: ["gone", "kept", "new", "over"],
              4: ["gone", "kept", "over"]}[lost]
    assert names == expect
    assert (b / "over").read_bytes() == (b"kept" if lost <= 1 else b"over")
    if "gone" in names:
        assert (b / "gone").read_bytes() == b"gone"
