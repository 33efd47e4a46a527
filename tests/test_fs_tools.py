"""Long random exercisers with data verification.

- An fsx-style exerciser (after fsx.c from xfstests, which has no Debian or PyPI package):
  random read / write / mmap read / mmap write / truncate / close+reopen / fsync on one
  file, every read checked against an in-memory model, the size checked after every op,
  and the whole file compared at intervals. Unlike plain fsx it also lets the daemon seal
  the file now and then (close + `sync`), so ops alternate between the staged and the
  sealed (chunked, coded) representations of the file, and it remounts once midway.
- fio (Debian package `fio`) with its own checksummed verification, through psync and
  mmap engines, then a verify-only pass after the data was sealed and remounted.
- stress-ng (Debian package `stress-ng`): every stressor of its `filesystem` class, one
  after another with `--verify`, on the mount; then the daemon's log and the store are
  checked.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import subprocess

import pytest

from conftest import check_store

PAGE = mmap.PAGESIZE


class Fsx:
    """fsx's operations and checks, over one file, against a bytearray model."""

    def __init__(self, path, mount, seed: int, maxlen: int = 2 << 20, maxop: int = 96 << 10):
        self.path, self.mount = path, mount
        self.rng = random.Random(seed)
        self.seed = seed
        self.maxlen, self.maxop = maxlen, maxop
        self.model = bytearray()
        self.fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        self.log: list[str] = []
        self.counts: dict[str, int] = {}
        self.opno = 0

    def fail(self, msg: str) -> None:
        tail = "\n".join(self.log[-25:])
        raise AssertionError(f"fsx seed {self.seed} op {self.opno}: {msg}\nlast ops:\n{tail}")

    def _range(self, for_read: bool) -> tuple[int, int]:
        size = len(self.model)
        if for_read:
            if size == 0:
                return 0, 0
            off = self.rng.randrange(size)
            n = self.rng.randint(1, min(self.maxop, size - off))
            return off, n
        off = self.rng.randrange(self.maxlen)
        n = self.rng.randint(1, min(self.maxop, self.maxlen - off))
        return off, n

    def _data(self, off: int, n: int) -> bytes:
        # like fsx: the op number and offset make every write's bytes recognisable
        seed = (self.opno * 2654435761 + off) & 0xFFFFFFFF
        if self.rng.random() < 0.15:
            return bytes([seed & 0xFF or 1]) * n          # runs: compressible, dedupable
        return random.Random(seed).randbytes(n)

    def _model_write(self, off: int, data: bytes) -> None:
        end = off + len(data)
        if end > len(self.model):
            self.model.extend(bytes(end - len(self.model)))
        self.model[off:end] = data

    def check_size(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.fail(f"size {size} != model {len(self.model)}")

    # -- ops ---------------------------------------------------------------------------------
    def op_read(self) -> None:
        off, n = self._range(True)
        got = os.pread(self.fd, n, off)
        if got != bytes(self.model[off:off + n]):
            bad = next(i for i in range(min(len(got), n)) if got[i] != self.model[off + i]) \
                if len(got) == n else -1
            self.fail(f"read {off}+{n}: mismatch at +{bad} (got {len(got)} bytes)")
        self.log.append(f"read {off}+{n}")

    def op_write(self) -> None:
        off, n = self._range(False)
        data = self._data(off, n)
        if os.pwrite(self.fd, data, off) != n:
            self.fail("short write")
        self._model_write(off, data)
        self.log.append(f"write {off}+{n}")

    def op_mapread(self) -> None:
        off, n = self._range(True)
        if n == 0:
            return
        pg = off - off % PAGE
        with mmap.mmap(self.fd, off + n - pg, offset=pg, prot=mmap.PROT_READ) as m:
            got = m[off - pg:off - pg + n]
        if got != bytes(self.model[off:off + n]):
            self.fail(f"mapread {off}+{n}: mismatch")
        self.log.append(f"mapread {off}+{n}")

    def op_mapwrite(self) -> None:
        off, n = self._range(False)
        data = self._data(off, n)
        if off + n > len(self.model):           # as fsx: extend with ftruncate first
            os.ftruncate(self.fd, off + n)
            self.model.extend(bytes(off + n - len(self.model)))
        pg = off - off % PAGE
        with mmap.mmap(self.fd, off + n - pg, offset=pg) as m:
            m[off - pg:off - pg + n] = data
            m.flush()
        self.model[off:off + n] = data
        self.log.append(f"mapwrite {off}+{n}")

    def op_truncate(self) -> None:
        r = self.rng.random()
        size = 0 if r < 0.05 else self.rng.randrange(self.maxlen)
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))
        self.log.append(f"truncate {size}")

    def op_closeopen(self) -> None:
        os.close(self.fd)
        sealed = self.rng.random() < 0.5
        if sealed:   # let the daemon seal it before the next op
            from elvesfs.control import request
            assert request(str(self.mount.store), "sync", timeout=120) == "ok"
        self.fd = os.open(self.path, os.O_RDWR)
        self.log.append(f"closeopen{' +seal' if sealed else ''}")

    def op_fsync(self) -> None:
        (os.fdatasync if self.rng.random() < 0.5 else os.fsync)(self.fd)
        self.log.append("fsync")

    def check_all(self) -> None:
        size = os.fstat(self.fd).st_size
        got = os.pread(self.fd, size + 1, 0)
        if got != bytes(self.model):
            bad = next((i for i in range(min(len(got), len(self.model)))
                        if got[i] != self.model[i]), min(len(got), len(self.model)))
            self.fail(f"full compare: first difference at {bad} (file {len(got)} bytes, "
                      f"model {len(self.model)})")
        with open(self.path, "rb") as f:           # a second, fresh handle agrees
            if f.read() != bytes(self.model):
                self.fail("full compare through a new handle")

    def run(self, nops: int, remount_at: int | None = None) -> None:
        ops = [(self.op_read, 20), (self.op_write, 22), (self.op_mapread, 10),
               (self.op_mapwrite, 10), (self.op_truncate, 8), (self.op_closeopen, 4),
               (self.op_fsync, 3)]
        fns = [f for f, _ in ops]
        weights = [w for _, w in ops]
        for self.opno in range(1, nops + 1):
            fn = self.rng.choices(fns, weights)[0]
            fn()
            self.counts[fn.__name__] = self.counts.get(fn.__name__, 0) + 1
            self.check_size()
            if self.opno % 250 == 0:
                self.check_all()
            if self.opno == remount_at:
                os.close(self.fd)
                self.mount.remount()
                self.fd = os.open(self.path, os.O_RDWR)
                self.log.append("remount")
                self.check_all()
        self.check_all()
        os.close(self.fd)


