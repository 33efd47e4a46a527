"""The POSIX surface of a real elvesfs mount, compared with a plain directory (ext4/tmpfs)
wherever the kernel's own filesystem is the natural oracle.

Most tests share one mount (`shared_dir`: a fresh directory in it) because mounting costs
seconds; tests that must remount either remount that shared mount or make their own.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import check_store, sha_file as sha

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    r = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def err(fn, *args, **kw) -> int:
    """errno of fn(*args) (0 if it succeeds)."""
    try:
        fn(*args, **kw)
    except OSError as exc:
        return exc.errno
    return 0



def tree(root: Path) -> dict:
    """Comparable picture of a directory tree: kind, permission bits, link count, size,
    content hash / link target, xattr names (not inode numbers, times or dir sizes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_nlink)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_nlink, st.st_size, sha(p))
    return out


def store_totals(store: Path) -> tuple[int, int, int]:
    """(live chunks, raw bytes, stored bytes) read straight from the store (read-only)."""
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.db import Database
    db = Database(str(store), readonly=True)
    try:
        with db.read() as txn:
            return ChunkStore(db).totals(txn)
    finally:
        db.close()


@pytest.fixture
def plain(tmp_path) -> Path:
    """A plain directory on the local disk: the oracle."""
    d = tmp_path / "plain"
    d.mkdir()
    return d


# -- create, open, read, write ------------------------------------------------------------

