"""kill -9 of the daemon at awkward moments: nothing fsynced (or closed) is lost, the next
mount recovers staged files, and the store stays consistent (our own check of the store's
invariants, and `elvesfs fsck --verify-data`)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, _run_cli, check_store, fsck_clean, sha_file, write_random



def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def close_quietly(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def test_fsynced_data_survives_kill9(make_mount):
    m = make_mount()
    a = os.urandom(5 << 20)
    b = os.urandom(1 << 20)
    # a sealed file that gets rewritten in place and fsynced
    old = bytearray(os.urandom(3 << 20))
    (m.path / "sealed").write_bytes(old)
    (m.path / "dir").mkdir()
    m.sync()
    fd1 = os.open(m.path / "dir" / "fresh", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd1, a)
    os.fsync(fd1)
    fd2 = os.open(m.path / "sealed", os.O_RDWR)
    os.pwrite(fd2, b, 1 << 20)
    os.fdatasync(fd2)
    old[1 << 20:2 << 20] = b
    os.write(fd1, b"not synced, but the page cache outlives a kill -9")
    m.kill9()                              # both files still open
    close_quietly(fd1, fd2)
    m.mount()
    got = (m.path / "dir" / "fresh").read_bytes()
    assert got[:len(a)] == a
    assert sha_file(m.path / "sealed") == sha(bytes(old))
    assert "recovery: sealing staged inode" in m.log()
    fsck_clean(m)


def test_kill9_while_sealing_a_large_file(make_mount):
    m = make_mount()
    size = 300 << 20
    want = write_random(m.path / "large", size)
    syncer = subprocess.Popen([sys.executable, "-m", "elvesfs.cli", "sync", str(m.path)],
                              cwd=str(ROOT), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    sealed_before_kill = "314572800 bytes" in m.log()
    m.kill9()
    syncer.wait(60)
    m.mount()
    assert sealed_before_kill or "recovery: sealing staged inode" in m.log()
    assert (m.path / "large").stat().st_size == size
    assert sha_file(m.path / "large") == want
    fsck_clean(m)


def test_kill9_at_various_moments_after_close(make_mount):
    m = make_mount()
    expect: dict[str, bytes] = {}
    for i, delay in enumerate([0.0, 0.05, 0.3, 1.0]):
        data = os.urandom((8 << 20) + i) + bytes(1 << 20)
        name = f"file{i}"
        (m.path / name).write_bytes(data)
        expect[name] = data
        # an in-place rewrite of the previous (by now sealed or recovered) file
        if i:
            prev = f"file{i - 1}"
            patched = bytearray(expect[prev])
            patched[100:200] = b"P" * 100
            with open(m.path / prev, "r+b") as f:
                f.seek(100)
                f.write(b"P" * 100)
            expect[prev] = bytes(patched)
        time.sleep(delay)
        m.kill9()
        m.mount()
        for n, d in expect.items():
            assert sha_file(m.path / n) == sha(d), f"{n} after kill at +{delay}s"
    assert check_store(m.store, mounted=True) == []
    fsck_clean(m)


def test_kill9_with_many_small_files_and_namespace_changes(make_mount):
    m = make_mount()
    expect: dict[str, bytes] = {}
    for d in range(10):
        (m.path / f"d{d}").mkdir()
        for f in range(30):
            data = os.urandom(100 + 37 * f) if f % 3 else b"same content %d" % (f % 5)
            (m.path / f"d{d}" / f"f{f}").write_bytes(data)
            expect[f"d{d}/f{f}"] = data
    os.rename(m.path / "d0" / "f1", m.path / "d1" / "moved")
    expect["d1/moved"] = expect.pop("d0/f1")
    os.link(m.path / "d2" / "f2", m.path / "d3" / "hard")
    expect["d3/hard"] = expect["d2/f2"]
    os.symlink("../d2/f2", m.path / "d4" / "sym")
    os.unlink(m.path / "d5" / "f5")
    del expect["d5/f5"]
    os.rename(m.path / "d6", m.path / "d9" / "d6")
    for k in [k for k in expect if k.startswith("d6/")]:
        expect["d9/" + k] = expect.pop(k)
    # an unlinked file still open at the kill: an orphan the next mount must delete
    orphan = os.open(m.path / "orphan", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(orphan, os.urandom(2 << 20))
    os.unlink(m.path / "orphan")
    m.kill9()
    close_quietly(orphan)
    m.mount()
    got = {}
    for dirpath, _, files in os.walk(m.path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                got[str(p.relative_to(m.path))] = p.read_bytes()
    assert got == expect
    assert os.readlink(m.path / "d4" / "sym") == "../d2/f2"
    assert os.stat(m.path / "d3" / "hard").st_nlink == 2
    fsck_clean(m)


def test_kill9_while_a_sealed_file_is_staged_again(make_mount):
    """The first write into a sealed file copies its content into a staging file; a crash
    during that copy must not replace the sealed content by the half-made copy."""
    import threading
    m = make_mount()
    size = 160 << 20
    want = write_random(m.path / "model", size)
    m.sync()
    m.remount()                       # nothing cached: the copy has to decode every chunk
    fd = os.open(m.path / "model", os.O_RDWR)
    done = threading.Event()

    def first_write():
        try:
            os.pwrite(fd, b"X", 0)  # at 0: the whole file is copied (no tail staging)
        except OSError:
            pass                      # the daemon died under it
        done.set()

    t = threading.Thread(target=first_write)
    t.start()
    time.sleep(0.4)
    copying = not done.is_set()
    m.kill9()
    t.join(30)
    close_quietly(fd)
    m.mount()
    got = sha_file(m.path / "model")
    assert (m.path / "model").stat().st_size == size
    if copying:
        assert got == want, "the crash during the copy destroyed the sealed content"
    fsck_clean(m)


def test_kill9_then_unmount_twice_keeps_deleted_space_reclaimed(make_mount):
    m = make_mount()
    (m.path / "keep").write_bytes(os.urandom(1 << 20))
    (m.path / "drop").write_bytes(os.urandom(4 << 20))
    m.sync()
    os.unlink(m.path / "drop")
    with open(m.path / "keep", "ab") as f:
        f.write(b"tail")
    m.kill9()
    m.mount()
    assert (m.path / "keep").stat().st_size == (1 << 20) + 4
    assert not (m.path / "drop").exists()
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.db import Database
    m.sync()
    db = Database(str(m.store), readonly=True)
    try:
        with db.read() as txn:
            _, raw, _ = ChunkStore(db).totals(txn)
    finally:
        db.close()
    assert raw < (1 << 20) + (256 << 10), "the deleted file's chunks are still live"
    fsck_clean(m)


def test_kill9_right_after_unlinking_a_staged_file(make_mount):
    """unlink deletes a closed file's staged bytes at once and leaves its chunks to a
    background task: a kill -9 in between leaves an orphan that the next mount drops."""
    m = make_mount()
    (m.path / "keep").write_bytes(b"kept")
    with open(m.path / "staged", "wb") as f:  # written and fsync'd; its seal may be
        f.write(os.urandom(24 << 20))         # running or not yet started at unlink
        f.flush()
        os.fsync(f.fileno())
    os.unlink(m.path / "staged")
    assert os.listdir(m.store / "staging") == [], "staged bytes still on disk after unlink"
    m.kill9()
    m.mount()
    assert sorted(os.listdir(m.path)) == ["keep"]
    assert (m.path / "keep").read_bytes() == b"kept"
    m.sync()
    assert os.listdir(m.store / "staging") == []
    fsck_clean(m)


def test_kill9_while_recoding_the_users_of_a_deleted_reference(make_mount):
    """Deleting a version that another is a delta of makes the daemon code that one
    again in the background, chunk by chunk; a kill -9 at any moment of it loses
    nothing, and the next mount finishes the job (the store is clean after)."""
    import numpy as np
    from safetensors.numpy import save_file
    m = make_mount()
    rng = np.random.default_rng(7)
    for i, delay in enumerate([0.0, 0.1, 0.3]):
        w = {f"layer{k}.weight": (rng.standard_normal((1024, 1024)) * 0.05).astype(np.float32)
             for k in range(6)}
        save_file(w, str(m.path / f"base{i}.safetensors"))
        m.sync()
        tuned = {k: v + np.float32(1e-4) * rng.standard_normal(v.shape, dtype=np.float32)
                 for k, v in w.items()}
        save_file(tuned, str(m.path / f"tuned{i}.safetensors"))
        m.sync()
        want = sha_file(m.path / f"tuned{i}.safetensors")
        os.unlink(m.path / f"base{i}.safetensors")  # tuned's chunks are coded again
        time.sleep(delay)
        m.kill9()
        m.mount()
        assert sha_file(m.path / f"tuned{i}.safetensors") == want, f"after kill at +{delay}s"
    m.sync()
    assert check_store(m.store, mounted=True) == []
    fsck_clean(m)


def test_after_kill9_sync_says_the_daemon_is_gone_and_mount_just_works(make_mount):
    """A daemon killed (OOM, kill -9) leaves a mount that fails every call with ENOTCONN.
    `elvesfs sync` says the daemon is gone and how to bring it back; `elvesfs mount` on
    that mountpoint detaches the dead mount and mounts again, with nothing lost."""
    m = make_mount()
    (m.path / "closed").write_bytes(b"written and closed, never synced")
    m.kill9(detach=False)
    with pytest.raises(OSError) as dead:
        os.stat(m.path)
    # ECONNABORTED: a call caught in flight while the kernel aborts the connection (the
    # daemon is waited for until it is a zombie, so a call can just meet the abort)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    with pytest.raises(OSError) as dead:
        os.stat(m.path)
    assert dead.value.errno == errno.ENOTCONN
    r = _run_cli("sync", str(m.path), check=False)
    assert r.returncode == 1
    assert "is not running" in r.stderr and f"elvesfs mount {m.path}" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run_cli("mount", str(m.path), "--store", str(m.store), check=False)
    assert r.returncode == 0, r.stderr
    assert "left by a daemon that stopped" in r.stderr
    m.pid = int((m.store / "daemon.lock").read_text().strip())
    assert (m.path / "closed").read_bytes() == b"written and closed, never synced"
    fsck_clean(m)


def test_mount_leaves_alone_a_mount_whose_daemon_still_runs(make_mount):
    """A live elvesfs mount is never detached by a second `elvesfs mount` on it."""
    m = make_mount()
    r = _run_cli("mount", str(m.path), "--store", str(m.store), check=False)
    assert r.returncode == 1 and "already a mountpoint" in r.stderr
    assert (m.store / "daemon.lock").read_text().strip() == str(m.pid)
    (m.path / "still").write_bytes(b"up")
    assert (m.path / "still").read_bytes() == b"up"


def test_recovery_seals_a_file_whose_policy_this_version_cannot_read(make_mount):
    """A staged file whose policy xattr this version cannot parse (set by another
    version, or damaged: setxattr refuses such values) is recovered with the mount's
    policy: the mount comes up and the fsync'd bytes read back exact."""
    from elvesfs.db import Database
    from elvesfs.namespace import ROOT_INO, Namespace
    from elvesfs.policy import XATTR
    m = make_mount()
    data = os.urandom(3 << 20)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, data)
    os.fsync(fd)
    m.kill9()
    close_quietly(fd)
    db = Database(str(m.store))
    try:
        ns = Namespace(db)
        with db.write() as txn:
            ns.setxattr(txn, ns.lookup(txn, ROOT_INO, b"f"), XATTR, b"elf=2.0,zstd-level=19")
    finally:
        db.close()
    m.mount()
    assert sha_file(m.path / "f") == sha(data)
    assert "recovery: sealing staged inode" in m.log()
    assert "using the mount's policy (lossless)" in m.log()
    fsck_clean(m)


