"""Content-detecting, non-executing parsers that split model files into byte segments.

A model file becomes an ordered list of segments covering it exactly, so ingest can
cut chunks on tensor boundaries and pick a codec per tensor.  Nothing here executes a
pickle; anything a parser rejects becomes one plain ``bytes`` segment.
"""

from __future__ import annotations

import logging
import os
import typing
from dataclasses import dataclass, field

__all__ = [
    "Segment",
    "ParsedFile",
    "parse",
    "DTYPE_BITS",
    "dtype_itemsize",
    "role_for",
    "FormatError",
    "check_segments",
    "parse_prefix",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Segment:
    """One contiguous byte range of a file; tensors carry what a codec needs to know."""

    offset: int
    length: int
    kind: str  # "bytes" | "tensor"
    name: str | None = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    role: str = "other"  # "weight" | "optimizer" | "other"


@dataclass(frozen=True)
class ParsedFile:
    """A file's format and its segments (contiguous, in order, covering [0, size))."""

    format: str  # "safetensors" | "torch-zip" | "torch-legacy" | "gguf" | "plain"
    segments: list[Segment] = field(default_factory=list)
    note: str = ""


class FormatError(ValueError):
    """Raised inside a parser when the input is not (or not a valid) file of its format."""


# Bits per element, by safetensors dtype name (plus a few torch-only names).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4_E2M1_X2": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "C32": 32,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "C128": 128,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def dtype_itemsize(dtype: str) -> int | None:
    """Whole bytes per element, or None for sub-byte or unknown dtypes."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None or bits % 8:
        return None
    return bits // 8


_OPTIMIZER_SUBTREES = frozenset(
    {
        "optimizer",
        "optim",
        "optimizer_states",
        "optimizer_state",
        "optimizer_state_dict",
        "optimizers",
        "opt_state",
    }
)
_OPTIMIZER_LEAVES = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step"})
_OTHER_SUBTREES = frozenset(
    {
        "rng_state",
        "rng_states",
        "torch_rng_state",
        "cuda_rng_state",
        "numpy_rng_state",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "grad_scaler",
        "scaler",
    }
)


def role_for(name: str | None) -> str:
    """Classify a tensor by its key path so lossy codecs never touch optimizer state."""
    if not name:
        return "weight"
    parts = name.split(".")
    if parts[-1] in _OPTIMIZER_LEAVES or any(p in _OPTIMIZER_SUBTREES for p in parts):
        return "optimizer"
    if any(p in _OTHER_SUBTREES for p in parts):
        return "other"
    return "weight"


def plain(size: int, note: str = "") -> ParsedFile:
    """The lossless fallback: the whole file as one bytes segment."""
    segs = [Segment(0, size, "bytes")] if size > 0 else []
    return ParsedFile("plain", segs, note)


def assemble(size: int, tensors: typing.Iterable[Segment]) -> list[Segment]:
    """Fill the gaps around tensor segments with bytes segments (adjacent bytes merge)."""
    out: list[Segment] = []
    pos = 0
    for t in sorted((t for t in tensors if t.length > 0), key=lambda s: s.offset):
        if t.offset < pos or t.offset + t.length > size:
            raise FormatError(f"tensor {t.name!r} at {t.offset}+{t.length} overlaps or is out of range")
        if t.offset > pos:
            out.append(Segment(pos, t.offset - pos, "bytes"))
        out.append(t)
        pos = t.offset + t.length
    if pos < size:
        out.append(Segment(pos, size - pos, "bytes"))
    return out


def check_segments(segments: list[Segment], size: int) -> None:
    """Assert the contract every caller relies on: exact, ordered, gap-free cover."""
    pos = 0
    for s in segments:
        if s.offset != pos or s.length <= 0 or s.kind not in ("bytes", "tensor"):
            raise FormatError(f"bad segment {s} at expected offset {pos}")
        pos += s.length
    if pos != size:
        raise FormatError(f"segments cover {pos} bytes, file has {size}")


class Window:
    """A read-only view of the first ``size`` bytes of a file, so parsers agree on the end."""

    def __init__(self, f: typing.BinaryIO, size: int, max_read: int | None = None) -> None:
        self._f = f
        self._size = size
        self._pos = 0
        self.max_read = max_read  # refuse single reads larger than this (memory bound)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        elif whence == 2:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError("negative seek position")
        self._pos = pos
        return pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._pos
        n = max(0, min(n, self._size - self._pos))
        if n == 0:
            return b""
        if self.max_read is not None and n > self.max_read:
            raise FormatError(f"refusing a {n}-byte read (cap {self.max_read})")
        self._f.seek(self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def pread(self, offset: int, n: int) -> bytes:
        """Read exactly n bytes at offset or raise FormatError (truncated file)."""
        if offset < 0 or n < 0 or offset + n > self._size:
            raise FormatError(f"read of {n} bytes at {offset} is past the end ({self._size})")
        self.seek(offset)
        data = self.read(n)
        if len(data) != n:
            raise FormatError(f"short read at {offset}: {len(data)} of {n} bytes")
        return data

    def close(self) -> None:
        """Never close the caller's file."""


def parse(f: typing.BinaryIO, size: int) -> ParsedFile:
    """Detect by content (never by name) and parse; never raises on bad input: returns format="plain" with one bytes segment and a note."""
    from . import gguf as _gg
    from . import safetensors as _st
    from . import torchlegacy as _tl
    from . import torchzip as _tz

    if size <= 0:
        return plain(0)
    w = Window(f, size)
    try:
        head = w.pread(0, min(size, 64))
    except Exception as e:  # unreadable: still stored, as plain bytes
        return _fallback(size, f"unreadable head: {e!r}")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        kind, parser = "torch-zip", _tz.parse
    elif _tl.looks_legacy(head):
        kind, parser = "torch-legacy", _tl.parse
    elif _st.looks_safetensors(head, size):
        kind, parser = "safetensors", _st.parse
    elif _gg.looks_gguf(head):
        kind, parser = "gguf", _gg.parse
    else:
        log.debug("no known model format in %d bytes: plain", size)
        return plain(size, "no known format detected")
    try:
        segs = parser(w, size)
        check_segments(segs, size)
    except FormatError as e:
        return _fallback(size, f"{kind}: {e}")
    except Exception as e:  # noqa: BLE001 - a parser bug must still not lose the file
        log.warning("format parser %s failed unexpectedly; storing plain bytes", kind, exc_info=True)
        return plain(size, f"{kind}: unexpected {e!r}")
    return ParsedFile(kind, segs)


def may_be_model(head: bytes, size: int) -> bool:
    """Whether a `size`-byte file whose first 64 bytes are `head` may parse as a model
    file: a file sealed as plain bytes that grew (a resumed download) is parsed again."""
    from . import gguf as _gg
    from . import safetensors as _st
    from . import torchlegacy as _tl

    return (head.startswith(b"PK") or _tl.looks_legacy(head)
            or _st.looks_safetensors(head, size) or _gg.looks_gguf(head))


def parse_prefix(f: typing.BinaryIO, available: int) -> tuple[str, list[Segment] | None]:
    """Plan a file that is still being written, from its first `available` bytes.

    ("plain", None): no model format starts this file; ("safetensors", tensor segments):
    the header is complete and valid for the size it promises, and these are the tensor
    segments parse() will return once the file has that size; ("torch-zip", tensor
    segments): those of a torch.save archive whose local headers are written so far;
    ("gguf", tensor segments): likewise for a GGUF file whose header is complete;
    ("later", None): a model format that can only be planned when the file is complete
    (or not yet). Never raises: it only lets the pre-seal get ahead."""
    try:
        return _parse_prefix(f, available)
    except Exception as e:  # noqa: BLE001 - only a head start: the final seal decides
        log.debug("cannot plan a file being written (%d bytes so far): %r", available, e)
        return "later", None


def _parse_prefix(f: typing.BinaryIO, available: int) -> tuple[str, list[Segment] | None]:
    from . import gguf as _gg
    from . import safetensors as _st
    from . import torchlegacy as _tl
    from . import torchzip as _tz

    head = os.pread(f.fileno(), 64, 0) if available >= 64 else b""
    if len(head) < 64:
        return "later", None
    if head.startswith(b"PK\x03\x04"):
        segs = _tz.prefix_segments(f, available)
        return ("torch-zip", segs) if segs else ("later", None)
    if head.startswith(b"PK") or _tl.looks_legacy(head):
        return "later", None
    if _gg.looks_gguf(head):
        return _planned(_gg.parse, "gguf", f, _gg.promised_size(f, available))
    promised = _st.promised_size(f, available)
    if promised is None and not _st.looks_safetensors(head, 1 << 62):
        return "plain", None
    return _planned(_st.parse, "safetensors", f, promised)


def _planned(parser, kind: str, f: typing.BinaryIO, promised: int | None
             ) -> tuple[str, list[Segment] | None]:
    """The tensor segments of a file whose header promises `promised` bytes (None: the
    header is not complete yet), as parse() will find them once it has that size."""
    if promised is None:
        return "later", None
    try:
        segs = parser(Window(f, promised), promised)
        check_segments(segs, promised)
    except FormatError:
        return "later", None
    return kind, [s for s in segs if s.kind == "tensor"]


def _fallback(size: int, note: str) -> ParsedFile:
    """Log and keep the bytes: a rejected file still round-trips exactly."""
    log.info("format fallback to plain bytes (%d bytes): %s", size, note)
    return plain(size, note)
