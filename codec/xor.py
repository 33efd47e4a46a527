"""Delta against a reference (same dtype and length: the same tensor in a previous
checkpoint or base model), coded with the planes layout. Lossless. The transforms
(params: reference hash, planes layout, transform id 0..3; sub+ctx adds the number of
classes, [the number of buckets,] and the classes' reference exponents as u16):

  xor  ``data XOR reference`` (ZipLLM's BitX), then the dtype's planes layout;
  sub  for 2/4/8-byte elements: the wrapping integer difference of the raw bits,
       zigzag-mapped (small changes of either sign -> small unsigned numbers), then
       byte planes, most significant first. On float weights and Adam moments a few
       dozen steps apart this beats XOR by 5-10% (a change that carries into a higher
       mantissa bit flips many bits under XOR, but is a small number as a difference).

  sub+ctx  floats only: the sub transform, with the elements split into NCLASSES
       classes by the exponent of the *reference* (which the decoder has): the
       NCLASSES - 1 commonest reference exponents get a class each, the rest share the
       last. Each class's byte planes are coded on their own (streams ``c{k}.byte{j}``,
       plane-major), so each gets its own code table. Why: an Adam step moves a weight
       by about the same amount whatever its size, so the delta in units of the last
       place shrinks as the reference's exponent grows; one table per exponent class
       codes the delta's high bytes ~4 % smaller on weights and Adam moments.
  sub+ctx+hi  (written now) sub+ctx, and within each class every byte plane below the
       top one is split again into NBUCKETS streams by min(its next higher byte,
       NBUCKETS - 1), which the decoder has already decoded (the buckets of one class
       and byte share its stream name). Why: the delta's magnitude is bimodal where
       some rows only decay (embedding rows of tokens absent from the batches: their
       deltas are tiny and their high bytes zero); a lower byte under a zero higher
       byte is a leading byte with a skewed distribution, under a non-zero one it is
       near uniform. ~9 % smaller on the word embeddings of a training checkpoint.

sub+blocks  for 2/4-byte elements: the sub transform's deltas cut in blocks of BLOCK
       elements; each block's class is the bit length of its largest delta, in steps
       of WIDTH_STEP bits (stream ``widths``, a byte per block); each class's deltas,
       blocks in order, are coded as the byte planes its width needs (streams
       ``w{k}.byte{j}``: every class's top plane, then every class's next plane, and so
       on; class 0: all zero, nothing stored).
       Why: where whole rows only decay (embedding rows of tokens absent from the
       batches, Adam moments of them against a scaled reference) their deltas are
       tiny, next to rows of full-size steps; blocks of one width code each kind with
       its own tables and drop their zero high bytes, as the hi buckets do, but decode
       in contiguous runs (no gather per element): ~2 % smaller than sub on a training
       checkpoint at nearly sub's decode speed.
scaled  (a flag on any of the above, float32 only) the reference is first multiplied by
       a scale the encoder estimated (kernels.scale_ref4: normal values only, so the
       result is the same under any flush-to-zero mode); the scale, a float64, ends
       the params. Why: Adam's moments of parameters that got no gradient since the
       reference only decay, exp_avg by beta1 and exp_avg_sq by beta2 per step (the
       word-embedding rows of tokens absent from the batches: half of a BERT's
       parameters), so each is the reference times beta^steps to a few units in the
       last place, which the plain difference does not see. On a checkpoint 50 AdamW
       steps after its reference, exp_avg's delta codes 9 % smaller, exp_avg_sq's 11 %.
       estimate_scale finds the scale as the commonest ratio data / reference on a
       sample, and keeps it only where it shortens the sample's deltas.

The encoder keeps the smallest transform on a sample (coded, or for large float chunks
estimated), except that sub+blocks must be 1 % smaller than sub and sub+ctx+hi 10 %
smaller than both, for their slower decoders (_pick_transform). The frame records
xxh3_64 of the reference, so decoding against a missing or wrong reference raises
FrameError instead of returning wrong bytes."""
from __future__ import annotations

import dataclasses
import math
import struct
from types import SimpleNamespace

import numpy as np

from .base import ApproxReference, Codec, Encoded, as_bytes_view, register
from .errors import FrameError
from .frame import hash64
from . import kernels
from .planes import L_BYTES, decode_planes, decoded_planes, encode_planes, layout_for
from .zstd_codec import code_stream, decode_stream

