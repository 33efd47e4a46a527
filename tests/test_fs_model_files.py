"""Model-based test with model files: the random operations of test_fs_model_based.py,
plus saves of safetensors files and torch.save checkpoints, on the mount and on a plain
directory, compared after every step (listing, sizes, link counts, bytes).

The saves are versions of a few model "families" (each version a few small optimizer-like
steps away from the one before), so a save is coded as XOR deltas of an earlier version
still in the store; the generic rules then overwrite them in place, truncate, rename and
unlink them (unlinking a delta's reference makes the sealer code its users again). A save
writes the file in one piece, in pieces, written aside and renamed over the old one (an
editor, save_pretrained), or over the old bytes without truncating (a broken file, which
must be stored as plain bytes). One family is big enough (36 MiB) to be pre-sealed while
it is written. Half of the examples run under a `protect` policy. Whether the model
paths really ran is asserted from `elvesfs stats` at the end: a test that never coded a
tensor or a delta would prove nothing about them. CI runs one fixed sequence
(derandomized, so that assertion cannot flake); `scripts/soak.py` runs new ones.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

from conftest import check_store
from test_fs_model_based import PATHS, Counters, FsMachine, picture

SMALL = {"emb": (1024, 160), "w": (256, 256), "h": (128, 128)}  # emb: 160 Ki values,
BIG = {"emb": (2304, 4096), "w": (256, 256), "h": (128, 128)}   # past CTX_DIRECT
FAMILIES = {0: SMALL, 1: SMALL, 2: BIG}
PIECE = 1 << 20  # a writer in pieces writes this much per call, like cp


@functools.lru_cache(maxsize=8)
def weights(family: int, version: int) -> dict[str, np.ndarray]:
    """A family's float32 weights at a version: version 0 drawn from the family's seed,
    each later one a few hundredths of a percent away (decay, plus noise on a quarter of
    the rows, as rows of tokens absent from a batch only decay)."""
    if version == 0:
        rng = np.random.default_rng(family)
        return {k: rng.normal(0, 0.05, shape).astype(np.float32)
                for k, shape in FAMILIES[family].items()}
    prev = weights(family, version - 1)
    rng = np.random.default_rng((family, version))
    out = {}
    for k, w in prev.items():
        step = w * np.float32(-1e-4)
        rows = rng.random(w.shape[0]) < 0.25
        step[rows] += rng.normal(0, 2e-4, (int(rows.sum()), w.shape[1])).astype(np.float32)
        out[k] = w + step
    return out


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """bfloat16 as its uint16 bits (the top half of each float32)."""
    return (a.view(np.uint32) >> 16).astype(np.uint16)


def _tensors(family: int, version: int) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype, array): float32, bfloat16 and float16 weights, an int64
    tensor and a small float32 vector."""
    w = weights(family, version)
    return {
        "embed.weight": ("F32", w["emb"]),
        "layer.weight": ("BF16", _bf16_bits(w["w"])),
        "head.weight": ("F16", w["h"].astype(np.float16)),
        "position_ids": ("I64", np.arange(512, dtype=np.int64)),
        "norm.bias": ("F32", w["w"][0, :64].copy()),
    }


def safetensors_bytes(family: int, version: int) -> bytes:
    """The file safetensors' save_file would write (header padded to 8 bytes)."""
    header, data, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dt, a) in _tensors(family, version).items():
        b = a.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        data.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(data)


