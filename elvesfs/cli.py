"""The `elvesfs` command: mount, umount, sync, stats, fsck, scrub, salvage, compress."""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import subprocess
import sys
import time

from .errors import CliError, DaemonGoneError
from .mounts import daemon_exited, default_store, mounts, store_of

log = logging.getLogger("elvesfs")


def cmd_mount(a: argparse.Namespace) -> int:
    mp = os.path.abspath(a.mountpoint)
    if _is_dead_mount(mp):
        _clear_dead_mount(mp)
    if not os.path.isdir(mp):
        raise CliError(f"mountpoint {mp} does not exist or is not a directory")
    if os.path.ismount(mp):
        raise CliError(f"{mp} is already a mountpoint; unmount it first")
    store = os.path.abspath(a.store or default_store(mp))
    if a.lossy:
        from .policy import Policy, PolicyError  # imports codec/ (numba): only here
        try:
            a.lossy = str(Policy.parse(a.lossy if a.lossy.startswith("elf")
                                       else f"elf={a.lossy}"))
        except PolicyError as exc:
            raise CliError(str(exc)) from None
    os.makedirs(store, exist_ok=True)
    logfile = os.path.join(store, "elvesfs.log")
    cmd = [sys.executable, "-m", "elvesfs.daemon", mp, "--store", store,
           "--cache-mb", str(a.cache_mb)]
    for o in a.o:
        cmd += ["-o", o]
    if a.lossy:
        cmd += ["--lossy", a.lossy]
    if a.protect:
        cmd.append("--protect")
    if a.no_preseal:
        cmd.append("--no-preseal")
    if a.debug:
        cmd.append("--debug")
    cmd += ["--read-ahead-kb", str(a.read_ahead_kb)]
    if a.foreground:
        from . import daemon
        return daemon.main(cmd[3:])
    rfd, wfd = os.pipe()
    cmd += ["--ready-fd", str(wfd), "--log", logfile]
    proc = subprocess.Popen(cmd, pass_fds=(wfd,), start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(logfile, "ab"))
    os.close(wfd)
    with os.fdopen(rfd) as r:
        msg = r.readline().strip()
    if msg == "OK":
        print(f"elvesfs: {mp} mounted (store {store}, log {logfile})", file=sys.stderr)
        return 0
    proc.wait(timeout=30)
    raise CliError(msg[4:] if msg.startswith("ERR ") else
                   f"the daemon exited before mounting (see {logfile})")


def _is_dead_mount(mp: str) -> bool:
    """A FUSE mount whose daemon has gone (kill -9, OOM) fails every call with ENOTCONN
    (ECONNABORTED for a call caught in flight while the kernel aborts the connection)."""
    try:
        os.stat(mp)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _clear_dead_mount(mp: str) -> None:
    """Detach the mount an elvesfs daemon left behind when it died, so that mounting again
    just works (the new daemon recovers what the old one had staged). Anything that is
    not plainly ours and dead is left alone, with a message saying what to do."""
    store = mounts().get(mp)
    if store is None:
        raise CliError(f"{mp} is a FUSE mount whose daemon is gone, not an elvesfs one; "
                       f"`fusermount3 -u {mp}` detaches it")
    if _store_locked(store):
        raise CliError(f"{mp} does not answer, but its elvesfs daemon (pid "
                       f"{_daemon_pid(store) or '?'}) still runs; see "
                       f"{os.path.join(store, 'elvesfs.log')}")
    r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if r.returncode:
        raise CliError(f"{mp} is left over from an elvesfs daemon that stopped, and it "
                       f"cannot be detached: {r.stderr.strip() or 'fusermount3 -u failed'} "
                       f"(`fuser -vm {mp}` lists processes still using it)")
    print(f"elvesfs: detached {mp}, left by a daemon that stopped (store {store})",
          file=sys.stderr)