def test_create_excl_append_trunc_against_plain(shared_dir, plain, shared_mount):
    results = {}
    for root in (shared_dir, plain):
        r = []
        p = root / "f"
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        os.write(fd, b"hello world")
        os.close(fd)
        r.append(err(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        # O_APPEND: two handles, interleaved, and pwrite's offset is ignored
        a = os.open(p, os.O_WRONLY | os.O_APPEND)
        b = os.open(p, os.O_RDWR | os.O_APPEND)
        os.write(a, b"-A1")
        os.write(b, b"-B1")
        os.lseek(a, 0, os.SEEK_SET)
        os.write(a, b"-A2")
        os.pwrite(b, b"-B2", 0)
        r.append(os.pread(b, 100, 0))
        os.close(a)
        os.close(b)
        r.append(p.read_bytes())
        # O_TRUNC on a staged file, then on a sealed one
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"x" * 10)
        os.close(fd)
        r.append(p.read_bytes())
        if root == shared_dir:
            shared_mount.sync()
        fd = os.open(p, os.O_RDWR | os.O_TRUNC)
        r.append(os.fstat(fd).st_size)
        os.write(fd, b"new")
        r.append(os.pread(fd, 10, 0))
        os.close(fd)
        r.append(p.read_bytes())
        r.append(stat.S_IMODE(p.stat().st_mode))
        # reading a write-only descriptor / writing a read-only one
        fd = os.open(p, os.O_WRONLY)
        r.append(err(os.read, fd, 1))
        os.close(fd)
        fd = os.open(p, os.O_RDONLY)
        r.append(err(os.write, fd, b"z"))
        os.close(fd)
        r.append(err(os.open, root / "missing", os.O_RDONLY))
        r.append(err(os.open, root / "f" / "x", os.O_CREAT | os.O_WRONLY))
        results[root] = r
    assert results[shared_dir] == results[plain]
    assert results[plain][2] == b"hello world-A1-B1-A2-B2"


def test_large_write_read_and_overwrite_patterns(shared_dir, shared_mount):
    p = shared_dir / "big"
    data = bytearray(os.urandom(3 << 20) + bytes(2 << 20) + os.urandom(1 << 20))
    p.write_bytes(data)
    assert p.read_bytes() == data
    shared_mount.sync()
    # unaligned rewrites of a sealed file: across what are chunk boundaries somewhere
    with open(p, "r+b") as f:
        for off, n in [(0, 1), (65_535, 3), (1 << 20, 200_000), (len(data) - 5, 5),
                       (len(data), 7)]:
            chunk = os.urandom(n)
            f.seek(off)
            f.write(chunk)
            data[off:off + n] = chunk
    assert p.read_bytes() == data
    shared_mount.sync()
    assert p.read_bytes() == data
    assert p.stat().st_size == len(data)
    # random-offset reads of the sealed file
    with open(p, "rb") as f:
        for off in (0, 1, 4095, 4096, 65_537, (3 << 20) - 10, len(data) - 1, len(data) + 10):
            f.seek(off)
            assert f.read(100_000) == bytes(data[off:off + 100_000])


# -- sparse files, truncate, EFBIG, > 4 GiB ---------------------------------------------------

def test_sparse_file_and_holes(shared_dir, shared_mount):
    p = shared_dir / "sparse"
    with open(p, "wb") as f:
        f.seek(10 << 20)
        f.write(b"end")
        f.seek(1 << 20)
        f.write(b"middle")
    expect = bytearray(10 << 20 | 3)
    expect[1 << 20:(1 << 20) + 6] = b"middle"
    expect[10 << 20:] = b"end"
    assert p.stat().st_size == len(expect)
    assert p.read_bytes() == expect
    shared_mount.sync()
    assert p.read_bytes() == expect
    # holes are not stored: far less than the logical size is charged
    assert p.stat().st_blocks * 512 < 1 << 20
    # a hole made by shrinking then growing a sealed file reads as zeros
    with open(p, "r+b") as f:
        f.truncate((1 << 20) + 3)
        f.truncate(4 << 20)
    expect = expect[:(1 << 20) + 3] + bytes((4 << 20) - (1 << 20) - 3)
    assert p.read_bytes() == expect
    shared_mount.sync()
    assert p.read_bytes() == expect


@pytest.mark.parametrize("sealed", [False, True], ids=["staged", "sealed"])
def test_truncate_grow_shrink(shared_dir, plain, shared_mount, sealed):
    base = os.urandom(300_000)
    out = {}
    for root in (shared_dir, plain):
        p = root / "t"
        p.write_bytes(base)
        if sealed and root == shared_dir:
            shared_mount.sync()
        r = []
        os.truncate(p, 100_000)                       # shrink by path
        r.append((p.stat().st_size, sha(p)))
        os.truncate(p, 500_000)                       # grow: a hole
        r.append((p.stat().st_size, sha(p)))
        with open(p, "r+b") as f:                     # ftruncate on an open handle
            f.truncate(50)
            f.seek(0, os.SEEK_END)
            r.append(f.tell())
            f.truncate(70_000)
            f.seek(60_000)
            f.write(b"abc")
            f.flush()
            os.fsync(f.fileno())
            r.append(os.fstat(f.fileno()).st_size)
        r.append((p.stat().st_size, sha(p)))
        os.truncate(p, 0)
        r.append((p.stat().st_size, p.read_bytes()))
        r.append(err(os.truncate, p, -1))
        r.append(err(os.truncate, root, 0))
        out[root] = r
    assert out[shared_dir] == out[plain]
    if sealed:
        shared_mount.sync()
        assert (shared_dir / "t").read_bytes() == b""


def test_truncate_by_path_right_after_close(shared_dir, shared_mount):
    """truncate(path) racing the seal that the last close started (no handle open)."""
    n = 40
    for i in range(n):
        p = shared_dir / f"r{i}"
        p.write_bytes(os.urandom(10_000 + 7_000 * i))
        time.sleep(0.0005 * (i % 8))
        os.truncate(p, 1000 * i)
        assert p.stat().st_size == 1000 * i
        assert len(p.read_bytes()) == 1000 * i
    shared_mount.sync()
    for i in range(n):
        assert (shared_dir / f"r{i}").stat().st_size == 1000 * i
    assert check_store(shared_mount.store, mounted=True) == []


def test_truncate_while_seal_waits_for_collection(shared_dir, shared_mount):
    """A small file whose seal has installed its layout but still waits (behind a large
    file's seal) to collect garbage: truncating it by path must not be lost."""
    big1, small, big2 = shared_dir / "big1", shared_dir / "small", shared_dir / "big2"
    big1.write_bytes(os.urandom(48 << 20))
    small.write_bytes(os.urandom(70_000))
    big2.write_bytes(os.urandom(48 << 20))
    ino = small.stat().st_ino
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and f"sealed inode {ino}:" not in shared_mount.log():
        time.sleep(0.01)
    os.truncate(small, 10)
    assert small.stat().st_size == 10
    assert len(small.read_bytes()) == 10
    shared_mount.sync()
    assert small.stat().st_size == 10
    assert len(small.read_bytes()) == 10
    assert check_store(shared_mount.store, mounted=True) == []


def test_special_files_against_plain(shared_dir, plain):
    out = {}
    for root in (shared_dir, plain):
        os.mkfifo(root / "fifo", 0o640)
        os.mknod(root / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # like /dev/null
        os.mknod(root / "sock", 0o600 | stat.S_IFSOCK)
        r = []
        for n in ("fifo", "chr", "sock"):
            s = os.lstat(root / n)
            r.append((n, stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_rdev, s.st_size))
        # a FIFO on the mount works as a pipe (the kernel serves it)
        t = threading.Thread(target=lambda: (root / "fifo").write_bytes(b"through the fifo"))
        t.start()
        r.append((root / "fifo").read_bytes())
        t.join()
        # (opening the device node is refused on the mount: FUSE mounts are nodev)
        # a directory removed while open still answers fstat
        os.mkdir(root / "d")
        fd = os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY)
        os.rmdir(root / "d")
        s = os.fstat(fd)
        r.append((stat.S_ISDIR(s.st_mode), s.st_nlink, os.listdir(fd)))
        os.close(fd)
        out[root] = r
    assert out[shared_dir] == out[plain]


def test_efbig(shared_dir, shared_mount):
    p = shared_dir / "f"
    p.write_bytes(b"0123456789")
    with pytest.raises(OverflowError):   # 2**63 does not even fit in off_t
        os.truncate(p, 2 ** 63)
    # the largest off_t: no real filesystem takes it (ext4 says EFBIG too)
    assert err(os.truncate, p, 2 ** 63 - 1) == errno.EFBIG
    fd = os.open(p, os.O_RDWR)
    try:
        assert err(os.pwrite, fd, b"x", 2 ** 63 - 1) in (errno.EFBIG, errno.EINVAL)
        assert err(os.ftruncate, fd, 2 ** 63 - 1) == errno.EFBIG
    finally:
        os.close(fd)
    # the failed calls changed nothing, and the mount still works
    assert p.read_bytes() == b"0123456789"
    assert p.stat().st_size == 10
    shared_mount.sync()
    assert p.read_bytes() == b"0123456789"


# -- directories -------------------------------------------------------------------------------

def test_mkdir_rmdir_readdir_against_plain(shared_dir, plain):
    out = {}
    for root in (shared_dir, plain):
        r = []
        os.mkdir(root / "a", 0o750)
        os.makedirs(root / "a" / "b" / "c")
        (root / "a" / "file").write_bytes(b"x")
        r.append(err(os.mkdir, root / "a"))
        r.append(err(os.mkdir, root / "a" / "file" / "x"))
        r.append(err(os.rmdir, root / "a"))
        r.append(err(os.rmdir, root / "a" / "file"))
        r.append(err(os.rmdir, root / "nope"))
        r.append(err(os.unlink, root / "a" / "b"))
        r.append(err(os.rmdir, os.path.join(root, "a", "b", "c", ".")))  # not pathlib: keeps "."
        r.append(sorted(os.listdir(root / "a")))
        r.append(os.stat(root / "a").st_nlink)
        os.rmdir(root / "a" / "b" / "c")
        r.append(os.stat(root / "a" / "b").st_nlink)
        r.append(sorted(e.name for e in os.scandir(root / "a")))
        r.append(sorted((e.name, e.is_dir(), e.is_file()) for e in os.scandir(root / "a")))
        # `ls -a` shows "." and ".." like any Linux filesystem, with the right inodes
        r.append(subprocess.run(["ls", "-a", str(root / "a")], capture_output=True,
                                text=True).stdout.split())
        ls = subprocess.run(["ls", "-ai", str(root / "a" / "b")], capture_output=True,
                            text=True).stdout.split()
        r.append(ls[1::2])
        r.append(ls[0::2] == [str(os.stat(root / "a" / "b").st_ino),
                              str(os.stat(root / "a").st_ino)])
        # creating inside a removed directory (still open as cwd-like handle)
        os.mkdir(root / "gone")
        dfd = os.open(root / "gone", os.O_RDONLY | os.O_DIRECTORY)
        os.rmdir(root / "gone")
        r.append(err(os.open, "x", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dfd))
        r.append(os.listdir(dfd))
        os.close(dfd)
        r.append(tree(root))
        out[root] = r
    assert out[shared_dir] == out[plain]


def test_directory_with_100k_entries(shared_dir):
    d = shared_dir / "many"
    d.mkdir()
    n = 100_000
    t0 = time.monotonic()
    for i in range(n):
        os.mknod(d / f"entry-{i:06d}", 0o644 | stat.S_IFREG)
    created = time.monotonic() - t0
    names = os.listdir(d)
    assert len(names) == n, f"listed {len(names)} of {n} entries"
    assert set(names) == {f"entry-{i:06d}" for i in range(n)}
    assert os.stat(d / "entry-054321").st_size == 0
    # readdir with an offset: a fresh scandir interrupted and resumed sees every entry once
    seen = []
    with os.scandir(d) as it:
        for e in it:
            seen.append(e.name)
    assert len(seen) == n and len(set(seen)) == n
    for i in range(0, n, 1000):
        os.unlink(d / f"entry-{i:06d}")
    assert len(os.listdir(d)) == n - n // 1000
    assert err(os.rmdir, d) == errno.ENOTEMPTY
    assert created < 120, f"creating {n} entries took {created:.0f}s"


# -- rename ----------------------------------------------------------------------------------

def _rename_script(root: Path) -> list:
    r = []
    (root / "d1").mkdir()
    (root / "d2").mkdir()
    (root / "d1" / "sub").mkdir()
    (root / "d2" / "empty").mkdir()
    (root / "d2" / "full").mkdir()
    (root / "d2" / "full" / "x").write_bytes(b"x")
    (root / "a").write_bytes(b"A" * 1000)
    (root / "b").write_bytes(b"B" * 2000)
    (root / "c").write_bytes(b"C")
    os.link(root / "c", root / "c2")
    os.rename(root / "a", root / "b")                        # over an existing file
    r.append(((root / "b").read_bytes()[:1], os.path.exists(root / "a")))
    os.rename(root / "b", root / "d1" / "b")                 # across directories
    os.rename(root / "d1" / "sub", root / "d2" / "sub")      # a directory across
    r.append((os.stat(root / "d1").st_nlink, os.stat(root / "d2").st_nlink))
    r.append(err(os.rename, root / "d1", root / "d2" / "empty"))  # dir over empty dir: ok
    r.append(err(os.rename, root / "d2" / "empty", root / "d2" / "full"))
    r.append(err(os.rename, root / "c", root / "d2" / "full"))    # file over dir
    r.append(err(os.rename, root / "d2" / "full", root / "c"))    # dir over file
    r.append(err(os.rename, root / "d2", root / "d2" / "sub" / "inside"))  # into itself
    r.append(err(os.rename, root / "nope", root / "x"))
    r.append(err(os.rename, root / "c", root / "c"))
    r.append(err(os.rename, root / "c", root / "c2"))        # hard links of one inode: no-op
    r.append(sorted(os.listdir(root)))
    r.append(err(os.rename, root / "c", root / ("n" * 256)))
    r.append(err(os.rename, root / "c", root / ("n" * 255)))
    os.rename(root / ("n" * 255), root / "c")
    # renameat2
    (root / "p").write_bytes(b"P")
    (root / "q").write_bytes(b"QQ")
    r.append(err(renameat2, root / "p", root / "q", RENAME_NOREPLACE))
    r.append(err(renameat2, root / "p", root / "r", RENAME_NOREPLACE))
    r.append(err(renameat2, root / "r", root / "q", RENAME_EXCHANGE))
    r.append(((root / "r").read_bytes(), (root / "q").read_bytes()))
    r.append(err(renameat2, root / "r", root / "missing", RENAME_EXCHANGE))
    # exchange a file with a directory in another directory: parents' link counts swap
    r.append(err(renameat2, root / "q", root / "d2" / "full", RENAME_EXCHANGE))
    r.append((os.stat(root).st_nlink, os.stat(root / "d2").st_nlink))
    r.append(sorted(os.listdir(root / "q")))
    r.append(err(renameat2, root / "q", root / "r", RENAME_EXCHANGE | RENAME_NOREPLACE))
    r.append(tree(root))
    return r


def test_rename_against_plain(shared_dir, plain):
    got = _rename_script(shared_dir)
    want = _rename_script(plain)
    assert got == want


def test_rename_open_and_replaced_files(shared_dir, shared_mount):
    d = shared_dir
    (d / "victim").write_bytes(b"old content")
    shared_mount.sync()
    with open(d / "victim", "rb") as old:
        with open(d / "writer.tmp", "wb") as f:     # editors: write temp, rename over
            f.write(b"new content")
            f.flush()
            os.rename(d / "writer.tmp", d / "victim")
            f.write(b" and more")                   # still writing after the rename
        assert old.read() == b"old content"         # the replaced inode lives on
    assert (d / "victim").read_bytes() == b"new content and more"
    shared_mount.sync()
    assert (d / "victim").read_bytes() == b"new content and more"
    assert os.stat(d / "victim").st_nlink == 1
    assert check_store(shared_mount.store, mounted=True) == []


# -- unlink, hard links, symlinks -----------------------------------------------------------

def test_unlink_open_file_until_close(shared_dir, shared_mount):
    before = store_totals(shared_mount.store)
    p = shared_dir / "tmpfile"
    data = os.urandom(2_000_000)
    with open(p, "w+b") as f:
        f.write(data)
        f.flush()
        os.unlink(p)
        assert not p.exists()
        f.seek(0)
        assert f.read() == data                    # staged and unlinked
        f.write(b"more")                           # still writable
        f.seek(0)
        assert f.read() == data + b"more"
        assert os.fstat(f.fileno()).st_nlink == 0
    # a sealed file unlinked while open
    q = shared_dir / "sealed"
    q.write_bytes(data)
    shared_mount.sync()
    fds = [os.open(q, os.O_RDONLY) for _ in range(2)]
    os.unlink(q)
    assert os.pread(fds[0], len(data), 0) == data
    os.close(fds[0])
    assert os.pread(fds[1], 100, 1_000_000) == data[1_000_000:1_000_100]
    os.close(fds[1])
    shared_mount.sync()
    time.sleep(0.2)
    # deleted data's space is reclaimed: no chunk of either file stays live
    after = store_totals(shared_mount.store)
    assert after[2] <= before[2] + 4096, (before, after)
    assert check_store(shared_mount.store, mounted=True) == []


def test_hard_links(shared_dir, shared_mount):
    a, b, c = shared_dir / "a", shared_dir / "sub" / "b", shared_dir / "c"
    (shared_dir / "sub").mkdir()
    a.write_bytes(b"first")
    os.link(a, b)
    os.link(b, c)
    assert [os.stat(x).st_nlink for x in (a, b, c)] == [3, 3, 3]
    assert os.stat(a).st_ino == os.stat(b).st_ino == os.stat(c).st_ino
    with open(b, "ab") as f:
        f.write(b" second")
    assert a.read_bytes() == c.read_bytes() == b"first second"
    shared_mount.sync()
    with open(c, "r+b") as f:
        f.write(b"FIRST")
    assert a.read_bytes() == b"FIRST second"
    os.unlink(a)
    assert os.stat(b).st_nlink == 2
    assert b.read_bytes() == b"FIRST second"
    assert err(os.link, shared_dir / "sub", shared_dir / "dirlink") == errno.EPERM
    assert err(os.link, b, c) == errno.EEXIST
    assert err(os.link, shared_dir / "nope", shared_dir / "x") == errno.ENOENT
    os.unlink(c)
    assert os.stat(b).st_nlink == 1
    assert b.read_bytes() == b"FIRST second"


def test_symlinks(shared_dir, plain):
    out = {}
    for root in (shared_dir, plain):
        r = []
        (root / "dir").mkdir()
        (root / "dir" / "target").write_bytes(b"T")
        os.symlink("dir/target", root / "rel")
        os.symlink("../dir/target", root / "dir" / "up")
        os.symlink("dir", root / "dirlink")
        os.symlink("nowhere", root / "dangling")
        os.symlink("x" * 4000, root / "longtarget")
        r.append(err(os.symlink, "x" * 5000, root / "toolong"))
        r.append(err(os.symlink, "t", root / "rel"))
        r.append([os.readlink(root / n) for n in ("rel", "dir/up", "dirlink", "dangling")])
        r.append(len(os.readlink(root / "longtarget")))
        r.append(((root / "rel").read_bytes(), (root / "dir" / "up").read_bytes()))
        r.append(os.lstat(root / "rel").st_size)
        r.append(stat.S_ISLNK(os.lstat(root / "rel").st_mode))
        r.append(sorted(os.listdir(root / "dirlink")))
        r.append(err(os.stat, root / "dangling"))
        r.append(err(os.readlink, root / "dir" / "target"))
        os.symlink("self", root / "self")
        r.append(err(os.stat, root / "self"))
        r.append(tree(root))
        out[root] = r
    assert out[shared_dir] == out[plain]


# -- attributes and permissions -----------------------------------------------------------------

def test_chmod_chown_utimens(shared_dir, shared_mount):
    p = shared_dir / "f"
    p.write_bytes(b"data")
    d = shared_dir / "d"
    d.mkdir()
    for target in (p, d):
        c0 = os.stat(target).st_ctime_ns
        time.sleep(0.01)
        os.chmod(target, 0o4751 if target == p else 0o1777)
        st = os.stat(target)
        assert stat.S_IMODE(st.st_mode) == (0o4751 if target == p else 0o1777)
        assert st.st_ctime_ns > c0
        os.chown(target, 1234, 5678)
        st = os.stat(target)
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        os.chown(target, -1, 42)
        assert (os.stat(target).st_uid, os.stat(target).st_gid) == (1234, 42)
        os.utime(target, ns=(1_000_000_001, 2_000_000_002))
        st = os.stat(target)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    # utimens on an open, written (staged) file, then close: the times set stay
    with open(p, "r+b") as f:
        f.write(b"DATA")
        f.flush()
        os.utime(f.fileno(), ns=(3_000_000_003, 4_000_000_004))
    assert os.stat(p).st_mtime_ns == 4_000_000_004
    shared_mount.sync()
    assert os.stat(p).st_mtime_ns == 4_000_000_004
    # a write after utime moves mtime forward to now
    before = time.time_ns()
    with open(p, "ab") as f:
        f.write(b"!")
    assert os.stat(p).st_mtime_ns >= before - 10_000_000
    os.utime(p)  # "now"
    assert abs(os.stat(p).st_mtime_ns - time.time_ns()) < 5_000_000_000
    # setgid directories hand their group down
    os.chown(d, 0, 777)
    os.chmod(d, 0o2775)
    (d / "child").write_bytes(b"")
    (d / "subdir").mkdir()
    assert os.stat(d / "child").st_gid == 777
    assert os.stat(d / "subdir").st_gid == 777
    assert os.stat(d / "subdir").st_mode & stat.S_ISGID


def test_mode_bits_against_plain(shared_dir, plain):
    out = {}
    for root in (shared_dir, plain):
        r = []
        p = root / "exe"
        p.write_bytes(b"#!/bin/sh\n")
        os.chmod(p, 0o6755)
        r.append(stat.S_IMODE(os.stat(p).st_mode))
        os.chown(p, 1000, 1000)                  # clears setuid/setgid on a file
        r.append(stat.S_IMODE(os.stat(p).st_mode))
        os.chmod(p, 0o6755)
        with open(p, "ab") as f:                 # so does a write (by root: kept or not,
            f.write(b"exit 0\n")                 # as the kernel decides)
        r.append(stat.S_IMODE(os.stat(p).st_mode))
        os.chmod(p, 0)
        r.append((stat.S_IMODE(os.stat(p).st_mode), p.read_bytes()))  # root reads anyway
        os.mkdir(root / "dir", 0o777)
        r.append(stat.S_IMODE(os.stat(root / "dir").st_mode))   # umask applied
        fd = os.open(root / "new", os.O_CREAT | os.O_WRONLY, 0o777)
        os.close(fd)
        r.append(stat.S_IMODE(os.stat(root / "new").st_mode))
        out[root] = r
    assert out[shared_dir] == out[plain]


NOBODY = 65534


def _as_nobody(dirfd: int, code: str) -> str:
    """Run python `code` as uid/gid 65534 with `dirfd` (an open directory) passed in as D."""
    py = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        py, "-c", f"import os, errno\nD = {dirfd}\n{code}"],
                       pass_fds=(dirfd,), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


