"""The numcodecs-style codec base class, the registry, and frame-level encode/decode
(content checksum, reference checks) shared by every codec."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dtypes as _dt
from .errors import FrameError
from .frame import hash64, pack, parse

REGISTRY: dict[str, type["Codec"]] = {}


def register(cls):
    REGISTRY[cls.codec_id] = cls
    return cls


def as_bytes_view(data) -> memoryview:
    """A flat, contiguous byte view of ``data`` (no copy when possible)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
        return memoryview(data.reshape(-1).view(np.uint8))
    mv = memoryview(data)
    if not mv.contiguous:
        mv = memoryview(mv.tobytes())
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


@dataclass
class Encoded:
    """What a codec's _encode returns (beyond its streams)."""

    streams: list
    params: bytes = b""
    lossy: bool = False
    needs_reference: bool = False
    bound: float | None = None
    max_error: float | None = None
    content_hash: int | None = None  # hash of what decode returns (lossy codecs)


class Codec:
    """Base class. Subclasses set ``codec_id`` and implement ``_encode(mv, dt)`` (mv: flat
    uint8 memoryview, dt: codec.dtypes.DType or None) returning an ``Encoded`` (or the
    dict of its fields) and the classmethod ``_decode(header, frame, dt, reference,
    fidelity)`` returning the decoded bytes-like."""

    codec_id = ""

    def __init__(self, dtype=None):
        self.dtype = dtype

    # numcodecs-style API ------------------------------------------------------------
    def encode(self, buf) -> bytes:
        mv = as_bytes_view(buf)
        dt = _dt.lookup(self.dtype, mv.nbytes)
        return self.frame(mv, dt, self._encode(mv, dt))

    def frame(self, mv: memoryview, dt, enc) -> bytes:
        """The frame of ``enc`` (this codec's coding of ``mv``): encode()'s second half,
        for a caller that has already coded the streams (the selector)."""
        if isinstance(enc, dict):
            enc = Encoded(**enc)
        ch = enc.content_hash if enc.content_hash is not None else hash64(mv)
        return pack(self.codec_id, dt.id if dt else 0, mv.nbytes, enc.params, enc.streams, ch,
                    lossy=enc.lossy, needs_reference=enc.needs_reference, bound=enc.bound,
                    max_error=enc.max_error)

    def decode(self, buf, out=None, *, reference=None, fidelity=None):
        res = decode_frame(buf, reference=reference, fidelity=fidelity)
        if out is not None:
            as_bytes_view(out)[:] = res
            return out
        return res

    def get_config(self) -> dict:
        return {"id": self.codec_id, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict):
        cfg = dict(config)
        cfg.pop("id", None)
        return cls(**cfg)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    # subclass hooks ---------------------------------------------------------------
    def _encode(self, mv: memoryview, dt):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):  # pragma: no cover
        raise NotImplementedError


class ApproxReference:
    """A delta's reference known to be inexact in its low mantissa bits only (a reduced-
    fidelity decode of a damaged chunk, see ``decode(approximate_reference=True)``):
    the delta decoder skips its checksum, and decode_frame the result's."""

    __slots__ = ("buf",)

    def __init__(self, buf) -> None:
        self.buf = buf


def decode_frame(frame, reference=None, fidelity=None, copy: bool = True,
                 approximate_reference: bool = False):
    """Decoded bytes of a frame; with ``copy=False`` a read-only memoryview of the
    decoder's own output when it has one (saves a copy of every decoded chunk)."""
    header = parse(frame)
    cls = REGISTRY.get(header.codec)
    if cls is None:
        raise FrameError(f"codec {header.codec!r} is not available in this build")
    dt = _dt.by_id(header.dtype_id)
    if header.dtype_id and dt is None:
        raise FrameError(f"frame has unknown dtype id {header.dtype_id}")
    if header.needs_reference and reference is None:
        raise FrameError(f"this {header.codec} frame is a delta: pass reference=<the same chunk of "
                         "the checkpoint it was encoded against> to decode it")
    approx = approximate_reference and header.needs_reference
    out = cls._decode(header, frame, dt, ApproxReference(reference) if approx else reference,
                      fidelity)
    out = _owned(out, frame, reference) if not copy else bytes(out) if not isinstance(out, bytes) else out
    if len(out) != header.raw_size:
        raise FrameError(f"decoded {len(out)} bytes but the frame says {header.raw_size}")
    if fidelity is None and not approx and not header.stored_as_is() and \
            not header.content_ok(out):
        raise FrameError(f"{header.codec} frame decoded to bytes whose checksum does not match "
                         "the one recorded at encode time" +
                         (" (wrong reference?)" if header.needs_reference else ""))
    return out


def _owned(out, frame, reference) -> bytes | memoryview:
    """``out`` without a copy when it is a fresh array, not a view of ``frame`` or the
    reference (a frame may live in a memory map that goes away after the call)."""
    if isinstance(out, bytes):
        return out
    if (isinstance(out, np.ndarray) and out.flags.c_contiguous
            and not any(b is not None and np.may_share_memory(out, np.frombuffer(b, np.uint8))
                        for b in (frame, reference))):
        out = out.reshape(-1).view(np.uint8)
        out.flags.writeable = False
        return out.data
    return _copy(out)


def _copy(buf) -> memoryview:
    """A read-only copy of ``buf``: numpy copies without the GIL (``bytes(buf)`` holds it:
    a reader thread copying a raw chunk out of the store's map would stall every other
    thread, the FUSE loop's replies included)."""
    src = buf.reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) \
        else np.frombuffer(buf, np.uint8)
    out = np.empty(src.shape[0], np.uint8)
    np.copyto(out, src)
    out.flags.writeable = False
    return out.data
