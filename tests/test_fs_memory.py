"""The daemon's memory stays bounded by its caches, not by the size of the files.

scripts/bench_memory.py measures the same at 1 and 4 GiB (README, "Memory")."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_memory import Sampler, make_floats  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
# What the daemon may add to its idle memory while writing or reading a 1 GiB file with
# a 32 MiB decoded-chunk cache: pieces in flight, coder buffers, the cache, allocator
# slack (measured here: 100-200 MiB). A daemon holding the file would add >= 1 GiB.
GROWTH = 400 * MiB


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 << 20):
            h.update(b)
    return h.hexdigest()


@pytest.mark.parametrize("name,header", [("model.safetensors", True), ("weights.bin", False)])
def test_a_file_larger_than_the_caches_is_stored_and_read_in_bounded_memory(
        make_mount, tmp_path, name, header):
    """1 GiB through the model path (parsed tensors) and the generic one (content-
    defined chunks): the daemon's own memory (RssAnon) grows by far less than the file
    while it is written, sealed and read back cold."""
    src = tmp_path / name
    make_floats(src, GiB, header)
    m = make_mount("--cache-mb", "32")
    s = Sampler(m.pid)
    idle = s.status()["RssAnon"]
    with s:
        with open(src, "rb") as f, open(m.path / name, "wb") as out:
            while b := f.read(8 << 20):
                out.write(b)
        m.sync()
    assert s.peak_anon - idle < GROWTH, f"write grew by {(s.peak_anon - idle) // MiB} MiB"
    m.remount()
    s = Sampler(m.pid)
    idle = s.status()["RssAnon"]
    with s:
        assert _sha(m.path / name) == _sha(src)
    assert s.peak_anon - idle < GROWTH, f"read grew by {(s.peak_anon - idle) // MiB} MiB"


def _read_uncached(path: Path) -> None:
    """Read the whole file from the daemon: its pages dropped from the page cache first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 8 << 20):
            pass
    finally:
        os.close(fd)


def test_the_idle_daemon_gives_freed_memory_back(make_mount, tmp_path):
    """Reads that stream 1 GiB through the 256 MiB chunk cache four times: once idle,
    the daemon holds about its cache, not the pages its threads freed (glibc keeps them
    per thread arena: ~580-680 MiB here without the periodic malloc_trim, ~370 with)."""
    src = tmp_path / "weights.bin"
    make_floats(src, GiB, False)
    m = make_mount("--cache-mb", "256")
    idle = Sampler(m.pid).status()["RssAnon"]
    with open(src, "rb") as f, open(m.path / src.name, "wb") as out:
        while b := f.read(8 << 20):
            out.write(b)
    m.sync()
    for _ in range(4):
        _read_uncached(m.path / src.name)
    deadline = time.monotonic() + 15  # the trim follows the 5 s periodic sync
    while True:
        held = Sampler(m.pid).status()["RssAnon"] - idle
        if held < (256 + 128) * MiB or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert held < (256 + 128) * MiB, f"the idle daemon holds {held // MiB} MiB more than at mount"