PROBE = """
def e(fn, *a, **k):
    try:
        fn(*a, **k)
        return 'ok'
    except OSError as x:
        return errno.errorcode[x.errno]
def rd(name):
    fd = os.open(name, os.O_RDONLY, dir_fd=D)
    os.close(fd)
def wr(name):
    fd = os.open(name, os.O_WRONLY, dir_fd=D)
    os.close(fd)
def mk(name):
    fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=D)
    os.close(fd)
print(e(rd, 'public'), e(rd, 'secret'), e(wr, 'public'), e(mk, 'new'),
      e(os.chmod, 'public', 0o777, dir_fd=D), e(os.unlink, 'public', dir_fd=D),
      e(os.chown, 'public', 65534, 65534, dir_fd=D), e(rd, 'sub/inner'),
      e(os.utime, 'public', ns=(1, 1), dir_fd=D), e(rd, 'mine'), e(wr, 'mine'),
      e(rd, 'locked'), e(os.stat, 'locked/x', dir_fd=D))
"""


def test_kernel_permission_checks(shared_dir, plain, shared_mount):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing")
    with open("/proc/self/mounts") as f:
        opts = [line.split()[3] for line in f if line.split()[1] == str(shared_mount.path)]
    assert opts and "allow_other" in opts[0].split(","), opts
    out = {}
    for root in (shared_dir, plain):
        os.chmod(root, 0o755)
        (root / "public").write_bytes(b"p")
        os.chmod(root / "public", 0o644)
        (root / "secret").write_bytes(b"s")
        os.chmod(root / "secret", 0o600)
        (root / "sub").mkdir(mode=0o700)
        (root / "sub" / "inner").write_bytes(b"i")
        os.chmod(root / "sub" / "inner", 0o644)
        (root / "mine").write_bytes(b"m")
        os.chmod(root / "mine", 0o600)
        os.chown(root / "mine", NOBODY, NOBODY)
        (root / "locked").mkdir(mode=0o711)
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = _as_nobody(dfd, PROBE)
            os.chmod(root / "secret", 0o644)      # a changed mode is seen at once
            second = _as_nobody(dfd, "fd = os.open('secret', os.O_RDONLY, dir_fd=D)\n"
                                     "print(os.read(fd, 10).decode())")
        finally:
            os.close(dfd)
        out[root] = (first, second)
    assert out[shared_dir] == out[plain]
    assert out[plain][0].split()[:4] == ["ok", "EACCES", "EACCES", "EACCES"]


