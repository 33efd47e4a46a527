#!/usr/bin/env python3
"""Long random soaks of a real mount, beyond what CI runs (minutes to hours).

  fsx    the fsx-style exerciser of tests/test_fs_tools.py on new seeds, with larger
         files and operations, a remount midway through each seed, the whole file
         compared after every 250 operations and at the end
  model  the hypothesis state machine of tests/test_fs_model_based.py (the mount against
         a plain directory after every step) with many more examples and steps
  files  the same with model files (tests/test_fs_model_files.py): safetensors and
         torch.save versions coded as deltas, overwritten, renamed and unlinked
  power  the power cuts of tests/test_power_cut.py (the store on tests/crashfs.py) on
         new seeds: a rollback to the last sync, a checkpoint rotation and a large
         pre-sealed file, each cut at a seeded moment

Then `elvesfs sync` and an independent check of the store (tests/conftest.check_store).
Each soak mounts its own store under --workdir (a FUSE daemon in its own process) and
always unmounts it. Exit status 0 only if every soak passed.

    . .venv/bin/activate
    python scripts/soak.py              # fsx 6 seeds x 6000 ops, model 1000 x 80, files 200 x 50,
                                        # power 10 seeds x 3 cuts
    python scripts/soak.py --fsx-seeds 0 --examples 0 --files-examples 50
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Mount, check_store  # noqa: E402  (the tests' own mount fixture)


def soak_fsx(work: Path, seeds: int, ops: int, first_seed: int) -> None:
    from test_fs_tools import Fsx
    m = Mount(work)
    m.mount()
    try:
        for seed in range(first_seed, first_seed + seeds):
            f = Fsx(m.path / f"fsx.{seed}", m, seed=seed, maxlen=8 << 20, maxop=512 << 10)
            f.run(ops, remount_at=ops // 2)
            m.sync()
            if (m.path / f"fsx.{seed}").read_bytes() != bytes(f.model):
                raise AssertionError(f"fsx seed {seed}: file differs after sync")
            print(f"fsx seed {seed}: ok {dict(sorted(f.counts.items()))}", flush=True)
        problems = check_store(m.store, mounted=True)
        if problems:
            raise AssertionError(f"store check: {problems}")
    finally:
        m.cleanup()


def soak_machine(work: Path, machine, examples: int, steps: int) -> None:
    """Run a state machine of the tests (the mount against a plain directory) at length."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    m = Mount(work, ("-o", "allow_other"))
    m.mount()
    try:
        machine.mount = m
        machine.plain_root = work / "plain"
        machine.max_remounts = max(4, examples // 10)  # remounts and kill -9s cost seconds
        (m.path / machine.subdir).mkdir(exist_ok=True)
        run_state_machine_as_test(machine, settings=settings(
            max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
            print_blob=True, suppress_health_check=list(HealthCheck)))
        m.sync()
        problems = check_store(m.store, mounted=True)
        if problems:
            raise AssertionError(f"store check: {problems}")
        print(f"{machine.__name__}: ok, {machine.counters.steps} steps", flush=True)
    finally:
        m.cleanup()


def soak_model(work: Path, examples: int, steps: int) -> None:
    from test_fs_model_based import FsMachine
    soak_machine(work, FsMachine, examples, steps)


def soak_model_files(work: Path, examples: int, steps: int) -> None:
    from test_fs_model_files import ModelFileMachine as M
    soak_machine(work, M, examples, steps)
    print(f"model files: parsed as {sorted(M.formats, key=str)}, {M.tensor_saves} checked "
          f"saves with tensors, {M.deltas} stored as deltas", flush=True)


def soak_power(work: Path, seeds: int, first_seed: int) -> None:
    """The power-cut tests of tests/test_power_cut.py (the store on tests/crashfs.py,
    cut under a live mount) on new seeds, each in its own directory."""
    import pytest
    import test_power_cut as pc
    for seed in range(first_seed, first_seed + seeds):
        for name in pc.SOAKED:
            d = Path(tempfile.mkdtemp(prefix=f"power-{seed}-", dir=work))
            mp = pytest.MonkeyPatch()
            try:
                with pc.crash_mount(d, mp) as crashed:
                    getattr(pc, name)(crashed, mp, seed)
            finally:
                mp.undo()
            shutil.rmtree(d, ignore_errors=True)
        print(f"power seed {seed}: ok ({len(pc.SOAKED)} cuts)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--fsx-seeds", type=int, default=6)
    p.add_argument("--fsx-ops", type=int, default=6000)
    p.add_argument("--first-seed", type=int, default=100, help="CI's fsx uses seeds 1 and 2")
    p.add_argument("--examples", type=int, default=1000, help="model-based examples (0: skip)")
    p.add_argument("--steps", type=int, default=80, help="steps per model-based example")
    p.add_argument("--files-examples", type=int, default=200,
                   help="model-based examples with model files (0: skip)")
    p.add_argument("--files-steps", type=int, default=50, help="steps per such example")
    p.add_argument("--power-seeds", type=int, default=10,
                   help="seeds of the power-cut tests, 3 cuts each (0: skip; from --first-seed)")
    a = p.parse_args(argv)
    failed = []
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)  # mkdtemp below needs it
    soaks = (("fsx", a.fsx_seeds, lambda w: soak_fsx(w, a.fsx_seeds, a.fsx_ops, a.first_seed)),
             ("model", a.examples, lambda w: soak_model(w, a.examples, a.steps)),
             ("files", a.files_examples,
              lambda w: soak_model_files(w, a.files_examples, a.files_steps)),
             ("power", a.power_seeds, lambda w: soak_power(w, a.power_seeds, a.first_seed)))
    for name, count, run in soaks:
        if count <= 0:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"elvesfs-soak-{name}-", dir=a.workdir))
        try:
            run(work)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            print(f"{name}: kept {work} (store and its log)", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("soak:", "FAILED " + ", ".join(failed) if failed else "all passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
