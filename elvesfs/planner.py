"""Planning a seal: which byte ranges of a staged file become which chunks.

A model file (formats.parse found tensors) is cut at tensor boundaries, each tensor in
element-aligned pieces of at most TENSOR_PIECE bytes, which the coders see with their
dtype, name and role; everything else is cut by content (FastCDC, ~256 KiB), so an
edit moves only the cuts near it; the holes of sparse files become hole extents.

A plan's prefix never depends on what follows it (CDC runs in fixed windows, tensor
pieces follow the header): that is what lets a pre-seal store the chunks of a file
still being written and the final seal reuse them (Presealed).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterator

from pyfastcdc import FastCDC

from . import formats
from .layout import HOLE

TENSOR_PIECE = 4 << 20
# Content-defined chunks of ~256 KiB: big enough that per-chunk costs (task, LMDB
# overflow pages, checksums, frame headers) stay small next to hashing and coding
# (64 KiB chunks sealed at half the speed), small enough to dedup edited files well.
CDC = dict(avg_size=256 << 10, min_size=64 << 10, max_size=1024 << 10)
CDC_WINDOW = 8 << 20  # CDC reads the file in windows of this size (bounds memory)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
            "C64": 8, "C128": 16}


@dataclass
class Piece:
    """A byte range of the file that becomes one chunk (or a hole)."""

    offset: int
    length: int
    dtype: str | None = None
    name: str | None = None
    role: str = "other"
    index: int = 0  # piece number within its tensor
    hole: bool = False
    data: memoryview | None = None  # the bytes, when the planner already read them
    pre: "Presealed | None" = None  # already coded and stored while the file was written


@dataclass(frozen=True)
class Presealed:
    """A chunk coded and stored while its file was still being written (a pre-seal).

    The final seal reuses it for the piece at the same (offset, length): the plan of a
    file's prefix does not depend on what follows it (see Planner.cdc_windows)."""

    offset: int
    length: int
    cid: bytes
    added: bool  # stored as a new chunk by the pre-seal (else it was a dedup hit)
    stored: int = 0
    codec: str = ""
    max_error: float | None = None
    delta: bool = False  # coded against a reference chunk
    tensor: tuple | None = None  # (dtype, name, role, index) of a tensor piece
    kept: bool = False  # a chunk of the sealed layout below a tail-staged file's base:
    # its bytes are not in the staging file (see staging.py)

    @classmethod
    def of_layout(cls, offset: int, length: int, cid: bytes) -> "Presealed":
        """A chunk of the sealed layout that the seal of a tail-staged file keeps."""
        return cls(offset, length, cid, added=False, kept=True)

    def matches(self, p: "Piece") -> bool:
        """Whether this chunk is exactly what the final plan wants for piece p."""
        return (self.offset, self.length) == (p.offset, p.length) and self.tensor == (
            (p.dtype, p.name, p.role, p.index) if p.name is not None else None)


