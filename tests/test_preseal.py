"""Pre-seal: a long sequential write is coded into the store while the writer goes on.

What users rely on: the bytes read back are the bytes written whatever the writer does
after a pre-seal (overwrites, truncates, unlinks, a crash), the pre-sealed chunks count
as the file's own (not as dedup), and no garbage or wrong refcount is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, check_store, sha_file

MiB = 1 << 20


def stored_chunks(store) -> int:
    """Chunks in the store right now (read from LMDB beside the running daemon)."""
    from elvesfs.db import Database
    db = Database(str(store), readonly=True)
    try:
        with db.read() as txn:
            return txn.stat(db.t["refs"])["entries"]
    finally:
        db.close()


def wait_for_chunks(store, at_least: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = stored_chunks(store)
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def write_blocks(fd: int, h, blocks: int, seed: int) -> None:
    """Append `blocks` MiB of pseudo-random bytes (seeded: cheap and distinct per seed)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for _ in range(blocks):
        b = rng.integers(0, 256, MiB, dtype=np.uint8).tobytes()
        os.write(fd, b)
        h.update(b)


def assert_kept_after_remount(mnt, path, sha: str) -> None:
    """The bytes survive a remount, and the unmounted store passes the invariant check."""
    mnt.remount()
    assert sha_file(path) == sha
    mnt.umount()
    assert check_store(mnt.store) == []


def blocks(n: int, seed: int) -> bytes:
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, n * MiB, dtype=np.uint8).tobytes()