@pytest.mark.parametrize("seed", [1, 2])
def test_fsx(shared_dir, shared_mount, seed):
    fsx = Fsx(shared_dir / f"fsx.{seed}", shared_mount, seed=seed)
    fsx.run(2500, remount_at=1200 if seed == 1 else None)
    assert all(fsx.counts.get(n, 0) > 20 for n in ("op_read", "op_write", "op_mapread",
                                                     "op_mapwrite", "op_truncate"))
    shared_mount.sync()
    with open(shared_dir / f"fsx.{seed}", "rb") as f:
        assert f.read() == bytes(fsx.model)
    assert check_store(shared_mount.store, mounted=True) == []


# -- fio ------------------------------------------------------------------------------------

FIO_JOBS = [
    # (name, extra options)
    ("psync-randwrite", ["--ioengine=psync", "--rw=randwrite", "--bsrange=4k-128k",
                         "--size=24m"]),
    ("mmap-randwrite", ["--ioengine=mmap", "--rw=randwrite", "--bs=16k", "--size=24m"]),
    # FUSE via pyfuse3 has no fallocate: fio lays a file out again (truncating it) when a
    # write job left it shorter than --size, so the size is a whole number of blocks
    ("psync-seq-unaligned", ["--ioengine=psync", "--rw=write", "--bs=12345",
                             f"--size={12345 * 2000}"]),
]


