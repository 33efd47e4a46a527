"""`elvesfs salvage`: get back what a damaged file still holds.

Through the mount, a chunk that fails its checksums makes reads of its range fail with
EIO: never wrong bytes. Salvage reads the store directly (also while it is mounted)
and writes the file out anyway, so a user whose only copy of a model sits on a bad
sector keeps everything that can be trusted:

- every chunk that verifies: exact;
- a float chunk whose damage is confined to its low-order streams (frames store them
  most significant first: sign and exponent, then the high mantissa bits, then the low
  ones): decoded from its intact streams at the highest fidelity they allow, the dropped
  mantissa bits set to the middle of their range (so each value is off by less than
  2^-(kept bits + 1) of itself);
- a delta (a checkpoint coded against an earlier one) whose reference came back so:
  decoded against that reduced reference, its values off by as much as theirs;
- anything else (a damaged frame header, sign/exponent stream or byte chunk, a missing
  chunk, a delta with damaged streams of its own or a lost reference): zeros.

Every range that is not exact is reported, with the tensors it holds when the output
parses as a model file. Nothing in the store is changed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

import codec
from codec.dtypes import BY_NAME

from .accounting import layout_of
from .chunkstore import ChunkStore
from .coding import decode_chunk
from .db import Database
from .errors import ChunkCorruptError, CliError
from .layout import HOLE
from .mounts import store_of
from .namespace import ROOT_INO, Namespace, key
from .reader import os_pwrite_all
from .staging import Staging

MAX_HOPS = 16  # a delta chain longer than this is a loop (the sealer builds depth 1)


@dataclass
class Damage:
    """A range of the file that could not be read back exactly."""

    offset: int
    length: int
    chunk: str  # chunk id (hex)
    outcome: str  # "reduced" (fewer mantissa bits) or "lost" (written as zeros)
    reason: str
    mantissa_bits: int | None = None  # kept, for "reduced"
    tensors: list[str] | None = None  # the tensors it overlaps, when the file parses


class Salvager:
    """Decodes a store's chunks as far as their intact streams allow."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.chunks = ChunkStore(db)

    def chunk(self, cid: bytes) -> tuple[bytes | memoryview | None, Damage | None]:
        """(bytes, None) for an exact chunk; (bytes, damage) at reduced fidelity; (None,
        damage) when nothing of it can be trusted. The chunk and its chain of references
        come from one snapshot: a daemon may re-code chunks meanwhile."""
        with self.db.read() as txn:
            return self._chunk(txn, cid, 0)

    def _chunk(self, txn, cid: bytes, hops: int):
        rec = self.chunks.record(txn, cid)
        frame = txn.get(cid, db=self.db.t["chunks"])
        if rec is None or frame is None:
            return None, _lost(cid, "the chunk is missing from the store")
        ref = None
        if rec.is_delta:  # decoded again for each of its deltas: memory stays bounded
            if hops >= MAX_HOPS:
                return None, _lost(cid, "its chain of delta references loops")
            ref, dmg = self._chunk(txn, rec.ref, hops + 1)
            if ref is None:
                return None, _lost(cid, f"it is a delta of a lost chunk ({dmg.reason})")
            if dmg is not None:
                return self._against_reduced(cid, frame, ref, dmg)
        try:
            return decode_chunk(cid, frame, rec.flags, ref), None
        except ChunkCorruptError as exc:
            cause = exc.__cause__
            damaged = getattr(cause, "damaged", ())
            if not damaged:  # a bad header, or streams that verify but decode wrong
                return None, _lost(cid, str(cause or exc))
            return self._reduced(cid, frame, ref, damaged)
        except Exception as exc:  # damaged data must not stop the salvage of the rest
            return None, _lost(cid, f"decoding it failed: {exc!r}")

    def _against_reduced(self, cid: bytes, frame, ref, ref_damage: Damage
                         ) -> tuple[bytes | None, Damage]:
        """A delta of a chunk that came back at reduced fidelity, decoded against that
        (its values are as far off as their reference values: the same mantissa bits)."""
        why = f"its reference chunk {ref_damage.chunk[:16]} has {ref_damage.reason}"
        try:
            out = codec.decode(frame, reference=ref, approximate_reference=True)
        except Exception as exc:  # FrameError, or anything a damaged frame provokes
            return None, _lost(cid, f"{why}; and {exc}")
        return out, Damage(0, 0, cid.hex(), "reduced", why,
                           mantissa_bits=ref_damage.mantissa_bits)

    def _reduced(self, cid: bytes, frame, ref, damaged) -> tuple[bytes | None, Damage]:
        """The chunk at the highest fidelity whose streams all verify."""
        what = f"stream(s) {', '.join(damaged)} damaged"
        try:
            info = codec.inspect(frame)
        except codec.FrameError as exc:
            return None, _lost(cid, f"{what}; {exc}")
        dt = BY_NAME.get(info.dtype or "")
        if dt is None or not dt.is_float or info.codec not in ("planes", "elf"):
            return None, _lost(cid, what)  # no prefix of its streams is a coarser copy
        for bits in range(dt.mbits - 1, -1, -1):
            try:
                out = codec.decode(frame, reference=ref, fidelity=bits)
            except Exception:  # FrameError, or anything a damaged frame provokes
                continue
            return out, Damage(0, 0, cid.hex(), "reduced", what, mantissa_bits=bits)
        return None, _lost(cid, f"{what}, which every precision needs")


