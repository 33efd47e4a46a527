#!/usr/bin/env python3
"""The daemon's memory while it stores and serves files larger than its caches.

For each --sizes (GiB), a safetensors file of 64 MiB float32 tensors and a torch.save
checkpoint of the same (model paths: parsed, coded per tensor), and the same floats as a
headerless .bin (generic path: content-defined chunks) are written with `cp` into a fresh mount, then `elvesfs sync`;
then, after unmount + drop_caches + mount, read with `cat`. A sampler reads the
daemon's /proc/PID/status every 10 ms:

  RssAnon   the daemon's own memory (heap, numpy buffers, decoded-chunk cache): what
            must stay bounded, whatever the file size
  VmHWM     peak resident set, including file-backed pages of LMDB's memory map (page
            cache the kernel reclaims at will; reported, not bounded by elvesfs)

Columns: the idle daemon after mount, the peak during each phase, and RssAnon 6 s
after the read (one sync period: the daemon then trims its allocator). A daemon that
held whole files would grow by the file size between the two sizes.

Usage: python scripts/bench_memory.py [--sizes 1,4] [--cache-mb 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_fs import drop_caches  # noqa: E402
from bench_ingest import cli  # noqa: E402

TENSOR = 64 << 20
MiB = 1 << 20


def _blocks(n: int):
    """n different 64 MiB blocks of float32 weights, N(0, 0.02)."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(TENSOR // 4) * 0.02).astype(np.float32)
    for i in range(n):
        yield base * np.float32(1 + (i + 1) * 1e-3)


def make_checkpoint(path: Path, size: int) -> None:
    """The same weights as a torch.save'd state dict (the zip checkpoint path)."""
    import torch
    torch.save({f"layers.{i}.weight": torch.from_numpy(b.reshape(-1, 1024))
                for i, b in enumerate(_blocks(size // TENSOR))}, path)


def make_floats(path: Path, size: int, header: bool) -> None:
    """`size` bytes of float32 weights (every 64 MiB block different), as a safetensors
    file of 64 MiB tensors (`header`) or as bare bytes, written in blocks."""
    n = size // TENSOR
    with open(path, "wb") as f:
        if header:
            meta = {f"layers.{i}.weight": {"dtype": "F32", "shape": [TENSOR // 4096, 1024],
                                           "data_offsets": [i * TENSOR, (i + 1) * TENSOR]}
                    for i in range(n)}
            h = json.dumps(meta).encode()
            h += b" " * (-len(h) % 8)
            f.write(len(h).to_bytes(8, "little") + h)
        for b in _blocks(n):
            f.write(b.tobytes())


class Sampler:
    """Peak RssAnon / VmHWM of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_anon, self.hwm = pid, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def status(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0]) << 10
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = self.status()
            except OSError:
                return
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.hwm = max(self.hwm, s["VmHWM"])
            time.sleep(0.01)

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def daemon_pid(store: Path) -> int:
    return int((store / "daemon.lock").read_text().strip())


def _phase(mnt: Path, store: Path, opts: tuple, row: dict, name: str, cmd: list[str],
           after: float = 0) -> int:
    """Mount, run `cmd` while sampling the daemon, unmount; the peaks (and, `after` s
    later, RssAnon) go into `row` under `name`. Returns cmd's exit code."""
    cli("mount", str(mnt), *opts)
    try:
        time.sleep(1)
        s = Sampler(daemon_pid(store))
        row["idle" if name == "write" else f"idle_{name}"] = s.status()["RssAnon"]
        with s:
            t0 = time.monotonic()
            rc = subprocess.run(cmd).returncode
            if name == "write":
                cli("sync", str(mnt))
            row[f"{name}_s"] = round(time.monotonic() - t0, 1)
        row[f"{name}_anon"], row[f"{name}_hwm"] = s.peak_anon, s.hwm
        if after:
            time.sleep(after)
            row[f"after_{name}"] = s.status()["RssAnon"]
    finally:
        cli("umount", str(mnt))
    return rc


def measure(src: Path, work: Path, cache_mb: int) -> dict:
    """Write `src` into a fresh mount, sync, remount cold, read it; the memory of each."""
    store, mnt = work / "store", work / "mnt"
    shutil.rmtree(store, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    opts = ("--store", str(store), "--cache-mb", str(cache_mb))
    row: dict = {"file": src.name, "GiB": round(src.stat().st_size / (1 << 30), 2)}
    if _phase(mnt, store, opts, row, "write", ["cp", str(src), str(mnt / src.name)]):
        raise RuntimeError(f"cp of {src} into the mount failed")
    drop_caches()
    # 6 s after the read: one 5 s sync period, after which the daemon trims its allocator
    rc = _phase(mnt, store, opts, row, "read", ["cmp", str(mnt / src.name), str(src)], 6)
    row["exact"] = rc == 0
    return row


def table(rows: list[dict], cache_mb: int) -> str:
    out = [f"Daemon memory, MiB (decoded-chunk cache {cache_mb} MiB; RssAnon = its own "
           "memory, VmHWM also counts LMDB map pages):", "",
           "| file | GiB | idle | write+sync peak RssAnon | (VmHWM) | cold read peak "
           "RssAnon | (VmHWM) | 6 s later | read exact |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['file']} | {r['GiB']} | {r['idle'] // MiB} | "
                   f"**{r['write_anon'] // MiB}** | {r['write_hwm'] // MiB} | "
                   f"**{r['read_anon'] // MiB}** | {r['read_hwm'] // MiB} | "
                   f"{r['after_read'] // MiB} | {r['exact']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4", help="file sizes in GiB, comma-separated")
    ap.add_argument("--cache-mb", type=int, default=256)
    ap.add_argument("--workdir", default="/var/tmp/elvesfs-bench-memory")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows = []
    try:
        for gib in (float(x) for x in a.sizes.split(",")):
            size = int(gib * (1 << 30)) // TENSOR * TENSOR
            for name, make in (("model.safetensors", lambda p: make_floats(p, size, True)),
                               ("checkpoint.pt", lambda p: make_checkpoint(p, size)),
                               ("weights.bin", lambda p: make_floats(p, size, False))):
                src = work / f"{gib:g}G-{name}"
                make(src)
                try:
                    rows.append(measure(src, work, a.cache_mb))
                finally:
                    src.unlink()
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work / "store", ignore_errors=True)
    print(table(rows, a.cache_mb))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    print(f"\nelvesfs code measured: commit {head}; {os.cpu_count()} CPUs; "
          f"{(time.monotonic() - t0) / 60:.1f} min in all.")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
