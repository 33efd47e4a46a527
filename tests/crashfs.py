"""crashfs: a passthrough FUSE filesystem that can lose power (a test tool, its own process).

    python tests/crashfs.py BACKING MOUNTPOINT [--free-mb N]

It models a disk with a volatile page cache, so that the tests can cut the power under
an elvesfs store (tests/test_power_cut.py) instead of only killing its daemon, which
loses nothing the kernel holds:

- File data written through the mount stays in crashfs's memory (4 KiB pages) until
  fsync/fdatasync of that file (or a write through an O_DSYNC handle, which the kernel
  turns into one) writes it to BACKING and fsyncs it there.
- SIGUSR1 is the power cut: each page not yet written goes to BACKING or not at random
  (seeded by the environment variable CRASHFS_SEED), as the kernel's write-back may have
  sent any subset of dirty pages in any order; then the journal's suffix is undone and
  the process exits at once, without unmounting. What BACKING holds then is what a
  reboot finds.
- Names and directories (create, mkdir, unlink, rmdir, rename, link, symlink, mknod) go
  to BACKING at once and into a journal, as in a journaling filesystem (ext4's jbd2):
  fsync commits the whole journal, fdatasync only when the file's size changed (a
  write through an O_DSYNC handle is an fdatasync); at the power cut a random suffix of the
  uncommitted part is undone, newest first (a removed or replaced file comes back from
  a hard link kept aside). Sizes set by truncate, modes and times are never lost. A
  file's size grows on BACKING only with data that reaches it.

statfs reports at most --free-mb free (default 500), so that elvesfs skips allocating
its store file ahead (FUSE has no fallocate: glibc would emulate it with a write per
4 KiB block). Single-threaded (trio): simple and slow, for tests of a few MiB.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import random
import signal
import stat
import sys
import tempfile

import pyfuse3
import trio

PAGE = 4096
log = logging.getLogger("crashfs")


class File:
    """A regular file's unwritten pages and its size as programs see it."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.dirty: dict[int, bytearray] = {}

    def page(self, index: int) -> bytearray:
        """Page `index` as the file holds it now (dirty copy, else read from BACKING)."""
        p = self.dirty.get(index)
        if p is None:
            p = bytearray(PAGE)
            got = os.pread(self.fd, PAGE, index * PAGE)
            p[:len(got)] = got
            self.dirty[index] = p
        return p

    def write(self, off: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            index, at = divmod(off + pos, PAGE)
            n = min(PAGE - at, len(data) - pos)
            self.page(index)[at:at + n] = data[pos:pos + n]
            pos += n
        self.size = max(self.size, off + len(data))

    def read(self, off: int, n: int) -> bytes:
        n = max(0, min(n, self.size - off))
        out = bytearray(os.pread(self.fd, n, off).ljust(n, b"\0"))
        for index in range(off // PAGE, (off + n + PAGE - 1) // PAGE):
            p = self.dirty.get(index)
            if p is not None:
                a, b = max(off, index * PAGE), min(off + n, (index + 1) * PAGE)
                out[a - off:b - off] = p[a - index * PAGE:b - index * PAGE]
        return bytes(out)

    def truncate(self, size: int) -> None:
        """Truncate at once (a metadata change); dirty pages past the end are gone."""
        for index in [i for i in self.dirty if i * PAGE >= size]:
            del self.dirty[index]
        last = self.dirty.get(size // PAGE)
        if last is not None:
            last[size % PAGE:] = bytes(PAGE - size % PAGE)
        if os.fstat(self.fd).st_size > size:
            os.ftruncate(self.fd, size)
        self.size = size

    def flush_page(self, index: int) -> None:
        """Write one page to BACKING, never past the file's size."""
        p = self.dirty.pop(index)
        end = min(PAGE, self.size - index * PAGE)
        if end > 0:
            os.pwrite(self.fd, bytes(p[:end]), index * PAGE)

    def fsync(self) -> bool:
        """Write every unwritten page; whether the size on BACKING changed (metadata)."""
        before = os.fstat(self.fd).st_size
        for index in sorted(self.dirty):
            self.flush_page(index)
        if os.fstat(self.fd).st_size < self.size:
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        return os.fstat(self.fd).st_size != before


class CrashFS(pyfuse3.Operations):
    """Path-based passthrough: a FUSE inode is the BACKING inode number."""

    def __init__(self, backing: str, free: int) -> None:
        super().__init__()
        self.free = free
        self.root_ino = os.lstat(backing).st_ino
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: backing}
        self.files: dict[int, File] = {}  # every file opened (their fds stay open)
        self.journal: list[tuple] = []  # name changes not yet committed by an fsync
        # hard links to removed or replaced files, beside BACKING (same filesystem), one
        # directory per run: a run after a cut must not collide with the last one's
        self.stash = tempfile.mkdtemp(prefix=".crashfs-stash-", dir=os.path.dirname(backing))
        self.kept = itertools.count()

    # -- helpers
    def _ino(self, st_ino: int) -> int:
        return pyfuse3.ROOT_INODE if st_ino == self.root_ino else st_ino

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        a = pyfuse3.EntryAttributes()
        ino = self._ino(st.st_ino)
        for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_blocks",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, k, getattr(st, k))
        f = self.files.get(ino)
        a.st_size = f.size if f is not None else st.st_size
        a.st_ino = ino
        a.st_blksize = PAGE
        a.attr_timeout = a.entry_timeout = 0
        self.paths[ino] = path
        return a

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _file(self, ino: int) -> File:
        f = self.files.get(ino)
        if f is None:
            fd = os.open(self._path(ino), os.O_RDWR | os.O_CLOEXEC)
            f = self.files[ino] = File(fd, os.fstat(fd).st_size)
        return f

    # -- the FUSE operations
    async def lookup(self, parent, name, ctx=None):
        return self._attr(self._child(parent, name))

    async def getattr(self, ino, ctx=None):
        return self._attr(self._path(ino))

    async def setattr(self, ino, attr, fields, fh, ctx):
        path = self._path(ino)
        if fields.update_size:
            self._file(ino).truncate(attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.lchown(path, attr.st_uid if fields.update_uid else -1,
                      attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return self._attr(path)

    async def readlink(self, ino, ctx):
        return os.fsencode(os.readlink(self._path(ino)))

    async def opendir(self, ino, ctx):
        return ino

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for i, name in enumerate(names[start_id:], start_id):
            try:
                attr = self._attr(os.path.join(path, name))
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def mkdir(self, parent, name, mode, ctx):
        path = self._child(parent, name)
        self._os(os.mkdir, path, mode)
        self.journal.append(("rmdir", path))
        return self._attr(path)

    async def mknod(self, parent, name, mode, rdev, ctx):
        path = self._child(parent, name)
        self._os(os.mknod, path, mode, rdev)
        self.journal.append(("unlink", path))
        return self._attr(path)

    async def symlink(self, parent, name, target, ctx):
        path = self._child(parent, name)
        self._os(os.symlink, os.fsdecode(target), path)
        self.journal.append(("unlink", path))
        return self._attr(path)

    async def link(self, ino, new_parent, new_name, ctx):
        path = self._child(new_parent, new_name)
        self._os(os.link, self._path(ino), path)
        self.journal.append(("unlink", path))
        return self._attr(path)

    async def unlink(self, parent, name, ctx):
        path = self._child(parent, name)
        kept = self._keep(path)
        self._os(os.unlink, path)
        self.journal.append(("restore", kept, path))

    async def rmdir(self, parent, name, ctx):
        path = self._child(parent, name)
        self._os(os.rmdir, path)
        self.journal.append(("mkdir", path))

    async def rename(self, old_parent, old_name, new_parent, new_name, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(old_parent, old_name), self._child(new_parent, new_name)
        replaced = os.path.lexists(new)
        kept = self._keep(new) if replaced else None
        self._os(os.rename, old, new)
        self.journal.append(("rename", new, old, replaced, kept))
        for ino, p in list(self.paths.items()):  # the moved entry and, for a directory,
            if p == old or p.startswith(old + "/"):  # everything below it
                self.paths[ino] = new + p[len(old):]

    async def open(self, ino, flags, ctx):
        self._file(ino)
        return pyfuse3.FileInfo(fh=ino, keep_cache=False)

    async def create(self, parent, name, mode, flags, ctx):
        path = self._child(parent, name)
        existed = os.path.lexists(path)
        fd = self._os(os.open, path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC |
                      (flags & os.O_EXCL), mode)
        os.close(fd)
        if not existed:
            self.journal.append(("unlink", path))
        attr = self._attr(path)
        if flags & os.O_TRUNC:
            self._file(attr.st_ino).truncate(0)
        await self.open(attr.st_ino, flags, ctx)
        return pyfuse3.FileInfo(fh=attr.st_ino), attr

    async def read(self, fh, off, size):
        return self._file(fh).read(off, size)

    async def write(self, fh, off, buf):
        self._file(fh).write(off, bytes(buf))
        return len(buf)

    async def fsync(self, fh, datasync):
        grew = self._file(fh).fsync()
        if grew or not datasync:  # as ext4: fsync commits the journal; fdatasync only
            self.journal.clear()  # when the file's size (metadata it needs) changed

    async def fsyncdir(self, fh, datasync):
        self.journal.clear()

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = s.f_bavail = min(st.f_bavail, self.free // st.f_frsize)
        s.f_files, s.f_ffree, s.f_favail = st.f_files, st.f_ffree, st.f_favail
        s.f_namemax = 255
        return s

    def _keep(self, path: str) -> str | None:
        """A hard link to the file at `path`, to bring it back if its removal is undone
        (directories are not kept: only empty ones are ever replaced or removed)."""
        if os.path.isdir(path) and not os.path.islink(path):
            return None
        kept = os.path.join(self.stash, str(next(self.kept)))
        os.link(path, kept, follow_symlinks=False)
        return kept

    @staticmethod
    def _os(fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    # -- the power cut
    def cut_power(self, seed: int) -> None:
        """Write a random subset of the unwritten pages (in a random order), then exit."""
        rng = random.Random(seed)
        pages = [(f, i) for f in self.files.values() for i in f.dirty]
        rng.shuffle(pages)
        written = 0
        for f, i in pages:
            if rng.random() < 0.5:
                f.flush_page(i)
                written += 1
        for f in self.files.values():
            os.fsync(f.fd)
        lost = rng.randint(0, len(self.journal))
        for op in reversed(self.journal[len(self.journal) - lost:]):
            _undo(op)
        log.info("power cut (seed %d): %d of %d unwritten pages reached the disk, "
                 "%d of %d uncommitted name changes were lost",
                 seed, written, len(pages), lost, len(self.journal))
        os._exit(0)


def _undo(op: tuple) -> None:
    """Undo one journaled name change (best effort: the state it left may be gone)."""
    kind, *args = op
    try:
        if kind == "unlink":
            os.unlink(args[0])
        elif kind == "rmdir":
            os.rmdir(args[0])
        elif kind == "mkdir":
            os.mkdir(args[0])
        elif kind == "restore":
            os.rename(args[0], args[1])
        elif kind == "rename":
            new, old, replaced, kept = args
            os.rename(new, old)
            if kept is not None:
                os.rename(kept, new)
            elif replaced:  # an empty directory
                os.mkdir(new)
    except OSError as exc:
        log.warning("cannot undo %s: %s", op, exc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--free-mb", type=int, default=500)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="crashfs: %(message)s")
    fs = CrashFS(os.path.abspath(a.backing), a.free_mb << 20)
    seed = int(os.environ.get("CRASHFS_SEED", "0"))
    signal.signal(signal.SIGUSR1, lambda *_: fs.cut_power(seed))
    pyfuse3.init(fs, a.mountpoint, {"fsname=crashfs", "subtype=crashfs"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    sys.exit(main())
