"""Storage policy of a file: lossless (the default) or ELF with an absolute error bound.

Written as text, in the mount option `--lossy` and the xattr `user.elvesfs.policy`
(set on a directory, inherited by files and directories created in it later)::

    lossless          every byte read back equals the byte written
    elf               ELF at its native bound (2^-24 for float32 in [-1, 1])
    elf=1e-4          ELF keeping |error| <= 1e-4 on every weight value
    protect           (alone or after a comma: ``elf=1e-4,protect``) a parity of the
                      sign+exponent streams of every float tensor chunk, so damage
                      within one stripe (1/8) of them is repaired on read
                      (noisy-storage coding; costs ~1.3 % on float32, ~3 % on
                      bfloat16, ~5 % on float16)

A lossy policy only ever applies to float32/float16/float64 model weights parsed
from a known format; headers, integers, optimizer state and plain files stay exact.
Protected chunks get their own ids (a seeded hash, still checked on every read): they
never share storage with, or take a delta reference from, unprotected ones.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

from codec.dtypes import LOSSY_DTYPES  # the element types ELF codes

log = logging.getLogger(__name__)

XATTR = b"user.elvesfs.policy"
PROTECT_SEED = zlib.crc32(b"protect") | 1  # ids of protected exact chunks (see chunk_seed)


class PolicyError(ValueError):
    """A policy string that cannot be understood."""


@dataclass(frozen=True)
class Policy:
    """How a file's chunks may be coded."""

    bound: float | str | None = None  # None: lossless; "native" or a float: ELF allowed
    protect: bool = False  # float chunks carry a parity of their sign+exponent streams

    @property
    def lossy(self) -> bool:
        return self.bound is not None

    @classmethod
    def parse(cls, text: str | bytes | None) -> "Policy":
        if text is None:
            return cls()
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        words = [w.strip() for w in text.strip().lower().split(",")]
        protect = "protect" in words
        rest = [w for w in words if w != "protect"]
        if len(rest) > 1:
            raise PolicyError(f"policy {text!r} names more than one coding")
        return cls(_bound(rest[0] if rest else ""), protect)

    def __str__(self) -> str:
        if self.bound is None:
            base = "lossless"
        else:
            base = "elf" if self.bound == "native" else f"elf={self.bound:g}"
        return base + ",protect" if self.protect else base

    def seed(self) -> int:
        """Hash seed for chunk ids of lossily coded chunks: distinct per bound."""
        if self.bound is None:
            return 0
        return zlib.crc32(str(self).encode()) | 1

    def chunk_seed(self, dtype: str | None, role: str) -> int:
        """The id seed of a chunk of this dtype and role: the lossy seed where ELF may
        code it, PROTECT_SEED where it is stored protected, else 0 (a plain xxh3)."""
        if self.allows_lossy(dtype, role):
            return self.seed()
        return PROTECT_SEED if self.protect else 0

    def allows_lossy(self, dtype: str | None, role: str) -> bool:
        """Only float weights may be coded lossily; optimizer state and the rest stay exact."""
        return self.lossy and dtype in LOSSY_DTYPES and role == "weight"


def file_policy(raw: bytes | None, default: Policy, ino: int = 0) -> Policy:
    """The policy a file's xattr (`raw`, None when unset) names, else the mount's.

    setxattr refuses what cannot be parsed, so an unreadable value means a store
    written by another version (or damaged): the file is coded with the mount's
    policy, not left unsealed (a seal, or the recovery of a whole mount, that raised
    here would keep it staged for ever)."""
    if raw is None:
        return default
    try:
        return Policy.parse(raw)
    except PolicyError as exc:
        log.warning("inode %d: %s; using the mount's policy (%s)", ino, exc, default)
        return default


def _bound(text: str) -> float | str | None:
    """The ELF bound a policy word names (None: lossless)."""
    if text in ("", "lossless", "none"):
        return None
    if text in ("elf", "elf=native"):
        return "native"
    if text.startswith("elf="):
        try:
            bound = float(text[4:])
        except ValueError:
            raise PolicyError(f"bad ELF bound in policy {text!r}: expected e.g. elf=1e-4") from None
        if not bound > 0 or bound >= 1:
            raise PolicyError(f"ELF bound must be in (0, 1), got {bound}")
        return bound
    raise PolicyError(f"unknown policy {text!r}: use lossless, elf or elf=BOUND, "
                      "optionally with ,protect")
