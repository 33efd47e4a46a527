#!/usr/bin/env python3
"""Benchmark elvesfs against a plain directory and pyfuse3's bare passthrough example.

One run, one disk (a fresh directory under --workdir, default /var/tmp), three targets:

  plain        a directory on that disk: the baseline every ratio is taken against
  passthrough  pyfuse3's examples/passthroughfs.py (fetched from the pyfuse3 sdist of the
               installed version at bench time) mirroring a directory on that disk: the
               floor any pyfuse3 filesystem pays for crossing FUSE in Python
  elvesfs      `python -m elvesfs.cli mount` with a fresh store on that disk

Measurements (each repeated --repeat times, medians reported):

  write   `cp SRC DIR/data.bin` of a --size file (half random bytes, half float32
          weights-like values; generated once, kept in /dev/shm so reading it costs
          nothing and does not touch the disk under test). Two times per target:
            "cp returns"      - the data is in the page cache / staging file
            "durable"         - plain: + fsync(file) + fsync(dir);
                                passthrough: + fsync of its backing file and dir (the
                                example has no fsync handler, the kernel would swallow it);
                                elvesfs: + `elvesfs sync MNT` (returns once the file is
                                sealed into the store and LMDB is fsync'd)
  paced   the same file written by a 200 MB/s writer (1 MiB blocks, like a download or
          a training loop's torch.save), then made durable as above: the time from the
          first byte to durable, which shows how much work is left after close
  cold    unmount (FUSE targets), `sync; echo 3 > /proc/sys/vm/drop_caches`, mount again,
  read    then `cat DIR/data.bin > /dev/null`
  meta    --files empty files in a fresh directory: os.open(O_CREAT|O_EXCL)+os.close,
          then os.stat each, then os.unlink each, timed per phase
  busy    the write above again, while a second process creates and stats an empty file
          in the same directory tree every 2 ms: the latency of each create + stat
          started between `cp` starting and the data being durable, p99 and max (is
          the filesystem still responsive while it ingests 1 GiB?)
  append  a --log-size log file (random bytes) written and made durable, then --appends
          rounds of: open(O_APPEND), write a 100-byte line, close (timed: what a training
          loop that logs one line per step waits), and the same with an fsync before the
          close (the passthrough's fsync is a no-op: not measured there). Between rounds
          the target is made durable as above, untimed, so that each append meets a
          sealed file, as a step every few seconds does
  dbench  dbench (Debian package `dbench`) with its NetBench load file: --dbench-clients
          processes creating, writing, reading, renaming, locking, listing and deleting
          many small files (a file server's day) for --dbench-seconds; the throughput
          dbench reports (what its clients saw: elvesfs seals their files meanwhile)

The first repeat also checks every target reads back exactly the bytes written (cmp).
elvesfs runs from a copy of elvesfs/ and codec/ taken at start (--no-snapshot: in place),
so edits to the tree during a run cannot make one daemon decode another version's frames.

Every FUSE filesystem runs as its own process (the benchmark never reads a mount served
by its own threads); mounts are always unmounted (try/finally), and only processes this
script started are ever signalled, by PID.

Run as root (dropping caches needs it) from the project's venv:

    . .venv/bin/activate
    sudo -E python scripts/bench_fs.py            # 1 GiB, 10k files, 3 repeats
    python scripts/bench_fs.py --quick            # 256 MiB, 2k files, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE = {"root": REPO, "env": None}  # where `python -m elvesfs...` imports from (see snapshot())
MB = 1_000_000
MiB = 1 << 20
PACED_RATE = 200 * MB  # bytes/s of the paced writer
DBENCH_LOAD = "/usr/share/dbench/client.txt"  # the load file Debian's dbench ships


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    s = s.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1:], None)
    return int(float(s[:-1]) * mult) if mult else int(s)


# -- mounts and caches -------------------------------------------------------------------
def mountpoints() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].replace("\\040", " ") for line in f}


def is_mounted(path: Path) -> bool:
    return str(path) in mountpoints()


def wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the filesystem process exited ({proc.returncode}) before "
                               f"mounting {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not become a mount within {timeout}s")
        time.sleep(0.02)


def drop_caches() -> bool:
    """sync + drop the page cache, dentries and inodes; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run(cmd: list[str], timeout: float = 3600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Profiler:
    """py-spy record attached to one PID for one phase (raw collapsed stacks)."""

    def __init__(self, pid: int | None, out: Path | None) -> None:
        self.proc = None
        if pid is None or out is None:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(exe):
            log("py-spy not found (pip install py-spy); not profiling")
            return
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200",
                                      "--format", "raw", "--threads", "--nonblocking",
                                      "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it attach

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- targets ------------------------------------------------------------------------------
class Target:
    name = "?"
    pid: int | None = None

    def __init__(self, work: Path) -> None:
        self.work = work

    @property
    def dir(self) -> Path:
        raise NotImplementedError

    def start(self) -> None:
        """Mount (FUSE targets)."""

    def stop(self) -> None:
        """Unmount, waiting for the filesystem process to finish."""

    def durable(self, f: Path) -> None:
        """Make `f` (just written by cp) durable: fsync, or elvesfs sealed + synced."""
        raise NotImplementedError

    def reset(self) -> None:
        """Start the next repeat from an empty target (unmounted)."""

    def cleanup(self) -> None:
        """Never leave a mount or a process behind, even after an error."""

    def describe(self, f: Path) -> str:
        return ""


class Plain(Target):
    name = "plain"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.root = work / "plain"
        self.root.mkdir()

    @property
    def dir(self) -> Path:
        return self.root

    def durable(self, f: Path) -> None:
        fsync_path(f)
        fsync_path(f.parent)

    def reset(self) -> None:
        shutil.rmtree(self.root)
        self.root.mkdir()


class Passthrough(Target):
    name = "passthrough"

    def __init__(self, work: Path, script: Path) -> None:
        super().__init__(work)
        self.script = script
        self.backing = work / "pt-backing"
        self.mnt = work / "pt-mnt"
        self.backing.mkdir()
        self.mnt.mkdir()
        self.proc: subprocess.Popen | None = None
        self.logf = open(work / "passthrough.log", "ab")

    @property
    def dir(self) -> Path:
        return self.mnt

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(self.script), str(self.backing),
                                      str(self.mnt)], stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=self.logf)
        self.pid = self.proc.pid
        wait_mounted(self.mnt, self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        run(["fusermount3", "-u", str(self.mnt)], timeout=120)
        rc = self.proc.wait(timeout=120)
        if rc:
            log(f"passthroughfs exited with {rc} (see {self.work / 'passthrough.log'})")
        self.proc = None
        self.pid = None

    def durable(self, f: Path) -> None:
        # passthroughfs.py has no fsync handler (ENOSYS: the kernel then treats fsync as a
        # no-op), so make the data durable where it really lives: its backing file.
        backing = self.backing / f.relative_to(self.mnt)
        fsync_path(backing)
        fsync_path(backing.parent)

    def reset(self) -> None:
        shutil.rmtree(self.backing)
        self.backing.mkdir()

    def cleanup(self) -> None:
        if is_mounted(self.mnt):
            r = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if r.returncode and is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by PID
                self.proc.wait()
            self.proc = None


class Elves(Target):
    name = "elvesfs"

    def __init__(self, work: Path, cache_mb: int | None) -> None:
        super().__init__(work)
        self.store = work / "elves-store"
        self.mnt = work / "elves-mnt"
        self.mnt.mkdir()
        self.cache_mb = cache_mb
        self.resyncs = 0  # times `elvesfs sync` returned while the file was still staged

    @property
    def dir(self) -> Path:
        return self.mnt

    def cli(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "elvesfs.cli", *args], timeout=timeout,
                   cwd=str(CODE["root"]), env=CODE["env"])

    def start(self) -> None:
        extra = ["--cache-mb", str(self.cache_mb)] if self.cache_mb else []
        self.cli("mount", str(self.mnt), "--store", str(self.store), *extra, timeout=120)
        self.pid = int((self.store / "daemon.lock").read_text().strip())

    def stop(self) -> None:
        self.cli("umount", str(self.mnt))
        self.pid = None

    def staged(self) -> list[str]:
        try:
            return os.listdir(self.store / "staging")
        except FileNotFoundError:
            return []

    def durable(self, f: Path) -> None:
        self.cli("sync", str(self.mnt))
        # `elvesfs sync` only waits for seals the daemon already knows about; the kernel
        # sends RELEASE asynchronously after close(), so check the staging area too.
        while self.staged():
            self.resyncs += 1
            time.sleep(0.01)
            self.cli("sync", str(self.mnt))

    def reset(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)  # a fresh store: no dedup across repeats

    def describe(self, f: Path) -> str:
        st = os.stat(f)
        return (f"stored {st.st_blocks * 512 / MiB:.1f} MiB for {st.st_size / MiB:.1f} MiB "
                f"logical ({st.st_blocks * 512 / max(1, st.st_size):.3f})")

    def cleanup(self) -> None:
        if is_mounted(self.mnt):
            r = subprocess.run([sys.executable, "-m", "elvesfs.cli", "umount", str(self.mnt),
                                "--timeout", "120"], capture_output=True,
                               cwd=str(CODE["root"]), env=CODE["env"], timeout=300)
            if r.returncode and is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if self.pid:  # the daemon we started, by the PID its store lock records
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None