def file_stats(path) -> dict:
    r = subprocess.run([sys.executable, "-m", "elvesfs.cli", "stats", "--json", str(path)],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert r.returncode == 0, r.stderr
    (f,) = json.loads(r.stdout)["files"]
    return f


def assert_counted_as_own(path, size: int) -> None:
    """Every byte of a sealed file is its own new chunk: pre-sealed chunks are not dedup
    hits (a dropped pre-seal whose chunks the final seal finds again would be)."""
    f = file_stats(path)
    assert f["state"] == "sealed" and f["logical"] == size, f
    assert f["dedup_saved"] == 0, f
    assert sum(c["raw"] for c in f["codecs"].values()) == size, f


def test_sequential_write_is_stored_before_close_and_counted_as_new(mnt):
    path = mnt.path / "big.bin"
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_blocks(fd, h, 80, seed=1)
        # the file is still open: only a pre-seal can have put its chunks in the store
        assert wait_for_chunks(mnt.store, 40) >= 40, mnt.log()[-3000:]
        write_blocks(fd, h, 16, seed=2)
    finally:
        os.close(fd)
    mnt.sync()
    assert sha_file(path) == h.hexdigest()
    assert_counted_as_own(path, 96 * MiB)
    assert_kept_after_remount(mnt, path, h.hexdigest())


def test_writes_arriving_out_of_order_keep_the_preseal(mnt):
    """Concurrent writers (or the kernel) may deliver block k+1 before block k: the gap
    is not a rewrite, so the pre-seal must wait for it, not read zeros or give up."""
    path = mnt.path / "swapped.bin"
    data = blocks(96, seed=5)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for k in range(0, 80, 2):  # blocks 1, 0, 3, 2, ...
            os.pwrite(fd, data[(k + 1) * MiB:(k + 2) * MiB], (k + 1) * MiB)
            os.pwrite(fd, data[k * MiB:(k + 1) * MiB], k * MiB)
        assert wait_for_chunks(mnt.store, 40) >= 40, mnt.log()[-3000:]
        os.pwrite(fd, data[80 * MiB:], 80 * MiB)
    finally:
        os.close(fd)
    mnt.sync()
    want = hashlib.sha256(data).hexdigest()
    assert sha_file(path) == want
    assert_counted_as_own(path, 96 * MiB)
    assert_kept_after_remount(mnt, path, want)


def test_unmount_right_after_close_keeps_the_preseal(mnt):
    """A file closed just before unmount is sealed on the way out, from its pre-seal."""
    path = mnt.path / "late.bin"
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_blocks(fd, h, 72, seed=6)
        assert wait_for_chunks(mnt.store, 40) >= 40, mnt.log()[-3000:]
    finally:
        os.close(fd)
    mnt.remount()  # no sync: the seal may still be pending when the unmount comes
    assert sha_file(path) == h.hexdigest()
    assert_counted_as_own(path, 72 * MiB)
    mnt.umount()
    assert check_store(mnt.store) == []


def test_preseal_follows_the_gap_free_prefix():
    """Unit: `written` advances only over contiguous writes; scattered writes give up."""
    from elvesfs.policy import Policy
    from elvesfs.state import MAX_AHEAD, Preseal
    pre = Preseal(Policy.parse("lossless"))
    assert pre.wrote(0, 10) and pre.written == 10
    assert pre.wrote(20, 30) and pre.written == 10  # a gap at [10, 20)
    assert pre.wrote(30, 40) and pre.written == 10
    assert pre.wrote(10, 20) and pre.written == 40 and not pre.ahead  # gap filled
    assert pre.wrote(5, 15) and pre.written == 40  # a rewrite inside the prefix
    for k in range(MAX_AHEAD):
        assert pre.wrote(100 + 2 * k, 101 + 2 * k)
    assert not pre.wrote(10_000, 10_001)  # random I/O: not worth following


@pytest.mark.parametrize("change", ["overwrite", "truncate"])
def test_changes_below_a_preseal_are_not_lost(mnt, change):
    path = mnt.path / "f.bin"
    expect = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        expect += blocks(64, seed=3)
        os.write(fd, expect)
        assert wait_for_chunks(mnt.store, 40) >= 40, mnt.log()[-3000:]
        if change == "overwrite":  # inside what the pre-seal already stored
            os.pwrite(fd, b"\xee" * 5000, 3 * MiB + 17)
            expect[3 * MiB + 17:3 * MiB + 17 + 5000] = b"\xee" * 5000
        else:
            os.ftruncate(fd, 10 * MiB + 3)
            del expect[10 * MiB + 3:]
            os.lseek(fd, 0, os.SEEK_END)
        more = blocks(40, seed=4)
        os.write(fd, more)
        expect += more
    finally:
        os.close(fd)
    want = hashlib.sha256(expect).hexdigest()
    mnt.sync()
    assert sha_file(path) == want
    assert_kept_after_remount(mnt, path, want)  # abandoned pre-sealed chunks collected


def test_unlink_while_presealing_reclaims_everything(mnt):
    path = mnt.path / "gone.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_blocks(fd, hashlib.sha256(), 64, seed=5)
        assert wait_for_chunks(mnt.store, 40) >= 40, mnt.log()[-3000:]
        os.unlink(path)
        write_blocks(fd, hashlib.sha256(), 8, seed=6)
    finally:
        os.close(fd)
    mnt.sync()
    mnt.umount()
    assert check_store(mnt.store) == []
    assert stored_chunks(mnt.store) == 0


def test_kill9_after_a_preseal_keeps_fsynced_data_and_a_clean_store(mnt):
    path = mnt.path / "ckpt.bin"
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_blocks(fd, h, 64, seed=7)
        os.fsync(fd)
        assert wait_for_chunks(mnt.store, 40) >= 40, mnt.log()[-3000:]
        mnt.kill9()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    mnt.mount()
    mnt.sync()
    assert sha_file(path) == h.hexdigest()
    mnt.umount()
    assert check_store(mnt.store) == []


@pytest.mark.parametrize("writer", ["safetensors", "torch", "gguf"])
def test_model_file_written_slowly_is_presealed_tensor_by_tensor(mnt, writer, tmp_path):
    """A model file written over time: its tensors are coded (with XOR deltas against the
    previous version) while the writer is still writing, and read back exactly."""
    import io

    import numpy as np
    rng = np.random.default_rng(8)
    base = {f"layer{i}.weight": (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32)
            for i in range(24)}
    v2 = {k: (w + (rng.standard_normal(w.shape) * 1e-4).astype(np.float32))
          for k, w in base.items()}

    def serialize(tensors: dict) -> bytes:
        if writer == "safetensors":
            from safetensors.numpy import save
            return save(tensors)
        if writer == "gguf":
            import zoo
            return zoo.write_gguf(tmp_path / "m.gguf", tensors).read_bytes()
        torch = pytest.importorskip("torch")
        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, buf)
        return buf.getvalue()

    path = mnt.path / {"safetensors": "model.safetensors", "gguf": "model.gguf"}.get(writer, "model.pt")
    for version, tensors in enumerate((base, v2)):
        data = serialize(tensors)
        chunks_before = stored_chunks(mnt.store)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            half = len(data) // 2
            os.write(fd, data[:half])
            # tensor pieces are 4 MiB: 48 MiB written gives the pre-seal several
            got = wait_for_chunks(mnt.store, chunks_before + 4)
            assert got >= chunks_before + 4, mnt.log()[-3000:]
            os.write(fd, data[half:])
        finally:
            os.close(fd)
        mnt.sync()
        assert sha_file(path) == hashlib.sha256(data).hexdigest()
        f = file_stats(path)
        assert f["format"] == {"torch": "torch-zip"}.get(writer, writer)
        assert f["tensors"] == 24
        # pre-sealed tensors are the file's own, never dedup hits; in version 1 only
        # metadata bytes equal to version 0's (still stored while it is sealed) are
        if version == 0:
            assert f["dedup_saved"] == 0, f
        else:
            assert f["dedup_saved"] < 64 << 10, f
            # the pre-sealed pieces were coded against version 0's tensors (version 0
            # is gone once overwritten: the seal's figures, not the current ones)
            assert f["seal"]["delta_raw"] > len(data) // 2, f
    assert_kept_after_remount(mnt, path, hashlib.sha256(serialize(v2)).hexdigest())


