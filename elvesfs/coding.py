"""The one seam between the filesystem and codec/: id, encode and decode one chunk."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

import codec

from .chunkstore import LOSSY, PROTECTED, ChunkRecord
from .errors import ChunkCorruptError
from .policy import PROTECT_SEED, Policy


def chunk_id(data: bytes | memoryview, seed: int = 0) -> bytes:
    """Content address of a chunk: xxh3-128 (seeded for lossily coded chunks)."""
    return xxhash.xxh3_128_digest(data, seed=seed)


@dataclass
class Encoded:
    """One coded chunk ready to store."""

    cid: bytes
    frame: bytes
    raw: int
    flags: int
    codec: str
    max_error: float | None
    needs_reference: bool = False


def encode_chunk(data: memoryview, dtype: str | None, role: str, policy: Policy,
                 reference: bytes | None = None, cid: bytes | None = None) -> Encoded:
    """Pick the best codec the policy allows for this chunk (codec/'s selector decides).

    `cid`, when the caller already hashed the chunk, must be chunk_id() under the policy."""
    lossy = policy.allows_lossy(dtype, role)
    if cid is None:
        cid = chunk_id(data, policy.chunk_seed(dtype, role))
    frame = codec.encode(data, dtype, codec="auto", bound=policy.bound if lossy else None,
                         reference=reference, protect=policy.protect)
    info = codec.inspect(frame)
    # A lossily seeded id cannot be checked against the decoded bytes: flag it, and
    # trust the frame's own checksums for that chunk.
    flags = (LOSSY if lossy else 0) | (PROTECTED if policy.protect else 0)
    return Encoded(cid, frame, len(data), flags, info.codec,
                   info.max_error if info.lossy else None, info.needs_reference)


def frame_dtype(frame: bytes | memoryview) -> str | None:
    """The element type a stored frame records (from its header alone)."""
    return codec.inspect(frame).dtype


def recode_chunk(data: bytes | memoryview, dtype: str | None, flags: int,
                 reference: bytes | memoryview | None = None) -> tuple[bytes, bool]:
    """(frame, needs its reference) of a stored chunk's decoded bytes coded again, when
    the chunk it was a delta of is going away: protected if it was, against `reference`
    if that pays, and lossless, as its delta frame was (a LOSSY flag only says that its
    id is seeded), so reads return the same bytes."""
    out = codec.encode(data, dtype, codec="auto", reference=reference,
                       protect=bool(flags & PROTECTED))
    return out, codec.inspect(out).needs_reference


def decode_chunk(cid: bytes, frame: bytes, flags: int,
                 reference: bytes | memoryview | None = None) -> bytes | memoryview:
    """Decode and verify a chunk: exact chunks must hash back to their id. The result
    is read-only (bytes, or a memoryview of the decoder's output: one copy less)."""
    try:
        data = codec.decode(frame, reference=reference, copy=False)
    except codec.FrameError as exc:
        raise ChunkCorruptError(f"chunk {cid.hex()} is corrupt: {exc}") from exc
    if not flags & LOSSY and chunk_id(data, PROTECT_SEED if flags & PROTECTED else 0) != cid:
        raise ChunkCorruptError(f"chunk {cid.hex()} failed its content checksum")
    return data


def mend_chunk(db, cid: bytes) -> tuple[str, ...]:
    """Write back a protected chunk with its damaged streams rebuilt from their parity
    (a scrub: the next damage to them is survivable again). Returns the streams mended;
    () when there was nothing to mend, or the chunk is gone or not protected."""
    from codec.frame import mend
    with db.write() as txn:
        raw = txn.get(cid, db=db.t["refs"])
        frame = txn.get(cid, db=db.t["chunks"])
        if raw is None or frame is None or not ChunkRecord.unpack(raw).flags & PROTECTED:
            return ()
        mended, names = mend(frame)
        if names:
            txn.put(cid, mended, db=db.t["chunks"])
    return tuple(names)