def _store_locked(store: str) -> bool:
    """Whether a daemon holds the store's lock (it dies with its holder)."""
    try:
        fd = os.open(os.path.join(store, "daemon.lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _daemon_pid(store: str) -> int | None:
    try:
        with open(os.path.join(store, "daemon.lock")) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def cmd_umount(a: argparse.Namespace) -> int:
    if os.path.realpath(a.mountpoint) not in mounts():
        raise CliError(f"{a.mountpoint} is not an elvesfs mountpoint")
    store = store_of(a.mountpoint)
    pid = _daemon_pid(store)
    alive = _store_locked(store)  # else the daemon died: its files wait for recovery
    r = subprocess.run(["fusermount3", "-u", a.mountpoint], capture_output=True, text=True)
    if r.returncode:
        msg = r.stderr.strip() or f"fusermount3 -u {a.mountpoint} failed"
        if "busy" in msg:
            msg += (" (a process has a file open there, or its working directory; "
                    f"`fuser -vm {a.mountpoint}` lists them; nothing was lost, the mount "
                    "stays up)")
        raise CliError(msg)
    if pid:  # the daemon seals what is still staged, then exits
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline:
            if daemon_exited(pid):
                break
            time.sleep(0.05)
        else:
            raise CliError(f"daemon {pid} is still finishing after {a.timeout}s (see its log)")
    left = _staged_files(store)
    if left and alive:
        print(f"elvesfs: {left} file(s) could not be sealed before unmounting (see "
              f"{os.path.join(store, 'elvesfs.log')}: usually a full disk); they are kept "
              "in the staging area, and the next mount serves and seals them", file=sys.stderr)
    elif left:
        print(f"elvesfs: the daemon was not running (killed?); the next mount recovers the "
              f"{left} file(s) it had staged", file=sys.stderr)
    return 0


def _staged_files(store: str) -> int:
    """How many staging files a store holds (after unmount: files the daemon could not seal)."""
    try:
        return sum(name.isdigit() for name in os.listdir(os.path.join(store, "staging")))
    except OSError:
        return 0


def cmd_sync(a: argparse.Namespace) -> int:
    from .control import request
    store = store_of(a.mountpoint)
    try:
        ans = request(store, "sync", timeout=None)
    except DaemonGoneError as exc:
        raise CliError(f"{exc}; `elvesfs mount {a.mountpoint}` mounts it again and "
                       "recovers the files it had staged") from None
    if ans.startswith("staged "):
        raise CliError(f"{ans.split()[1]} closed file(s) could not be sealed (see "
                       f"{os.path.join(store, 'elvesfs.log')}: usually a full disk); they "
                       "are kept, fsync'd, in the staging area and sealed once there is room")
    if ans != "ok":
        raise CliError(f"sync failed: {ans}")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    from .stats import main as stats_main
    return stats_main(a)


def cmd_fsck(a: argparse.Namespace) -> int:
    from .fsck import main as fsck_main
    return fsck_main(a)


def cmd_scrub(a: argparse.Namespace) -> int:
    from .scrub import main as scrub_main
    return scrub_main(a)


def cmd_salvage(a: argparse.Namespace) -> int:
    from .salvage import main as salvage_main
    return salvage_main(a)


def cmd_compress(a: argparse.Namespace) -> int:
    from .compress import main as compress_main
    return compress_main(a.args)


def parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="elvesfs", description=__doc__)
    p.add_argument("--version", action="version", version=f"elvesfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mount", help="mount a store (created if new) on MOUNTPOINT")
    m.add_argument("mountpoint")
    m.add_argument("--store", help="store directory (default: one per mountpoint under "
                                   "~/.local/share/elvesfs)")
    m.add_argument("-o", action="append", default=[], help="FUSE options, e.g. allow_other")
    m.add_argument("--lossy", metavar="elf[=BOUND]",
                   help="allow ELF on float weights (default: lossless)")
    m.add_argument("--protect", action="store_true",
                   help="give float tensors' sign+exponent streams a parity, so damage "
                        "within one stripe of them is repaired on read (costs 1-5%%)")
    m.add_argument("--cache-mb", type=int, default=256, help="decoded chunk cache size")
    m.add_argument("--no-preseal", action="store_true",
                   help="code files only once closed, never while they are being written "
                        "(uses less disk while writing; sealing at close takes longer)")
    m.add_argument("--read-ahead-kb", type=int, default=1024,
                   help="kernel read-ahead for the mount (root only)")
    m.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    m.add_argument("--debug", action="store_true")
    m.set_defaults(fn=cmd_mount)
    u = sub.add_parser("umount", help="seal everything and unmount")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=3600)
    u.set_defaults(fn=cmd_umount)
    s = sub.add_parser("sync", help="wait until every closed file is sealed")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_sync)
    st = sub.add_parser("stats", help="logical and stored sizes, savings, policies")
    st.add_argument("paths", nargs="*", default=[])
    st.add_argument("--store", help="store directory (default: that of the paths' mount)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_stats)
    f = sub.add_parser("fsck", help="check (and --repair) an unmounted store")
    f.add_argument("target", help="store directory or its (unmounted) default mountpoint")
    f.add_argument("--repair", action="store_true")
    f.add_argument("--verify-data", action="store_true", help="decode and verify every chunk")
    f.set_defaults(fn=cmd_fsck)
    sc = sub.add_parser("scrub", help="verify every stored chunk while mounted")
    sc.add_argument("mountpoint")
    sc.add_argument("--repair", action="store_true",
                    help="write back protected chunks repaired from their parity")
    sc.set_defaults(fn=cmd_scrub)
    sv = sub.add_parser("salvage", help="write out a damaged file: exact where it verifies, "
                        "floats at reduced precision where only low mantissa bits are damaged")
    sv.add_argument("path", help="the file, in a live mount (or, with --store, its path "
                                 "inside the store's file system)")
    sv.add_argument("output", help="where to write what can be recovered")
    sv.add_argument("--store", help="read this (unmounted) store instead of PATH's mount")
    sv.add_argument("--json", action="store_true", help="the damaged ranges as JSON")
    sv.set_defaults(fn=cmd_salvage)
    c = sub.add_parser("compress", help="report what each codec does to a model file")
    c.add_argument("args", nargs=argparse.REMAINDER)
    c.set_defaults(fn=cmd_compress)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="elvesfs: %(message)s")
    a = parser().parse_args(argv)
    try:
        rc = a.fn(a) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:  # `elvesfs stats | head`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process killed by SIGPIPE
    except CliError as exc:
        print(f"elvesfs: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one clear line, not a traceback
        from .errors import ElvesError
        if isinstance(exc, (ElvesError, OSError)):
            print(f"elvesfs: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