def test_name_too_long(shared_dir):
    ok, long = "n" * 255, "n" * 256
    (shared_dir / ok).write_bytes(b"")
    os.mkdir(shared_dir / ("d" * 255))
    for fn, args in [
        (os.open, (shared_dir / long, os.O_CREAT | os.O_WRONLY)),
        (os.mkdir, (shared_dir / long,)),
        (os.symlink, ("t", shared_dir / long)),
        (os.link, (shared_dir / ok, shared_dir / long)),
        (os.rename, (shared_dir / ok, shared_dir / long)),
        (os.stat, (shared_dir / long,)),
        (os.mknod, (shared_dir / long, 0o644 | stat.S_IFREG)),
    ]:
        assert err(fn, *args) == errno.ENAMETOOLONG, fn
    assert sorted(os.listdir(shared_dir)) == sorted([ok, "d" * 255])
    assert os.stat(shared_dir / ok).st_size == 0
    # multibyte names: the limit is 255 bytes, not characters
    assert err(os.mkdir, shared_dir / ("é" * 128)) == errno.ENAMETOOLONG
    os.mkdir(shared_dir / ("é" * 127))


# -- xattrs --------------------------------------------------------------------------------

def test_xattrs_against_plain(shared_dir, plain):
    out = {}
    for root in (shared_dir, plain):
        r = []
        p = root / "f"
        p.write_bytes(b"x")
        d = root / "d"
        d.mkdir()
        os.symlink("f", root / "l")
        for target in (p, d):
            os.setxattr(target, "user.a", b"1")
            os.setxattr(target, "user.empty", b"")
            os.setxattr(target, "user.big", b"v" * 3000)  # ext4 takes a block at most
            os.setxattr(target, "trusted.t", b"root only")
            r.append(sorted(os.listxattr(target)))
            r.append(os.getxattr(target, "user.a"))
            r.append(os.getxattr(target, "user.empty"))
            r.append(os.getxattr(target, "user.big") == b"v" * 3000)
            r.append(err(os.getxattr, target, "user.missing"))
            r.append(err(os.setxattr, target, "user.a", b"2", os.XATTR_CREATE))
            r.append(err(os.setxattr, target, "user.new", b"2", os.XATTR_REPLACE))
            os.setxattr(target, "user.a", b"22", os.XATTR_REPLACE)
            r.append(os.getxattr(target, "user.a"))
            os.removexattr(target, "user.a")
            r.append(err(os.removexattr, target, "user.a"))
            r.append(err(os.getxattr, target, "user.a"))
            r.append(err(os.setxattr, target, "user." + "x" * 300, b"1"))
            r.append(err(os.setxattr, target, "bogus.ns", b"1"))
            r.append(sorted(os.listxattr(target)))
        r.append(err(os.setxattr, root / "l", "user.x", b"1", follow_symlinks=False))
        r.append(sorted(os.listxattr(root / "l")))  # follows to f
        out[root] = r
    assert out[shared_dir] == out[plain]
    # the largest value Linux allows (64 KiB), many names, and values surviving a seal
    p = shared_dir / "f"
    os.setxattr(p, "user.max", b"m" * 65536)
    for i in range(200):
        os.setxattr(p, f"user.n{i:03d}", str(i).encode())
    assert os.getxattr(p, "user.max") == b"m" * 65536
    assert err(os.setxattr, p, "user.toobig", b"m" * 65537) == errno.E2BIG
    assert len([n for n in os.listxattr(p) if n.startswith("user.n")]) == 200
    with open(p, "ab") as f:
        f.write(b"more data")
    assert os.getxattr(p, "user.n199") == b"199"