# -- setup --------------------------------------------------------------------------------
def fetch_passthrough(dest: Path) -> Path:
    """examples/passthroughfs.py from the sdist of the installed pyfuse3 version."""
    from importlib.metadata import version
    ver = version("pyfuse3")
    dl = dest / "sdist"
    dl.mkdir()
    log(f"fetching the pyfuse3 {ver} sdist for examples/passthroughfs.py")
    # only pyfuse3 as a source archive: its build requirements may come as wheels (with
    # ":all:" pip would compile Cython from source just to read the sdist's metadata)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pyfuse3",
         f"pyfuse3=={ver}", "-d", str(dl)], timeout=600)
    tarballs = list(dl.glob("pyfuse3-*.tar.gz"))
    if not tarballs:
        raise RuntimeError(f"pip download left no pyfuse3 sdist in {dl}")
    with tarfile.open(tarballs[0]) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("examples/passthroughfs.py"))
        data = tf.extractfile(member).read()
    out = dest / "passthroughfs.py"
    out.write_bytes(data)
    return out


def snapshot(dest: Path) -> str:
    """Copy elvesfs/ and codec/ so that edits to the tree during the run cannot mix code
    versions between the daemon that writes a file and the one that reads it back; warm
    numba's cache there. Returns a description of the code measured."""
    for pkg in ("elvesfs", "codec"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(dest) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    CODE["root"], CODE["env"] = dest, env
    # the daemon's own warm-up: every kernel it would otherwise compile in the background
    # of the first measurement (a new path, a cold numba cache) is compiled now
    warm = "from elvesfs.daemon import warm_up_codecs\nwarm_up_codecs()\n"
    run([sys.executable, "-c", warm], cwd=str(dest), env=env, timeout=600)
    try:
        head = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "elvesfs",
                     "codec"]).stdout.strip()
        return f"commit {head}" + (" + uncommitted changes in elvesfs/ or codec/" if dirty
                                   else "")
    except Exception:
        return "unknown commit"


