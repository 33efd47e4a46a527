"""Exceptions that carry the errno a FUSE handler should return, and a message a user can act on."""

from __future__ import annotations

import errno


class ElvesError(Exception):
    """Base class: every elvesfs error maps to an errno for the FUSE layer."""

    errno: int = errno.EIO


class StoreFullError(ElvesError):
    """The disk (or LMDB map) holding the store is full: surfaces as ENOSPC."""

    errno = errno.ENOSPC


class StoreLockedError(ElvesError):
    """Another daemon already serves this store."""

    errno = errno.EBUSY


class StoreCorruptError(ElvesError):
    """The store is damaged; `elvesfs fsck` can check and repair it."""

    errno = errno.EIO


class ChunkCorruptError(StoreCorruptError):
    """A chunk failed its checksum on read: we return EIO rather than wrong bytes."""


class CliError(Exception):
    """An error shown to the user as one line, with a non-zero exit (the CLI's)."""


class DaemonGoneError(CliError):
    """A mount's daemon is no longer running (killed, crashed): its control socket is dead."""
