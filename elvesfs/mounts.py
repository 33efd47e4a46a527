"""Where stores and mounts are: a mountpoint's default store, the live elvesfs mounts
(from /proc/self/mountinfo) and the store behind a path, and a mount's kernel
read-ahead, and whether a daemon has exited. Shared by the CLI commands and the daemon."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.parse

from .errors import CliError

log = logging.getLogger(__name__)


def default_store(mountpoint: str) -> str:
    """A per-user store directory per mountpoint: $XDG_DATA_HOME/elvesfs/<name>-<hash>."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    mp = os.path.abspath(mountpoint)
    tag = hashlib.sha256(mp.encode()).hexdigest()[:8]
    name = os.path.basename(mp.rstrip("/")) or "root"
    return os.path.join(base, "elvesfs", f"{name}-{tag}")


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Let the kernel read ahead further than FUSE's default 128 KiB on this mount
    (loaders read whole shards sequentially). Needs root; logged and skipped otherwise.

    Call it once the mount serves, and in the daemon from a worker thread: the kernel
    sets the read-ahead from the reply to its INIT request, which the stat() here waits
    for, and the loop thread must be free to answer that stat."""
    try:
        dev = os.stat(mountpoint).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("read_ahead_kb not set: %s", exc)


def mount_table() -> list[tuple[str, str, str]]:
    """(mountpoint, type, source) of every mount this process sees, dead FUSE mounts
    included, with mountinfo's octal escapes (whitespace, backslash) decoded."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields = right.split()
            if len(fields) >= 2:
                out.append((_unescape(left.split()[4]), os.fsdecode(fields[0]),
                            _unescape(fields[1])))
    return out


def mounts() -> dict[str, str]:
    """Mountpoint -> store root of every live elvesfs mount."""
    return {mp: unquote_store(src[len("elvesfs:"):]) for mp, _, src in mount_table()
            if src.startswith("elvesfs:")}


def quote_store(store: str) -> str:
    """The store's path as the mount's source name (`elvesfs:PATH` in `df` and
    mountinfo): pyfuse3 passes options as ASCII and libfuse splits them at commas, so
    bytes outside printable ASCII, ',', '\\' and '%' are written as %XX."""
    return "".join(chr(b) if 32 <= b < 127 and b not in b",\\%" else f"%{b:02X}"
                   for b in os.fsencode(store))


def unquote_store(name: str) -> str:
    """Inverse of quote_store."""
    return os.fsdecode(urllib.parse.unquote_to_bytes(name))


def _unescape(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def mount_of(path: str) -> tuple[str, str]:
    """(mountpoint, store) of the elvesfs mount holding `path` (a mountpoint or anything
    in it)."""
    live = mounts()
    p = os.path.realpath(path)
    while p not in live:
        if p == "/":
            raise CliError(f"{path} is not an elvesfs mount or inside one")
        p = os.path.dirname(p)
    return p, live[p]


def store_of(path: str) -> str:
    """The store behind the elvesfs mount holding `path`."""
    return mount_of(path)[1]


def daemon_exited(pid: int) -> bool:
    """Whether process `pid` has exited: gone, or a zombie not yet reaped. A daemon's
    parent is init once `elvesfs mount` has returned, and some inits (this project's CI
    VM's) take over a second to reap: its work was done when it became a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc: ask the kernel whether the PID exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