_P = struct.Struct("<QB")  # reference hash, planes layout
_P2 = struct.Struct("<QBB")  # reference hash, planes layout, transform (0 xor, 1 sub)
T_XOR, T_SUB, T_SUBCTX, T_SUBCTX_HI, T_SUB_BLOCKS = 0, 1, 2, 3, 4
BLOCK = 128  # sub+blocks: elements per block
WIDTH_STEP = 2  # sub+blocks: a block's class is its widest delta's bit length / 2, rounded up
_PB = struct.Struct("<QBBHB")  # reference hash, planes layout, transform, block size,
# width step
NCLASSES = 8
NBUCKETS = 4  # sub+ctx+hi: a lower byte's table is picked by min(higher byte, 3)
SPLIT_MIN = 4096  # planes of fewer bytes are never split by bucket (see _buckets_pay)
_P3 = struct.Struct("<QBBB")  # reference hash, planes layout, transform, classes; then
# (classes - 1) u16 reference exponents, one per class (the last class: all the others)
SAMPLE = 1 << 16  # elements tried with each transform
EST_SAMPLE = 1 << 14  # elements of the middle of a large chunk its estimates look at
CTX_DIRECT = 2 * SAMPLE  # float chunks from this many elements: estimates, no trials
CTX_MIN = 4096  # float chunks under this many elements: no sub+ctx trial
#: sub+ctx+hi is written only where it is this much smaller than the better of sub and
#: sub+blocks (order-0 estimates on a sample for large chunks, coded sizes for the
#: others): its classes cost a gather back into element order at decode (~1 ns per
#: element, twice with the buckets) that the others' decoders do not. Where the
#: reference's exponent decides the delta's size (a bf16 fine-tune: 16 % smaller than
#: sub) it stays; on an fp32 training checkpoint, sub and sub+blocks come within 2 %
CTX_GAIN = 0.10  # as a fraction of the better of sub and sub+blocks
BLOCKS_TIE = 0.99  # sub+blocks is written where it is 1 % smaller than sub (else sub:
# its one-pass decoder is faster)
T_SCALED = 0x10  # flag on the transform byte: coded against scaled_reference(ref, scale)
_SCALE = struct.Struct("<d")  # the scale, after all other params of a T_SCALED frame
SCALE_SAMPLE = 1024  # elements (spread over the chunk) estimate_scale looks at
SCALE_MIN_SHARE = 1 / 16  # the commonest ratio must hold this share of the sample
SCALE_GAIN = 0.95  # keep a scale only where the sample's delta bits drop below this


def scaled_reference(ref, scale: float) -> np.ndarray:
    """The reference a T_SCALED frame is coded against (uint32): every normal float32
    of ``ref`` times ``scale``, rounded once; other values as they are."""
    r = _u8(ref).view(np.uint32)
    out = np.empty_like(r)
    kernels.scale_ref4(r, r.view(np.float32), float(scale), out, out.view(np.float32))
    return out


def estimate_scale(mv, ref, dt) -> float:
    """The scale to code ``mv`` against (1.0: none), for float32 chunks: the commonest
    ratio data / reference over a spread sample of SCALE_SAMPLE elements (the ratios
    binned by their top 10 mantissa bits, the median of the commonest bin), kept when
    at least SCALE_MIN_SHARE of the sample is in that bin and the sub deltas of the
    sample against the scaled reference need under SCALE_GAIN of the bits."""
    if dt is None or dt.name != "F32" or mv.nbytes < 4 * SCALE_SAMPLE:
        return 1.0
    x_all, r_all = _u8(mv).view(np.uint32), _u8(ref).view(np.uint32)
    stride = x_all.shape[0] // SCALE_SAMPLE
    x, r = x_all[::stride][:SCALE_SAMPLE], r_all[::stride][:SCALE_SAMPLE]
    x, r = np.ascontiguousarray(x), np.ascontiguousarray(r)
    scale, count = kernels.ratio_mode(x, r, 13)  # bins: the ratio's top 10 mantissa bits
    if count < SCALE_SAMPLE * SCALE_MIN_SHARE or scale == 1.0 or \
            not 2.0 ** -100 < abs(scale) < 2.0 ** 100:
        return 1.0
    gain = kernels.sub_bit_lengths4(x, scaled_reference(r, scale))
    return scale if gain < SCALE_GAIN * kernels.sub_bit_lengths4(x, r) else 1.0


def _with_scale(params: bytes, scale: float) -> bytes:
    """``params`` of a frame (transform byte at offset 9) marked T_SCALED, the scale
    appended."""
    p = bytearray(params)
    p[_P.size] |= T_SCALED
    return bytes(p) + _SCALE.pack(scale)


def _split_scale(header, dt):
    """(header without the scale, scale) of a frame; scale 1.0 when not T_SCALED."""
    params = header.params
    if len(params) <= _P.size or not params[_P.size] & T_SCALED:
        return header, 1.0
    if len(params) < _P2.size + _SCALE.size:
        raise FrameError("xor frame: bad scale parameters")
    (scale,) = _SCALE.unpack(params[-_SCALE.size:])
    if dt is None or dt.name != "F32" or not (math.isfinite(scale) and scale != 0):
        raise FrameError("xor frame: scale on a dtype other than float32, or not finite")
    p = bytearray(params[:-_SCALE.size])
    p[_P.size] &= ~T_SCALED & 0xFF
    return dataclasses.replace(header, params=bytes(p)), scale


def _u8(b) -> np.ndarray:
    if isinstance(b, np.ndarray):
        return np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return np.frombuffer(b, np.uint8)


def _utype(dt) -> np.dtype:
    size = dt.itemsize if dt else 1
    return np.dtype(f"<u{size}") if size in (1, 2, 4, 8) else np.dtype(np.uint8)


def _xor(mv, ref, dt):
    ut = _utype(dt)
    return np.bitwise_xor(_u8(mv).view(ut), _u8(ref).view(ut))


