"""A write-only handle of a file nobody else has open writes around the kernel page cache
(direct_io, see Operations._open_handle). These tests hold the mount to what every
program relies on meanwhile: a read after a write() returns sees it, whatever handle,
mapping or cache the reader has. Each sequence runs on a plain directory too, the oracle.
(Linux >= 6.6 itself drops cached pages before a direct write, so on such a kernel these
pass even without the daemon's own dropping, which older kernels need.)
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import Iterator

PAGE = 4096
OLD, NEW, MAPPED = b"o" * (4 * PAGE), b"N" * PAGE, b"m" * PAGE


@contextlib.contextmanager
def writer_and(path: Path, second: int) -> Iterator[tuple[int, int]]:
    """A write-only handle of a fresh 4-page file (sole: direct on elvesfs), then a
    second handle opened beside it with flags `second` (a page-cache handle)."""
    path.write_bytes(OLD)
    w = os.open(path, os.O_WRONLY)
    try:
        other = os.open(path, second)
        try:
            yield w, other
        finally:
            os.close(other)
    finally:
        os.close(w)


def reader_open_while_writing(d: Path) -> list[bytes]:
    """A reader opened after the (direct) writer caches pages, then the writer rewrites
    them: the reader's next read and its shared mapping must show the new bytes."""
    p = d / "f"
    with writer_and(p, os.O_RDONLY) as (w, r):
        seen = [os.pread(r, 4 * PAGE, 0)]  # now cached
        m = mmap.mmap(r, 4 * PAGE, prot=mmap.PROT_READ)
        seen.append(m[PAGE:2 * PAGE])
        os.pwrite(w, NEW, PAGE)
        seen.append(os.pread(r, 4 * PAGE, 0))
        seen.append(m[PAGE:2 * PAGE])
        os.pwrite(w, NEW, 3 * PAGE)
        seen.append(m[:])
        m.close()
    seen.append(p.read_bytes())
    return seen


def cached_before_writer(d: Path) -> list[bytes]:
    """Pages cached by a reader that has since closed (kept across opens) must not be
    served after a write-only handle, opened without O_TRUNC, rewrote them."""
    p = d / "f"
    p.write_bytes(OLD)
    with open(p, "rb") as f:
        first = f.read()
    w = os.open(p, os.O_WRONLY)
    os.pwrite(w, NEW, 0)
    with open(p, "rb") as f:  # while the writer is still open
        during = f.read()
    os.close(w)
    return [first, during, p.read_bytes()]


def mapped_write_then_direct_write(d: Path) -> list[bytes]:
    """A shared mapping stores into a page, then the direct writer writes the same page:
    the later write() wins, as on any filesystem (the mapping's dirty page is written
    back before the direct write, not after it)."""
    p = d / "f"
    with writer_and(p, os.O_RDWR) as (w, rw):
        m = mmap.mmap(rw, 4 * PAGE)
        m[PAGE:2 * PAGE] = MAPPED       # dirty, not yet written back
        m[2 * PAGE:3 * PAGE] = MAPPED   # a page the writer leaves alone
        os.pwrite(w, NEW, PAGE)
        seen = [m[:]]
        m.flush()
        m.close()
    seen.append(p.read_bytes())
    return seen


def test_reader_opened_while_a_direct_writer_writes(shared_dir: Path, tmp_path: Path):
    got = reader_open_while_writing(shared_dir)
    assert got == reader_open_while_writing(tmp_path)
    assert got[2][PAGE:2 * PAGE] == NEW and got[-1][3 * PAGE:] == NEW


def test_pages_cached_before_a_direct_writer(shared_dir: Path, tmp_path: Path):
    got = cached_before_writer(shared_dir)
    assert got == cached_before_writer(tmp_path)
    assert got[1][:PAGE] == NEW


def test_shared_mapping_then_direct_write(shared_dir: Path, tmp_path: Path):
    got = mapped_write_then_direct_write(shared_dir)
    assert got == mapped_write_then_direct_write(tmp_path)
    assert got[-1][PAGE:3 * PAGE] == NEW + MAPPED


def test_copies_through_a_direct_writer_read_back(shared_dir: Path):
    """cp-like: a new file written in 1 MiB pieces by a sole write-only handle, read
    back while still open and after close, equal to what was written."""
    data = os.urandom(3 << 20) + bytes(1 << 20)
    p = shared_dir / "big"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), 1 << 20):
            assert os.pwrite(fd, data[off:off + (1 << 20)], off) == 1 << 20
        assert p.read_bytes() == data
    finally:
        os.close(fd)
    assert p.read_bytes() == data
