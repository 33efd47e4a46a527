"""The daemon's memory stays bounded by its caches, not by the size of the files.

scripts/bench_memory.py measures the same at 1 and 4 GiB (README, "Memory")."""

from __future__ import annotations

import hashlib
import sys
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
