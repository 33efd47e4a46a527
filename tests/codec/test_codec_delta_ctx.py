"""The sub+ctx delta (zigzag(data - reference) coded per class of the reference's
exponent): exact on every float dtype and special value, chosen where it pays,
and corrupt frames or wrong references raise."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import xor as X
from codec.frame import parse
from framekit import assert_flips_raise

SET = settings(max_examples=30, deadline=None)
FLOATS = ["F32", "BF16", "F16", "F64"]
SPECIAL_BITS = {4: [0x7FC00000, 0xFFC00123, 0x7F800000, 0xFF800000, 0x80000000, 0, 1, 0x807FFFFF],
                2: [0x7E00, 0xFE01, 0x7C00, 0xFC00, 0x8000, 0, 1, 0x7F80, 0xFF81],
                8: [0x7FF8000000000001, 0xFFF0000000000000, 0x8000000000000000, 1, 0]}


def _bits(x: np.ndarray, dt: str) -> np.ndarray:
    if dt == "BF16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype({"F32": np.float32, "F16": np.float16, "F64": np.float64}[dt]).view(
        {"F32": np.uint32, "F16": np.uint16, "F64": np.uint64}[dt])


def _pair(dt, n, seed, specials):
    """A reference and its successor after Adam-like steps (same size for every
    weight), with special values sprinkled into both."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 0.05, n) * np.exp(rng.normal(0, 1, n))
    new = ref - 1e-3 * np.sign(rng.normal(0, 1, n)) * rng.random(n)
    r, x = _bits(ref, dt), _bits(new, dt)
    if specials and n:
        sp = np.array(SPECIAL_BITS[r.itemsize], np.uint64).astype(r.dtype)
        for a in (r, x):
            idx = rng.integers(0, n, min(n, 40))
            a[idx] = rng.choice(sp, idx.size)
    return x.tobytes(), r.tobytes()


CTX = [X.T_SUBCTX, X.T_SUBCTX_HI]


@pytest.fixture(params=CTX)
def force_ctx(monkeypatch, request):
    monkeypatch.setattr(X, "_pick_transform", lambda mv, ref, dt, level, trials=None:
                        request.param if X._ctx_ok(dt) else X.T_XOR)
    monkeypatch.setattr(X, "_splits", lambda h: _every_lower_plane(h, True))
    return request.param


def _every_lower_plane(h, split: bool) -> np.ndarray:
    """A split matrix for X._splits: every lower plane split (or none); plane 0 never."""
    s = np.full(h.shape[:2], split)
    s[0] = False
    return s


def _encode_with(t, data, dt, ref, split=None):
    """Encode with transform t (and, if ``split`` is a bool, every lower plane split
    in buckets or none)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(X, "_pick_transform", lambda mv, r, d, level, trials=None: t)
        if split is not None:
            mp.setattr(X, "_splits", lambda h: _every_lower_plane(h, split))
        return codec.encode(data, dt, codec="xor", reference=ref)


@SET
@given(st.sampled_from(FLOATS), st.integers(0, 5000), st.integers(0, 2**32 - 1), st.booleans(),
       st.sampled_from(CTX), st.sampled_from([None, True, False]))
def test_ctx_roundtrip_exact(dt, n, seed, specials, t, split):
    data, ref = _pair(dt, n, seed, specials)
    frame = _encode_with(t, data, dt, ref, split)
    if n:
        h = parse(frame)
        assert h.params[9] == t
        size = len(data) // n
        mask = int.from_bytes(h.params[12:12 + X._mask_len(size)], "little") \
            if t == X.T_SUBCTX_HI else 0
        if split is not None and t == X.T_SUBCTX_HI:
            assert mask == (2 ** ((size - 1) * 8) - 1 if split else 0)
        assert len(h.streams) == 8 * size + bin(mask).count("1") * 3
    assert codec.decode(frame, reference=ref) == data
    # unrelated reference of the same length: still exact
    other = bytes(np.random.default_rng(seed + 1).integers(0, 256, len(data), dtype=np.uint8))
    assert codec.decode(_encode_with(t, data, dt, other, split), reference=other) == data


@pytest.mark.parametrize("n", [200000, 20000])  # past CTX_DIRECT (estimates), under (trials)
def test_ctx_is_chosen_where_it_pays(n):
    """bf16 Adam steps (the delta's size follows the reference's exponent): sub+ctx+hi
    is written, CTX_GAIN smaller than plain sub."""
    data, ref = _pair("BF16", n, 0, False)
    frame = codec.encode(data, "BF16", reference=ref)
    h = parse(frame)
    assert h.codec == "xor" and h.params[9] == X.T_SUBCTX_HI
    assert h.streams[0].name == "c0.byte1"
    plain = _encode_with(X.T_SUB, data, "BF16", ref)
    assert len(frame) < (1 - X.CTX_GAIN) * len(plain)
    assert codec.decode(frame, reference=ref) == data


@pytest.mark.parametrize("n", [200000, 20000])
def test_ctx_gives_way_where_it_saves_little(n):
    """fp32 Adam steps: sub+ctx+hi saves less than CTX_GAIN over plain sub, so the
    faster-decoding sub (or sub+blocks) is written, within CTX_GAIN of ctx's size."""
    data, ref = _pair("F32", n, 0, False)
    frame = codec.encode(data, "F32", reference=ref)
    assert parse(frame).params[9] in (X.T_SUB, X.T_SUB_BLOCKS)
    ctx = _encode_with(X.T_SUBCTX_HI, data, "F32", ref)
    assert len(ctx) < len(frame) < len(ctx) / (1 - X.CTX_GAIN)
    assert codec.decode(frame, reference=ref) == data


