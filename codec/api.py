"""The functional API the filesystem calls: encode / decode / inspect."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import dtypes as _dt
from .dtypes import lossy_allowed
from .base import REGISTRY, as_bytes_view, decode_frame
from .frame import parse, protect as protect_frame

ORDER = ("raw", "zstd", "shuffle", "planes", "elf", "xor")


@dataclass
class FrameInfo:
    codec: str
    version: int
    dtype: str | None
    raw_size: int
    stored_size: int
    lossy: bool
    bound: float | None
    max_error: float | None
    needs_reference: bool
    streams: list = field(default_factory=list)  # [(name, stored size)]
    stream_methods: list = field(default_factory=list)  # [(name, "raw"|"zstd"|"const")]
    protected: list = field(default_factory=list)  # names of streams with a parity or copy

    @property
    def ratio(self) -> float:
        return self.raw_size / self.stored_size if self.stored_size else float("inf")


def available_codecs() -> list[str]:
    return [c for c in ORDER if c in REGISTRY]


def get_codec(name: str, dtype=None, **kw):
    """The numcodecs-style codec object for ``name``."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {available_codecs()}") from None
    return cls(dtype=dtype, **kw)


def encode(data, dtype=None, *, codec: str = "auto", bound=None, reference=None,
           level: int = 3, protect: bool = False) -> bytes:
    """Encode one chunk into a self-describing frame.

    data: bytes-like of raw little-endian elements (or opaque bytes); dtype: safetensors
    dtype name or None. codec: "auto" or one of available_codecs(). bound: None
    (lossless), a float > 0 (absolute error bound) or "native" -- only used for
    F32/F16/F64, ignored elsewhere. reference: same-length chunk for "xor". protect:
    give the sign+exponent streams of float data a parity (frame.protect): decode
    survives damage within one stripe of each (1/8 of a stream, or all of a small one)."""
    # protected: ELF in byte planes, whose top plane (sign and high bits) is what a parity
    # protects (its joint layout holds sign and magnitude in one stream: its parity would
    # cost 1/8 of everything, more than the joint layout saves over planes)
    frame = _encode(data, dtype, codec, bound, reference, level, joint=not protect)
    if protect:
        n = as_bytes_view(data).nbytes
        dt = _dt.lookup(dtype, n)
        if dt is not None and dt.is_float:
            return protect_frame(frame, n // dt.itemsize)
    return frame


def _encode(data, dtype, codec: str, bound, reference, level: int, joint: bool) -> bytes:
    mv = as_bytes_view(data)
    dt = _dt.lookup(dtype, mv.nbytes)
    if bound is not None and bound != "native":
        bound = float(bound)
        if not bound > 0:
            raise ValueError(f"bound must be > 0 or 'native', got {bound!r}")
    if reference is not None:
        reference = as_bytes_view(reference)
    dname = dt.name if dt else None
    if codec == "auto":
        from .selector import select
        return select(mv, dt, bound=bound, reference=reference, level=level, joint=joint)
    if codec == "elf":
        if bound is None:
            raise ValueError("codec='elf' is lossy: pass bound=<absolute error> or bound='native'")
        if not lossy_allowed(dt, bound):
            codec = "planes"  # never lossy on BF16 / ints / bytes: stay lossless
    if codec == "xor":
        if reference is None:
            raise ValueError("codec='xor' needs reference=<same chunk of a previous checkpoint>")
        return get_codec("xor", dname, reference=reference, level=level).encode(mv)
    if codec == "elf":
        return get_codec("elf", dname, bound=bound, level=level, joint=joint).encode(mv)
    if codec in ("zstd", "planes", "shuffle"):
        return get_codec(codec, dname, level=level).encode(mv)
    return get_codec(codec, dname).encode(mv)


def decode(frame, reference=None, fidelity=None, copy: bool = True,
           approximate_reference: bool = False) -> bytes | memoryview:
    """Decode a frame to its raw bytes (exact for lossless frames, within the recorded
    bound for ELF frames). ``fidelity``: None = everything; an int = number of mantissa
    (fraction) bits wanted -- only the most significant streams that hold them are read
    and verified; dropped bits read as the midpoint of their range. Ignored by codecs
    without planes (raw, zstd, xor: always exact). ``copy=False`` may return a
    read-only memoryview instead of bytes, saving a copy of the output.

    ``approximate_reference=True`` (salvage of damaged data): ``reference`` is a
    reduced-fidelity decode of the exact reference (sign and exponent exact, low
    mantissa bits not); a float delta is decoded against it without checking the
    reference's checksum or the result's. Each value is then off by about as much as its
    reference value is: xor deltas keep the error in the same low bits, sub deltas add
    the reference's error to the value's bits. The delta's own streams are still
    verified."""
    return decode_frame(frame, reference=reference, fidelity=fidelity, copy=copy,
                        approximate_reference=approximate_reference)


def inspect(frame) -> FrameInfo:
    h = parse(frame)
    dt = _dt.by_id(h.dtype_id)
    from .frame import METHOD_NAMES
    return FrameInfo(codec=h.codec, version=h.version, dtype=dt.name if dt else None,
                     raw_size=h.raw_size, stored_size=len(memoryview(frame).cast("B")),
                     lossy=h.lossy, bound=h.bound, max_error=h.max_error,
                     needs_reference=h.needs_reference,
                     streams=[(s.name, s.stored_len) for s in h.streams],
                     stream_methods=[(s.name, METHOD_NAMES[s.method]) for s in h.streams],
                     protected=[s.name for s in h.streams if s.protected])
