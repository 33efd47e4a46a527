#!/usr/bin/env python3
"""Stored size of model files through an elvesfs mount vs zstd -3 and zipnn, plus seal speed.

Scenarios (each in a fresh store, files copied in chronological order with `cp`,
then `elvesfs sync`; then the newest file is read cold, after a remount and
dropping the page cache, beside a cold read of the same file in a plain directory):

  series     three torch.save checkpoints (MiniLM + AdamW state) 50 steps apart
  five       a fine-tune as .safetensors and as .bin + the three checkpoints of its run
  zoo        MiniLM fp32, its bf16 and fp16 conversions, and the fine-tune pair
  elf        fp32 models (MiniLM + the fine-tune) under `--lossy elf` (native bound)
  gguf       MiniLM and its fine-tune as F16 GGUF files (written by llama.cpp's `gguf`
             package), the fine-tune after its base

Then, each on a fresh mount with the page cache dropped, `elvesfs scrub` (every stored
chunk verified online) is timed beside `cat` of every file through the mount, both
as logical MB/s.

Baselines run in the same process on the same files: zstd -3 of each file alone,
and zipnn (PyPI) of each file alone with the file's float dtype. The stored size of
elvesfs is the bytes of its chunks (`elvesfs stats`); the LMDB file size (what `df`
sees, including metadata and free pages) is shown beside it.

Usage: python scripts/bench_ingest.py [--workdir DIR] [--scenarios series,five,zoo,elf,gguf]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402


def cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "elvesfs.cli", *args], capture_output=True,
                       text=True, cwd=str(ROOT))
    if r.returncode:
        raise RuntimeError(f"elvesfs {' '.join(args)}: {r.stderr}")
    return r.stdout


def make_files(work: Path) -> dict[str, list[Path]]:
    """Create (once, cached in work) the model files of every scenario."""
    from safetensors.torch import load_file, save_file
    ck = work / "ckpt"
    ckpts = sorted(ck.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if len(ckpts) < 3:
        print("training MiniLM for 150 AdamW steps (checkpoints every 50) ...", file=sys.stderr)
        ckpts = zoo.train_checkpoints(ck, steps=150, every=50)
    ft = work / "ft"
    if not (ft / "pytorch_model.bin").exists():
        zoo.finetune_pair(ckpts[-1], ft)
    conv = work / "conv"
    if not (conv / "minilm-fp16.safetensors").exists():
        conv.mkdir(parents=True, exist_ok=True)
        sd = load_file(str(zoo.minilm_safetensors()))
        save_file({k: v.bfloat16() for k, v in sd.items()}, str(conv / "minilm-bf16.safetensors"))
        save_file({k: v.half() for k, v in sd.items()}, str(conv / "minilm-fp16.safetensors"))
    ggufs = [conv / "minilm-fp16.gguf", ft / "model-fp16.gguf"]
    for src, dst in zip([zoo.minilm_safetensors(), ft / "model.safetensors"], ggufs):
        if not dst.exists():  # llama.cpp's F16 export of the model and of its fine-tune
            zoo.write_gguf(dst, {k: (v.half() if v.is_floating_point() else v).numpy()
                                 for k, v in load_file(str(src)).items()},
                           arch="bert")
    base = zoo.minilm_safetensors()
    pair = [ft / "model.safetensors", ft / "pytorch_model.bin"]
    return {
        "gguf": ggufs,
        "series": ckpts,
        "five": pair + ckpts,
        "zoo": [base, conv / "minilm-bf16.safetensors", conv / "minilm-fp16.safetensors"] + pair,
        "elf": [base, ft / "model.safetensors"],
    }


def dest_name(p: Path) -> str:
    """Unique name in the mount: the source directory tells the models apart."""
    return f"{p.parent.name}-{p.name}"


def dtype_of(p: Path) -> str:
    return "bfloat16" if "bf16" in p.name else "float16" if "fp16" in p.name else "float32"


def zstd3(p: Path) -> int:
    import zstandard
    return len(zstandard.ZstdCompressor(level=3).compress(p.read_bytes()))


def zipnn_size(p: Path) -> int | None:
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    z = ZipNN(input_format="byte", bytearray_dtype=dtype_of(p))
    return len(z.compress(p.read_bytes()))


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("warning: cannot drop caches; reads may be warm", file=sys.stderr)


def cold_read_MBps(path: Path) -> float:
    """`cat` of a file with the page cache dropped first (root only; else it is warm)."""
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path.stat().st_size / (time.monotonic() - t0) / 1e6


def cold_seconds(mnt: Path, mount_args: list[str], argv: list[str]) -> float:
    """Seconds ``argv`` takes on a fresh mount (no decoded chunk cached) with the page
    cache dropped; `elvesfs scrub` exits 1 on damage, which this raises on."""
    cli("mount", *mount_args)
    try:
        drop_caches()
        t0 = time.monotonic()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=str(ROOT))
        return time.monotonic() - t0
    finally:
        cli("umount", str(mnt))


def run_scenario(name: str, files: list[Path], work: Path) -> dict:
    store, mnt = work / f"store-{name}", work / f"mnt-{name}"
    shutil.rmtree(store, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    extra = ["--lossy", "elf"] if name == "elf" else []
    cli("mount", str(mnt), "--store", str(store), *extra)
    try:
        t0 = time.monotonic()
        for f in files:
            subprocess.run(["cp", str(f), str(mnt / dest_name(f))], check=True)
        t_cp = time.monotonic() - t0
        cli("sync", str(mnt))
        t_all = time.monotonic() - t0
        st = json.loads(cli("stats", "--json", str(mnt)))
        du = sum((mnt / dest_name(f)).stat().st_blocks * 512 for f in files)
    finally:
        cli("umount", str(mnt))
    newest = files[-1]
    read_plain = cold_read_MBps(newest)
    cli("mount", str(mnt), "--store", str(store), *extra)
    try:
        read_fs = cold_read_MBps(mnt / dest_name(newest))
    finally:
        cli("umount", str(mnt))
    # verifying every stored chunk online vs reading every file through the mount
    margs = [str(mnt), "--store", str(store), *extra]
    t_scrub = cold_seconds(mnt, margs, [sys.executable, "-m", "elvesfs.cli", "scrub", str(mnt)])
    t_cat = cold_seconds(mnt, margs, ["cat", *[str(mnt / dest_name(f)) for f in files]])
    logical = sum(f.stat().st_size for f in files)
    z3 = sum(zstd3(f) for f in files)
    zn = [zipnn_size(f) for f in files]
    zn_total = None if None in zn else sum(zn)
    stored = st["store"]["stored"]
    per_file = {Path(f["path"]).name: f for f in st["files"]}
    max_err = max((f["max_error"] or 0) for f in st["files"])
    return {
        "scenario": name, "files": len(files), "logical": logical, "stored": stored,
        "db_bytes": st["store"]["db_bytes"], "du": du,
        "ratio": logical / stored, "zstd3_ratio": logical / z3,
        "zipnn_ratio": logical / zn_total if zn_total else None,
        "vs_zipnn": zn_total / stored if zn_total else None,
        "dedup_saved": st["store"]["dedup_saved"], "delta_saved": st["store"]["delta_saved"],
        "cp_MBps": logical / t_cp / 1e6, "cp_sync_MBps": logical / t_all / 1e6,
        "max_error": max_err, "read_MBps": read_fs, "read_plain_MBps": read_plain,
        "scrub_MBps": logical / t_scrub / 1e6, "cat_all_MBps": logical / t_cat / 1e6,
        "per_file": {k: round(v["ratio"] or 0, 3) for k, v in per_file.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", default="/var/tmp/elvesfs-bench-ingest")
    ap.add_argument("--scenarios", default="series,five,zoo,elf,gguf")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files = make_files(work)
    rows = [run_scenario(s, files[s], work) for s in a.scenarios.split(",")]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| scenario | files | logical MiB | elvesfs stored MiB (LMDB file) | elvesfs | zstd -3 | zipnn | elvesfs vs zipnn | dedup saved MiB | delta saved MiB | cp MB/s | cp+seal MB/s | cold read of the newest file MB/s (plain dir) | scrub MB/s (cat of every file) | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        zr = f"{r['zipnn_ratio']:.2f}x" if r["zipnn_ratio"] else "-"
        vz = f"{r['vs_zipnn']:.3f}x" if r["vs_zipnn"] else "-"
        print(f"| {r['scenario']} | {r['files']} | {r['logical'] / 2**20:.1f} | "
              f"{r['stored'] / 2**20:.1f} ({r['db_bytes'] / 2**20:.1f}) | {r['ratio']:.2f}x | "
              f"{r['zstd3_ratio']:.2f}x | {zr} | {vz} | {r['dedup_saved'] / 2**20:.1f} | "
              f"{r['delta_saved'] / 2**20:.1f} | {r['cp_MBps']:.0f} | {r['cp_sync_MBps']:.0f} | "
              f"{r['read_MBps']:.0f} ({r['read_plain_MBps']:.0f}) | "
              f"{r['scrub_MBps']:.0f} ({r['cat_all_MBps']:.0f}) | {r['max_error']:.3g} |")
    for r in rows:
        print(f"\n{r['scenario']}: per-file ratios {r['per_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
