#!/usr/bin/env python3
"""Disk used by a training run that rotates its checkpoints, through an elvesfs mount.

A training loop (MiniLM + AdamW, lr 2e-5, tests/zoo.py's toy objective) `torch.save`s
{model, optimizer} every --every steps into checkpoint-<step>/training_state.pt and
deletes all but the newest --keep checkpoints after each save, as Hugging Face
Trainer's `save_total_limit` does. The same run writes the same files into the mount
and into a plain directory. After each save + rotation + `elvesfs sync`, the row
shows, for the files alive at that moment:

  logical    their size (`du --apparent-size`; the plain directory's use)
  elvesfs    `du` of the mount (st_blocks: each file's share of the stored chunks, so
             the sum is the store's chunk bytes, including deleted versions that
             deltas still need)
  zstd -3, zipnn   each live file compressed alone (baselines, same run)
  save+sync s      both torch.saves (mount and plain), the rotation and `elvesfs sync`

Usage: python scripts/bench_rotation.py [--steps 300] [--every 25] [--keep 2] [--workdir DIR]
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
sys.path.insert(0, str(ROOT / "scripts"))
import zoo  # noqa: E402
from bench_ingest import cli, zipnn_size, zstd3  # noqa: E402


def du(path: Path, apparent: bool = False) -> int:
    args = ["du", "-s", "--block-size=1"] + (["--apparent-size"] if apparent else [])
    return int(subprocess.run(args + [str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def run(steps: int, every: int, keep: int, work: Path) -> list[dict]:
    import torch
    torch.set_num_threads(1)
    plain, store, mnt = work / "plain", work / "store", work / "mnt"
    for d in (plain, store):
        shutil.rmtree(d, ignore_errors=True)
    plain.mkdir(parents=True)
    mnt.mkdir(exist_ok=True)
    cli("mount", str(mnt), "--store", str(store))
    rows: list[dict] = []
    baseline: dict[str, tuple[int, int | None]] = {}  # checkpoint -> (zstd -3, zipnn)
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = zoo.load_bert(zoo.minilm_dir())
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        target = torch.randn(model.config.hidden_size, generator=gen)
        live: list[str] = []
        for step in range(1, steps + 1):
            out = model(**zoo._batch(gen, model.config.vocab_size)).last_hidden_state
            loss = ((out.mean(dim=1) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % every:
                continue
            name = f"checkpoint-{step}"
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
            t0 = time.monotonic()
            for top in (mnt, plain):
                (top / name).mkdir()
                torch.save(state, top / name / "training_state.pt")
            live.append(name)
            while keep and len(live) > keep:
                gone = live.pop(0)
                for top in (mnt, plain):
                    shutil.rmtree(top / gone)
            cli("sync", str(mnt))
            seconds = time.monotonic() - t0
            f = plain / name / "training_state.pt"
            baseline[name] = (zstd3(f), zipnn_size(f))
            zn = [baseline[n][1] for n in live]
            rows.append({
                "step": step, "live": len(live), "logical": du(plain, apparent=True),
                "elvesfs": du(mnt), "zstd3": sum(baseline[n][0] for n in live),
                "zipnn": None if None in zn else sum(zn), "save_sync_s": round(seconds, 2),
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        st = json.loads(cli("stats", "--json", str(mnt)))
        rows.append({"store": st["store"]})
    finally:
        cli("umount", str(mnt))
    return rows


def table(rows: list[dict], keep: int, every: int) -> str:
    mb = 1e6
    out = [f"Checkpoints every {every} steps, the newest {keep or 'all'} kept "
           "(MB; ratio = logical / stored):", "",
           "| step | live files | logical | elvesfs | ratio | zstd -3 | zipnn | save+sync s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step" not in r:
            continue
        zn = f"{r['zipnn'] / mb:.1f}" if r["zipnn"] else "n/a"
        out.append(f"| {r['step']} | {r['live']} | {r['logical'] / mb:.1f} | "
                   f"{r['elvesfs'] / mb:.1f} | **{r['logical'] / r['elvesfs']:.2f}x** | "
                   f"{r['zstd3'] / mb:.1f} | {zn} | {r['save_sync_s']} |")
    steady = [r for r in rows if "step" in r and r["live"] == max(x.get("live", 0) for x in rows)]
    if steady:
        lo = sum(r["logical"] for r in steady)
        out += ["", f"Over the {len(steady)} rows with {steady[0]['live']} live files: "
                f"elvesfs {lo / sum(r['elvesfs'] for r in steady):.2f}x, "
                f"zstd -3 {lo / sum(r['zstd3'] for r in steady):.2f}x"
                + (f", zipnn {lo / sum(r['zipnn'] for r in steady):.2f}x"
                   if all(r["zipnn"] for r in steady) else "")
                + f"; elvesfs at the end {rows[-2]['logical'] / rows[-2]['elvesfs']:.2f}x."]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    ap.add_argument("--workdir", default="/var/tmp/elvesfs-bench-rotation")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows = run(a.steps, a.every, a.keep, work)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=str(ROOT)).stdout.strip()
    print(table(rows, a.keep, a.every))
    print(f"\nelvesfs code measured: commit {head}; {(time.monotonic() - t0) / 60:.1f} min in all.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
