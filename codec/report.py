"""The per-codec report on a file's tensors (``python -m codec``, ``elvesfs compress``):
ratio, encode/decode MB/s on one thread, max error, which codec each chunk got.

The caller reads the file and cuts its tensors into chunks (<= 4 MiB per tensor, as
the filesystem does); this module only codes them, so it knows no file format."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable

import numpy as np

from . import available_codecs, decode, encode, inspect
from .dtypes import BY_NAME

NPF = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
CODECS = "zstd,planes,elf,auto"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The report's options (shared by both commands)."""
    ap.add_argument("file")
    ap.add_argument("--bound", default=None, type=_bound,
                    help="absolute error bound for ELF (> 0), or 'native'")
    ap.add_argument("--codecs", default=CODECS, help=f"comma list (default {CODECS})")
    ap.add_argument("--chunk", type=_mib, default=4.0, help="chunk size in MiB (>= 1/64)")
    ap.add_argument("--protect", action="store_true",
                    help="with a parity of the sign+exponent streams (what the policy costs)")


def _bound(text: str) -> str | float:
    """--bound: 'native' or a positive number (argparse reports anything else)."""
    if text == "native":
        return text
    try:
        b = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'native': {text!r}") from None
    if not b > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return b


def _mib(text: str) -> float:
    """--chunk: at least 16 KiB, so a typo cannot make millions of tiny chunks."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 1 / 64:
        raise argparse.ArgumentTypeError(f"must be >= 1/64 (16 KiB): {text!r}")
    return v


def chunked(tensors: Iterable[tuple[str | None, memoryview]], chunk_bytes: int
            ) -> list[tuple[str | None, memoryview]]:
    """(dtype, bytes) pieces of at most chunk_bytes, whole elements each (dtypes the
    codecs do not know, None, are cut anywhere)."""
    out = []
    for dt, mv in tensors:
        size = BY_NAME[dt].itemsize if dt in BY_NAME else 1
        step = max(size, chunk_bytes - chunk_bytes % size)
        out += [(dt, mv[o:o + step]) for o in range(0, max(mv.nbytes, 1), step)]
    return out


def report(chunks: list[tuple[str | None, memoryview]], codecs: str, bound,
           protect: bool) -> int:
    """Print one line per codec; the exit status (2: an unknown codec, 1: a lossless
    round trip that differs)."""
    names = codecs.split(",")
    for name in names:
        if name != "auto" and name not in available_codecs():
            print(f"{name}: unknown codec (known: auto, {', '.join(available_codecs())})",
                  file=sys.stderr)
            return 2
    print(f"{'codec':8s} {'ratio':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s} {'max error':>10s}  picks")
    for name in names:
        b = "native" if name == "elf" and bound is None else bound
        if (line := _one_codec(chunks, name, b, protect)) is None:
            print(f"{name}: round trip mismatch!", file=sys.stderr)
            return 1
        print(line)
    return 0


def _one_codec(chunks, name: str, bound, protect: bool) -> str | None:
    """The report line of one codec, or None when a lossless round trip differs."""
    # untimed: the largest chunk of each dtype first, so the speeds do not include
    # loading (or, the first time ever, compiling) the codec's numba kernels
    largest: dict = {}
    for dt, c in chunks:
        if dt not in largest or c.nbytes > largest[dt].nbytes:
            largest[dt] = c
    for dt, c in largest.items():
        decode(encode(c, dt, codec=name, bound=bound, protect=protect))
    raw = stored = 0
    te = td = err = 0.0
    picks: dict[str, int] = {}
    for dt, c in chunks:
        t0 = time.perf_counter()
        f = encode(c, dt, codec=name, bound=bound, protect=protect)
        t1 = time.perf_counter()
        dec = decode(f)
        td += time.perf_counter() - t1
        te += t1 - t0
        raw += c.nbytes
        stored += len(f)
        info = inspect(f)
        picks[info.codec] = picks.get(info.codec, 0) + 1
        if info.lossy:
            x = np.frombuffer(c, NPF[dt]).astype(np.float64)
            y = np.frombuffer(dec, NPF[dt]).astype(np.float64)
            ok = np.isfinite(x)
            if ok.any():
                err = max(err, float(np.abs(x[ok] - y[ok]).max()))
        elif dec != c:
            return None
    return (f"{name:8s} {raw / max(stored, 1):6.3f}x {raw / max(te, 1e-9) / 1e6:9.0f} "
            f"{raw / max(td, 1e-9) / 1e6:9.0f} {err:10.3g}  {picks}")
