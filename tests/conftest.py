"""Fixtures that mount elvesfs for real: the daemon is its own process, always unmounted."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elvesfs.mounts import daemon_exited

ROOT = Path(__file__).resolve().parent.parent


def sha_file(path) -> str:
    """sha256 of a file, read in 1 MiB blocks (the oracle for bytes read back)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_random(path, size: int, block: int = 4 << 20) -> str:
    """Write `size` random bytes to `path` in blocks; returns their sha256."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // block):
            data = os.urandom(block)
            h.update(data)
            f.write(data)
    return h.hexdigest()


def _run_cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "elvesfs.cli", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=str(ROOT))
    if check and r.returncode:
        raise AssertionError(f"elvesfs {' '.join(args)} failed: {r.stderr}")
    return r


def _is_mounted(path: str) -> bool:
    """Whether `path` is a mountpoint now, dead or alive."""
    from elvesfs.mounts import mount_table
    return any(mp == path for mp, _, _ in mount_table())


def _lock_pid(store: Path) -> int | None:
    """The PID of the live daemon of `store`: the one its lock file names, while that
    lock is held (the file keeps the PID of a daemon that has exited, which another
    process may have by now)."""
    try:
        fd = os.open(store / "daemon.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except BlockingIOError:
        try:
            return int(os.pread(fd, 64, 0).decode().strip() or 0) or None
        except ValueError:
            return None
    finally:
        os.close(fd)


def _abort_fuse_connection(path: str) -> None:
    """End every request pending on the FUSE mount at `path` (fusectl's abort), so that a
    daemon blocked on one can be killed; the device comes from the mount table, as a
    stat() of the mount could hang too. Needs root; does nothing otherwise."""
    with open("/proc/self/mountinfo") as f:
        devs = [line.split()[2] for line in f if line.split()[4] == path]
    if not devs or os.geteuid() != 0:
        return
    conns = "/sys/fs/fuse/connections"
    mounted = not os.listdir(conns) and subprocess.run(
        ["mount", "-t", "fusectl", "none", conns], capture_output=True).returncode == 0
    try:
        with open(f"{conns}/{devs[-1].split(':')[1]}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass
    finally:
        if mounted:
            subprocess.run(["umount", conns], capture_output=True)


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

    def kill9(self, detach: bool = True) -> None:
        """Kill the daemon without any chance to clean up and wait until it is gone; then
        detach the dead mount (or leave it, failing every call with ENOTCONN)."""
        assert self.pid
        os.kill(self.pid, signal.SIGKILL)
        for _ in range(250):
            if daemon_exited(self.pid):  # a zombie counts: init may take a second to reap it
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"daemon {self.pid} did not exit after SIGKILL")
        if detach:
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        self.pid = None

    def log(self) -> str:
        try:
            return (self.store / "elvesfs.log").read_text()
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Unmount even after a failure: polite first; then, if the mount or our daemon
        is still there (a daemon that hangs, even one stuck on a request to its own
        mount), abort the FUSE connection, detach the mount and kill the daemon by PID."""
        if _is_mounted(str(self.path)):
            try:
                subprocess.run([sys.executable, "-m", "elvesfs.cli", "umount", str(self.path),
                                "--timeout", "60"], capture_output=True, timeout=90)
            except subprocess.TimeoutExpired:
                pass
        if _is_mounted(str(self.path)):
            _abort_fuse_connection(str(self.path))
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        pid = _lock_pid(self.store)  # a daemon still alive; also when `mount` failed
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
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


@pytest.fixture(scope="session")
def shared_mount(tmp_path_factory) -> Mount:
    """One mount (allow_other, so permission tests can run as another uid) shared by the
    filesystem test modules: mounting costs seconds, so tests work in their own subdirectory
    (`shared_dir`). A test may remount it; it must close its files first."""
    d = tmp_path_factory.mktemp("shared")
    os.chmod(d, 0o755)
    m = Mount(d, ("-o", "allow_other"))
    m.mount()
    yield m
    m.cleanup()


@pytest.fixture
def shared_dir(shared_mount: Mount, request) -> Path:
    """A fresh, empty directory inside the shared mount (re-mounted if a failed test left
    it unmounted)."""
    if not _is_mounted(str(shared_mount.path)):
        if shared_mount.pid:
            try:
                os.kill(shared_mount.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["fusermount3", "-u", "-z", str(shared_mount.path)], capture_output=True)
        shared_mount.mount()
    name = request.node.name.replace("/", "_").replace("[", "_").replace("]", "")[:200]
    d = shared_mount.path / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


def lmdb_info(store) -> dict:
    """LMDB's info of a store (last_pgno, last_txnid ...) as another process sees it,
    without its lock: a daemon's commits are in the page cache before they are synced."""
    import lmdb
    env = lmdb.open(str(store), readonly=True, lock=False, max_dbs=20, subdir=True)
    try:
        return env.info()
    finally:
        env.close()


def fsck_clean(m: "Mount") -> None:
    """Unmount, then the store must pass our invariant check and `elvesfs fsck
    --verify-data`."""
    m.umount()
    assert check_store(m.store) == []
    r = _run_cli("fsck", "--verify-data", str(m.store), check=False, timeout=300)
    assert r.returncode == 0, f"fsck: {r.stdout}{r.stderr}"
    assert "clean" in r.stdout


def check_store(store: Path, *, mounted: bool = False) -> list[str]:
    """An independent consistency check of a store (a test oracle, not `elvesfs fsck`).

    Returns a list of problems: layouts naming missing chunks, refcounts that differ from
    the references counted from layouts and delta chunks (and deps from the delta
    chunks), entries naming missing inodes,
    wrong link counts, sizes that differ from layouts; and, when `mounted` is False,
    leftover staging records/files, orphan inodes and uncollected garbage."""
    from collections import Counter

    from elvesfs.chunkstore import MAX_DELTA_DEPTH, NO_REF, ChunkRecord
    from elvesfs.db import Database
    from elvesfs.layout import Layout
    from elvesfs.namespace import ROOT_INO, U64, Inode

    problems: list[str] = []
    db = Database(str(store), readonly=True)
    try:
        with db.read() as txn:
            t = db.t
            inodes = {U64.unpack(k)[0]: Inode.unpack(U64.unpack(k)[0], v)
                      for k, v in txn.cursor(db=t["inodes"])}
            refs = {bytes(k): ChunkRecord.unpack(v) for k, v in txn.cursor(db=t["refs"])}
            frames = {bytes(k) for k in txn.cursor(db=t["chunks"]).iternext(values=False)}
            zero = {bytes(k) for k in txn.cursor(db=t["zero"]).iternext(values=False)}
            orphans = {bytes(k) for k in txn.cursor(db=t["orphans"]).iternext(values=False)}
            layouts = {U64.unpack(k)[0]: Layout.from_bytes(v)
                       for k, v in txn.cursor(db=t["layouts"])}
            staged = [int.from_bytes(k, "big") for k in
                      txn.cursor(db=t["staging"]).iternext(values=False)]
            dentries = [(U64.unpack(k[:8])[0], bytes(k[8:]), U64.unpack(v)[0])
                        for k, v in txn.cursor(db=t["dentries"])]
    finally:
        db.close()
    expected: Counter[bytes] = Counter()
    for ino, lay in layouts.items():
        node = inodes.get(ino)
        if node is None:
            problems.append(f"layout of missing inode {ino}")
        elif ino not in staged and node.size != lay.size:
            problems.append(f"inode {ino}: size {node.size} != layout size {lay.size}")
        ends = [int(e) for e in lay.ext["end"]]
        if ends != sorted(ends):
            problems.append(f"inode {ino}: layout extents out of order")
        expected.update(lay.ids())
    deps: Counter[bytes] = Counter()
    for cid, rec in refs.items():
        if rec.ref != NO_REF:
            expected[rec.ref] += 1
            deps[rec.ref] += 1
            if rec.ref not in refs:
                problems.append(f"delta chunk {cid.hex()} names missing reference")
    for cid in refs:  # reads decode at most MAX_DELTA_DEPTH references per chunk
        depth, c = 0, cid
        while c in refs and refs[c].ref != NO_REF and depth <= MAX_DELTA_DEPTH:
            depth, c = depth + 1, refs[c].ref
        if depth > MAX_DELTA_DEPTH:
            problems.append(f"delta chain from {cid.hex()} is longer than {MAX_DELTA_DEPTH}")
    for cid, n in expected.items():
        if cid not in refs or cid not in frames:
            problems.append(f"chunk {cid.hex()} referenced {n}x is missing")
        elif refs[cid].refcount != n:
            problems.append(f"chunk {cid.hex()}: refcount {refs[cid].refcount} != {n} references")
    for cid, rec in refs.items():
        if rec.deps != deps[cid]:
            problems.append(f"chunk {cid.hex()}: deps {rec.deps} != {deps[cid]} delta chunks")
    held_by_deltas_only = {c for c, n in expected.items() if n and n == deps[c]}
    if orphans != held_by_deltas_only:
        problems.append(f"orphans listed {len(orphans)}, held only by deltas "
                        f"{len(held_by_deltas_only)}")
    for cid, rec in refs.items():
        if cid not in frames:
            problems.append(f"chunk record {cid.hex()} without frame")
        if rec.refcount and cid not in expected:
            problems.append(f"chunk {cid.hex()} has refcount {rec.refcount} but no reference")
        if rec.refcount == 0 and cid not in zero:
            problems.append(f"garbage chunk {cid.hex()} is not listed in `zero`")
    links: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for parent, name, ino in dentries:
        if parent not in inodes:
            problems.append(f"entry {name!r} in missing directory {parent}")
        node = inodes.get(ino)
        if node is None:
            problems.append(f"entry {name!r} names missing inode {ino}")
            continue
        links[ino] += 1
        if node.is_dir:
            subdirs[parent] += 1
    for ino, node in inodes.items():
        if ino == ROOT_INO:
            continue
        want = 2 + subdirs[ino] if node.is_dir else links[ino]
        if node.is_dir and links[ino] == 0 and node.nlink == 0:
            want = 0  # removed directory still open
        if node.nlink != want:
            problems.append(f"inode {ino}: nlink {node.nlink} != {want}")
    root = inodes.get(ROOT_INO)
    if root is None:
        problems.append("no root inode")
    elif root.nlink != 2 + subdirs[ROOT_INO]:
        problems.append(f"root nlink {root.nlink} != {2 + subdirs[ROOT_INO]}")
    if not mounted:
        if staged:
            problems.append(f"staging records left after unmount: {staged}")
        left = os.listdir(store / "staging") if (store / "staging").is_dir() else []
        if left:
            problems.append(f"staging files left after unmount: {left}")
        orphans = [i for i, n in inodes.items() if n.nlink == 0 and i != ROOT_INO]
        if orphans:
            problems.append(f"orphan inodes left after unmount: {orphans}")
        garbage = [c for c, r in refs.items() if r.refcount == 0]
        if garbage:
            problems.append(f"{len(garbage)} garbage chunks not collected")
    return problems
