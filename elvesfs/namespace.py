"""Inodes, directory entries, symlinks and xattrs: the POSIX namespace, stored in LMDB.

Every function takes an open LMDB transaction so that a FUSE operation (say a rename
that replaces a file) commits as one atomic step. Inode numbers are never reused.
"""

from __future__ import annotations

import errno
import stat
import struct
import time
from dataclasses import dataclass

import lmdb

from .db import Database
from .errors import ElvesError

ROOT_INO = 1
NAME_MAX = 255

# mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev
INODE = struct.Struct("<IIIIQqqqQ")
U64 = struct.Struct(">Q")


class FsError(ElvesError):
    """A POSIX error raised by namespace logic; the FUSE layer passes its errno on."""

    def __init__(self, err: int, msg: str = "") -> None:
        super().__init__(msg or errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass
class Inode:
    """Attributes of one inode, as stored."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0

    def pack(self) -> bytes:
        return INODE.pack(self.mode, self.uid, self.gid, self.nlink, self.size,
                          self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev)

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> "Inode":
        return cls(ino, *INODE.unpack(raw))

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


def key(ino: int) -> bytes:
    return U64.pack(ino)


def dkey(parent: int, name: bytes) -> bytes:
    return U64.pack(parent) + name


class Namespace:
    """Typed access to the namespace tables of a Database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.t = db.t

    # -- inodes -----------------------------------------------------------
    def get(self, txn: lmdb.Transaction, ino: int) -> Inode:
        raw = txn.get(key(ino), db=self.t["inodes"])
        if raw is None:
            raise FsError(errno.ENOENT, f"no inode {ino}")
        return Inode.unpack(ino, raw)

    def find(self, txn: lmdb.Transaction, ino: int) -> Inode | None:
        raw = txn.get(key(ino), db=self.t["inodes"])
        return None if raw is None else Inode.unpack(ino, raw)

    def put(self, txn: lmdb.Transaction, inode: Inode) -> None:
        txn.put(key(inode.ino), inode.pack(), db=self.t["inodes"])

    def new_inode(self, txn: lmdb.Transaction, mode: int, uid: int, gid: int,
                  rdev: int = 0) -> Inode:
        """Allocate a fresh inode number (never reused) and store its attributes."""
        raw = txn.get(b"next_ino", db=self.t["meta"])
        ino = U64.unpack(raw)[0] if raw else ROOT_INO + 1
        txn.put(b"next_ino", U64.pack(ino + 1), db=self.t["meta"])
        now = time.time_ns()
        inode = Inode(ino, mode, uid, gid, 1 if not stat.S_ISDIR(mode) else 2, 0, now, now, now, rdev)
        self.put(txn, inode)
        return inode

    def ensure_root(self, uid: int, gid: int) -> None:
        """Create the root directory of an empty store."""
        with self.db.write() as txn:
            if txn.get(key(ROOT_INO), db=self.t["inodes"]) is None:
                now = time.time_ns()
                self.put(txn, Inode(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, 2, 0, now, now, now))

    def delete_inode(self, txn: lmdb.Transaction, ino: int) -> None:
        """Remove an inode's attributes, symlink target and xattrs (data is the caller's job)."""
        txn.delete(key(ino), db=self.t["inodes"])
        txn.delete(key(ino), db=self.t["symlinks"])
        for name in list(self.xattr_names(txn, ino)):
            txn.delete(key(ino) + name, db=self.t["xattrs"])

    def orphans(self, txn: lmdb.Transaction) -> list[int]:
        """Inodes with no directory entry left (unlinked while open when the daemon stopped)."""
        out = []
        for k, v in txn.cursor(db=self.t["inodes"]):
            if U64.unpack(k)[0] != ROOT_INO and Inode.unpack(0, v).nlink == 0:
                out.append(U64.unpack(k)[0])
        return out

    # -- directory entries --------------------------------------------------
    @staticmethod
    def check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, "name longer than 255 bytes")
        if not name or b"/" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL, f"invalid name {name!r}")

    def lookup(self, txn: lmdb.Transaction, parent: int, name: bytes) -> int | None:
        raw = txn.get(dkey(parent, name), db=self.t["dentries"])
        return None if raw is None else U64.unpack(raw)[0]

    def link(self, txn: lmdb.Transaction, parent: int, name: bytes, ino: int) -> None:
        txn.put(dkey(parent, name), U64.pack(ino), db=self.t["dentries"])

    def unlink(self, txn: lmdb.Transaction, parent: int, name: bytes) -> None:
        txn.delete(dkey(parent, name), db=self.t["dentries"])

    def entries(self, txn: lmdb.Transaction, parent: int) -> list[tuple[bytes, int]]:
        """All (name, ino) of a directory, in name order."""
        prefix = U64.pack(parent)
        out = []
        cur = txn.cursor(db=self.t["dentries"])
        if cur.set_range(prefix):
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                out.append((k[8:], U64.unpack(v)[0]))
        return out

    def is_empty_dir(self, txn: lmdb.Transaction, ino: int) -> bool:
        prefix = U64.pack(ino)
        cur = txn.cursor(db=self.t["dentries"])
        return not (cur.set_range(prefix) and cur.key().startswith(prefix))

    def all_dentries(self, txn: lmdb.Transaction):
        """Every (parent, name, ino): for fsck."""
        for k, v in txn.cursor(db=self.t["dentries"]):
            yield U64.unpack(k[:8])[0], k[8:], U64.unpack(v)[0]

    # -- symlinks ---------------------------------------------------------
    def set_symlink(self, txn: lmdb.Transaction, ino: int, target: bytes) -> None:
        txn.put(key(ino), target, db=self.t["symlinks"])

    def readlink(self, txn: lmdb.Transaction, ino: int) -> bytes:
        raw = txn.get(key(ino), db=self.t["symlinks"])
        if raw is None:
            raise FsError(errno.EINVAL, "not a symlink")
        return raw

    # -- xattrs -----------------------------------------------------------
    def getxattr(self, txn: lmdb.Transaction, ino: int, name: bytes) -> bytes | None:
        return txn.get(key(ino) + name, db=self.t["xattrs"])

    def setxattr(self, txn: lmdb.Transaction, ino: int, name: bytes, value: bytes) -> None:
        txn.put(key(ino) + name, value, db=self.t["xattrs"])

    def removexattr(self, txn: lmdb.Transaction, ino: int, name: bytes) -> bool:
        return txn.delete(key(ino) + name, db=self.t["xattrs"])

    def xattr_names(self, txn: lmdb.Transaction, ino: int) -> list[bytes]:
        prefix = key(ino)
        out = []
        cur = txn.cursor(db=self.t["xattrs"])
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                if not k.startswith(prefix):
                    break
                out.append(k[8:])
        return out
