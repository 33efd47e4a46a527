"""The selector (Elves' rule): try the allowed codecs on a sample of the chunk, encode
the whole chunk with the winner, and never store more than the raw frame.

Candidates that cannot win are skipped rather than tried: plain zstd beats the planes
layout on a float chunk only through repeats (runs, repeated rows), and planes already
tries zstd on each plane where repeats show. So on float data planes goes first; zstd
is tried only when one of planes' streams chose zstd (or planes is not a candidate)."""
from __future__ import annotations

import numpy as np

from . import kernels, shuffle, zstd_codec
from .base import REGISTRY
from .dtypes import lossy_allowed
from .elf import native_bound
from .frame import METHOD_RAW, METHOD_ZSTD, parse
from .xor import estimate_scale, scaled_reference
from .zstd_codec import code_stream

SLICE = 64 * 1024
NSLICES = 4
WHOLE_BELOW = 64 * 1024  # chunks up to this size: every candidate on the whole chunk
SMALL_SLICE = 16 * 1024  # the smallest sample slice
SHUFFLE_MIN = 4096  # opaque chunks from this size are probed for fixed-width records
#: with ELF among the candidates each sample slice is 1/LOSSY_SHARE of the chunk, not
#: 1/32: ELF codes ~2.5x slower than planes and its sample costs that much more, while
#: ELF and planes differ by 20-300 % (on bench_codecs' MiniLM fp32, fp16 and fine-tune
#: at bounds 1e-4, 1e-3 and native: the same total stored bytes to the byte;
#: encode 0.49x -> 0.53x of zstd -3 at 1e-4)
LOSSY_SHARE = 128
#: xor is taken without trials when the order-0 size of the sample's reference delta
#: (plain sub, no context) is under this fraction of the sample's own. On the training
#: checkpoint and the fine-tune (bench_codecs' two reference sets) every chunk estimated
#: in [0.85, 0.95) was won by xor (34 of 34, its frame 0.84-0.99 of the best without the
#: reference), so the trials would pick xor; in [0.95, 1.05) xor won 28 of 113 (0.92-1.05
#: of it): those keep the trials. (zstd on the plain bytes of floats never came within
#: 8 % of planes there.)
XOR_SURE = 0.95


def candidates(dt, bound, reference) -> list[str]:
    c = ["zstd"]
    if dt is not None and dt.itemsize > 1:
        c.append("planes")
    if lossy_allowed(dt, bound) and (bound == "native" or bound >= native_bound(dt)):
        c.append("elf")
    if reference is not None:
        c.append("xor")
    return c


def _make(name, dt, bound, reference, level, sample_of: int | None = None, joint: bool = True,
          scale: float = 1.0):
    kw = {"dtype": dt.name if dt else None}
    if name in ("zstd", "planes", "elf", "xor"):
        kw["level"] = level
    if name == "elf":
        kw["bound"] = bound
        kw["joint"] = joint  # False: byte planes (a protected frame guards its top plane)
    if name == "xor":
        kw["reference"] = reference
        kw["sample_of"] = sample_of
        kw["scale"] = scale
    return REGISTRY[name](**kw)


def sample_slices(nbytes: int, itemsize: int, slice_size: int = SLICE) -> list[tuple[int, int]]:
    """NSLICES element-aligned (start, stop) byte ranges spread over the chunk."""
    span = slice_size - slice_size % itemsize
    gap = (nbytes - span) / (NSLICES - 1)
    out = []
    for i in range(NSLICES):
        s = int(i * gap)
        s -= s % itemsize
        out.append((s, s + span))
    return out


def uses_zstd(frame: bytes) -> bool:
    """Whether any stream of the frame is zstd-coded (a sign of repeats)."""
    return any(s.method == METHOD_ZSTD for s in parse(frame).streams)