def test_ctx_wrong_reference_and_corruption(force_ctx):
    data, ref = _pair("F32", 3000, 5, True)
    frame = codec.encode(data, "F32", codec="xor", reference=ref)
    bad_ref = bytearray(ref)
    bad_ref[100] ^= 1
    with pytest.raises(codec.FrameError, match="wrong reference"):
        codec.decode(frame, reference=bytes(bad_ref))
    with pytest.raises(codec.FrameError):
        codec.decode(frame)
    assert_flips_raise(frame, ref)


def test_ctx_hi_buckets_pay_on_bimodal_deltas():
    """Rows that only decay (tiny deltas) next to rows that take Adam steps: splitting
    the lower bytes by their higher byte beats one table per class."""
    rng = np.random.default_rng(4)
    ref = rng.normal(0, 0.05, (500, 384)).astype(np.float32)
    new = ref * np.float32(1 - 2e-7)
    seen = rng.random(500) < 0.3
    new[seen] -= (1e-4 * np.sign(rng.normal(0, 1, (seen.sum(), 384)))).astype(np.float32)
    data, r = new.tobytes(), ref.tobytes()
    hi, one = _encode_with(X.T_SUBCTX_HI, data, "F32", r), _encode_with(X.T_SUBCTX, data, "F32", r)
    assert len(hi) < 0.97 * len(one)
    assert codec.decode(hi, reference=r) == data


def test_ctx_bad_parameters_are_frame_errors():
    from codec.frame import Stream, pack
    data, ref = _pair("F32", 2000, 7, False)
    frame = _encode_with(X.T_SUBCTX_HI, data, "F32", ref, split=True)
    h = parse(frame)
    streams = [Stream(s.name, s.method, s.raw_len, bytes(codec.frame.stream_view(frame, s)))
               for s in h.streams]
    for params in (h.params[:11], h.params[:11] + bytes([3]) + h.params[12:],
                   h.params[:10] + bytes([9]) + h.params[11:], h.params + b"\0",
                   h.params[:12] + bytes([0x7F]) + h.params[13:],  # mask: fewer splits
                   h.params[:14] + bytes([0]) + h.params[15:]):  # mask: no splits there
        bad = pack("xor", h.dtype_id, h.raw_size, params, streams, h.content_hash,
                   needs_reference=True)
        with pytest.raises(codec.FrameError):
            codec.decode(bad, reference=ref)
    with pytest.raises(codec.FrameError):
        codec.decode(pack("xor", h.dtype_id, h.raw_size, h.params, streams[:-1],
                          h.content_hash, needs_reference=True), reference=ref)


def test_ctx_classes_cover_every_element():
    from codec.dtypes import BY_NAME
    r = np.random.default_rng(1).normal(0, 1, 10000).astype(np.float32).view(np.uint32)
    exps = X._class_exponents(r, BY_NAME["F32"])
    assert len(exps) == X.NCLASSES - 1 and exps == sorted(exps)
    cls, counts = X._classes(r, BY_NAME["F32"], exps)
    assert counts.sum() == r.size and np.array_equal(np.bincount(cls, minlength=8), counts)
    g = np.empty_like(r)
    from codec import kernels
    kernels.group_by_class(r, cls, counts, g)
    assert np.array_equal(g, r[np.argsort(cls, kind="stable")])
    back = np.empty_like(r)
    kernels.ungroup_by_class(g, cls, counts, back)
    assert np.array_equal(back, r)