def test_a_version_written_right_after_others_is_coded_against_its_reference(mnt, tmp_path):
    """Files saved back to back, no sync (MiniLM, its bf16 and fp16 conversions, then a
    fine-tune): the fine-tune's pre-seal waits until the files closed before it are in
    the store, so every tensor of it is a delta of the model (none coded alone because
    the model's seal was still queued behind the conversions' pre-seals), and closed
    files whose pre-seals overlap never wait for each other (no deadlock)."""
    import sys
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo
    base = zoo.minilm_safetensors()
    sd = st.load_file(str(base))
    g = torch.Generator().manual_seed(0)
    tuned = {k: v + torch.randn(v.shape, generator=g) * 1e-4 if v.is_floating_point() else v
             for k, v in sd.items()}
    srcs = [base]
    for name, tensors in [("bf16", {k: v.bfloat16() for k, v in sd.items()}),
                          ("fp16", {k: v.half() for k, v in sd.items()}), ("tuned", tuned)]:
        st.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        srcs.append(tmp_path / f"{name}.safetensors")
    subprocess.run(["sh", "-c", " && ".join(  # back to back, as a script would
        f"cp {src} {mnt.path / f'{i}-{src.name}'}" for i, src in enumerate(srcs))], check=True)
    mnt.sync()
    dst = mnt.path / f"3-{srcs[-1].name}"
    assert sha_file(dst) == sha_file(srcs[-1])
    f = file_stats(dst)
    floats = sum(v.numel() * v.element_size() for v in tuned.values() if v.is_floating_point())
    # tiny tensors (a few KiB in all) may be cheaper coded alone; the rest must be deltas
    assert floats - (64 << 10) < f["delta_raw"] <= floats, f
    assert_kept_after_remount(mnt, dst, sha_file(srcs[-1]))


def test_no_preseal_mount_codes_only_at_close(make_mount):
    m = make_mount("--no-preseal")
    path = m.path / "late.bin"
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_blocks(fd, h, 64, seed=9)
        time.sleep(3)  # time enough for a pre-seal to store tens of chunks (see above)
        assert stored_chunks(m.store) == 0
    finally:
        os.close(fd)
    m.sync()
    assert stored_chunks(m.store) > 0
    assert sha_file(path) == h.hexdigest()
