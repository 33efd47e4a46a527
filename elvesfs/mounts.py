"""Where stores and mounts are: a mountpoint's default store, the live elvesfs mounts
(from /proc/self/mountinfo) and the store behind a path. Shared by the CLI commands."""

from __future__ import annotations

import hashlib
import os

from .errors import CliError


def default_store(mountpoint: str) -> str:
    """A per-user store directory per mountpoint: $XDG_DATA_HOME/elvesfs/<name>-<hash>."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    mp = os.path.abspath(mountpoint)
    tag = hashlib.sha256(mp.encode()).hexdigest()[:8]
    name = os.path.basename(mp.rstrip("/")) or "root"
    return os.path.join(base, "elvesfs", f"{name}-{tag}")


def mounts() -> dict[str, str]:
    """Mountpoint -> store root of every live elvesfs mount (from /proc/self/mountinfo)."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if len(fields) >= 2 and fields[1].startswith("elvesfs:"):
                mp = left.split()[4].replace("\\040", " ")
                out[mp] = fields[1][len("elvesfs:"):].replace("\\040", " ")
    return out


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