def test_xattr_names_stay_listable(shared_dir):
    """A file takes xattrs until their names would pass the 64 KiB listxattr can return,
    then ENOSPC (like a full ext4 xattr block): it stays listable and copyable."""
    p = shared_dir / "f"
    p.write_bytes(b"x")
    names = []
    for i in range(1000):
        name = f"user.{i:04d}" + "n" * 240
        try:
            os.setxattr(p, name, b"")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break
        names.append(name)
    else:
        raise AssertionError("1000 names of 250 bytes all accepted: listxattr would fail")
    listed = os.listxattr(p)  # E2BIG if the names passed the kernel's limit
    assert sorted(listed) == sorted(names)
    assert sum(len(n) + 1 for n in listed) <= 65536
    os.setxattr(p, names[0], b"replaced")  # an existing name still takes a new value
    os.removexattr(p, names[1])            # and removing one makes room again
    os.setxattr(p, "user.again", b"1")
    assert os.getxattr(p, "user.again") == b"1"


# -- statfs, fsync, mmap, handles, O_DIRECT ---------------------------------------------------

def test_statfs_and_df(shared_dir, shared_mount):
    s = os.statvfs(shared_dir)
    assert s.f_bavail > 0 and s.f_bfree >= s.f_bavail
    assert s.f_blocks >= s.f_bfree
    assert s.f_namemax == 255
    assert s.f_frsize > 0 and s.f_bsize > 0
    assert s.f_files > 0 and s.f_ffree > 0
    disk = os.statvfs(shared_mount.store)
    # free space is the store disk's free space and the store file's pages free for new
    # data (within what other writers change meanwhile)
    free, disk_free = s.f_bavail * s.f_frsize, disk.f_bavail * disk.f_frsize
    store_file = (shared_mount.store / "data.mdb").stat().st_blocks * 512
    assert disk_free - (1 << 30) < free < disk_free + store_file + (1 << 30)
    r = subprocess.run(["df", "-B1", str(shared_mount.path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    used0 = int(r.stdout.splitlines()[1].split()[2])
    (shared_dir / "incompressible").write_bytes(os.urandom(20 << 20))
    shared_mount.sync()
    r = subprocess.run(["df", "-B1", str(shared_mount.path)], capture_output=True, text=True)
    used1 = int(r.stdout.splitlines()[1].split()[2])
    assert used1 - used0 >= 18 << 20, (used0, used1)


def test_fsync_fdatasync(shared_dir, shared_mount):
    p = shared_dir / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"a" * 100_000)
        os.fsync(fd)
        os.write(fd, b"b" * 100)
        os.fdatasync(fd)
        assert os.pread(fd, 200_100, 0) == b"a" * 100_000 + b"b" * 100
    finally:
        os.close(fd)
    shared_mount.sync()
    for flags in (os.O_RDONLY, os.O_RDWR):    # on a sealed file, read-only and writable
        fd = os.open(p, flags)
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(fd)
    dfd = os.open(shared_dir, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    assert p.read_bytes() == b"a" * 100_000 + b"b" * 100


def test_mmap_read_and_shared_write(shared_dir, shared_mount):
    p = shared_dir / "m"
    data = bytearray(os.urandom(3 << 20))
    p.write_bytes(data)
    shared_mount.sync()
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == data
        assert m[123_456:123_500] == data[123_456:123_500]
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED)
        m[0:5] = b"HELLO"
        m[1 << 20:(1 << 20) + 4096] = b"\x00" * 4096
        m[-3:] = b"END"
        m.flush()
        m.close()
    data[0:5] = b"HELLO"
    data[1 << 20:(1 << 20) + 4096] = bytes(4096)
    data[-3:] = b"END"
    assert p.read_bytes() == data
    # mmap write on a freshly created (staged) file, then close the fd before munmap
    q = shared_dir / "fresh"
    with open(q, "w+b") as f:
        f.truncate(1 << 20)
        m = mmap.mmap(f.fileno(), 1 << 20)
    m[500:510] = b"0123456789"
    m.close()
    assert q.read_bytes()[495:515] == bytes(5) + b"0123456789" + bytes(5)
    shared_mount.remount()
    assert sha(p) == hashlib.sha256(data).hexdigest()
    assert (shared_dir / "fresh").read_bytes()[500:510] == b"0123456789"


def test_several_handles_different_modes(shared_dir, shared_mount):
    p = shared_dir / "h"
    p.write_bytes(b"0" * 1000)
    shared_mount.sync()
    r = os.open(p, os.O_RDONLY)
    w = os.open(p, os.O_WRONLY)
    rw = os.open(p, os.O_RDWR)
    try:
        assert os.pread(r, 10, 0) == b"0" * 10
        os.pwrite(w, b"W" * 10, 0)
        assert os.pread(r, 10, 0) == b"W" * 10
        assert os.pread(rw, 10, 0) == b"W" * 10
        os.pwrite(rw, b"R", 5)
        assert os.pread(r, 10, 0) == b"WWWWWRWWWW"
        os.ftruncate(w, 8)
        assert os.fstat(r).st_size == 8
        assert os.pread(r, 100, 0) == b"WWWWWRWW"
        os.close(w)
        os.close(rw)
        rw = w = -1
        # the last writer closed: a seal starts while a reader still reads
        for _ in range(20):
            assert os.pread(r, 100, 0) == b"WWWWWRWW"
        shared_mount.sync()
        assert os.pread(r, 100, 0) == b"WWWWWRWW"
        # a new writer while the reader stays open
        w = os.open(p, os.O_WRONLY | os.O_APPEND)
        os.write(w, b"++")
        assert os.pread(r, 100, 0) == b"WWWWWRWW++"
    finally:
        for fd in (r, w, rw):
            if fd >= 0:
                os.close(fd)
    assert p.read_bytes() == b"WWWWWRWW++"


def test_reopen_during_seal(shared_dir, shared_mount):
    """A writer coming back while the file is being sealed aborts and redoes the seal."""
    p = shared_dir / "busy"
    data = bytearray(os.urandom(24 << 20))
    p.write_bytes(data)
    for i in range(6):
        time.sleep(0.05 * i)
        off = (i * 3_999_999) % len(data)
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(b"%d" % i * 1000)
        data[off:off + len(b"%d" % i) * 1000] = b"%d" % i * 1000
        assert p.stat().st_size == len(data)
    assert sha(p) == hashlib.sha256(data).hexdigest()
    shared_mount.sync()
    assert sha(p) == hashlib.sha256(data).hexdigest()
    assert check_store(shared_mount.store, mounted=True) == []


def test_o_direct(shared_dir, shared_mount):
    p = shared_dir / "direct"
    buf = mmap.mmap(-1, 1 << 20)            # page-aligned memory
    payload = os.urandom(1 << 20)
    buf.write(payload)
    fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.pwritev(fd, [buf], 0) == 1 << 20
        assert os.pwritev(fd, [memoryview(buf)[:4096]], 1 << 20) == 4096
        rb = mmap.mmap(-1, 1 << 20)
        assert os.preadv(fd, [rb], 0) == 1 << 20
        assert rb[:] == payload
    finally:
        os.close(fd)
    shared_mount.sync()
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        rb = mmap.mmap(-1, 1 << 20)
        assert os.preadv(fd, [rb], 0) == 1 << 20
        assert rb[:] == payload
    finally:
        os.close(fd)
    assert p.read_bytes() == payload + payload[:4096]


# -- concurrency -------------------------------------------------------------------------------

def test_concurrent_writers_and_readers(shared_dir, shared_mount):
    n_files, size = 6, 4 << 20
    blobs = [os.urandom(size) for _ in range(n_files)]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            with open(shared_dir / f"w{i}", "wb") as f:
                for off in range(0, size, 100_000):
                    f.write(blobs[i][off:off + 100_000])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    shared_path = shared_dir / "same"
    with open(shared_path, "wb") as f:
        f.truncate(size)

    def range_writer(k: int, parts: int) -> None:
        try:
            step = size // parts
            fd = os.open(shared_path, os.O_WRONLY)
            try:
                for off in range(k * step, (k + 1) * step, 65_536):
                    n = min(65_536, (k + 1) * step - off)
                    os.pwrite(fd, blobs[0][off:off + n], off)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    stop = threading.Event()
    torn: list[str] = []

    def reader() -> None:
        # reads of a file rewritten in place: always its full size, only bytes ever written
        while not stop.is_set():
            d = (shared_dir / "pattern").read_bytes()
            if len(d) != 1 << 20 or set(d) - set(b"abcdefgh"):
                torn.append(f"read {len(d)} bytes with values {sorted(set(d))[:10]}")
                return

    (shared_dir / "pattern").write_bytes(b"a" * (1 << 20))
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_files)]
    threads += [threading.Thread(target=range_writer, args=(k, 4)) for k in range(4)]
    rt = threading.Thread(target=reader)
    rt.start()
    for t in threads:
        t.start()
    with open(shared_dir / "pattern", "r+b") as f:
        for c in b"bcdefgh":
            for off in range(0, 1 << 20, 4096):
                f.seek(off)
                f.write(bytes([c]) * 4096)
    for t in threads:
        t.join()
    # other processes writing disjoint ranges of one file at the same time
    code = ("import os,sys\nk=int(sys.argv[1]);p=sys.argv[2]\nfd=os.open(p,os.O_WRONLY)\n"
            "os.pwrite(fd,bytes([65+k])*1000000,k*1000000)\nos.close(fd)\n")
    multi = shared_dir / "multi"
    multi.write_bytes(b"")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k), str(multi)])
             for k in range(4)]
    assert [p.wait(60) for p in procs] == [0] * 4
    stop.set()
    rt.join()
    assert not errors, errors
    assert not torn, torn
    for i in range(n_files):
        assert (shared_dir / f"w{i}").read_bytes() == blobs[i]
    assert shared_path.read_bytes() == blobs[0]
    assert multi.read_bytes() == b"".join(bytes([65 + k]) * 1_000_000 for k in range(4))
    shared_mount.sync()
    for i in range(n_files):
        assert sha(shared_dir / f"w{i}") == hashlib.sha256(blobs[i]).hexdigest()
    assert (shared_dir / "pattern").read_bytes() == b"h" * (1 << 20)
    assert check_store(shared_mount.store, mounted=True) == []