def test_recovery_without_a_staging_file_keeps_the_sealed_content(make_mount):
    """A staging file gone by the next mount (deleted by hand, lost with its disk): the
    file keeps its last sealed content, and the store stays clean."""
    m = make_mount()
    old = os.urandom(2 << 20)
    (m.path / "f").write_bytes(old)
    m.sync()
    fd = os.open(m.path / "f", os.O_WRONLY)
    os.pwrite(fd, b"new bytes", 4096)
    os.pwrite(fd, b"and a longer file", len(old) + 4096)
    os.fsync(fd)                       # the longer size is in the stored inode now
    ino = os.fstat(fd).st_ino
    m.kill9()
    close_quietly(fd)
    staged = m.store / "staging" / str(ino)
    assert staged.exists()
    staged.unlink()
    m.mount()
    assert f"staging file of inode {ino} is missing" in m.log()
    assert (m.path / "f").stat().st_size == len(old)
    assert sha_file(m.path / "f") == sha(old)
    fsck_clean(m)


def test_umount_of_a_dead_mount_says_the_next_mount_recovers_its_files(make_mount):
    """`elvesfs umount` after the daemon was killed detaches the dead mount and says that
    the files it had staged wait for the next mount (not that a seal failed)."""
    m = make_mount()
    data = os.urandom(1 << 20)
    fd = os.open(m.path / "open", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, data)
    os.fsync(fd)  # staged while open, so still staged at the kill
    m.kill9(detach=False)
    close_quietly(fd)
    r = _run_cli("umount", str(m.path), check=False)
    assert r.returncode == 0, r.stderr
    assert "the daemon was not running" in r.stderr and "recovers the 1 file(s)" in r.stderr
    assert "could not be sealed" not in r.stderr
    m.mount()
    assert sha_file(m.path / "open") == sha(data)
    fsck_clean(m)