def make_source(path: Path, size: int) -> None:
    """Half random bytes (incompressible), half float32 N(0, 0.02) 'weights'."""
    import numpy as np
    rng = np.random.default_rng(12345)
    block = 64 * MiB
    half = size // 2
    with open(path, "wb") as f:
        for pos in range(0, half, block):
            f.write(rng.integers(0, 256, min(block, half - pos), dtype=np.uint8).tobytes())
        for pos in range(half, size, block):
            n = min(block, size - pos)
            f.write(rng.normal(0, 0.02, n // 4).astype(np.float32).tobytes())
            f.write(bytes(n % 4))


# -- measurements -------------------------------------------------------------------------
def timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def bench_write_read(t: Target, src: Path, size: int, res: dict, verify: bool, cold_ok: bool,
                     prof_dir: Path | None, rep: int) -> None:
    t.reset()
    t.start()
    try:
        dst = t.dir / "data.bin"
        prof = Profiler(t.pid, prof_dir and prof_dir / f"{t.name}-write-r{rep}.txt")
        t0 = time.perf_counter()
        run(["cp", str(src), str(dst)])
        t1 = time.perf_counter()
        t.durable(dst)
        t2 = time.perf_counter()
        prof.stop()
        res["write_cp"].append(t1 - t0)
        res["write_durable"].append(t2 - t0)
        extra = t.describe(dst)
        log(f"  {t.name:12s} write: cp {t1 - t0:7.2f}s  durable {t2 - t0:7.2f}s  "
            f"({size / MB / (t2 - t0):7.1f} MB/s) {extra}")
    finally:
        t.stop()
    if cold_ok:
        drop_caches()
    t.start()
    try:
        prof = Profiler(t.pid, prof_dir and prof_dir / f"{t.name}-read-r{rep}.txt")
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as null:
            subprocess.run(["cat", str(dst)], stdout=null, check=True)
        dt = time.perf_counter() - t0
        prof.stop()
        res["read_cold"].append(dt)
        log(f"  {t.name:12s} cold read: {dt:7.2f}s ({size / MB / dt:7.1f} MB/s)")
        if verify:
            r = subprocess.run(["cmp", str(src), str(dst)], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{t.name}: data read back differs: {r.stdout}{r.stderr}")
    finally:
        t.stop()


def bench_paced(t: Target, src: Path, size: int, res: dict, rate: float) -> None:
    """A writer slower than the disk (a download, a training loop's torch.save): write at
    `rate` bytes/s, then time until durable. Here the filesystem can work while the
    writer writes, so what counts is how little is left to do after close."""
    t.reset()
    t.start()
    try:
        dst = t.dir / "paced.bin"
        t0 = time.perf_counter()
        done = 0
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while block := fin.read(MiB):
                fout.write(block)
                done += len(block)
                ahead = done / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        t1 = time.perf_counter()
        t.durable(dst)
        t2 = time.perf_counter()
        res["paced_durable"].append(t2 - t0)
        log(f"  {t.name:12s} paced write at {rate / MB:.0f} MB/s: written {t1 - t0:6.2f}s, "
            f"close -> durable {t2 - t1:6.2f}s")
    finally:
        t.stop()


PROBE = r"""
import json, os, sys, time
d, stop = sys.argv[1], sys.argv[2]
os.makedirs(d, exist_ok=True)
lat, i = [], 0
while not os.path.exists(stop):
    t0 = time.monotonic()  # the system-wide clock: the bench keeps the probes it times
    p = os.path.join(d, f"p{i}")
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    os.stat(p)
    lat.append((t0, time.monotonic() - t0))
    i += 1
    time.sleep(0.002)
print(json.dumps(lat))
"""


def bench_busy(t: Target, src: Path, size: int, res: dict, stop: Path) -> None:
    """Metadata latency while the write runs: a probe process (its own GIL) creates and
    stats a file every 2 ms; the probes that start between `cp` starting and the data
    being durable count (the probe starts earlier, so that it runs by then)."""
    t.reset()
    t.start()
    stop.unlink(missing_ok=True)
    probe = None
    try:
        probe = subprocess.Popen([sys.executable, "-c", PROBE, str(t.dir / "probe"), str(stop)],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        dst = t.dir / "busy.bin"
        t0 = time.monotonic()
        run(["cp", str(src), str(dst)])
        t.durable(dst)
        t1 = time.monotonic()
        dt = t1 - t0
        stop.touch()
        out, _ = probe.communicate(timeout=120)
        if probe.returncode:
            raise RuntimeError(f"{t.name}: the latency probe failed (exit {probe.returncode})")
        lat = sorted(d for start, d in json.loads(out) if t0 <= start <= t1)
        if not lat:
            raise RuntimeError(f"{t.name}: no probe ran during the write")
        p99, worst = lat[min(len(lat) - 1, int(len(lat) * 0.99))], lat[-1]
        res["busy_p99"].append(p99)
        res["busy_max"].append(worst)
        log(f"  {t.name:12s} busy: {len(lat)} probes over {dt:.2f}s, median "
            f"{statistics.median(lat) * 1e3:.2f} ms, p99 {p99 * 1e3:.1f} ms, "
            f"max {worst * 1e3:.1f} ms")
    finally:
        stop.touch()
        if probe is not None and probe.poll() is None:
            try:
                probe.wait(timeout=30)
            except subprocess.TimeoutExpired:
                probe.kill()
                probe.wait()
        stop.unlink(missing_ok=True)
        t.stop()


def bench_meta(t: Target, nfiles: int, res: dict, prof_dir: Path | None, rep: int) -> None:
    t.reset()
    t.start()
    try:
        d = t.dir / "meta"
        os.mkdir(d)
        names = [os.path.join(d, f"f{i:06d}") for i in range(nfiles)]
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC

        def create() -> None:
            for n in names:
                os.close(os.open(n, flags, 0o644))

        def stat() -> None:
            for n in names:
                os.stat(n)

        def unlink() -> None:
            for n in names:
                os.unlink(n)

        times = {}
        for phase, fn in (("create", create), ("stat", stat), ("unlink", unlink)):
            prof = Profiler(t.pid, prof_dir and prof_dir / f"{t.name}-{phase}-r{rep}.txt")
            times[phase] = timed(fn)
            prof.stop()
            res[phase].append(times[phase])
        os.rmdir(d)
        log(f"  {t.name:12s} meta: " + "  ".join(
            f"{k} {nfiles / v:8.0f}/s" for k, v in times.items()))
    finally:
        t.stop()


LOG_LINE = b'{"step": 123456, "loss": 0.1234567, "lr": 0.0001, "grad_norm": 1.2345678, "t": 1}\n'


def bench_append(t: Target, res: dict, log_size: int, rounds: int) -> None:
    t.reset()
    t.start()
    try:
        f = t.dir / "train.log"
        with open(f, "wb") as out:
            for _ in range(log_size // (4 * MiB)):
                out.write(os.urandom(4 * MiB))
        t.durable(f)
        for key, sync in (("append", False), ("append_fsync", True)):
            if sync and isinstance(t, Passthrough):
                continue  # passthroughfs.py has no fsync handler: nothing to compare
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                fd = os.open(f, os.O_WRONLY | os.O_APPEND)
                os.write(fd, LOG_LINE)
                if sync:
                    os.fsync(fd)
                os.close(fd)
                times.append(time.perf_counter() - t0)
                t.durable(f)
            res[key].append(statistics.median(times))
            log(f"  {t.name:12s} {key}: median {statistics.median(times) * 1e3:.2f} ms, "
                f"max {max(times) * 1e3:.2f} ms over {rounds} appends")
        lines = rounds * (1 if isinstance(t, Passthrough) else 2)
        if os.path.getsize(f) != log_size // (4 * MiB) * 4 * MiB + lines * len(LOG_LINE):
            raise RuntimeError(f"{t.name}: the log has {os.path.getsize(f)} bytes")
    finally:
        t.stop()


def bench_dbench(t: Target, res: dict, clients: int, seconds: int) -> None:
    t.reset()
    t.start()
    try:
        d = t.dir / "dbench"
        os.mkdir(d)
        r = run(["dbench", "-D", str(d), "-t", str(seconds), "-c", DBENCH_LOAD, str(clients)],
                timeout=10 * seconds + 300)
        m = re.search(r"^Throughput ([0-9.]+) MB/sec", r.stdout, re.M)
        if m is None:
            raise RuntimeError(f"dbench printed no throughput: {r.stdout[-2000:]}")
        res["dbench"].append(float(m.group(1)))
        shutil.rmtree(d)
        log(f"  {t.name:12s} dbench: {m.group(1)} MB/s")
    finally:
        t.stop()


METRICS = [  # key, label, unit kind
    ("write_cp", "seq write, until `cp` returns", "bytes"),
    ("write_durable", "seq write, until durable (fsync / `elvesfs sync`)", "bytes"),
    ("paced_durable", "paced write (a 200 MB/s writer), until durable", "bytes"),
    ("read_cold", "cold read (`cat`, after remount + drop_caches)", "bytes"),
    ("create", "create (open O_CREAT+close)", "ops"),
    ("stat", "stat", "ops"),
    ("unlink", "unlink", "ops"),
    ("busy_p99", "create + stat during the write, p99 latency", "ms"),
    ("busy_max", "create + stat during the write, max latency", "ms"),
    ("dbench", "dbench, NetBench load (many small files), throughput", "rate"),
    ("append", "append a line to a sealed log (open, write, close), median", "ms"),
    ("append_fsync", "the same with fsync before close, median", "ms"),
]


def table(results: dict, names: list[str], size: int, nfiles: int) -> str:
    def rate(name: str, key: str, kind: str) -> float | None:
        v = results.get(name, {}).get(key)
        if not v:
            return None
        if kind == "ms":  # a latency: its inverse, so that every ratio is higher = better
            return 1 / statistics.median(v)
        if kind == "rate":  # measured as a rate (MB/s) already
            return statistics.median(v)
        return (size / MB if kind == "bytes" else nfiles) / statistics.median(v)

    fmt_abs = {"bytes": "{:.0f} MB/s".format, "ops": "{:.0f} ops/s".format,
               "rate": "{:.1f} MB/s".format,
               "ms": lambda r: f"{1e3 / r:.1f} ms" if r < 100 else f"{1e3 / r:.2f} ms"}
    head = ["measurement"] + names
    ratios = [(n, "plain") for n in names if n != "plain" and "plain" in names]
    if "elvesfs" in names and "passthrough" in names:
        ratios.append(("elvesfs", "passthrough"))
    head += [f"{a} / {b}" for a, b in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, kind in METRICS:
        if all(rate(n, key, kind) is None for n in names):
            continue  # a phase skipped in this run
        row = [label]
        for n in names:
            r = rate(n, key, kind)
            row.append("–" if r is None else fmt_abs[kind](r))
        for a, b in ratios:
            ra, rb = rate(a, key, kind), rate(b, key, kind)
            row.append("–" if not ra or not rb else f"**{ra / rb:.2f}x**")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/var/tmp",
                   help="a fresh directory is created (and removed) under this one; every "
                        "target lives on its disk (default /var/tmp)")
    p.add_argument("--size", default="1GiB", help="file size for write/read (default 1GiB)")
    p.add_argument("--files", type=int, default=10_000, help="files for the metadata test")
    p.add_argument("--repeat", type=int, default=3, help="repeats; medians are reported")
    p.add_argument("--quick", action="store_true",
                   help="256 MiB, 2000 files, dbench for 8 s, a 64 MiB log, 1 repeat")
    p.add_argument("--targets", default="plain,passthrough,elvesfs",
                   help="comma list (ratios vs plain need plain)")
    p.add_argument("--skip", default="",
                   help="comma list of: write, paced, meta, busy, dbench, append")
    p.add_argument("--dbench-clients", type=int, default=4, help="dbench processes (default 4)")
    p.add_argument("--dbench-seconds", type=int, default=20,
                   help="dbench's run time, after its own warm-up of a fifth of it (default 20)")
    p.add_argument("--log-size", default="256MiB",
                   help="size of the log the append phase appends to (default 256MiB)")
    p.add_argument("--appends", type=int, default=20, help="appends per kind (default 20)")
    p.add_argument("--source-dir", default=None,
                   help="where the source file is generated (default /dev/shm if it has room)")
    p.add_argument("--cache-mb", type=int, default=None, help="elvesfs --cache-mb")
    p.add_argument("--no-verify", action="store_true", help="skip the cmp of the read-back data")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy record the FUSE daemons during each timed phase (raw "
                        "collapsed stacks into DIR; perturbs the timings)")
    p.add_argument("--json", metavar="FILE", help="also write the raw timings as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run elvesfs from the tree in place (default: from a copy of elvesfs/ "
                        "and codec/ taken at start, immune to edits during the run)")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.files, a.repeat, a.dbench_seconds = "256MiB", 2000, 1, 8
        a.log_size, a.appends = "64MiB", 10
    size = parse_size(a.size)
    names = [n for n in a.targets.split(",") if n]
    skip = set(filter(None, a.skip.split(",")))

    for tool in ("cp", "cat", "cmp", "fusermount3"):
        if shutil.which(tool) is None:
            log(f"{tool} not found")
            return 1
    if "dbench" not in skip and not (shutil.which("dbench") and os.path.exists(DBENCH_LOAD)):
        log("dbench not installed (apt-get install dbench): skipping that phase")
        skip.add("dbench")
    cold_ok = os.geteuid() == 0
    if not cold_ok:
        log("not root: cannot drop caches; 'cold' reads only follow a remount")

    workdir = Path(tempfile.mkdtemp(prefix="elvesfs-bench-", dir=a.workdir)).resolve()
    src_parent = Path(a.source_dir) if a.source_dir else None
    if src_parent is None:
        shm = Path("/dev/shm")
        src_parent = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * size else workdir
    srcdir = Path(tempfile.mkdtemp(prefix="elvesfs-bench-src-", dir=src_parent))
    prof_dir = Path(a.profile).resolve() if a.profile else None
    if prof_dir:
        prof_dir.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):  # let the finally blocks unmount
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    targets: list[Target] = []
    results: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k, _, _ in METRICS} for n in names}
    load0 = os.getloadavg()
    t_start = time.monotonic()
    failed = True
    try:
        for n in names:
            if n == "plain":
                targets.append(Plain(workdir))
            elif n == "passthrough":
                targets.append(Passthrough(workdir, fetch_passthrough(workdir)))
            elif n == "elvesfs":
                targets.append(Elves(workdir, a.cache_mb))
            else:
                raise SystemExit(f"unknown target {n!r}")
        code = "the tree in place"
        if "elvesfs" in names and not a.no_snapshot:
            log("snapshotting elvesfs/ and codec/, warming numba's cache")
            snap = workdir / "code"
            snap.mkdir()
            code = snapshot(snap)
        src = srcdir / "source.bin"
        if {"write", "paced", "busy"} - skip:
            log(f"generating a {size / MiB:.0f} MiB source file in {srcdir}")
            make_source(src, size)
        log(f"work directory {workdir} ({os.cpu_count()} CPUs, load {load0[0]:.2f})")
        for rep in range(a.repeat):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            log(f"repeat {rep + 1}/{a.repeat}: order {[t.name for t in order]}")
            for t in order:
                if "write" not in skip:
                    bench_write_read(t, src, size, results[t.name], verify=rep == 0 and
                                     not a.no_verify, cold_ok=cold_ok, prof_dir=prof_dir,
                                     rep=rep)
                if "paced" not in skip:
                    bench_paced(t, src, size, results[t.name], PACED_RATE)
                if "meta" not in skip:
                    bench_meta(t, a.files, results[t.name], prof_dir, rep)
                if "busy" not in skip:
                    bench_busy(t, src, size, results[t.name], workdir / "probe-stop")
                if "dbench" not in skip:
                    bench_dbench(t, results[t.name], a.dbench_clients, a.dbench_seconds)
                if "append" not in skip:
                    bench_append(t, results[t.name], parse_size(a.log_size), a.appends)
        failed = False
    finally:
        for t in targets:
            try:
                t.cleanup()
            except Exception as exc:
                log(f"cleanup of {t.name}: {exc}")
        left = [str(m) for m in (workdir / "pt-mnt", workdir / "elves-mnt") if is_mounted(m)]
        if left:
            log(f"WARNING: still mounted: {left}")
        shutil.rmtree(srcdir, ignore_errors=True)
        if failed:
            for lf in (workdir / "elves-store" / "elvesfs.log", workdir / "passthrough.log"):
                if lf.exists():
                    tail = lf.read_text(errors="replace").splitlines()[-40:]
                    log(f"last lines of {lf}:\n" + "\n".join(tail))
            log(f"run failed: keeping {workdir} for inspection")
        elif not a.keep and not left:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    load1 = os.getloadavg()
    elves = next((t for t in targets if isinstance(t, Elves)), None)
    print()
    print(f"File {size / MiB:.0f} MiB (half random bytes, half float32 N(0, 0.02)), "
          f"{a.files} files, dbench {a.dbench_clients} clients for {a.dbench_seconds} s, "
          f"median of {a.repeat} run(s); {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
          f"{elapsed / 60:.1f} min in all. Ratios: higher is better (rate / plain rate; "
          f"for latencies, plain latency / latency).")
    if elves is not None:
        print(f"elvesfs code measured: {code}.")
    if not cold_ok:
        print("Caches were NOT dropped (not root): reads are after a remount only.")
    if elves is not None and elves.resyncs:
        print(f"Note: `elvesfs sync` returned {elves.resyncs} time(s) before the file was sealed.")
    print()
    print(table(results, names, size, a.files))
    if a.json:
        Path(a.json).write_text(json.dumps({"size": size, "files": a.files, "repeat": a.repeat,
                                            "load": [load0, load1], "seconds": results},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