def torch_bytes(family: int, version: int) -> bytes:
    """A torch.save checkpoint of the same tensors (bf16 as torch.bfloat16), with a step."""
    import torch
    sd = {}
    for name, (dt, a) in _tensors(family, version).items():
        t = torch.from_numpy(a.copy())
        sd[name] = t.view(torch.bfloat16) if dt == "BF16" else t
    buf = io.BytesIO()
    torch.save({"model": sd, "step": version * 50}, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def model_file(fmt: str, family: int, version: int) -> bytes:
    return (safetensors_bytes if fmt == "safetensors" else torch_bytes)(family, version)


def write_file(path: Path, data: bytes, style: str) -> int:
    """Save ``data`` at ``path`` the way a writer of that ``style`` does."""
    if style == "replace":  # write aside, then rename over the old file
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.rename(tmp, path)
        return len(data)
    flags = os.O_WRONLY | os.O_CREAT | (0 if style == "inplace" else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        if style == "pieces":
            view = memoryview(data)
            return sum(os.write(fd, view[i:i + PIECE]) for i in range(0, len(data), PIECE))
        return os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


class ModelFileMachine(FsMachine):
    subdir = "model-files"
    counters = Counters()
    formats: set = set()  # what `elvesfs stats` said the checked saves were parsed as
    # (None for an empty file that was never sealed: it has no seal record)
    deltas = 0  # checked saves stored (in part) as deltas of an earlier version
    tensor_saves = 0  # checked saves whose tensors were parsed

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[tuple[str, int, int]] = []  # (format, family, version) saved
        if self.counters.examples % 2:
            os.setxattr(self.a, "user.elvesfs.policy", b"protect")  # inherited below

    @rule(path=st.sampled_from(PATHS),
          fmt=st.sampled_from(["safetensors", "torch"]),
          family=st.sampled_from([0, 0, 1, 1, 2]),
          version=st.integers(0, 3),
          style=st.sampled_from(["whole", "pieces", "replace", "inplace"]),
          check=st.booleans())
    def save_model(self, path, fmt, family, version, style, check):
        data = model_file(fmt, family, version)
        r = self.both(write_file, path, args=(data, style))
        if r[0] == "ok":
            self.saved.append((fmt, family, version))
            if check and style != "inplace":
                self._check_stats(self.a / path)

    @precondition(lambda self: self.saved)
    @rule(data=st.data(), path=st.sampled_from(PATHS),
          style=st.sampled_from(["whole", "pieces", "replace"]))
    def save_next_version(self, data, path, style):
        """The next checkpoint of a model saved before (a training run's next save),
        always checked: these are the saves that should be coded as deltas."""
        fmt, family, version = data.draw(st.sampled_from(self.saved))
        self.save_model(path, fmt, family, (version + 1) % 4, style, True)

    @precondition(lambda self: not self.remounted)
    @rule()
    def crash(self):
        """kill -9 of the daemon (seals, collections and re-codings may be running), then
        mount again: every write that returned is in the staging files or the store, so
        the tree must still equal the plain one (the invariants check it)."""
        self.close_all()
        self.remounted = True
        if self.counters.remounts >= self.max_remounts:  # rationed, as remount is
            return
        self.counters.remounts += 1
        self.counters.kills += 1
        self.mount.kill9()
        self.mount.mount()
        assert check_store(self.mount.store, mounted=True) == []

    def _check_stats(self, path: Path) -> None:
        """Seal everything, then record how the save at ``path`` was stored."""
        self.sync()
        out = subprocess.run([sys.executable, "-m", "elvesfs.cli", "stats", "--json", str(path)],
                             capture_output=True, text=True, check=True)
        (f,) = json.loads(out.stdout)["files"]
        type(self).formats.add(f["format"])
        if f["tensors"]:
            type(self).tensor_saves += 1
        if "xor" in f["codecs"]:  # as stored now (a dedup of an earlier delta counts)
            type(self).deltas += 1


def test_model_files_model_based(shared_mount, tmp_path):
    M = ModelFileMachine
    M.mount = shared_mount
    M.plain_root = tmp_path / "plain"
    (shared_mount.path / M.subdir).mkdir(exist_ok=True)
    run_state_machine_as_test(
        M, settings=settings(max_examples=12, stateful_step_count=30, deadline=None,
                             database=None, print_blob=True, derandomize=True,
                             suppress_health_check=list(HealthCheck)))
    print(f"{M.counters.steps} steps, {M.counters.remounts} remounts, {M.counters.kills} of them kill -9s; checked saves: {M.tensor_saves} with tensors, "
          f"{M.deltas} stored as deltas, formats {sorted(M.formats, key=str)}")
    # the model paths really ran: tensors parsed from both formats, and deltas coded
    assert {"safetensors", "torch-zip"} <= M.formats, M.formats
    assert M.tensor_saves > 0 and M.deltas > 0, (M.tensor_saves, M.deltas)
    shared_mount.sync()
    assert check_store(shared_mount.store, mounted=True) == []
    for ex in (shared_mount.path / M.subdir).iterdir():
        assert picture(ex) == picture(M.plain_root / ex.name)
