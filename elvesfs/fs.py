"""The FUSE layer: translates pyfuse3 calls into namespace, staging and read operations.

The slow parts of a file's life that its calls set going (pre-seal while it grows, seal
once closed, free once removed) are lifecycle.py's.

Rules this module keeps:
- it runs on the trio event loop and never does CPU work there: decoding, sealing
  and garbage collection go to worker threads (`trio.to_thread`);
- every handler maps errors to an errno; an unexpected exception is logged and
  becomes EIO, never a dead mount;
- lookup counts are tracked so an unlinked inode lives until the kernel forgets
  it and its last handle is closed.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from typing import Any, Callable, Sequence

import pyfuse3
import trio

from .accounting import stored_share
from .chunkstore import ChunkStore
from .coding import mend_chunk
from .db import Database
from .errors import ElvesError, StoreCorruptError, StoreFullError
from .ingest import Sealer
from .lifecycle import Lifecycle
from .layout import HOLE, Layout
from .namespace import FsError, Inode, Namespace, ROOT_INO, key
from .policy import XATTR as POLICY_XATTR, Policy, PolicyError, file_policy
from .reader import ChunkReader
from .staging import Staging
from .state import DirHandle, Handle, InodeState, InodeStates

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 1.0
BLKSIZE = 1 << 20  # st_blksize: cp and friends write 1 MiB at a time (fewer FUSE calls)
MAX_FILE_SIZE = (1 << 63) - 1
READAHEAD = 4  # chunks past a read that are decoded ahead of the reader ...
PREFETCH_MIN = 1 << 20  # ... if they are at least this big (see _readahead)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# The kernel's listxattr returns at most this many bytes of names (XATTR_LIST_MAX): a file
# with more could not be listed (E2BIG), so cp -a, rsync -X and getfattr -d would fail.
XATTR_LIST_MAX = 65536


def handler(fn: Callable) -> Callable:
    """Map exceptions to errnos; an unexpected one is logged and becomes EIO."""

    @functools.wraps(fn)
    async def wrapper(self: "Operations", *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (FsError, ElvesError) as exc:
            if exc.errno == errno.EIO or isinstance(exc, StoreFullError):
                log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("%s: disk full: %s", fn.__name__, exc)
            elif exc.errno in (errno.EFBIG, errno.EINVAL):
                log.info("%s: %s", fn.__name__, exc)
            else:
                log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Operations(pyfuse3.Operations):
    """pyfuse3 operations of one mounted store."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    direct_writes = True  # sole write-only handles bypass the page cache (_open_handle)

    def __init__(self, db: Database, ns: Namespace, chunks: ChunkStore, staging: Staging,
                 reader: ChunkReader, sealer: Sealer, default_policy: Policy,
                 preseal: bool = True) -> None:
        super().__init__()
        self.db, self.ns, self.chunks, self.staging = db, ns, chunks, staging
        self.reader, self.sealer = reader, sealer
        self.default_policy = default_policy
        self.state = InodeStates()
        self.lookups: Counter[int] = Counter()
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self.parents: dict[int, int] = {ROOT_INO: ROOT_INO}  # directory -> parent, for ".."
        # chunks a readahead task is fetching, set when it is done (cached, or failed)
        self.prefetching: dict[bytes, trio.Event] = {}
        self._next_fh = 1
        self.layouts: dict[int, Layout] = {}
        self.generation = 0  # bumped whenever refcounts change: invalidates st_blocks shares
        self.blocks: dict[int, tuple[int, int]] = {}
        # one decoding reader thread per CPU: decoding is CPU work, and more threads only
        # trade the GIL back and forth (cold 1 GiB `cat`s on 2 CPUs, 4 runs each: 4
        # threads 1.66 s median, 2 threads 1.57 s; a checkpoint of 4 MiB deltas 0.86 vs 0.76 s)
        self.read_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.nursery: trio.Nursery | None = None
        # pre-seals, seals and frees: the slow parts of a file's life, off this layer
        self.life = Lifecycle(db, ns, staging, sealer, self.state, self.lookups, self.handles,
                              self._policy, self._stored_changed, preseal)

    def serve_in(self, nursery: trio.Nursery) -> None:
        """Start background tasks (readahead, seals, pre-seals, frees) in `nursery`."""
        self.nursery = self.life.nursery = nursery

    # -- helpers -------------------------------------------------------------
    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        st = self.state.get(inode.ino)
        size = st.size if st is not None and st.staged else inode.size
        mtime = st.mtime_ns if st is not None and st.mtime_ns is not None else inode.mtime_ns
        ctime = st.ctime_ns if st is not None and st.ctime_ns is not None else inode.ctime_ns
        a.st_ino = inode.ino
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = inode.rdev
        a.st_size = size
        a.st_blksize = BLKSIZE
        a.st_blocks = await self._blocks(inode, st)
        a.st_atime_ns = inode.atime_ns
        a.st_mtime_ns = mtime
        a.st_ctime_ns = ctime
        return a

    async def _blocks(self, inode: Inode, st: InodeState | None) -> int:
        """512-byte blocks: the file's share of stored bytes (1/N of a chunk N files share);
        a staged file's staging file, plus the sealed bytes below its base if tail staged."""
        if st is not None and st.staged:
            own = os.fstat(st.fd).st_blocks
            return own + await self._stored_blocks(inode) if st.base else own
        if not inode.is_reg or inode.size == 0:
            return 0
        return await self._stored_blocks(inode)

    async def _stored_blocks(self, inode: Inode) -> int:
        """512-byte blocks of the inode's share of its sealed layout's bytes (cached)."""
        cached = self.blocks.get(inode.ino)
        if cached and cached[0] == self.generation:
            return cached[1]
        gen = self.generation
        blocks = await trio.to_thread.run_sync(self._share_blocks, inode.ino,
                                               limiter=self.read_limiter)
        self.blocks[inode.ino] = (gen, blocks)
        return blocks

    def _share_blocks(self, ino: int) -> int:
        """512-byte blocks of the inode's share of stored bytes (thread side)."""
        with self.db.read() as txn:
            share = stored_share(txn, self.db.t, self.chunks, ino)
        return int((share + 511) // 512)

    def _layout(self, ino: int) -> Layout:
        lay = self.layouts.get(ino)
        if lay is None:
            with self.db.read() as txn:
                raw = txn.get(key(ino), db=self.db.t["layouts"])
            lay = Layout.from_bytes(raw) if raw else Layout.empty()
            if len(self.layouts) > 4096:
                self.layouts.clear()
            self.layouts[ino] = lay
        return lay

    def _get(self, ino: int) -> Inode:
        with self.db.read() as txn:
            return self.ns.get(txn, ino)

    def _policy(self, ino: int) -> Policy:
        with self.db.read() as txn:
            raw = self.ns.getxattr(txn, ino, POLICY_XATTR)
        return file_policy(raw, self.default_policy, ino)

    def _touch_dir(self, txn, ino: int, now: int, nlink_delta: int = 0) -> None:
        d = self.ns.get(txn, ino)
        d.mtime_ns = d.ctime_ns = now
        d.nlink += nlink_delta
        self.ns.put(txn, d)

    def _lookup_inc(self, ino: int) -> None:
        self.lookups[ino] += 1

    # -- lookup and attributes --------------------------------------------------
    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        if len(name) > 255:
            raise FsError(errno.ENAMETOOLONG)
        with self.db.read() as txn:
            ino = self.ns.lookup(txn, parent_inode, name)
            if ino is None:
                raise FsError(errno.ENOENT)
            inode = self.ns.get(txn, ino)
        attrs = await self._attrs(inode)
        self._lookup_inc(ino)
        if inode.is_dir:
            self.parents[ino] = parent_inode
        return attrs

    @handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.lookups[ino] -= n
            if self.lookups[ino] <= 0:
                del self.lookups[ino]
                await self.life.maybe_drop(ino)

    @handler
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return await self._attrs(self._get(inode))

    @handler
    async def setattr(self, inode: int, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        now = time.time_ns()
        if fields.update_size:
            await self._truncate(inode, attr.st_size)
        with self.db.write() as txn:
            node = self.ns.get(txn, inode)
            st = self.state.get(inode)
            if fields.update_mode:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                node.uid = attr.st_uid
            if fields.update_gid:
                node.gid = attr.st_gid
            if fields.update_atime:
                node.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
                if st is not None:
                    st.mtime_ns = None
            elif fields.update_size:
                node.mtime_ns = now
                if st is not None:
                    st.mtime_ns = None
            node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
            if st is not None:
                st.ctime_ns = None
                if st.staged:
                    node.size = st.size
            self.ns.put(txn, node)
        return await self._attrs(node)

    async def _truncate(self, ino: int, size: int) -> None:
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        if self._get(ino).is_dir:
            raise FsError(errno.EISDIR)
        st = self.state.of(ino)
        async with st.lock:  # a held lock keeps `st` in self.state while the seal ends
            await self.life.stop_seal(st)
            inode = self._get(ino)  # a seal that just finished changed it
            if not st.staged and size == inode.size:
                unchanged = True
            else:
                unchanged = False
                if not st.staged:
                    await self._stage(st, inode, copy=size > 0, at=min(size, inode.size))
                elif size < st.base:
                    await self._fill_base(st, size)
                os.ftruncate(st.fd, size)
                st.size = size
                self.life.reset_preseal(st, fresh=size == 0)
        if unchanged:
            self.state.release(ino)
        elif not st.writers:
            self.life.schedule_seal(ino)

    @handler
    async def readlink(self, inode: int, ctx) -> bytes:
        with self.db.read() as txn:
            return self.ns.readlink(txn, inode)

    # -- creating entries ---------------------------------------------------------
    def _new_entry(self, parent: int, name: bytes, mode: int, ctx, rdev: int = 0,
                   target: bytes | None = None) -> Inode:
        """Create an inode and its entry in one transaction (POSIX: EEXIST if taken)."""
        self.ns.check_name(name)
        now = time.time_ns()
        with self.db.write() as txn:
            p = self.ns.get(txn, parent)
            if not p.is_dir:
                raise FsError(errno.ENOTDIR)
            if p.nlink == 0:
                raise FsError(errno.ENOENT)
            if self.ns.lookup(txn, parent, name) is not None:
                raise FsError(errno.EEXIST)
            gid = ctx.gid
            if p.mode & stat.S_ISGID:
                gid = p.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            inode = self.ns.new_inode(txn, mode, ctx.uid, gid, rdev)
            if target is not None:
                self.ns.set_symlink(txn, inode.ino, target)
                inode.size = len(target)
                self.ns.put(txn, inode)
            self.ns.link(txn, parent, name, inode.ino)
            policy = self.ns.getxattr(txn, parent, POLICY_XATTR)
            if policy is not None and (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                self.ns.setxattr(txn, inode.ino, POLICY_XATTR, policy)
            self._touch_dir(txn, parent, now, 1 if stat.S_ISDIR(mode) else 0)
        return inode

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx):
        inode = self._new_entry(parent_inode, name, mode, ctx, rdev)
        self._lookup_inc(inode.ino)
        return await self._attrs(inode)

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx):
        inode = self._new_entry(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        self._lookup_inc(inode.ino)
        self.parents[inode.ino] = parent_inode
        return await self._attrs(inode)

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx):
        inode = self._new_entry(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target)
        self._lookup_inc(inode.ino)
        return await self._attrs(inode)

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        inode = self._new_entry(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        self._lookup_inc(inode.ino)
        # no staging file yet: the first write makes one, so an empty file (lock files,
        # `touch`) costs no staging, seal or garbage collection
        fi = self._open_handle(inode.ino, flags)
        return fi, await self._attrs(inode)

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        self.ns.check_name(new_name)
        now = time.time_ns()
        with self.db.write() as txn:
            node = self.ns.get(txn, inode)
            if node.is_dir:
                raise FsError(errno.EPERM)
            if self.ns.lookup(txn, new_parent_inode, new_name) is not None:
                raise FsError(errno.EEXIST)
            node.nlink += 1
            node.ctime_ns = now
            self.ns.put(txn, node)
            self.ns.link(txn, new_parent_inode, new_name, inode)
            self._touch_dir(txn, new_parent_inode, now)
        self._lookup_inc(inode)
        return await self._attrs(node)

    # -- removing entries ---------------------------------------------------------
    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        now = time.time_ns()

        def remove(txn) -> Inode:
            ino = self.ns.lookup(txn, parent_inode, name)
            if ino is None:
                raise FsError(errno.ENOENT)
            node = self.ns.get(txn, ino)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            self.ns.unlink(txn, parent_inode, name)
            node.nlink -= 1
            node.ctime_ns = now
            self.ns.put(txn, node)
            self._touch_dir(txn, parent_inode, now)
            return node
        node = self.db.write_freeing(remove)
        if node.nlink == 0:
            await self.life.maybe_drop(node.ino)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx) -> None:
        now = time.time_ns()

        def remove(txn) -> int:
            ino = self.ns.lookup(txn, parent_inode, name)
            if ino is None:
                raise FsError(errno.ENOENT)
            node = self.ns.get(txn, ino)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if not self.ns.is_empty_dir(txn, ino):
                raise FsError(errno.ENOTEMPTY)
            self.ns.unlink(txn, parent_inode, name)
            node.nlink = 0
            node.ctime_ns = now
            self.ns.put(txn, node)
            self._touch_dir(txn, parent_inode, now, -1)
            return ino
        ino = self.db.write_freeing(remove)
        self.parents.pop(ino, None)
        await self.life.maybe_drop(ino)

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx) -> None:
        self.ns.check_name(name_new)
        now = time.time_ns()
        dropped, moved = self.db.write_freeing(
            lambda txn: self._rename(txn, parent_inode_old, name_old, parent_inode_new,
                                     name_new, flags, now))
        self.parents.update(moved)  # once committed
        if dropped is not None:
            await self.life.maybe_drop(dropped)

    def _rename(self, txn, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                name_new: bytes, flags: int, now: int) -> tuple[int | None, dict[int, int]]:
        """rename()'s transaction (no effect outside it: write_freeing may run it twice):
        the inode it unlinked for good, if any, and {directory: its new parent}."""
        dropped = None
        moved: dict[int, int] = {}
        src = self.ns.lookup(txn, parent_inode_old, name_old)
        if src is None:
            raise FsError(errno.ENOENT)
        dst = self.ns.lookup(txn, parent_inode_new, name_new)
        snode = self.ns.get(txn, src)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            dnode = self.ns.get(txn, dst)
            self.ns.link(txn, parent_inode_old, name_old, dst)
            self.ns.link(txn, parent_inode_new, name_new, src)
            if parent_inode_old != parent_inode_new and snode.is_dir != dnode.is_dir:
                moved_dir_delta = 1 if snode.is_dir else -1
                self._touch_dir(txn, parent_inode_old, now, -moved_dir_delta)
                self._touch_dir(txn, parent_inode_new, now, moved_dir_delta)
            else:
                self._touch_dir(txn, parent_inode_old, now)
                self._touch_dir(txn, parent_inode_new, now)
            for n in (snode, dnode):
                n.ctime_ns = now
                self.ns.put(txn, n)
            if snode.is_dir:
                moved[src] = parent_inode_new
            if dnode.is_dir:
                moved[dst] = parent_inode_old
            return None, moved
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if dst == src:
                return None, moved
            dnode = self.ns.get(txn, dst)
            if dnode.is_dir:
                if not snode.is_dir:
                    raise FsError(errno.EISDIR)
                if not self.ns.is_empty_dir(txn, dst):
                    raise FsError(errno.ENOTEMPTY)
                dnode.nlink = 0
                self._touch_dir(txn, parent_inode_new, now, -1)
            else:
                if snode.is_dir:
                    raise FsError(errno.ENOTDIR)
                dnode.nlink -= 1
            dnode.ctime_ns = now
            self.ns.put(txn, dnode)
            if dnode.nlink == 0:
                dropped = dst
        self.ns.unlink(txn, parent_inode_old, name_old)
        self.ns.link(txn, parent_inode_new, name_new, src)
        snode.ctime_ns = now
        self.ns.put(txn, snode)
        delta = 1 if snode.is_dir and parent_inode_old != parent_inode_new else 0
        if snode.is_dir:
            moved[src] = parent_inode_new
        self._touch_dir(txn, parent_inode_old, now, -delta)
        self._touch_dir(txn, parent_inode_new, now, delta)
        return dropped, moved

    # -- open, read, write ----------------------------------------------------------
    def _open_handle(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        """A new handle. A write-only open of a file nobody else has open is direct_io:
        `cp`, `torch.save` and `save_file` then write straight to the daemon without the
        kernel page cache (a copy, and a page allocated per 4 KiB, less per byte
        written; without writeback caching the kernel drops such pages anyway once it
        sees the new mtime). Its open drops pages cached earlier (keep_cache off). A
        page-cache handle opened while it is open makes it `mixed`: then each of its
        writes drops the kernel's pages before (dirty mappings are written back first:
        they are older) and after (a read racing the write may have cached old bytes).
        Linux >= 6.6 does the first itself; older kernels need both."""
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        st = self.state.of(ino)
        direct = self.direct_writes and (flags & os.O_ACCMODE) == os.O_WRONLY \
            and not st.handles
        fh = self._fh()
        self.handles[fh] = Handle(ino, writable, flags, direct=direct)
        st.handles += 1
        if writable:
            st.writers += 1
        if direct:
            st.direct_writers += 1
        elif st.direct_writers:
            st.mixed = True
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct, direct_io=direct)

    @handler
    async def open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        node = self._get(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        fi = self._open_handle(inode, flags)
        if flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY:
            # libfuse enables atomic_o_trunc: the kernel sends no setattr for O_TRUNC,
            # truncating is ours (after the handle exists, so no seal starts in between)
            try:
                await self._truncate(inode, 0)
            except BaseException:
                await self.release(fi.fh)
                raise
            st = self.state.of(inode)
            st.mtime_ns = st.ctime_ns = time.time_ns()
        return fi

    async def _stage(self, st: InodeState, inode: Inode, copy: bool, at: int = 0) -> None:
        """Give the inode a staging file; with `copy`, holding its sealed content first:
        tail staged (staging.py) from the chunk holding `at`, the first offset written,
        where the seal can keep the chunks below it, so an append to a large file copies
        only its last chunk.

        The staging record (what recovery seals) is committed only once the file holds the
        sealed content it takes over, durably: a crash during the copy leaves a stray file
        that recovery deletes, never a half copy that would replace the sealed data."""
        lay = self._layout(inode.ino) if copy and inode.size else None
        base = self.sealer.tail_base(inode.ino, lay, at) if lay is not None else 0
        fd = self.staging.create_file(inode.ino)
        try:
            if lay is not None:
                await trio.to_thread.run_sync(self._copy_sealed, lay, fd, base, inode.size,
                                              limiter=self.read_limiter)
            with self.db.write() as txn:
                self.staging.mark(txn, inode.ino, base)
        except BaseException:
            os.close(fd)
            self.staging.remove_file(inode.ino)
            raise
        st.fd, st.base = fd, base
        st.size = inode.size if copy else 0
        self.layouts.pop(inode.ino, None)
        self.life.reset_preseal(st, fresh=st.size == 0)

    async def _fill_base(self, st: InodeState, cut: int | None = None) -> None:
        """Before a write below a tail-staged file's base (or a truncate to `cut` below
        it): the sealed bytes below the base into the staging file (Sealer.fill_base)."""
        await trio.to_thread.run_sync(self.sealer.fill_base, st.ino, self._layout(st.ino),
                                      st.base, cut, limiter=self.read_limiter)
        st.base = 0

    def _copy_sealed(self, lay: Layout, fd: int, start: int, size: int) -> None:
        """Thread side of _stage: sealed content from `start` into the staging file, of
        length `size`, made durable."""
        self.reader.copy_to_fd(lay, fd, start)
        os.ftruncate(fd, size)
        os.fsync(fd)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        return await self._read(self.handles[fh].ino, off, size)

    async def _read(self, ino: int, off: int, size: int, retry: bool = True
                    ) -> bytes | memoryview:
        st = self.state.get(ino)
        if st is None or not st.staged:
            return await self._read_sealed(ino, off, size, retry)
        if off >= st.base:
            return os.pread(st.fd, size, off)
        # tail staged: below the base, the bytes are the sealed layout's
        n = min(size, st.base - off)
        head = await self._read_sealed(ino, off, n, retry)
        if len(head) < n or n == size:
            return head
        return b"".join((head, await self._read(ino, off + n, size - n, retry)))

    async def _read_sealed(self, ino: int, off: int, size: int, retry: bool
                           ) -> bytes | memoryview:
        """Read from the inode's sealed layout (decoded chunks, cached and read ahead)."""
        lay = self._layout(ino)
        if off >= lay.size:
            return b""
        data = self.reader.cached_range(lay, off, size)
        if data is None and await self._prefetched(lay, off, size):
            data = self.reader.cached_range(lay, off, size)
        if data is None:
            try:
                data = await trio.to_thread.run_sync(self.reader.read_range, lay, off,
                                                     size, limiter=self.read_limiter)
            except StoreCorruptError:
                # A rewrite sealed meanwhile may have released the chunks of the layout
                # we started from: read the file's current content instead.
                st = self.state.get(ino)
                if retry and ((st is not None and st.staged) or self._layout(ino) is not lay):
                    return await self._read(ino, off, size, retry=False)
                raise
        self._readahead(lay, off + size)
        return data

    def _readahead(self, lay: Layout, off: int) -> None:
        """Prepare what a sequential reader (a loader reading whole shards) needs next.

        Big chunks are decoded ahead in worker threads: the kernel's next requests would
        all wait on one chunk's decode. Small ones are not: the kernel's own readahead
        already keeps several requests in flight, and a task per 256 KiB chunk only
        contends for the GIL and the event loop (a 1 GiB cold `cat` of a generic file:
        2.6 s with them, 2.0 s without)."""
        if self.nursery is None or off >= lay.size:
            return
        i = lay.find(off)
        for j in range(i, min(i + READAHEAD, len(lay))):
            cid = lay.chunk_id(j)
            if (cid != HOLE and lay.length(j) >= PREFETCH_MIN
                    and cid not in self.prefetching and cid not in self.reader.cache):
                # one task per chunk: duplicates would each hold a reader thread slot
                self.prefetching[cid] = trio.Event()
                self.nursery.start_soon(self._prefetch, cid)

    async def _prefetch(self, cid: bytes) -> None:
        try:
            await trio.to_thread.run_sync(self.reader.get, cid, limiter=self.read_limiter)
        except Exception as exc:  # the real read will report it
            log.debug("readahead of %s failed: %s", cid.hex(), exc)
        finally:
            self.prefetching.pop(cid).set()

    async def _prefetched(self, lay: Layout, off: int, size: int) -> bool:
        """Wait here, on the event loop, for readahead tasks already decoding chunks of
        [off, off + size); True if there were any. The kernel sends the 1 MiB requests of
        a 4 MiB chunk at once: each waiting in a reader thread would hold a slot of
        read_limiter that the next chunks' readahead needs."""
        pending = [self.prefetching[c] for c in lay.chunk_ids(off, size) if c in self.prefetching]
        for ev in pending:
            await ev.wait()
        return bool(pending)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        h.flushed = False
        if off + len(buf) > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        st = self.state.of(h.ino)
        if not st.staged or st.sealing or off < st.base:
            async with st.lock:
                await self.life.stop_seal(st)
                if not st.staged:
                    await self._stage(st, self._get(h.ino), copy=True, at=off)
                if off < st.base:
                    await self._fill_base(st)
        if h.direct and st.mixed:  # write back what mmaps dirtied first: it is older
            await self._drop_kernel_pages(h.ino)
        n = os.pwrite(st.fd, buf, off)
        while n < len(buf):
            try:
                n += os.pwrite(st.fd, memoryview(buf)[n:], off + n)
            except OSError:  # a full disk part-way: report what was written, as
                break  # ext4 does (the staging file's length is the file's size)
        if h.direct and st.mixed:  # the page-cache handles' pages are stale now
            await self._drop_kernel_pages(h.ino)
        if off + n > st.size:
            st.size = off + n
        st.mtime_ns = st.ctime_ns = time.time_ns()
        self.life.wrote(st, off, off + n)
        return n

    def _persist_attrs(self, st: InodeState) -> None:
        """Write in-memory size and times into the stored inode (if there are any: a
        release of a file opened for writing and not written, `touch` or a `.lock` file,
        commits nothing, and does not wait for a seal's commits)."""
        if not st.staged and st.mtime_ns is None and st.ctime_ns is None:
            return
        with self.db.write() as txn:
            node = self.ns.find(txn, st.ino)
            if node is None:
                return
            if st.staged:
                node.size = st.size
            if st.mtime_ns is not None:
                node.mtime_ns = st.mtime_ns
            if st.ctime_ns is not None:
                node.ctime_ns = st.ctime_ns
            self.ns.put(txn, node)
        st.mtime_ns = st.ctime_ns = None

    @handler
    async def flush(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h is not None and h.writable:
            h.flushed = True
            st = self.state.get(h.ino)
            if st is not None and (st.mtime_ns is not None or st.ctime_ns is not None):
                self._persist_attrs(st)

    @handler
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        st = self.state.of(h.ino)
        st.handles -= 1
        if h.writable:
            st.writers -= 1
            self._persist_attrs(st)
        if h.direct:
            st.direct_writers -= 1
            st.mixed = st.mixed and st.direct_writers > 0
        if st.staged and not st.writers:
            with self.db.read() as txn:
                node = self.ns.find(txn, h.ino)
            if node is not None and node.nlink > 0:
                self.life.schedule_seal(h.ino)
        if not st.handles:
            await self.life.maybe_drop(h.ino)
        self.state.release(h.ino)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        st = self.state.get(h.ino)
        if st is None or not st.staged:
            await trio.to_thread.run_sync(self.db.sync)
            return
        self._persist_attrs(st)
        fd = os.dup(st.fd)  # a seal may close st.fd while the fsync runs in a thread
        try:
            await trio.to_thread.run_sync(self._sync_staged, h.ino, fd)
        finally:
            os.close(fd)

    def _sync_staged(self, ino: int, fd: int) -> None:
        """Thread side of fsync of a staged file: its bytes, its staging file's entry
        (once per staging file), then LMDB with its staging record and attributes."""
        os.fsync(fd)
        self.staging.sync_entry(ino)
        self.db.sync()

    async def _drop_kernel_pages(self, ino: int) -> None:
        """Have the kernel write back and drop its cached pages of `ino`, from a worker
        thread: the kernel waits for pages locked by reads (or written back by it) that
        this loop has to serve meanwhile."""
        await trio.to_thread.run_sync(self._invalidate, ino, True)

    def _invalidate(self, ino: int, data: bool) -> None:
        """Drop kernel-cached attributes (st_blocks changed) and, after lossy coding, data."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=not data)
        except Exception as exc:  # not mounted (tests) or inode unknown to the kernel
            log.debug("invalidate_inode(%d): %s", ino, exc)

    def _stored_changed(self, ino: int, refs: bool, data: bool | None) -> None:
        """The inode's stored content changed: forget its cached layout and st_blocks;
        `refs`: chunks' refcounts changed too, so any file's share of them may have;
        unless `data` is None, have the kernel drop the inode's attributes, and its
        pages if `data`."""
        self.layouts.pop(ino, None)
        self.blocks.pop(ino, None)
        if refs:
            self.generation += 1
        if data is not None:
            self._invalidate(ino, data)

    async def mend(self, cid: bytes) -> tuple[str, ...]:
        """Rebuild a protected chunk's damaged streams from their parity and write it
        back (`elvesfs scrub --repair`), in a worker thread."""
        return await trio.to_thread.run_sync(mend_chunk, self.db, cid)

    # -- directories --------------------------------------------------------------
    @handler
    async def opendir(self, inode: int, ctx) -> int:
        node = self._get(inode)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        fh = self._fh()
        self.dirs[fh] = DirHandle(inode)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token) -> None:
        d = self.dirs[fh]
        if d.entries is None or start_id == 0:
            with self.db.read() as txn:
                d.entries = self.ns.entries(txn, d.ino)
        # ids: 1 after ".", 2 after "..", i + 3 after entry i. The kernel takes no lookup
        # reference for "." and ".." (so none is counted here), only for the others.
        for dot, ino, next_id in ((b".", d.ino, 1), (b"..", self.parents.get(d.ino, d.ino), 2)):
            if start_id < next_id:
                with self.db.read() as txn:
                    node = self.ns.find(txn, ino) or self.ns.find(txn, d.ino)
                if node is None:
                    return
                if not pyfuse3.readdir_reply(token, dot, await self._attrs(node), next_id):
                    return
        for i in range(max(start_id - 2, 0), len(d.entries)):
            name, ino = d.entries[i]
            with self.db.read() as txn:
                node = self.ns.find(txn, ino)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, await self._attrs(node), i + 3):
                break
            self._lookup_inc(ino)
            if node.is_dir:
                self.parents[ino] = d.ino

    @handler
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self.db.sync)

    # -- xattrs ---------------------------------------------------------------------
    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx) -> None:
        if name == POLICY_XATTR:
            try:
                Policy.parse(value)
            except PolicyError as exc:
                log.warning("rejected policy on inode %d: %s", inode, exc)
                raise FsError(errno.EINVAL) from None
        if len(name) > 255:
            raise FsError(errno.ERANGE)
        if not name.startswith(XATTR_NAMESPACES):
            # like ext4: unknown namespaces, and system.* (POSIX ACLs would be stored but
            # never enforced), are not supported
            raise FsError(errno.EOPNOTSUPP)
        with self.db.write() as txn:
            node = self.ns.get(txn, inode)
            if self.ns.getxattr(txn, inode, name) is None:
                listed = sum(len(n) + 1 for n in self.ns.xattr_names(txn, inode))
                if listed + len(name) + 1 > XATTR_LIST_MAX:
                    raise FsError(errno.ENOSPC)  # what ext4 says when its xattr space is full
            self.ns.setxattr(txn, inode, name, value)
            node.ctime_ns = time.time_ns()
            self.ns.put(txn, node)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        with self.db.read() as txn:
            self.ns.get(txn, inode)
            value = self.ns.getxattr(txn, inode, name)
        if value is None:
            raise FsError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode: int, ctx) -> list[bytes]:
        with self.db.read() as txn:
            return self.ns.xattr_names(txn, inode)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx) -> None:
        with self.db.write() as txn:
            if not self.ns.removexattr(txn, inode, name):
                raise FsError(pyfuse3.ENOATTR)
            node = self.ns.get(txn, inode)
            node.ctime_ns = time.time_ns()
            self.ns.put(txn, node)

    # -- filesystem -----------------------------------------------------------------
    @handler
    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        """Capacity = what the store's data takes + what it can still write, so `df`
        shows real use: free is the disk's free space plus the store file's pages that
        hold no data (LMDB's free pages: deleted data, taken by the next writes; and the
        file's allocated tail past LMDB's last page)."""
        disk = os.statvfs(self.db.path)
        bs = 4096
        live = self.db.live_bytes()
        used = live + self._staging_bytes()
        free = disk.f_bavail * disk.f_frsize + max(0, self.db.allocated_bytes() - live)
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = bs
        s.f_blocks = (used + free) // bs
        s.f_bfree = free // bs
        s.f_bavail = free // bs
        s.f_files = 1 << 32
        s.f_ffree = (1 << 32) - 1000
        s.f_favail = s.f_ffree
        s.f_namemax = 255
        return s

    def _staging_bytes(self) -> int:
        return sum(os.fstat(st.fd).st_blocks * 512 for st in self.state.values() if st.staged)