def _try_all(names, mv, dt, bound, reference, level, joint: bool = True,
             scale: float = 1.0) -> bytes:
    """The smallest frame of the candidates on the whole chunk; planes first, so zstd
    is skipped on float data without repeats."""
    if _xor_sure(names, np.frombuffer(mv, np.uint8), reference, dt, scale):
        return _make("xor", dt, bound, reference, level, scale=scale).encode(mv)
    frames = []
    for c in _planes_first(names):
        if c == "zstd" and _zstd_hopeless(dt, frames, names):
            continue
        frames.append(_make(c, dt, bound, reference, level, joint=joint,
                            scale=scale).encode(mv))
    return min(frames, key=len)


def _planes_first(names: list[str]) -> list[str]:
    return sorted(names, key=lambda c: c != "planes")


def _zstd_hopeless(dt, frames: list[bytes], names: list[str]) -> bool:
    """zstd cannot beat a float planes frame none of whose streams chose zstd."""
    return (dt is not None and dt.is_float and "planes" in names and bool(frames)
            and not uses_zstd(frames[0]))


def _sample_winner(names, mv, dt, bound, reference, level, skip: bool = True,
                   joint: bool = True, scale: float = 1.0) -> str:
    """The candidate whose frame of four spread slices (1/32 of the chunk; 1/128 with
    ELF) is smallest (``skip``: leave out zstd where planes' sample frame shows it cannot
    win); xor codes the sample with the transform and scale the whole chunk would take
    (no transform trials)."""
    n = mv.nbytes
    size = dt.itemsize if dt else 1
    # slices of 1/32 of the chunk (1/128 where ELF is a candidate), 16..64 KiB each:
    # the sample stays a small fraction of the work
    share = LOSSY_SHARE if "elf" in names else 32
    parts = sample_slices(n, size, min(SLICE, max(SMALL_SLICE, n // share)))
    a = np.frombuffer(mv, np.uint8)
    sample = np.concatenate([a[s:e] for s, e in parts])
    ref_sample = None
    if reference is not None:
        r = np.frombuffer(reference, np.uint8)
        ref_sample = np.concatenate([r[s:e] for s, e in parts])
    if skip and _xor_sure(names, sample, ref_sample, dt, scale):
        return "xor"
    best, win = None, names[0]
    frames: list[bytes] = []
    for c in _planes_first(names):
        if skip and c == "zstd" and _zstd_hopeless(dt, frames, names):
            continue
        f = _make(c, dt, bound, ref_sample, level, sample_of=n, joint=joint,
                  scale=scale).encode(sample)
        frames.append(f)
        if best is None or len(f) < best:
            best, win = len(f), c
    return win


def _xor_sure(names, sample, ref_sample, dt, scale: float = 1.0) -> bool:
    """Whether xor wins the sample (or the whole small chunk) by so much on an order-0
    estimate (XOR_SURE) that the trials can be skipped: float data against a
    reference (scaled by ``scale``, as xor would code it), the lossless candidates
    only."""
    if ref_sample is None or dt is None or not dt.is_float or dt.itemsize not in (2, 4, 8) \
            or not set(names) <= {"zstd", "planes", "xor"}:
        return False
    ut = np.dtype(f"<u{dt.itemsize}")
    m = sample.shape[0] // dt.itemsize
    if m < 2:
        return False
    # every other element: half the time, the same estimate within ~0.005
    x = sample[:m * dt.itemsize].view(ut)[::2]
    r = np.frombuffer(ref_sample, np.uint8)[:m * dt.itemsize].view(ut)
    r = (r if scale == 1.0 else scaled_reference(r, scale))[::2]
    if dt.itemsize == 4:
        bz, bx = kernels.sub_vs_raw_bits4(x, r)
    else:
        bz, bx = kernels.sub_vs_raw_bits(x, r, 8 * dt.itemsize)
    # bz == 0 (the data is its reference there): the trials decide (zstd can win on
    # constant data)
    return 0 < bz < XOR_SURE * bx


def _planes_then_zstd(mv, dt, level) -> bytes:
    """Lossless floats without a reference: planes on the whole chunk; zstd only where
    planes saw repeats and zstd wins on the sample, then the smaller whole frame."""
    planes = _make("planes", dt, None, None, level).encode(mv)
    if not uses_zstd(planes) or \
            _sample_winner(["zstd", "planes"], mv, dt, None, None, level, skip=False) != "zstd":
        return planes
    other = _make("zstd", dt, None, None, level).encode(mv)
    return other if len(other) < len(planes) else planes


def _opaque(mv, level) -> bytes | None:
    """Opaque bytes: shuffled when a sample's lanes show fixed-width records (arrays
    in a file we do not parse), else one zstd attempt; None when zstd does not pay.
    Where zstd finds repeats in a slice (text, repeated records), plain zstd is tried
    too, and the smaller frame kept."""
    h8 = shuffle.sample_lanes(mv) if mv.nbytes >= SHUFFLE_MIN else None
    shuffled = None
    if h8 is not None and (k := shuffle.probe(mv, h8)) > 1:
        repeats = _repeats(mv, h8, level)
        if repeats:
            params, streams = shuffle.shuffle_streams(mv, k, level)
        else:
            params, streams = shuffle.shuffle_streams_fast(mv, k, level, h8)
        shuffled = REGISTRY["shuffle"](stride=k, level=level).frame(
            mv, None, dict(streams=streams, params=params))
        if not repeats and not uses_zstd(shuffled):
            return shuffled
    s = code_stream("bytes", mv, level, analyse=False)
    if s.method == METHOD_RAW:
        return shuffled
    plain = REGISTRY["zstd"](level=level).frame(mv, None, dict(streams=[s]))
    return shuffled if shuffled is not None and len(shuffled) <= len(plain) else plain


def _repeats(mv, h8, level) -> bool:
    """Whether zstd codes a 16 KiB slice from the middle of the chunk 5 % below the
    order-0 size of the sample ``h8``: repeats, which coding shuffled lanes on their
    own may miss."""
    n = mv.nbytes
    mid = np.frombuffer(mv, np.uint8)[max(0, n // 2 - SMALL_SLICE // 2):][:SMALL_SLICE]
    zsize = len(zstd_codec.compressor(min(level, 1)).compress(mid))
    return zsize < 0.95 * mid.shape[0] * float(kernels.lane_bits(h8, 1)[0]) / 8


def select(mv, dt, *, bound=None, reference=None, level=3, joint: bool = True) -> bytes:
    """The smallest frame of the allowed codecs; ``joint``: whether ELF may use its joint
    layout (codec.elf; False for frames whose top streams are to be protected)."""
    n = mv.nbytes
    raw = REGISTRY["raw"](dtype=dt.name if dt else None)
    if reference is not None and reference.nbytes != n:
        raise ValueError(f"reference has {reference.nbytes} bytes, data {n}")
    if n < 64:
        return raw.encode(mv)
    names = candidates(dt, bound, reference)
    # xor's scale for the whole chunk, so that its sample trials code as the chunk will
    scale = estimate_scale(mv, reference, dt) if "xor" in names else 1.0
    if dt is None and names == ["zstd"]:
        best = _opaque(mv, level)
        if best is None:  # zstd did not pay (random, encrypted): the raw frame at once,
            return raw.encode(mv)  # not a zstd frame thrown away for it
    elif len(names) == 1:  # e.g. int8: nothing to choose, no sample pass
        best = _make(names[0], dt, bound, reference, level).encode(mv)
    elif n <= WHOLE_BELOW:  # small chunks: every candidate on the whole chunk
        best = _try_all(names, mv, dt, bound, reference, level, joint, scale)
    elif names == ["zstd", "planes"] and dt.is_float:
        best = _planes_then_zstd(mv, dt, level)
    else:
        win = _sample_winner(names, mv, dt, bound, reference, level, joint=joint,
                             scale=scale)
        best = _make(win, dt, bound, reference, level, joint=joint, scale=scale).encode(mv)
    if len(best) > n:  # coding barely paid: the smaller of it and the raw frame
        plain = raw.encode(mv)
        return plain if len(plain) <= len(best) else best
    return best
