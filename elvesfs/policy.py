"""Storage policy of a file: lossless (the default) or ELF with an absolute error bound.

Written as text, in the mount option `--lossy` and the xattr `user.elvesfs.policy`
(set on a directory, inherited by files and directories created in it later)::

    lossless          every byte read back equals the byte written
    elf               ELF at its native bound (2^-24 for float32 in [-1, 1])
    elf=1e-4          ELF keeping |error| <= 1e-4 on every weight value

A lossy policy only ever applies to float32/float16/float64 model weights parsed
from a known format; headers, integers, optimizer state and plain files stay exact.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from codec.dtypes import LOSSY_DTYPES  # the element types ELF codes

XATTR = b"user.elvesfs.policy"


class PolicyError(ValueError):
    """A policy string that cannot be understood."""


@dataclass(frozen=True)
class Policy:
    """How a file's chunks may be coded."""

    bound: float | str | None = None  # None: lossless; "native" or a float: ELF allowed

    @property
    def lossy(self) -> bool:
        return self.bound is not None

    @classmethod
    def parse(cls, text: str | bytes | None) -> "Policy":
        if text is None:
            return cls()
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        text = text.strip().lower()
        if text in ("", "lossless", "none"):
            return cls()
        if text in ("elf", "elf=native"):
            return cls("native")
        if text.startswith("elf="):
            try:
                bound = float(text[4:])
            except ValueError:
                raise PolicyError(f"bad ELF bound in policy {text!r}: expected e.g. elf=1e-4") from None
            if not bound > 0 or bound >= 1:
                raise PolicyError(f"ELF bound must be in (0, 1), got {bound}")
            return cls(bound)
        raise PolicyError(f"unknown policy {text!r}: use lossless, elf or elf=BOUND")

    def __str__(self) -> str:
        if self.bound is None:
            return "lossless"
        return "elf" if self.bound == "native" else f"elf={self.bound:g}"

    def seed(self) -> int:
        """Hash seed for chunk ids of lossily coded chunks: distinct per bound."""
        if self.bound is None:
            return 0
        return zlib.crc32(str(self).encode()) | 1

    def allows_lossy(self, dtype: str | None, role: str) -> bool:
        """Only float weights may be coded lossily; optimizer state and the rest stay exact."""
        return self.lossy and dtype in LOSSY_DTYPES and role == "weight"