def _sub(mv, ref, dt) -> np.ndarray:
    """zigzag(data - reference) on the raw bits, wrapping."""
    ut = _utype(dt)
    bits = ut.itemsize * 8
    if ut.itemsize in (2, 4):
        out = np.empty(mv.nbytes // ut.itemsize, ut)
        kernels.sub_zigzag(_u8(mv).view(ut), _u8(ref).view(ut), out, bits)
        return out
    d = _u8(mv).view(ut) - _u8(ref).view(ut)  # wraps modulo 2^bits
    sd = d.view(np.dtype(f"<i{ut.itemsize}"))
    return ((d << ut.type(1)) ^ (sd >> (bits - 1)).view(ut)).astype(ut, copy=False)


def _unsub(z: np.ndarray, ref, ut: np.dtype) -> np.ndarray:
    """Inverse of _sub: reference + unzigzag(z), wrapping."""
    z = z.view(ut)
    d = (z >> ut.type(1)) ^ (ut.type(0) - (z & ut.type(1)))
    return _u8(ref).view(ut) + d


def _planes_view(header, layout: int) -> SimpleNamespace:
    """The header as decode_planes reads a planes frame's: its layout as the params."""
    return SimpleNamespace(params=bytes([layout]), raw_size=header.raw_size,
                           streams=header.streams)


def _unsub_planes(frame, header, ref, ut: np.dtype, out=None) -> np.ndarray:
    """_unsub of the merged byte planes, in one pass from the decoded planes (``out``:
    where to put the result; it may be the reference itself, as for every decoder
    here: each element is read before it is written)."""
    n = header.raw_size // ut.itemsize
    planes = decoded_planes(frame, header.streams, n)
    r = _u8(ref).view(ut)
    if out is not None:  # the scaled (float32) reference itself: add in place
        kernels.merge_add_u32(*planes, out)
        return out
    out = np.empty(n, ut)
    (kernels.merge_unsub_u32 if ut.itemsize == 4 else kernels.merge_unsub_u16)(*planes, r, out)
    return out


def _plane_streams(arr: np.ndarray, dt, level: int) -> tuple[int, list]:
    """(stored size, streams) of ``arr`` coded with the planes layout of ``dt``."""
    layout, streams = encode_planes(arr.view(np.uint8), dt, level)
    return sum(len(x.stored) for x in streams), streams


def _pick_transform(mv, ref, dt, level: int, trials: dict | None = None) -> int:
    """The transform for the chunk (sub for 2/4/8-byte elements, sub+blocks for 2/4-byte
    ones, sub+ctx+hi for floats). Float chunks of CTX_DIRECT elements or more decide
    by order-0 estimates on a sample (_direct_transform): trials would cost as much as
    the encoding. Smaller chunks code a sample with each and keep the smallest; under
    CTX_MIN elements sub+ctx is not tried (its 8 classes' streams cost more in headers
    and tables than the classes save). sub+ctx must be CTX_GAIN smaller than the
    better of sub and sub+blocks (its decode gathers every element back into order),
    and sub+blocks BLOCKS_TIE smaller than sub. When the sample is the whole chunk,
    ``trials`` gets the winner's (params, streams): no second coding."""
    ut = _utype(dt)
    if ut.itemsize == 1:
        return T_XOR
    direct = _direct_transform(mv, ref, dt, mv.nbytes)
    if direct is not None:
        return direct
    n = min(SAMPLE, mv.nbytes // ut.itemsize)
    if n == 0:
        return T_XOR
    a, r = _middle(mv, ref, ut.itemsize * n, ut.itemsize)
    step = a.nbytes
    done = {T_XOR: _plane_streams(_xor(a, r, dt), dt, level)}
    if n > 1:  # one element: every stream is one constant byte, so sub ties and xor wins
        z = _sub(a, r, dt)
        done[T_SUB] = _plane_streams(z, _bytes_dtype(ut), level)
        if ut.itemsize in (2, 4):
            streams = _encode_blocks(z, level)
            size = sum(len(x.stored) + 8 for x in streams)
            if size < BLOCKS_TIE * done[T_SUB][0]:
                done[T_SUB_BLOCKS] = size, streams
    if _ctx_ok(dt) and n >= CTX_MIN:
        params, streams = _encode_ctx(a, r, dt, level)
        size = sum(len(x.stored) + 8 for x in streams)
        fast = min(done[k][0] for k in (T_SUB, T_SUB_BLOCKS) if k in done)
        if size <= (1 - CTX_GAIN) * fast:
            done[T_SUBCTX_HI] = size, (params, streams)
    t = min(done, key=lambda k: done[k][0])
    if trials is not None and step == mv.nbytes:
        trials[t] = done[t][1]
    return t


def _middle(mv, ref, step: int, itemsize: int):
    """The ``step`` bytes from the middle of the chunk and of its reference."""
    mid = (mv.nbytes // 2) // itemsize * itemsize
    lo = max(0, min(mid, mv.nbytes - step))
    return mv[lo:lo + step], ref[lo:lo + step]


def _direct_transform(mv, ref, dt, nbytes: int) -> int | None:
    """The transform a float chunk of ``nbytes`` (``mv``: it or a sample of it) of
    CTX_DIRECT elements or more takes without trials (else None): order-0 estimates
    of sub, sub+blocks and sub+ctx+hi on EST_SAMPLE elements from its middle,
    with _pick_transform's margins."""
    if not _ctx_ok(dt) or nbytes // dt.itemsize < CTX_DIRECT:
        return None
    a, r = _middle(mv, ref, min(mv.nbytes, EST_SAMPLE * dt.itemsize), dt.itemsize)
    sub, blocks, ctx = _estimates(a, r, dt)
    fast, t = (blocks, T_SUB_BLOCKS) if blocks < BLOCKS_TIE * sub else (sub, T_SUB)
    return T_SUBCTX_HI if ctx <= (1 - CTX_GAIN) * fast else t


def _estimates(mv, ref, dt) -> tuple[float, float, float]:
    """Order-0 coded bits of (sub, sub+blocks, sub+ctx+hi) on (mv, ref), tables and
    headers not counted (sub+blocks: inf for 8-byte elements). The class and bucket
    histograms of sub+ctx+hi partition sub's plane histograms, so one pass gives both."""
    _, _, _, h, split = _ctx_planes(mv, ref, dt, NBUCKETS)  # h: (size, class, bucket, 256)
    sub = _hist_bits(h.sum(axis=(1, 2))).sum()
    ctx = np.where(split, _hist_bits(h).sum(axis=2), _hist_bits(h.sum(axis=2))).sum()
    blocks = np.inf
    if dt.itemsize in (2, 4):
        z = _sub(mv, ref, dt)
        w = kernels.block_widths(z, BLOCK, WIDTH_STEP)
        hb = kernels.blocks_hist(z, w, BLOCK, dt.itemsize, _nclasses(dt.itemsize, WIDTH_STEP))
        used = _class_bytes(np.arange(hb.shape[0]), dt.itemsize, WIDTH_STEP)
        keep = np.arange(dt.itemsize)[None, :] < used[:, None]  # the planes each class codes
        blocks = (_hist_bits(hb) * keep).sum() + _hist_bits(np.bincount(w, minlength=256))
    return float(sub), float(blocks), float(ctx)


def _hist_bits(h: np.ndarray) -> np.ndarray:
    """Order-0 coded bits of each histogram along the last axis: n log2 n - sum h log2 h."""
    rows = np.ascontiguousarray(h, np.int64).reshape(-1, h.shape[-1])
    return kernels.hist_bits_rows(rows).reshape(h.shape[:-1])


def _class_bytes(k, size: int, step: int):
    """Byte planes a sub+blocks class codes (its width in bytes, at most the element's)."""
    return np.minimum((k * step + 7) // 8, size)


def _nclasses(size: int, step: int) -> int:
    """sub+blocks classes of ``size``-byte elements: widths 0, step, 2 step, ... bits."""
    return -(-8 * size // step) + 1


def _class_elements(w: np.ndarray, n: int, block: int, ncls: int):
    """(block indices ordered by class, each class's first position among them, elements
    per class) of a sub+blocks chunk of ``n`` elements (its last block may be short)."""
    order, starts = kernels.blocks_by_class(w, ncls)
    counts = np.diff(starts) * block
    if w.shape[0]:
        counts[w[-1]] -= w.shape[0] * block - n
    return order, starts, counts


def _encode_blocks(z: np.ndarray, level: int) -> list:
    """The streams of sub+blocks from the zigzag deltas ``z`` (uint16 or uint32)."""
    size = z.dtype.itemsize
    w = kernels.block_widths(z, BLOCK, WIDTH_STEP)
    _, _, counts = _class_elements(w, z.shape[0], BLOCK, _nclasses(size, WIDTH_STEP))
    off = np.concatenate([[0], np.cumsum(counts)])
    g = np.empty_like(z)
    kernels.group_blocks(z, w, BLOCK, off[:-1].copy(), g)
    lanes = g.view(np.uint8).reshape(-1, size)
    return [code_stream("widths", w, level)] + [
        code_stream(f"w{k}.byte{j}", np.ascontiguousarray(lanes[off[k]:off[k + 1], j]), level)
        for k, j in _block_planes(counts, size, WIDTH_STEP)]


def _block_planes(counts: np.ndarray, size: int, step: int) -> list[tuple[int, int]]:
    """(class, byte) of each plane stream of sub+blocks, in frame order: every class's
    top plane first (with the widths, what `protect` guards), then every class's
    second plane, and so on: the most significant bytes first."""
    nbytes = [int(_class_bytes(k, size, step)) for k in range(len(counts))]
    return [(k, nbytes[k] - 1 - r) for r in range(size) for k in range(1, len(counts))
            if counts[k] and nbytes[k] > r]


def _decode_blocks(header, frame, ref, ut: np.dtype, out=None) -> np.ndarray:
    """Inverse of _encode_blocks and the sub transform (the reference already checked),
    one class at a time: its blocks, in order, get the reference plus the deltas read
    straight from the class's planes, added in place to a copy of the reference
    (``out``: None, or the reference itself as a writable array)."""
    try:
        *_, block, step = _PB.unpack(header.params)
    except struct.error:
        raise FrameError("xor frame: bad block parameters") from None
    size = ut.itemsize
    n = header.raw_size // size
    nblk = -(-n // block) if block else -1
    ncls = _nclasses(size, step) if step else 0
    if size not in (2, 4) or block == 0 or step == 0 or not header.streams or \
            header.streams[0].name != "widths" or header.streams[0].raw_len != nblk:
        raise FrameError("xor frame: bad block parameters or widths stream")
    w = np.frombuffer(decode_stream(frame, header.streams[0]), np.uint8)
    if nblk and int(w.max()) >= ncls:
        raise FrameError("xor frame: block width out of range")
    blocks, starts, counts = _class_elements(w, n, block, ncls)
    order = _block_planes(counts, size, step)
    want = [(f"w{k}.byte{j}", int(counts[k])) for k, j in order]
    if [(s.name, s.raw_len) for s in header.streams[1:]] != want:
        raise FrameError("xor frame: the block streams do not match the widths")
    planes: dict = {}  # class -> its planes, most significant first
    for (k, _), s in zip(order, header.streams[1:]):
        planes.setdefault(k, []).append(_read_only(decode_stream(frame, s)))
    out = _u8(ref).view(ut).copy() if out is None else out  # the reference, added to
    for k, pl in planes.items():  # class 0 (not there): the deltas are zero
        nb = len(pl)
        pl = pl + [pl[0]] * (4 - nb)  # fillers, never read
        kernels.unsub_block_class(blocks[starts[k]:starts[k + 1]], block, *pl, nb, out)
    return out


def _read_only(buf) -> np.ndarray:
    """A decoded stream as a read-only uint8 array (one numba signature for all)."""
    p = np.frombuffer(buf, np.uint8)
    if p.flags.writeable:
        p.setflags(write=False)
    return p


def _ctx_ok(dt) -> bool:
    """sub+ctx needs an exponent field: floats of 2, 4 or 8 bytes."""
    return dt is not None and dt.is_float and dt.itemsize in (2, 4, 8)


def _exponent_hist(ref_u: np.ndarray, dt) -> np.ndarray:
    """Elements of the reference per exponent value (int64[2^ebits])."""
    return kernels.exponent_hist(ref_u, dt.mbits, (1 << dt.ebits) - 1)


def _top_exponents(h: np.ndarray) -> list[int]:
    """The NCLASSES - 1 commonest exponents of an exponent histogram (a class each)."""
    top = np.argsort(-h, kind="stable")[:NCLASSES - 1]
    return sorted(int(x) for x in top if h[x] > 0)


def _class_exponents(ref_u: np.ndarray, dt) -> list[int]:
    """The NCLASSES - 1 commonest exponents of the reference (a class each)."""
    return _top_exponents(_exponent_hist(ref_u, dt))


def _classes(ref_u: np.ndarray, dt, exps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(class of each element, elements per class) from the reference's exponents."""
    lut = _class_lut(dt, exps)
    cls = np.empty(ref_u.shape[0], np.uint8)
    counts = np.zeros(NCLASSES, np.int64)
    kernels.ref_classes(ref_u, dt.mbits, (1 << dt.ebits) - 1, lut, cls, counts)
    return cls, counts


def _encode_ctx(mv, ref, dt, level: int, nb: int = NBUCKETS):
    """(params, streams) of sub+ctx: per class of the reference's exponent, the byte
    planes of zigzag(data - reference), plane-major; with ``nb`` > 1 buckets each
    lower plane is split further by its next higher byte (sub+ctx+hi)."""
    size = _utype(dt).itemsize
    exps, counts, pl, hist, split = _ctx_planes(mv, ref, dt, nb)
    off = np.concatenate([[0], np.cumsum(counts)])
    streams = []
    split_bits = 0  # bit (j - 1) * NCLASSES + c: plane j of class c is split in buckets
    for j in range(size):
        for c in range(NCLASSES):
            name = f"c{c}.byte{size - 1 - j}"
            seg = pl[j, off[c]:off[c + 1]]
            jh = hist[j, c]
            if not split[j, c]:
                streams.append(code_stream(name, seg, level, hist=jh.sum(axis=0)))
                continue
            split_bits |= 1 << ((j - 1) * NCLASSES + c)
            bo = np.concatenate([[0], np.cumsum(jh.sum(axis=1))])
            streams += [code_stream(name, seg[bo[b]:bo[b + 1]], level, hist=jh[b])
                        for b in range(nb)]
    # the reference's hash is left 0: the encoder sets it once, for every layout
    head = _P3.pack(0, L_BYTES, T_SUBCTX if nb == 1 else T_SUBCTX_HI, NCLASSES)
    if nb > 1:
        head += bytes([nb]) + split_bits.to_bytes(_mask_len(size), "little")
    return head + struct.pack(f"<{len(exps)}H", *exps), streams


def _ctx_planes(mv, ref, dt, nb: int):
    """(class exponents, elements per class, class-grouped byte planes (size, n),
    hist[j, c, b] = histogram of plane j of class c under bucket b of its higher byte,
    split[j, c] = whether that plane is split in buckets; split planes are in bucket
    order). One pass over the reference, one over both (no class or delta array, no
    histogram passes over the planes); 4-byte elements go through whole class-grouped
    values, then one pass makes every plane, split or not."""
    ut = _utype(dt)
    ref_u = _u8(ref).view(ut)
    eh = _exponent_hist(ref_u, dt)
    exps = _top_exponents(eh)
    lut = _class_lut(dt, exps)
    counts = np.bincount(lut, weights=eh, minlength=NCLASSES).astype(np.int64)
    size = ut.itemsize
    count_t = np.int32 if ref_u.shape[0] < 1 << 31 else np.int64  # int32: ~5 % faster
    hist = np.zeros((NCLASSES, size * NBUCKETS, kernels.HIST_ROW), count_t)  # see ctx_split
    args = (_u8(mv).view(ut), ref_u, dt.mbits, (1 << dt.ebits) - 1, lut, counts)
    pl = np.empty((size, ref_u.shape[0]), np.uint8)
    if size == 4:  # F32: ctx_group4 has its exponent field built in
        g = np.empty(ref_u.shape[0], ut)
        kernels.ctx_group4(args[0], ref_u, lut, counts, g, hist.reshape(-1))
    else:
        kernels.ctx_split(*args, pl, hist)
    h = hist[:, :, :256].reshape(NCLASSES, size, NBUCKETS, 256).transpose(1, 0, 2, 3)
    if nb != NBUCKETS:  # plain sub+ctx: one bucket
        h = h.sum(axis=2, keepdims=True)
    h = np.ascontiguousarray(h, np.int64)
    split = _splits(h) if nb > 1 else np.zeros((size, NCLASSES), bool)
    off = np.concatenate([[0], np.cumsum(counts)])
    if size == 4:
        kernels.planes_by_bucket4(g, off, np.ascontiguousarray(split.T).view(np.uint8),
                                  _bucket_starts(off, h, nb), pl)
    else:
        _group_split_planes(pl, off, split, h)
    return exps, counts, pl, h, split


def _bucket_starts(off: np.ndarray, hist: np.ndarray, nb: int) -> np.ndarray:
    """starts[c, j, b] (uint64): where bucket b of plane j of class c begins when the
    plane is split (after the class's earlier buckets)."""
    if nb > 1:
        return kernels.bucket_starts(off, hist, NBUCKETS)
    # one bucket: every plane of a class starts where the class does
    starts = off[:-1, None, None] + np.zeros((1, hist.shape[0], NBUCKETS), np.int64)
    return starts.astype(np.uint64)


def _group_split_planes(pl: np.ndarray, off: np.ndarray, split: np.ndarray,
                        hist: np.ndarray) -> None:
    """Put every split plane of ``pl`` in bucket order, in place (lowest plane first:
    each is split by the plane above it, still in element order)."""
    for j in range(pl.shape[0] - 1, 0, -1):
        for c in np.flatnonzero(split[j]):
            seg = pl[j, off[c]:off[c + 1]]
            grouped = np.empty_like(seg)
            kernels.group_by_bucket(seg, pl[j - 1, off[c]:off[c + 1]],
                                    hist[j, c].sum(axis=1), grouped)
            seg[:] = grouped


def _mask_len(size: int) -> int:
    """Bytes of the sub+ctx+hi split mask: one bit per lower plane and class."""
    return ((size - 1) * NCLASSES + 7) // 8


def _buckets_pay(jh: np.ndarray) -> bool:
    """Whether splitting a plane by bucket of its higher byte (``jh``: its (nb, 256)
    histogram by bucket) saves, by the order-0 entropy of the parts, more than 1 % plus
    the extra streams' headers and tables (elsewhere the split costs decode time for
    nothing); planes of fewer than 4096 bytes are never split."""
    return bool(kernels.buckets_pay(jh, SPLIT_MIN))


def _splits(h: np.ndarray) -> np.ndarray:
    """split[j, c] = _buckets_pay(h[j, c]) for every lower plane j >= 1 and class c of a
    (size, classes, nb, 256) histogram, in one kernel call (plane 0 is never split)."""
    return kernels.buckets_pay_all(h, SPLIT_MIN)


def _ctx_params(header, dt, t: int) -> tuple[list[int], int, int]:
    """(class exponents, buckets, split mask) of a sub+ctx frame, validated against
    its streams."""
    _, _, _, ncls = _P3.unpack_from(header.params)
    rest = header.params[_P3.size:]
    size = _utype(dt).itemsize
    nb, mask = 1, 0
    if t == T_SUBCTX_HI:
        m = _mask_len(size)
        if len(rest) < 1 + m:
            raise FrameError("xor frame: bad context-class parameters")
        nb, mask, rest = rest[0], int.from_bytes(rest[1:1 + m], "little"), rest[1 + m:]
    want = ncls * size + bin(mask).count("1") * (nb - 1)
    if ncls != NCLASSES or not 1 <= nb <= 255 or len(rest) % 2 or len(rest) // 2 >= ncls \
            or len(header.streams) != want:
        raise FrameError("xor frame: bad context-class parameters")
    exps = list(struct.unpack(f"<{len(rest) // 2}H", rest))
    if any(e >= 1 << dt.ebits for e in exps) or mask >> ((size - 1) * ncls):
        raise FrameError("xor frame: class exponent or split mask out of range")
    return exps, nb, mask


def _decode_ctx(header, frame, dt, ref, t: int, out=None) -> np.ndarray:
    """Inverse of _encode_ctx (the reference already checked): each class's planes are
    merged where they were decoded (a split plane's buckets first put back in order by
    the plane above it) into the class-grouped values; one pass then puts the classes
    back in order and adds the reference (the class sizes come from the frame and are
    checked there against the reference's exponents: no class array, no copies of the
    planes into one array)."""
    if not _ctx_ok(dt):
        raise FrameError("xor frame: context classes on a dtype without exponents")
    exps, nb, mask = _ctx_params(header, dt, t)
    ut = _utype(dt)
    ref_u = _u8(ref).view(ut)
    n = ref_u.shape[0]
    counts = np.array([s.raw_len for s in header.streams[:NCLASSES]], np.int64)
    if counts.sum() != n:
        raise FrameError("xor frame: the class streams do not add up to the chunk")
    planes = _class_planes(header, frame, ut.itemsize, nb, mask, counts)
    g = np.empty(2 * n, ut)  # the values, then slack unsub_gather's overrun check needs
    off = np.concatenate([[0], np.cumsum(counts)])
    for c in range(NCLASSES):
        _merge_class(planes[c::NCLASSES], g[off[c]:off[c + 1]])
    out = np.empty(n, ut) if out is None else out
    if not kernels.unsub_gather(g, ref_u, dt.mbits, (1 << dt.ebits) - 1,
                                _class_lut(dt, exps), counts, out):
        raise FrameError("xor frame: class sizes do not match the reference's exponents "
                         "(corrupt frame or wrong reference)")
    return out


def _merge_class(pl: list, dst: np.ndarray) -> None:
    """Byte planes (most significant first) of one class into its values ``dst``."""
    if len(pl) == 4:
        kernels.merge_u32(pl[0], pl[1], pl[2], pl[3], dst)
    elif len(pl) == 2:
        kernels.merge_u16(pl[0], pl[1], dst)
    else:
        b = dst.view(np.uint8).reshape(-1, len(pl))
        for j, p in enumerate(pl):
            b[:, len(pl) - 1 - j] = p


def _class_planes(header, frame, size: int, nb: int, mask: int, counts) -> list:
    """The decoded plane of each (plane j, class c), at index j * NCLASSES + c, each
    checked to hold one byte per element of its class; split planes put back in
    order. All read-only (one numba signature for the merge kernels)."""
    planes = []
    streams = iter(header.streams)
    for j in range(size):
        for c in range(NCLASSES):
            if j == 0 or not mask >> ((j - 1) * NCLASSES + c) & 1:
                s = next(streams)
                _check_len(s, counts[c])
                p = np.frombuffer(decode_stream(frame, s), np.uint8)
            else:
                p = _ungroup_buckets(frame, [next(streams) for _ in range(nb)],
                                     planes[-NCLASSES], counts[c])
            if p.flags.writeable:
                p.setflags(write=False)
            planes.append(p)
    return planes


def _ungroup_buckets(frame, parts: list, higher: np.ndarray, count: int) -> np.ndarray:
    """One class's plane from its bucket streams, put back in order by the plane
    above it (``higher``)."""
    bc = np.array([s.raw_len for s in parts], np.int64)
    if bc.sum() != count:
        raise FrameError(f"xor frame: the buckets of {parts[0].name!r} do not add up "
                         "to their class (wrong reference?)", damaged=(parts[0].name,))
    grouped = np.concatenate([np.frombuffer(decode_stream(frame, s), np.uint8)
                              for s in parts])
    seg = np.empty(count, np.uint8)
    if not kernels.ungroup_by_bucket(grouped, higher, bc, seg):
        raise FrameError(f"xor frame: the buckets of {parts[0].name!r} do not match "
                         "their higher byte (corrupt frame or wrong reference)",
                         damaged=(parts[0].name,))
    return seg


def _class_lut(dt, exps: list[int]) -> np.ndarray:
    """Class of each exponent value: exps[k] -> k, all the others -> the last class."""
    lut = np.full(1 << dt.ebits, NCLASSES - 1, np.uint8)
    lut[np.asarray(exps, np.int64)] = np.arange(len(exps), dtype=np.uint8)
    return lut


def _check_len(s, want: int) -> None:
    """A class stream must hold one byte per element of its class."""
    if s.raw_len != want:
        raise FrameError(f"xor frame: stream {s.name!r} has {s.raw_len} bytes, its class "
                         f"has {want} elements (wrong reference?)", damaged=(s.name,))


def _bytes_dtype(ut: np.dtype):
    """A dtype descriptor that makes planes use plain byte planes of this width."""
    from .dtypes import BY_NAME
    return BY_NAME[{1: "U8", 2: "U16", 4: "U32", 8: "U64"}[ut.itemsize]]


@register
class XorCodec(Codec):
    codec_id = "xor"

    def __init__(self, dtype=None, reference=None, level: int = 3,
                 sample_of: int | None = None, scale: float | None = None):
        """``sample_of``: the data is a sample (the selector's) of a chunk of this many
        bytes; it is coded with the transform that chunk takes without a trial, so the
        sample's size is the one of the coding the chunk would get (and no trials).
        ``scale``: the reference's scale (T_SCALED; 1.0: none); None: estimate_scale."""
        super().__init__(dtype)
        self.reference = reference
        self.level = int(level)
        self.sample_of = sample_of
        self.scale = scale

    def get_config(self):  # the reference is data, not configuration
        return {"id": self.codec_id, "dtype": self.dtype, "level": self.level}

    def _encode(self, mv, dt):
        if self.reference is None:
            raise ValueError("XorCodec needs reference=<bytes of the same length>")
        ref = as_bytes_view(self.reference)
        if ref.nbytes != mv.nbytes:
            raise ValueError(f"reference has {ref.nbytes} bytes, data {mv.nbytes}")
        scale = estimate_scale(mv, ref, dt) if self.scale is None else float(self.scale)
        if scale == 1.0:
            return self._encode_against(mv, ref, dt, hash64(ref))
        enc = self._encode_against(mv, scaled_reference(ref, scale).view(np.uint8), dt,
                                   hash64(ref))
        enc.params = _with_scale(enc.params, scale)
        return enc

    def _encode_against(self, mv, ref, dt, rh: int) -> Encoded:
        """The frame's content coded against ``ref``, whose original has hash ``rh``."""
        trials: dict = {}
        t = _direct_transform(mv, ref, dt, self.sample_of) if self.sample_of else None
        if t is None:
            t = _pick_transform(mv, ref, dt, self.level, trials)
        if t in (T_SUBCTX, T_SUBCTX_HI):
            params, streams = trials.get(t) or _encode_ctx(
                mv, ref, dt, self.level, NBUCKETS if t == T_SUBCTX_HI else 1)
        elif t == T_SUB_BLOCKS:
            params = _PB.pack(0, L_BYTES, T_SUB_BLOCKS, BLOCK, WIDTH_STEP)
            streams = trials.get(t) or _encode_blocks(_sub(mv, ref, dt), self.level)
        else:
            streams = trials.get(t)
            if streams is None:
                if t == T_SUB:
                    d, pdt = _sub(mv, ref, dt), _bytes_dtype(_utype(dt))
                else:
                    d, pdt = _xor(mv, ref, dt), dt
                _, streams = _plane_streams(d, pdt, self.level)
            params = _P2.pack(0, layout_for(dt if t == T_XOR else _bytes_dtype(_utype(dt))), t)
        # every layout starts with the hash of the reference the caller passed (a trial
        # on a whole chunk or a scaled reference would hash another): set here, once
        return Encoded(streams=streams, params=struct.pack("<Q", rh) + params[8:],
                       needs_reference=True)

    @classmethod
    def _decode(cls, header, frame, dt, reference, fidelity):
        header, scale = _split_scale(header, dt)
        params = header.params
        t = T_XOR if len(params) == _P.size else params[_P.size] if len(params) > _P.size \
            else -1
        ctx = t in (T_SUBCTX, T_SUBCTX_HI)
        fmt = {T_XOR: _P if len(params) == _P.size else _P2, T_SUB: _P2,
               T_SUB_BLOCKS: _PB}.get(t, _P3 if ctx else None)
        if fmt is None or len(params) < fmt.size or (not ctx and len(params) != fmt.size):
            raise FrameError(f"xor frame: unknown transform {t} or bad parameters")
        rh, layout = fmt.unpack_from(params)[:2]
        approx = isinstance(reference, ApproxReference)  # salvage: no checksum to match
        ref = as_bytes_view(reference.buf if approx else reference)
        if ref.nbytes != header.raw_size or (not approx and hash64(ref) != rh):
            raise FrameError(f"xor frame: wrong reference ({ref.nbytes} bytes, checksum mismatch"
                             f" or length != {header.raw_size}); pass the exact chunk it was "
                             "encoded against")
        out = None
        if scale != 1.0:  # the scaled reference becomes the output, decoded in place
            out = scaled_reference(ref, scale)
            ref = out.view(np.uint8)

        if ctx:
            return _decode_ctx(header, frame, dt, ref, t, out)
        if t == T_SUB_BLOCKS:
            return _decode_blocks(header, frame, ref, _utype(dt), out)

        if t == T_SUB:
            ut = _utype(dt)
            if ut.itemsize in (2, 4) and layout == L_BYTES and \
                    len(header.streams) == ut.itemsize:
                return _unsub_planes(frame, header, ref, ut, out)
            z = decode_planes(_planes_view(header, layout), frame, _bytes_dtype(ut), None)
            return _unsub(np.ascontiguousarray(z).reshape(-1).view(np.uint8), ref, ut)
        d = decode_planes(_planes_view(header, layout), frame, dt, None)
        return _xor(d, ref, dt)