# -- du, sync, remount, store integrity --------------------------------------------------------

def test_du_tells_the_truth(make_mount):
    m = make_mount()
    rnd = os.urandom(6 << 20)
    (m.path / "a").write_bytes(rnd)
    (m.path / "b").write_bytes(rnd)                      # a duplicate: stored once
    (m.path / "d").mkdir()
    (m.path / "d" / "zeros").write_bytes(bytes(16 << 20))   # compresses to almost nothing
    (m.path / "d" / "half").write_bytes(rnd[: 3 << 20] + os.urandom(1 << 20))
    with open(m.path / "sparse", "wb") as f:
        f.seek(100 << 20)
        f.write(b"x")
    os.symlink("a", m.path / "link")
    logical = (6 << 20) * 2 + (16 << 20) + (4 << 20) + (100 << 20) + 1 + 1
    m.sync()
    a, b = os.stat(m.path / "a"), os.stat(m.path / "b")
    assert a.st_blocks == b.st_blocks
    assert a.st_blocks * 512 < 0.75 * len(rnd)           # the copies share the bytes
    assert os.stat(m.path / "d" / "zeros").st_blocks * 512 < 1 << 20
    assert os.stat(m.path / "sparse").st_blocks * 512 < 1 << 20
    apparent = int(subprocess.run(["du", "-s", "-b", str(m.path)], capture_output=True,
                                  text=True, check=True).stdout.split()[0])
    assert apparent == logical
    used = int(subprocess.run(["du", "-s", "-B1", str(m.path)], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    _, raw, stored = store_totals(m.store)
    assert raw >= 7 << 20
    assert abs(used - stored) <= 0.02 * stored + 512 * 10, (used, stored)
    # deleting one copy moves its share onto the other: du stays equal to the store
    os.unlink(m.path / "b")
    m.sync()
    time.sleep(1.1)  # attribute cache timeout
    used = int(subprocess.run(["du", "-s", "-B1", str(m.path)], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    _, _, stored = store_totals(m.store)
    assert abs(used - stored) <= 0.02 * stored + 512 * 10, (used, stored)
    # a no longer splits its last 3 MiB with b: its share grows from ~2.5 to ~4.5 MiB
    assert os.stat(m.path / "a").st_blocks >= 1.5 * a.st_blocks


def test_sync_seals_everything(shared_dir, shared_mount):
    for i in range(20):
        (shared_dir / f"f{i}").write_bytes(os.urandom(50_000 + i))
    shared_mount.sync()
    from elvesfs.db import Database
    db = Database(str(shared_mount.store), readonly=True)
    try:
        with db.read() as txn:
            staged = list(txn.cursor(db=db.t["staging"]).iternext(values=False))
    finally:
        db.close()
    assert staged == []
    assert os.listdir(shared_mount.store / "staging") == []
    r = subprocess.run([sys.executable, "-m", "elvesfs.cli", "sync", str(shared_mount.store)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not an elvesfs mount" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_everything_survives_remount(shared_dir, shared_mount):
    d = shared_dir
    data = os.urandom(1 << 20)
    (d / "file").write_bytes(data)
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "deeper" / "empty").write_bytes(b"")
    os.link(d / "file", d / "sub" / "hard")
    os.symlink("../file", d / "sub" / "sym")
    os.chmod(d / "sub", 0o751)
    os.chown(d / "sub" / "hard", 4242, 2424)
    os.setxattr(d / "file", "user.note", b"kept")
    os.utime(d / "sub" / "deeper" / "empty", ns=(5, 123_456_789_012_345_678))
    # a sparse file past 4 GiB: a few bytes at 5 GiB (outside `d`: tree() reads every byte)
    (shared_dir.parent / "t_4g").mkdir(exist_ok=True)
    big = shared_dir.parent / "t_4g" / "beyond4g"
    with open(big, "wb") as f:
        f.seek(5 << 30)
        f.write(b"far away")
    assert big.stat().st_size == (5 << 30) + 8
    with open(big, "rb") as f:
        f.seek((5 << 30) - 4)
        assert f.read() == bytes(4) + b"far away"
        f.seek(4 << 30)
        assert f.read(4096) == bytes(4096)
    # a staged (still open, fsynced) file is sealed at unmount too
    fd = os.open(d / "open", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"written before unmount")
    os.fsync(fd)
    os.close(fd)
    before = tree(d)
    meta = {p: (os.lstat(d / p).st_mtime_ns, os.lstat(d / p).st_uid, os.lstat(d / p).st_gid)
            for p in before}
    shared_mount.remount()
    assert tree(d) == before
    assert {p: (os.lstat(d / p).st_mtime_ns, os.lstat(d / p).st_uid, os.lstat(d / p).st_gid)
            for p in before} == meta
    assert os.getxattr(d / "file", "user.note") == b"kept"
    assert os.stat(d / "sub" / "hard").st_nlink == 2
    assert big.stat().st_size == (5 << 30) + 8
    with open(big, "rb") as f:
        f.seek(5 << 30)
        assert f.read() == b"far away"
        f.seek(1 << 30)
        assert f.read(1 << 20) == bytes(1 << 20)
    assert big.stat().st_blocks * 512 < 1 << 20


def test_corrupt_chunk_gives_eio_not_wrong_bytes(make_mount):
    """A chunk failing its checksum: EIO for that file, the mount and other files fine."""
    m = make_mount()
    good, bad = os.urandom(300_000), os.urandom(300_000)
    (m.path / "good").write_bytes(good)
    (m.path / "bad").write_bytes(bad)
    m.umount()
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.layout import Layout
    from elvesfs.namespace import Namespace, ROOT_INO, key
    from elvesfs.db import Database
    db = Database(str(m.store))
    try:
        ns = Namespace(db)
        with db.write() as txn:
            ino = ns.lookup(txn, ROOT_INO, b"bad")
            lay = Layout.from_bytes(txn.get(key(ino), db=db.t["layouts"]))
            cid = lay.chunk_id(len(lay) - 1)
            frame = bytearray(ChunkStore(db).frame(txn, cid))
            frame[len(frame) // 2] ^= 0x55     # one flipped byte in the payload
            txn.put(cid, bytes(frame), db=db.t["chunks"])
    finally:
        db.close()
    m.mount()
    with pytest.raises(OSError) as e:
        (m.path / "bad").read_bytes()
    assert e.value.errno == errno.EIO
    assert (m.path / "good").read_bytes() == good
    (m.path / "after").write_bytes(b"still works")
    assert (m.path / "after").read_bytes() == b"still works"
