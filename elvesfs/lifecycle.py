"""A file's data after the FUSE call that changed it has returned: pre-seal, seal, free.

fs.py translates FUSE calls and asks this module for the slow parts of a file's life:

    written  ->  staged (its bytes in a staging file; fs.py stages and writes)
    growing  ->  pre-sealed: the prefix a sequential writer has finished is coded and
                 stored while it writes on (Sealer.preseal), so close has only the tail
    closed   ->  sealed into the store (Sealer.seal); the staging file goes
    removed  ->  freed once it has no link and no user: staged bytes at once, chunks
                 by a background task (Sealer.drop + collect)

Everything CPU- or I/O-heavy runs in worker threads, never on the trio loop, and the
store's writers (seals, pre-seals, drops, garbage collection) one at a time
(`seal_limiter`). Nothing here knows FUSE: fs.py passes the in-memory inode table and a
callback that forgets what it cached of a file whose stored content changed.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Callable

import trio

from .db import Database
from .errors import StoreFullError
from .ingest import Sealer
from .layout import Layout
from .namespace import Namespace, ROOT_INO, key
from .policy import Policy
from .staging import Staging
from .state import Handle, InodeState, InodeStates, Preseal

log = logging.getLogger(__name__)

PRESEAL_STEP = 32 << 20  # pre-seal once this much more of a file being written is there
PRESEAL_MAX = 64 << 20  # at most this much per pre-seal call (holds the seal limiter)
PRESEAL_RESERVE = 256 << 20  # free disk space a pre-seal never eats into


class Lifecycle:
    """Seals, pre-seals and frees the files of one mounted store (see the module doc)."""

    def __init__(self, db: Database, ns: Namespace, staging: Staging, sealer: Sealer,
                 state: InodeStates, lookups: Counter[int], handles: dict[int, Handle],
                 policy_of: Callable[[int], Policy],
                 changed: Callable[[int, bool, bool | None], None], preseal: bool = True
                 ) -> None:
        self.db, self.ns, self.staging, self.sealer = db, ns, staging, sealer
        self.state, self.lookups, self.handles = state, lookups, handles  # fs.py's, shared
        self.policy_of = policy_of
        # changed(ino, refs, data): ino's stored content changed; refs: chunks' refcounts
        # too; data: None if the kernel need not hear of it, else if its pages are stale
        self.changed = changed
        self.preseal = preseal  # code growing files while they are written (Sealer.preseal)
        self.dropping: dict[int, trio.Event] = {}  # inodes whose data is being freed
        self.seal_limiter = trio.CapacityLimiter(1)  # seals, drops and GC run one at a time
        self.pending_seals = 0
        self.seals_due: Counter[int] = Counter()  # inode -> seal tasks not finished
        self.idle = trio.Condition()
        self.nursery: trio.Nursery | None = None  # set once the loop runs (daemon._serve)

    # -- freeing removed files --------------------------------------------------------
    async def maybe_drop(self, ino: int) -> None:
        """Free an inode's data once it has no links and no open handles; delete the
        inode itself once the kernel has forgotten it too.

        The data does not wait for the kernel's FORGET, which comes asynchronously after
        unlink has returned: as on ext4, the staged bytes of a removed file that nobody
        holds open are off the disk when unlink returns (a full disk is usable again at
        once); its chunks are released by a background task, which waits its turn behind
        seals (seals, drops and GC run one at a time), so unlink never waits for a seal
        of another file. Only one drop of an inode runs at a time (its release, unlink
        and forget can overlap)."""
        if ino == ROOT_INO:
            return
        while (busy := self.dropping.get(ino)) is not None:
            await busy.wait()
        st = self.state.get(ino)
        if st is not None and st.handles:
            return
        forgotten = self.lookups.get(ino, 0) <= 0
        with self.db.read() as txn:
            node = self.ns.find(txn, ino)
            if node is None or node.nlink > 0:
                return
            if not forgotten and (st is None or st.idle) and not self._holds_data(txn, ino):
                return  # nothing to free before FORGET, which deletes the inode
        self.dropping[ino] = trio.Event()
        background = False
        try:
            background = await self._drop(ino, st, forgotten)
        finally:
            if not background:
                self._dropped(ino)

    def _dropped(self, ino: int) -> None:
        self.dropping.pop(ino).set()

    async def _drop(self, ino: int, st: InodeState | None, forgotten: bool) -> bool:
        """maybe_drop's work: stop the inode's seal and pre-seal, close and delete its
        staging file, then free its chunks (and delete the inode row once `forgotten`).
        True when the chunks went to a background task, which calls _dropped."""
        pinned = st is not None and st.preseal is not None  # its chunks wait for collect
        staged = False
        if st is not None:
            st.abort.set()
            if st.seal_done is not None and not st.seal_done.is_set():
                await st.seal_done.wait()
            if st.preseal is not None and st.preseal.running:
                await st.preseal.done.wait()
            self.reset_preseal(st, fresh=False)
            if st.fd is not None:
                staged = True
                os.close(st.fd)
                st.fd = None
            st.mtime_ns = st.ctime_ns = None
            self.state.release(ino)
        self.changed(ino, False, None)
        # the staged bytes go now; the staging record goes with the chunks' transaction
        # (a crash in between leaves an orphan, which recovery drops). A staged file's
        # last link frees its pages and blocks (~50-70 ms per GiB): off the loop; with
        # nothing staged there is at most a stray file, and no thread hop (`rm` of 10k
        # sealed files: a hop each cost 0.79x of the passthrough's unlink rate)
        if staged:
            await trio.to_thread.run_sync(self.staging.remove_file, ino)
        else:
            self.staging.remove_file(ino)
        with self.db.read() as txn:
            data = self._holds_data(txn, ino)
        if not data and not pinned:
            # no chunk to free (an empty file, or only holes): no thread hop, and nothing
            # to do before FORGET, which deletes the inode inline
            if forgotten:
                self.db.write_freeing(lambda txn: self._delete_inode(txn, ino))
            return False
        if self.nursery is None:
            await self._drop_chunks(ino, forgotten)
            return False
        self.nursery.start_soon(self._drop_chunks, ino, forgotten, True)
        return True

    async def _drop_chunks(self, ino: int, forgotten: bool, background: bool = False) -> None:
        """Release the chunks and staging record of a dropped inode, then collect."""
        try:
            await trio.to_thread.run_sync(self._drop_and_collect, ino, not forgotten,
                                          limiter=self.seal_limiter)
            self.changed(ino, True, None)
            self._seal_unsealed()  # the room freed may be what a failed seal lacked
            if background and len(self.dropping) == 1:
                # the last of a burst of removals: a sync point now lets the next writes
                # reuse the freed pages (a pinned snapshot holds them until then)
                await trio.to_thread.run_sync(self.db.sync, True)
        except Exception:
            if not background:
                raise
            log.exception("freeing the chunks of removed inode %d failed; the next mount "
                          "(or elvesfs fsck --repair) frees them", ino)
        finally:
            if background:
                self._dropped(ino)

    def _unsealed(self) -> list[int]:
        """Closed files still staged with no seal due: their seal failed (a full disk,
        an error), or recovery could not seal them (daemon.adopt_staged)."""
        return [ino for ino, st in self.state.items()
                if st.staged and not st.writers and not st.sealing and ino not in self.seals_due]

    def _seal_unsealed(self) -> None:
        for ino in self._unsealed():
            self.schedule_seal(ino)

    def _holds_data(self, txn, ino: int) -> bool:
        """Whether an inode has staged bytes or references a chunk (an empty or
        all-holes layout does not)."""
        if txn.get(key(ino), db=self.db.t["staging"]) is not None:
            return True
        raw = txn.get(key(ino), db=self.db.t["layouts"])
        return bool(raw) and bool(Layout.from_bytes(raw).ids())

    def _delete_inode(self, txn, ino: int) -> None:
        """Delete an inode that references no chunk (its layout, if any, is holes)."""
        txn.delete(key(ino), db=self.db.t["layouts"])
        txn.delete(key(ino), db=self.db.t["fstats"])
        self.ns.delete_inode(txn, ino)

    def _drop_and_collect(self, ino: int, keep_inode: bool) -> None:
        self.sealer.drop(ino, keep_inode)
        self.sealer.collect()
        self.db.refill_reserve()  # if a full disk took it: space may be back now

    # -- pre-seal: overlap coding with a long sequential write -----------------------
    def reset_preseal(self, st: InodeState, fresh: bool) -> None:
        """Forget a pre-seal (its chunks become garbage); start anew if the file is empty."""
        if st.preseal is not None:
            self.sealer.unpin(st.ino)
        st.preseal = Preseal(self.policy_of(st.ino)) if fresh and self.preseal else None

    def wrote(self, st: InodeState, off: int, end: int) -> None:
        """After each write: start a pre-seal once enough of a growing file's prefix is
        there; a write below what a pre-seal has read (a rewrite) or scattered writes
        drop it."""
        pre = st.preseal
        if pre is None:
            return
        if off < pre.claimed or not pre.wrote(off, end):
            # a rewrite of what a pre-seal read (its plan no longer holds), or random I/O
            self.reset_preseal(st, fresh=False)
        elif (not pre.running and self.nursery is not None
              and pre.written - pre.pos >= PRESEAL_STEP):
            pre.running = True
            pre.done = trio.Event()
            self.nursery.start_soon(self._preseal_task, st, pre)

    @staticmethod
    def presealed(st: InodeState, policy: Policy) -> list | None:
        """What the final seal of `st` under `policy` can take from its pre-seal."""
        pre = st.preseal
        if pre is None or pre.running or pre.policy != policy:
            return None
        return list(pre.pieces)

    def _room_for_preseal(self, n: int) -> bool:
        """Pre-sealed chunks sit beside the staged bytes until close: only with room."""
        disk = os.statvfs(self.db.path)
        return disk.f_bavail * disk.f_frsize > 4 * n + PRESEAL_RESERVE

    async def _other_seals_done(self, ino: int) -> None:
        """Let closed files seal first: the file written after them is coded against
        their tensors (XOR deltas) only once they are in the store.

        Only a file still being written waits: once its own seal is due, the seal waits
        for this pre-seal, so waiting here for other seals (whose pre-seals may wait for
        ours) could deadlock; the caller stops instead."""
        async with self.idle:
            while ino not in self.seals_due and any(i != ino for i in self.seals_due):
                await self.idle.wait()

    async def _preseal_task(self, st: InodeState, pre: Preseal) -> None:
        """Store a growing file's prefix while the writer goes on, so that sealing at
        close has only the tail left. Any failure only costs the head start."""
        try:
            while (st.preseal is pre and st.staged and not st.sealing
                   and pre.written - pre.pos >= PRESEAL_STEP):
                await self._other_seals_done(st.ino)
                if (st.ino in self.seals_due  # closed: its seal codes the rest
                        or not (st.preseal is pre and st.staged and not st.sealing)):
                    break
                end = min(pre.written, pre.pos + PRESEAL_MAX)
                if not self._room_for_preseal(end - pre.pos):
                    break  # the file's bytes would be on disk twice: leave it to close
                pre.claimed = max(pre.claimed, end)
                fd = os.dup(st.fd)
                try:
                    pos, pieces = await trio.to_thread.run_sync(
                        self.sealer.preseal, st.ino, fd, pre.pos, end,
                        pre.policy, limiter=self.seal_limiter)
                finally:
                    os.close(fd)
                if pos == pre.pos:
                    break
                pre.pieces.extend(pieces)
                pre.pos = pos
        except Exception:
            log.exception("pre-sealing inode %d failed; it is sealed at close", st.ino)
            if st.preseal is pre:
                self.reset_preseal(st, fresh=False)
        finally:
            pre.running = False
            pre.done.set()

    # -- sealing --------------------------------------------------------------------
    async def stop_seal(self, st: InodeState) -> None:
        """A writer is back: abort a running seal of this inode and wait for it to stop."""
        if st.sealing:
            st.abort.set()
            await st.seal_done.wait()

    def schedule_seal(self, ino: int) -> None:
        """Seal the inode in a background task (none before the loop runs: tests)."""
        if self.nursery is not None:
            self.pending_seals += 1
            self.seals_due[ino] += 1
            self.nursery.start_soon(self._seal_task, ino)

    async def _seal_task(self, ino: int) -> None:
        try:
            await self.seal(ino)
        finally:
            self.pending_seals -= 1
            self.seals_due[ino] -= 1
            if not self.seals_due[ino]:
                del self.seals_due[ino]
            async with self.idle:
                self.idle.notify_all()

    async def seal(self, ino: int) -> None:
        """Seal a closed staged inode into the store (off the loop); keep it staged on error."""
        st = self.state.get(ino)
        if st is None or not st.staged or st.writers or st.sealing or st.lock.locked():
            return  # (the holder of st.lock, a truncate, schedules a seal when done)
        st.sealing = True
        st.abort.clear()
        st.seal_done = trio.Event()
        try:
            policy = self.policy_of(ino)
            pre = st.preseal
            if pre is not None and pre.running:
                await pre.done.wait()
            resume = self.presealed(st, policy)
            stats = await trio.to_thread.run_sync(self.sealer.seal, ino, policy, st.abort,
                                                  resume, limiter=self.seal_limiter)
            if stats is not None:
                self.reset_preseal(st, fresh=False)
                fd, st.fd = st.fd, None
                self.changed(ino, True, stats.lossy_bytes > 0)
                # the last reference to the removed staging file: closing it frees the
                # file's pages and blocks (~50-70 ms per GiB), off the loop
                await trio.to_thread.run_sync(os.close, fd)
            await trio.to_thread.run_sync(self.sealer.collect, limiter=self.seal_limiter)
        except StoreFullError as exc:
            log.error("cannot seal inode %d, it stays staged until space is freed: %s", ino, exc)
        except Exception:
            log.exception("sealing inode %d failed; its data stays staged", ino)
        finally:
            st.sealing = False
            st.seal_done.set()
            self.state.release(ino)

    async def wait_idle(self) -> list[int]:
        """Return once no seal is pending or running (for `elvesfs sync`), with the closed
        files that stay staged all the same (their seals failed: a full disk), whose
        staging files are then fsync'd: what sync promises holds, durable, unsealed.

        close() returns to the application after FLUSH, but the kernel sends RELEASE (which
        starts the seal) later: give handles already flushed a moment to be released."""
        for _ in range(200):
            if not any(h.flushed for h in self.handles.values()):
                break
            await trio.sleep(0.01)
        while True:
            self._seal_unsealed()  # e.g. a seal that failed on a full disk
            async with self.idle:
                while self.pending_seals:
                    await self.idle.wait()
            if not self.dropping:
                break
            while self.dropping:  # removed files whose chunks are being released: the
                await next(iter(self.dropping.values())).wait()  # room may seal more
        unsealed = self._unsealed()
        for ino in unsealed:
            st = self.state.get(ino)
            if st is None or st.fd is None:  # sealed meanwhile
                continue
            fd = os.dup(st.fd)  # a seal may close st.fd while the fsync runs
            try:
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)
        if unsealed:
            await trio.to_thread.run_sync(self.staging.sync_dir)
        await trio.to_thread.run_sync(self.db.sync, True)
        return unsealed

