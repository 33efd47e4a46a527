"""The mount daemon: opens a store, recovers it, serves FUSE until unmounted, then seals and closes.

Always its own process (a Python process that reads a mount served by its own
threads deadlocks on the GIL). `elvesfs mount` starts it with `--ready-fd`: the
daemon writes "OK\n" there once the mount is live, or "ERR <message>\n".
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import fcntl
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pyfuse3
import trio

from .cache import ChunkCache
from .chunkstore import ChunkStore
from .control import serve_control
from .db import Database
from .errors import ElvesError, StoreFullError, StoreLockedError
from .fs import Operations
from .ingest import Sealer
from .mounts import quote_store, set_read_ahead
from .layout import Layout
from .namespace import Namespace, key
from .policy import XATTR as POLICY_XATTR, Policy, file_policy
from .reader import ChunkReader
from .staging import Staging

log = logging.getLogger("elvesfs.daemon")


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment: a bad value is reported and
    the default used, rather than a daemon that dies on import with a traceback."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        log.warning("%s=%r is not a positive number of seconds; using %s", name, raw, default)
        return default
    return value


# seconds between syncs of LMDB (see _periodic_sync; like ext4's commit= option) ...
SYNC_INTERVAL = _env_seconds("ELVESFS_SYNC_INTERVAL", 5.0)
SYNC_COMMITS = 256  # ... or this many commits, whichever comes first
SYNC_POLL = 0.05
SWITCH_INTERVAL = _env_seconds("ELVESFS_SWITCH_INTERVAL", 0.0005)
WARMUP_WAIT = 5.0  # seconds the mount waits for the codec kernels to load


@dataclass
class Store:
    """The opened parts of one store, wired together."""

    root: str
    db: Database
    ns: Namespace
    chunks: ChunkStore
    staging: Staging
    reader: ChunkReader
    sealer: Sealer
    lock_fd: int

    def close(self) -> None:
        self.sealer.close()
        self.db.close()
        os.close(self.lock_fd)


def lock_store(root: str) -> int:
    """Take the store's daemon lock, or explain who holds it."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, "daemon.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StoreLockedError(f"store {root} is in use by another elvesfs daemon "
                               f"(pid {holder or '?'}); unmount it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_store(root: str, cache_bytes: int = 256 << 20) -> Store:
    """Lock and open a store for exclusive use by this process."""
    lock_fd = lock_store(root)
    try:
        db = Database(root)
        ns = Namespace(db)
        chunks = ChunkStore(db)
        staging = Staging(db, root)
        reader = ChunkReader(db, chunks, ChunkCache(cache_bytes))
        sealer = Sealer(db, ns, chunks, staging, reader)
    except BaseException:
        os.close(lock_fd)
        raise
    return Store(root, db, ns, chunks, staging, reader, sealer, lock_fd)


def recover(store: Store, default_policy: Policy) -> None:
    """Finish what a crash interrupted: drop orphans, seal staged files, collect garbage."""
    with store.db.read() as txn:
        orphans = store.ns.orphans(txn)
        staged = store.staging.staged(txn)
        stray = store.staging.stray_files(txn)
    for ino in stray:
        log.info("recovery: removing unfinished staging copy of inode %d", ino)
        store.staging.remove_file(ino)
    for ino in orphans:
        log.info("recovery: deleting orphan inode %d", ino)
        store.sealer.drop(ino)
    for ino in staged:
        if ino in orphans:
            continue
        if not os.path.exists(store.staging.path(ino)):
            log.warning("recovery: staging file of inode %d is missing; keeping its last sealed "
                        "content", ino)
            store.db.write_freeing(lambda txn: _keep_sealed(store, txn, ino))
            continue
        with store.db.read() as txn:
            raw = store.ns.getxattr(txn, ino, POLICY_XATTR)
        policy = file_policy(raw, default_policy, ino)
        log.info("recovery: sealing staged inode %d", ino)
        try:
            store.sealer.seal(ino, policy, threading.Event())
        except Exception as exc:
            # nothing is lost: the mount serves it from its staging file (adopt_staged)
            # and seals it later; a full disk must not keep the store from mounting, or
            # nobody could delete a file to free space
            log.error("recovery: cannot seal inode %d now, it stays staged: %s", ino, exc)
    try:
        store.sealer.collect()
    except StoreFullError as exc:
        log.error("recovery: garbage collection postponed: %s", exc)
    store.db.sync(mark=True)