@pytest.mark.parametrize("dt, want", [("BF16", X.T_SUBCTX_HI), ("F32", X.T_SUB)])
def test_sample_of_a_large_chunk_takes_its_transform(dt, want):
    """The selector's xor sample of a large float chunk is coded with the transform
    that chunk takes without trials (decided on the sample by estimates: sub+ctx+hi on
    bf16 Adam steps, plain sub on fp32 ones), and still decodes exactly."""
    data, ref = _pair(dt, 5000, 7, True)
    big = 4 * X.CTX_DIRECT
    frame = codec.get_codec("xor", dt, reference=ref, sample_of=big).encode(data)
    assert parse(frame).params[9] == want
    assert codec.decode(frame, reference=ref) == data
    small = codec.get_codec("xor", dt, reference=ref, sample_of=len(data)).encode(data)
    assert small == codec.encode(data, dt, codec="xor", reference=ref)


@pytest.mark.parametrize("dt", FLOATS)
def test_one_element_chunk_is_xor_and_no_larger_than_sub(dt):
    """A one-element chunk skips the sub trial: every stream is one constant byte, so
    sub cannot be smaller than xor."""
    for seed in range(20):
        data, ref = _pair(dt, 1, seed, seed % 2 == 0)
        frame = codec.encode(data, dt, codec="xor", reference=ref)
        assert parse(frame).params[9] == X.T_XOR
        assert len(frame) <= len(_encode_with(X.T_SUB, data, dt, ref))
        assert codec.decode(frame, reference=ref) == data


@SET
@given(st.sampled_from(FLOATS + ["I16", "U32", "I64"]), st.integers(0, 5000),
       st.integers(0, 2**32 - 1), st.booleans())
def test_sub_roundtrip_exact(dt, n, seed, specials):
    """The sub transform (2- and 4-byte elements decode in one fused pass from the
    planes) is exact on every dtype, with special values, and against any reference."""
    if dt in FLOATS:
        data, ref = _pair(dt, n, seed, specials)
    else:
        rng = np.random.default_rng(seed)
        size = {"I16": 2, "U32": 4, "I64": 8}[dt]
        ref = rng.integers(0, 256, n * size, dtype=np.uint8).tobytes()
        data = bytes(rng.integers(0, 256, n * size, dtype=np.uint8)) if specials else ref
    frame = _encode_with(X.T_SUB, data, dt, ref)
    if n:
        assert parse(frame).params[9] == X.T_SUB
    assert codec.decode(frame, reference=ref) == data
    other = bytes(np.random.default_rng(seed + 1).integers(0, 256, len(data), dtype=np.uint8))
    assert codec.decode(_encode_with(X.T_SUB, data, dt, other), reference=other) == data


def test_sub_frame_with_a_damaged_plane_raises():
    data, ref = _pair("F32", 3000, 2, False)
    frame = _encode_with(X.T_SUB, data, "F32", ref)
    for s in parse(frame).streams:
        if s.stored_len:
            bad = bytearray(frame)
            bad[s.offset + s.stored_len // 2] ^= 0x10
            with pytest.raises(codec.FrameError):
                codec.decode(bytes(bad), reference=ref)


@pytest.mark.parametrize("t", [X.T_XOR, X.T_SUB, X.T_SUBCTX, X.T_SUBCTX_HI])
def test_delta_against_an_approximate_reference(t):
    """Salvage decodes a delta against its reference's reduced-fidelity copy (sign and
    exponent exact, the low 8 of 23 mantissa bits at their midpoint): each value is then
    within 2^-15 of itself, as the reference's values are. Without the flag that
    reference is refused as the wrong one, and the delta's own damaged streams are
    still caught."""
    data, ref = _pair("F32", 50_000, 7, False)
    frame = _encode_with(t, data, "F32", ref, split=True if t == X.T_SUBCTX_HI else None)
    r = np.frombuffer(ref, np.uint32)
    approx = ((r & ~np.uint32(0xFF)) | np.uint32(0x80)).tobytes()
    with pytest.raises(codec.FrameError, match="wrong reference"):
        codec.decode(frame, reference=approx)
    got = np.frombuffer(codec.decode(frame, reference=approx, approximate_reference=True),
                        np.float32)
    want = np.frombuffer(data, np.float32)
    err = np.abs(got.astype(np.float64) - want) / np.abs(want)
    assert 0 < err.max() <= 2.0 ** -15
    assert codec.decode(frame, reference=ref, approximate_reference=True) == data
    s = parse(frame).streams[-1]
    bad = bytearray(frame)
    bad[s.offset + s.stored_len // 2] ^= 0xFF
    with pytest.raises(codec.FrameError):
        codec.decode(bytes(bad), reference=approx, approximate_reference=True)
