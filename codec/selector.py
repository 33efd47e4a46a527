"""The selector (Elves' rule): try the allowed codecs on a sample of the chunk, encode
the whole chunk with the winner, and never store more than the raw frame."""
from __future__ import annotations

import numpy as np

from .base import REGISTRY
from .elf import native_bound

SLICE = 64 * 1024
NSLICES = 4
WHOLE_BELOW = 64 * 1024  # chunks up to this size: every candidate on the whole chunk
SMALL_SLICE = 16 * 1024  # the smallest sample slice


def candidates(dt, bound, reference) -> list[str]:
    from .api import lossy_allowed
    c = ["zstd"]
    if dt is not None and dt.itemsize > 1:
        c.append("planes")
    if lossy_allowed(dt, bound) and (bound == "native" or bound >= native_bound(dt)):
        c.append("elf")
    if reference is not None:
        c.append("xor")
    return c


def _make(name, dt, bound, reference, level):
    kw = {"dtype": dt.name if dt else None}
    if name in ("zstd", "planes", "elf", "xor"):
        kw["level"] = level
    if name == "elf":
        kw["bound"] = bound
    if name == "xor":
        kw["reference"] = reference
    return REGISTRY[name](**kw)


def sample_slices(nbytes: int, itemsize: int, slice_size: int = SLICE) -> list[tuple[int, int]]:
    """NSLICES element-aligned (start, stop) byte ranges spread over the chunk."""
    span = slice_size - slice_size % itemsize
    gap = (nbytes - span) / (NSLICES - 1)
    out = []
    for i in range(NSLICES):
        s = int(i * gap)
        s -= s % itemsize
        out.append((s, s + span))
    return out


def select(mv, dt, *, bound=None, reference=None, level=3) -> bytes:
    n = mv.nbytes
    raw = REGISTRY["raw"](dtype=dt.name if dt else None)
    if reference is not None and reference.nbytes != n:
        raise ValueError(f"reference has {reference.nbytes} bytes, data {n}")
    if n < 64:
        return raw.encode(mv)
    names = candidates(dt, bound, reference)
    if len(names) == 1:  # e.g. opaque bytes: nothing to choose, no sample pass
        best = _make(names[0], dt, bound, reference, level).encode(mv)
    elif n <= WHOLE_BELOW:
        frames = [_make(c, dt, bound, reference, level).encode(mv) for c in names]
        best = min(frames, key=len)
    else:
        size = dt.itemsize if dt else 1
        # slices of 1/32 of the chunk, 16..64 KiB each: the sample stays a small
        # fraction of the work
        parts = sample_slices(n, size, min(SLICE, max(SMALL_SLICE, n // 32)))
        a = np.frombuffer(mv, np.uint8)
        sample = np.concatenate([a[s:e] for s, e in parts])
        ref_sample = None
        if reference is not None:
            r = np.frombuffer(reference, np.uint8)
            ref_sample = np.concatenate([r[s:e] for s, e in parts])
        sizes = [len(_make(c, dt, bound, ref_sample, level).encode(sample)) for c in names]
        win = names[int(np.argmin(sizes))]
        best = _make(win, dt, bound, reference, level).encode(mv)
    if len(best) > n:  # coding barely paid: the smaller of it and the raw frame
        plain = raw.encode(mv)
        return plain if len(plain) <= len(best) else best
    return best