def _lost(cid: bytes, reason: str) -> Damage:
    return Damage(0, 0, cid.hex(), "lost", reason)


def salvage(store: str, ino: int, out_path: str) -> list[Damage]:
    """Write file ``ino`` of ``store`` to ``out_path``; return its ranges not read exactly."""
    db = Database(store, readonly=True)
    try:
        with db.read() as txn:
            node = Namespace(db).find(txn, ino)
            if node is None or not node.is_reg:
                raise CliError(f"inode {ino} is not a regular file of store {store}")
            staging = Staging(db, store)
            staged = txn.get(key(ino), db=db.t["staging"]) is not None
            base = staging.base(txn, ino) if staged else 0
            layout = layout_of(txn, db.t, ino)
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if staged:  # not sealed yet: its bytes are in its staging file, those below
                # the base of a tail-staged file in its sealed layout (staging.py)
                damage = _write_chunks(Salvager(db), layout, fd, end=base) if base else []
                _copy_staged(staging.path(ino), fd, node.size, start=base)
            else:
                damage = _write_chunks(Salvager(db), layout, fd)
                os.ftruncate(fd, node.size)
        finally:
            os.close(fd)
    finally:
        db.close()
    _name_tensors(out_path, damage)
    return damage


def _write_chunks(s: Salvager, layout, fd: int, end: int | None = None) -> list[Damage]:
    damage = []
    for i in range(len(layout)):
        if end is not None and layout.start(i) >= end:
            break
        cid = layout.chunk_id(i)
        if cid == HOLE:
            continue
        data, dmg = s.chunk(cid)
        if data is not None and len(data) != layout.length(i):
            data, dmg = None, _lost(cid, f"it decodes to {len(data)} bytes, the file has "
                                         f"{layout.length(i)} there")
        if data is not None:
            os_pwrite_all(fd, data, layout.start(i))
        if dmg is not None:
            dmg.offset, dmg.length = layout.start(i), layout.length(i)
            damage.append(dmg)
    return damage


def _copy_staged(path: str, fd: int, size: int, start: int = 0) -> None:
    with open(path, "rb") as src:
        off = src.seek(start)
        while off < size:
            buf = src.read(min(8 << 20, size - off))
            if not buf:
                break
            os_pwrite_all(fd, buf, off)
            off += len(buf)
    os.ftruncate(fd, size)


def _name_tensors(path: str, damage: list[Damage]) -> None:
    """Name the tensors each damaged range overlaps, if the salvaged file parses."""
    if not damage:
        return
    from .formats import parse
    with open(path, "rb") as f:
        parsed = parse(f, os.fstat(f.fileno()).st_size)
    for d in damage:
        d.tensors = [s.name for s in parsed.segments if s.kind == "tensor" and s.name
                     and s.offset < d.offset + d.length and d.offset < s.offset + s.length]


def resolve(path: str, store: str | None) -> tuple[str, int]:
    """(store, inode) of ``path``: a file in a live mount, or with ``store`` a path
    inside that store's file system (for a store that is not mounted)."""
    if store is None:
        st = os.stat(path)  # this CLI is its own process: no daemon deadlock
        return store_of(path), st.st_ino
    db = Database(store, readonly=True)
    try:
        ns = Namespace(db)
        ino = ROOT_INO
        with db.read() as txn:
            for part in [p for p in path.split("/") if p]:
                child = ns.lookup(txn, ino, part.encode())
                if child is None:
                    raise CliError(f"{path}: no such file in store {store}")
                ino = child
    finally:
        db.close()
    return store, ino


def main(a) -> int:
    """`elvesfs salvage`: 0 when every byte came back exact, 2 when the output was
    written with reduced or lost ranges (listed), 1 on an error (a bad path, or the
    output could not be written)."""
    store, ino = resolve(a.path, a.store)
    if os.path.abspath(a.output) == os.path.abspath(a.path):
        raise CliError("the output must not be the damaged file itself")
    damage = salvage(store, ino, a.output)
    if a.json:
        json.dump({"output": a.output, "damage": [asdict(d) for d in damage]}, sys.stdout,
                  indent=1)
        print()
    else:
        for d in damage:
            what = (f"{d.mantissa_bits} mantissa bits kept" if d.outcome == "reduced"
                    else "lost, written as zeros")
            names = f" in {', '.join(d.tensors)}" if d.tensors else ""
            print(f"bytes {d.offset}-{d.offset + d.length - 1}{names}: {what} ({d.reason})")
        n_red = sum(d.outcome == "reduced" for d in damage)
        print(f"{a.output}: " + ("every byte exact" if not damage else
                                 f"{n_red} range(s) at reduced precision, "
                                 f"{len(damage) - n_red} lost"), file=sys.stderr)
    return 2 if damage else 0