def _data_regions(fd: int, size: int, pos: int = 0) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_hole) covering [pos, size), using SEEK_DATA/SEEK_HOLE where supported."""
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            data = size
        data = min(data, size)
        if data > pos:
            yield pos, data, True
            pos = data
            if pos >= size:
                break
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(hole, size)
        yield pos, hole, False
        pos = hole


class Planner:
    """Splits a staged file into pieces: tensor-aligned for model files, CDC otherwise."""

    def __init__(self) -> None:
        self._cdc = threading.local()

    def cdc(self) -> FastCDC:
        if not hasattr(self._cdc, "c"):
            self._cdc.c = FastCDC(**CDC)
        return self._cdc.c

    def plan(self, fd: int, size: int, resume: list[Presealed] | None = None
             ) -> tuple[str, str, Iterator[Piece]]:
        """(format, note, pieces) for the file behind `fd`.

        `resume`: pieces a pre-seal already stored for a prefix of the file, in order
        from offset 0; used when the file turns out to be plain bytes."""
        with os.fdopen(os.dup(fd), "rb") as f:
            parsed = formats.parse(f, size)
        if parsed.format == "plain":
            return "plain", parsed.note, self._plain(fd, size, resume or [])
        pieces = self._segments(fd, parsed.segments)
        if resume:
            pieces = self._attach(pieces, resume)
        return parsed.format, parsed.note, pieces

    @staticmethod
    def _attach(pieces: Iterator[Piece], resume: list[Presealed]) -> Iterator[Piece]:
        """Mark the pieces a pre-seal already stored (tensor pieces of a safetensors file)."""
        done = {(r.offset, r.length): r for r in resume}
        for p in pieces:
            r = done.get((p.offset, p.length))
            if r is not None and r.matches(p):
                p.pre = r
            yield p

    def prefix_pieces(self, fd: int, pos: int, end: int, done: list[int]) -> Iterator[Piece]:
        """Pieces of a file still being written, from `pos` on, that its final plan will
        hold whatever comes after `end`: CDC windows of plain files, tensor pieces of a
        safetensors or GGUF file whose header is complete. Sets done[0] past the last one."""
        done[0] = pos
        with os.fdopen(os.dup(fd), "rb") as f:
            kind, segments = formats.parse_prefix(f, end)
        if kind == "plain":
            yield from self.cdc_windows(fd, pos, end, done)
        elif kind in ("safetensors", "torch-zip", "gguf"):
            for p in self._segments(fd, [s for s in segments if s.kind == "tensor"]):
                if p.offset < pos:
                    continue
                if p.offset + p.length > end:
                    break
                yield p
                done[0] = p.offset + p.length

    def plan_tail(self, fd: int, size: int, kept: list[tuple[int, int, bytes]],
                  base: int) -> Iterator[Piece]:
        """Pieces of a tail-staged file sealed as plain bytes (staging.py): the sealed
        layout's extents (start, length, chunk id) below `base` as they are, then the
        staging file's bytes from `base` on. `base` is the start of one of those extents:
        a content-defined cut, so the file is cut as _plain would cut all of it (that
        only matters for dedup: any cut is correct)."""
        for start, length, cid in kept:
            if cid == HOLE:
                yield Piece(start, length, hole=True)
            else:
                yield Piece(start, length, pre=Presealed.of_layout(start, length, cid))
        yield from self._plain(fd, size, [], start=base)

    def _plain(self, fd: int, size: int, resume: list[Presealed], start: int = 0
               ) -> Iterator[Piece]:
        resume_end = resume[-1].offset + resume[-1].length if resume else 0
        for a, b, hole in _data_regions(fd, size, start):
            if hole:
                yield Piece(a, b - a, hole=True)
            elif a == 0 and resume_end and b >= resume_end:
                # the plan of [0, resume_end) is what the pre-seal cut: reuse it
                for r in resume:
                    yield Piece(r.offset, r.length, pre=r)
                yield from self._cdc_pieces(fd, resume_end, b)
            else:
                yield from self._cdc_pieces(fd, a, b)

    def _window(self, fd: int, pos: int, n: int, last: bool) -> list[Piece]:
        """CDC pieces of the n bytes at pos; unless `last`, without the window's tail,
        which is re-chunked with the next window."""
        buf = os.pread(fd, n, pos)
        if len(buf) < n:
            raise OSError(f"staging file shrank while sealing (read {len(buf)} of {n} bytes)")
        cuts = list(self.cdc().cut_buf(buf))
        if not last and len(cuts) > 1:
            cuts = cuts[:-1]
        view = memoryview(buf)
        return [Piece(pos + c.offset, c.length, data=view[c.offset:c.offset + c.length])
                for c in cuts]

    def _cdc_pieces(self, fd: int, a: int, b: int) -> Iterator[Piece]:
        """Content-defined pieces of [a, b), reading CDC_WINDOW at a time to bound memory."""
        pos = a
        while pos < b:
            n = min(CDC_WINDOW, b - pos)
            pieces = self._window(fd, pos, n, last=pos + n >= b)
            yield from pieces
            pos = pieces[-1].offset + pieces[-1].length

    def cdc_windows(self, fd: int, pos: int, end: int, done: list[int]) -> Iterator[Piece]:
        """The pieces _cdc_pieces(fd, 0, b) cuts in its windows from `pos` on, for every
        b > end: only whole windows that end before `end`, never a last window. Sets
        done[0] to where the next window starts."""
        done[0] = pos
        while pos + CDC_WINDOW < end:
            pieces = self._window(fd, pos, CDC_WINDOW, last=False)
            yield from pieces
            pos = done[0] = pieces[-1].offset + pieces[-1].length

    def _segments(self, fd: int, segments: list) -> Iterator[Piece]:
        for seg in segments:
            if seg.kind != "tensor" or seg.dtype not in ITEMSIZE:
                yield from self._cdc_pieces(fd, seg.offset, seg.offset + seg.length)
                continue
            step = TENSOR_PIECE - TENSOR_PIECE % ITEMSIZE[seg.dtype]
            for idx, off in enumerate(range(0, seg.length, step)):
                yield Piece(seg.offset + off, min(step, seg.length - off), seg.dtype,
                            seg.name, seg.role, idx)