def _keep_sealed(store: Store, txn, ino: int) -> None:
    """Drop a staging record whose file is gone: the inode's content and size become
    its sealed layout's again (a write may have stored the staged size)."""
    store.staging.forget(txn, ino)
    node = store.ns.find(txn, ino)
    if node is not None:
        raw = txn.get(key(ino), db=store.db.t["layouts"])
        node.size = Layout.from_bytes(raw).size if raw else 0
        store.ns.put(txn, node)


def adopt_staged(ops: Operations, store: Store) -> None:
    """Serve the files recovery could not seal (a full disk) from their staging files,
    as if just written: `elvesfs sync`, the next close or the unmount seals them."""
    with store.db.read() as txn:
        staged = {ino: store.staging.base(txn, ino) for ino in store.staging.staged(txn)}
    for ino, base in staged.items():
        st = ops.state.of(ino)
        st.fd = store.staging.open_existing(ino)
        st.size = os.fstat(st.fd).st_size
        st.base = base if base <= st.size else 0  # (see Sealer._kept)
        log.warning("inode %d stays staged (%d bytes), to be sealed once there is room",
                    ino, st.size)


async def _serve(ops: Operations, store: Store, live: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        ops.serve_in(nursery)
        nursery.start_soon(live)
        nursery.start_soon(_signals, nursery)
        nursery.start_soon(serve_control, store.root, ops)
        nursery.start_soon(_periodic_sync, store.db)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _signals(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()
            return


async def _periodic_sync(db: Database) -> None:
    """Flush LMDB every SYNC_INTERVAL s, like a journalling filesystem's commit interval,
    then give the allocator's free pages back; and sooner after SYNC_COMMITS commits:
    the sync point's snapshot keeps the pages that later commits free from reuse, so
    a burst of small commits (`tar x` of many files: each commit copies ~8 pages)
    would otherwise grow data.mdb by ~30 MiB a second until the next sync."""
    trim = _malloc_trim()
    last = trio.current_time()
    while True:
        await trio.sleep(SYNC_POLL)
        due = trio.current_time() - last >= SYNC_INTERVAL
        if not due and db.commits_since_sync() < SYNC_COMMITS:
            continue
        await trio.to_thread.run_sync(db.sync, True)
        last = trio.current_time()
        if due and trim is not None:
            await trio.to_thread.run_sync(trim, 0)


def _malloc_trim():
    """glibc's malloc_trim, or None (another libc). Why: decoded chunks and coder buffers
    are freed by many threads, each with its own malloc arena; glibc keeps their free
    pages, so a daemon with a 256 MiB chunk cache sat at ~650 MiB after a few 1 GiB
    reads, ~370 MiB with a trim every 5 s (scripts/bench_memory.py, README "Memory")."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _seal_remaining(ops: Operations, store: Store) -> None:
    """After unmount: seal whatever is still staged (every handle is closed by now)."""
    for ino, st in list(ops.state.items()):
        if st.staged:
            os.close(st.fd)
            st.fd = None
            with store.db.read() as txn:
                node = store.ns.find(txn, ino)
            if node is None or node.nlink == 0:
                store.sealer.drop(ino)
                continue
            policy = ops._policy(ino)
            try:
                store.sealer.seal(ino, policy, threading.Event(),
                                  ops.life.presealed(st, policy))
            except Exception as exc:  # it stays staged: the next mount seals it
                log.error("cannot seal inode %d before unmounting, it stays staged: %s",
                          ino, exc)
            store.sealer.unpin(ino)
    with store.db.read() as txn:
        orphans = store.ns.orphans(txn)
    for ino in orphans:
        store.sealer.drop(ino)
    try:
        store.sealer.collect()
    except StoreFullError as exc:  # garbage only: the next mount collects it
        log.error("garbage collection postponed: %s", exc)


def warm_up_codecs() -> None:
    """Load the codecs' compiled kernels now, in the background, not in the first seal."""
    import numpy as np

    import codec
    sample = (np.random.default_rng(0).standard_normal(4096) * 0.02).astype(np.float32)
    try:
        for dtype, data in (("F32", sample), ("F16", sample.astype(np.float16)),
                            ("BF16", (sample.view(np.uint32) >> 16).astype(np.uint16))):
            raw = data.tobytes()
            for bound in (None, "native"):
                codec.decode(codec.encode(raw, dtype, bound=bound))
            codec.decode(codec.encode(raw, dtype, reference=raw[::-1]), reference=raw[::-1])
        # a large delta chunk (its transform decided by estimates) with a decayed half (a
        # scaled reference) and rows that barely move (sub+blocks)
        ref = np.tile(sample, 64)
        new = ref * np.float32(0.005)
        new[ref.size // 2:] = ref[ref.size // 2:] + np.float32(1e-9)
        codec.decode(codec.encode(new.tobytes(), "F32", reference=ref.tobytes()),
                     reference=ref.tobytes())
        codec.decode(codec.encode(b"warm up" * 1000, None))
        arr = np.random.default_rng(1).standard_normal(1 << 16) * 0.02  # arrays in opaque
        for part in (arr.astype(np.float32).tobytes(), arr.astype(np.float16).tobytes()):
            codec.decode(codec.encode(part[1:], None))  # bytes: the byte shuffle
    except Exception:  # only a warm-up: the real call reports any problem
        log.debug("codec warm-up failed", exc_info=True)
    # Python's full (generation 2) collections visit every tracked object, ~127k once
    # numba's kernels are loaded: each took 45-90 ms, holding the GIL, so the event loop
    # stopped that long a few times a minute while files sealed. Objects alive now live
    # until exit anyway; frozen, later collections skip them (worst stat latency while
    # 2000 small files sealed: 88-108 -> 13-29 ms; docs/MEASUREMENTS.md).
    gc.collect()
    gc.freeze()


def fuse_options(extra: list[str], store_root: str) -> set[str]:
    """pyfuse3's defaults plus ours: kernel permission checks and a name `mount` shows."""
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    opts |= {"default_permissions", f"fsname=elvesfs:{quote_store(store_root)}",
             "subtype=elvesfs"}
    for o in extra:
        opts |= {x for x in o.split(",") if x}
    if any(o.startswith("max_read=") for o in opts):
        # libfuse then ends the session at the kernel's INIT, after the mount succeeded
        # ("init() and fuse_session_new() requested different maximum read size")
        raise ElvesError("-o max_read is not supported (pyfuse3 cannot pass it on to "
                         "libfuse's INIT); reads are sized by the kernel's readahead")
    return opts


def _fuse_init(ops: Operations, mountpoint: str, options: set[str]) -> None:
    """pyfuse3.init; when it fails, the error carries libfuse's own reason, which it
    prints on stderr (e.g. "fuse: unknown option(s): `-o bogus'"), not pyfuse3's
    "fuse_session_new() failed". The printed text still reaches stderr (the log).
    A pipe, not a file: no disk needed (libfuse prints a line or two, far below the
    pipe's 64 KiB, so it never blocks). Read without waiting for EOF: a fusermount3
    that libfuse starts (auto_unmount) inherits the write end and lives on."""
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    saved = os.dup(2)
    os.dup2(wfd, 2)
    os.close(wfd)
    failure = None
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        failure = exc
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with os.fdopen(rfd, "rb") as said:
        text = (said.read() or b"").decode(errors="replace").strip()
    if text:
        print(text, file=sys.stderr, flush=True)
    if failure is not None:
        lines = [line for line in text.splitlines() if line]
        # libfuse's lines; in --foreground our own log shares stderr
        reason = " / ".join([x for x in lines if x.startswith("fuse")] or lines) or str(failure)
        if "/dev/fuse" in reason and "Permission denied" in reason:
            reason += (" (this user may not use FUSE: /dev/fuse is usually mode 0666, "
                       "or the user must be in its group)")
        raise ElvesError(f"cannot mount on {mountpoint}: {reason}") from None


def run(mountpoint: str, root: str, options: list[str], default_policy: Policy,
        cache_bytes: int, ready_fd: int | None, preseal: bool = True,
        read_ahead_kb: int = 1024) -> int:
    """Open, recover, mount and serve; returns the process exit code."""
    # Worker threads (seal, pre-seal, reads) hold the GIL between their C calls; hand it
    # over sooner than the default 5 ms so the FUSE loop thread is not starved by them.
    sys.setswitchinterval(SWITCH_INTERVAL)

    def ready(msg: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, (msg + "\n").encode())
            os.close(ready_fd)

    try:
        store = open_store(root, cache_bytes)
    except ElvesError as exc:
        ready(f"ERR {exc}")
        log.error("%s", exc)
        return 1
    warm = threading.Thread(target=warm_up_codecs, name="elvesfs-warmup", daemon=True)
    warm.start()
    try:
        store.ns.ensure_root(os.getuid(), os.getgid())
        recover(store, default_policy)
        ops = Operations(store.db, store.ns, store.chunks, store.staging, store.reader,
                         store.sealer, default_policy, preseal=preseal)
        adopt_staged(ops, store)
        # The first read after mounting would otherwise wait ~0.4 s for the kernels to
        # load; a first-ever start compiles them, which takes longer: then go on.
        warm.join(WARMUP_WAIT)
        _fuse_init(ops, mountpoint, fuse_options(options, root))
    except Exception as exc:
        ready(f"ERR {exc}")
        if isinstance(exc, ElvesError):  # a user's error (an option, the mountpoint)
            log.error("startup failed: %s", exc)
        else:
            log.exception("startup failed")
        store.close()
        return 1
    log.info("mounted %s on %s (policy %s)", root, mountpoint, default_policy)

    async def live() -> None:
        """Once the loop serves: the mount's read-ahead, then "OK" to `elvesfs mount`
        (which returns only then, with the mount usable and tuned; --foreground too).
        Abandoned if the loop fails first: its stat may wait on a loop that is gone."""
        await trio.to_thread.run_sync(set_read_ahead, mountpoint, read_ahead_kb,
                                      abandon_on_cancel=True)
        ready("OK")

    try:
        trio.run(_serve, ops, store, live)
    except BaseException:
        log.exception("event loop failed")
        pyfuse3.close(unmount=True)
        _seal_remaining(ops, store)
        store.close()
        raise
    pyfuse3.close(unmount=True)
    _seal_remaining(ops, store)
    store.close()
    log.info("unmounted %s", mountpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elvesfs-daemon")
    p.add_argument("mountpoint")
    p.add_argument("--store", required=True)
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("--lossy", default=None)
    p.add_argument("--protect", action="store_true")
    p.add_argument("--cache-mb", type=int, default=256)
    p.add_argument("--no-preseal", action="store_true")
    p.add_argument("--read-ahead-kb", type=int, default=1024)
    p.add_argument("--ready-fd", type=int, default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    handlers = [logging.FileHandler(a.log)] if a.log else [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    policy = Policy.parse(a.lossy) if a.lossy else Policy()
    if a.protect:
        policy = dataclasses.replace(policy, protect=True)
    return run(os.path.abspath(a.mountpoint), os.path.abspath(a.store), a.options, policy,
               a.cache_mb << 20, a.ready_fd, preseal=not a.no_preseal,
               read_ahead_kb=a.read_ahead_kb)


if __name__ == "__main__":
    sys.exit(main())