def _fio(path, name, extra, *more):
    cmd = ["fio", f"--name={name}", f"--filename={path}", "--fallocate=none", "--verify=crc32c",
           "--verify_fatal=1", "--verify_state_save=0",  # no state files left in the cwd
           "--randrepeat=1", "--randseed=1234", "--output-format=terse",
           "--minimal", *extra, *more]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_fio_verify(shared_dir, shared_mount):
    if not shutil.which("fio"):
        pytest.skip("fio is not installed (apt-get install fio)")
    for name, extra in FIO_JOBS:
        r = _fio(shared_dir / name, name, extra)          # write, then read back and verify
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        assert "verify" not in r.stderr.lower(), r.stderr
    shared_mount.remount()                                # sealed, then read cold
    for name, extra in FIO_JOBS:
        r = _fio(shared_dir / name, name, extra, "--verify_only")
        assert r.returncode == 0, f"{name} after remount: {r.stdout}{r.stderr}"
        assert "verify" not in r.stderr.lower(), r.stderr
    # the check can fail: one flipped byte and fio's verify-only pass reports it
    name, extra = FIO_JOBS[2]
    with open(shared_dir / name, "r+b") as f:
        f.seek(5 * 12345 + 100)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    r = _fio(shared_dir / name, name, extra, "--verify_only")
    assert r.returncode != 0


# Stressors that need what a FUSE mount cannot offer or the test must not do: mounts
# (bind-mount), binder devices, /proc, fs-verity, fanotify marks on the whole mount.
STRESS_NG_EXCLUDE = "bind-mount,binderfs,procfs,verity,fanotify"


def test_stress_ng_filesystem_class(make_mount):
    """stress-ng's filesystem stressors (files, dirs, links, renames, locks, xattrs, mmap,
    truncation, utimes, dnotify/inotify, ...) with verification: all pass, the daemon
    logs no error, and the store is consistent afterwards."""
    if not shutil.which("stress-ng"):
        pytest.skip("stress-ng is not installed (apt-get install stress-ng)")
    m = make_mount()
    work = m.path / "stress"
    work.mkdir()
    r = subprocess.run(["stress-ng", "--temp-path", str(work), "--class", "filesystem",
                        "--sequential", "1", "--timeout", "1s", "--verify",
                        "--exclude", STRESS_NG_EXCLUDE],
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    failures = "\n".join(ln for ln in out.splitlines() if "fail" in ln.lower())
    assert r.returncode == 0, failures or out[-4000:]
    assert "successful run completed" in out and "unsuccessful" not in out, failures
    for line in m.log().splitlines():
        assert " ERROR " not in line and "Traceback" not in line, line
    m.umount()
    assert check_store(m.store) == []


DBENCH_LOAD = "/usr/share/dbench/client.txt"  # the NetBench load file Debian's dbench ships


def test_dbench(make_mount):
    """dbench's NetBench load (Samba's file-server emulation: creates, small writes and
    reads, renames, unlinks, byte-range locks, directory scans, xattrs) from concurrent
    clients, then again with synchronous opens and directory operations: every call
    returns what the load file expects (dbench stops with exit 1 at the first that does
    not), the daemon logs no error, and the store is consistent afterwards."""
    if not (shutil.which("dbench") and os.path.exists(DBENCH_LOAD)):
        pytest.skip("dbench is not installed (apt-get install dbench)")
    m = make_mount()
    for flags in (["-x"], ["-x", "-s", "-S"]):
        work = m.path / "dbench"
        work.mkdir()
        r = subprocess.run(["dbench", "-D", str(work), "-t", "6", "-c", DBENCH_LOAD, *flags,
                            "4"], capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"dbench {flags}: {out[-4000:]}"
        assert "Throughput" in out and " failed" not in out, out[-4000:]
        shutil.rmtree(work)  # what dbench leaves (its client directories)
    for line in m.log().splitlines():
        assert " ERROR " not in line and "Traceback" not in line, line
    m.umount()
    assert check_store(m.store) == []
