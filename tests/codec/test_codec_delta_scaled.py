"""xor's scaled reference (T_SCALED): Adam moments that only decay between two
checkpoints are coded against the reference times the decay, exactly, whatever the
values, and only where the scale pays."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import xor as X
from codec.frame import parse
from framekit import repack

SET = settings(max_examples=40, deadline=None)
SPECIALS = np.array([0x7FC00000, 0xFFC00123, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000,
                     0, 1, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF], np.uint32)


def _decayed(n_rows: int, seed: int, touched: float = 0.4, steps: int = 50,
             beta: float = 0.9) -> tuple[bytes, bytes]:
    """(exp_avg after ``steps`` AdamW steps, exp_avg before), as torch computes it: rows
    that got no gradient decay by ``beta`` each step (lerp towards 0, rounded to float32
    at every step); the other rows get fresh values."""
    rng = np.random.default_rng(seed)
    ref = (rng.normal(0, 1e-4, (n_rows, 384)) * np.exp(rng.normal(0, 1, (n_rows, 1))))
    ref = ref.astype(np.float32)
    m = ref.copy()
    w = np.float32(1 - beta)
    for _ in range(steps):
        m = m + w * (np.float32(0) - m)  # torch.lerp(m, 0, 1 - beta) for weight < 0.5
    seen = rng.random(n_rows) < touched
    m[seen] = rng.normal(0, 1e-4, (int(seen.sum()), 384)).astype(np.float32)
    return m.tobytes(), ref.tobytes()


def _frame_scale(frame: bytes) -> float | None:
    h = parse(frame)
    if h.codec != "xor" or not h.params[9] & X.T_SCALED:
        return None
    return struct.unpack("<d", h.params[-8:])[0]


@pytest.mark.parametrize("beta", [0.9, 0.999])
def test_decayed_moments_are_coded_scaled_and_smaller(beta, monkeypatch):
    data, ref = _decayed(600, 1, beta=beta)
    frame = codec.encode(data, "F32", reference=ref)
    scale = _frame_scale(frame)
    assert scale is not None and abs(scale / beta ** 50 - 1) < 1e-3
    assert codec.decode(frame, reference=ref) == data
    monkeypatch.setattr(X, "estimate_scale", lambda mv, ref, dt: 1.0)
    monkeypatch.setattr(codec.selector, "estimate_scale", lambda mv, ref, dt: 1.0)
    plain = codec.encode(data, "F32", reference=ref)
    assert _frame_scale(plain) is None
    assert len(frame) < 0.9 * len(plain), (len(frame), len(plain))


def test_no_scale_where_it_does_not_pay():
    """A fine-tune's small random steps, unrelated data, other dtypes: no scale."""
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 0.05, 300_000).astype(np.float32)
    tuned = (ref + rng.normal(0, 1e-4, ref.size)).astype(np.float32)
    other = rng.normal(0, 0.05, ref.size).astype(np.float32)
    dt = codec.dtypes.lookup("F32", ref.nbytes)
    for x in (tuned, other, ref):
        assert X.estimate_scale(x.view(np.uint8), ref.view(np.uint8), dt) == 1.0
        assert _frame_scale(codec.encode(x.tobytes(), "F32", reference=ref.tobytes())) is None
    data, r = _decayed(100, 3)
    f64 = np.frombuffer(data, np.float32).astype(np.float64)
    rf64 = np.frombuffer(r, np.float32).astype(np.float64)
    assert X.estimate_scale(f64.view(np.uint8), rf64.view(np.uint8),
                            codec.dtypes.lookup("F64", f64.nbytes)) == 1.0


@SET
@given(st.integers(0, 3000), st.integers(0, 2**32 - 1),
       st.sampled_from([0.9 ** 50, 0.999 ** 50, 1.5, -0.25, 2.0 ** 90, 2.0 ** -90, 1 - 1e-7,
                        3.0e38]),
       st.sampled_from([X.T_XOR, X.T_SUB, X.T_SUBCTX, X.T_SUBCTX_HI, X.T_SUB_BLOCKS]),
       st.booleans())
def test_scaled_roundtrip_exact(n, seed, scale, t, specials):
    """Any scale, any transform, NaN payloads, infinities, subnormals, -0.0, the largest
    floats and products that overflow or underflow: bytes out == bytes in."""
    rng = np.random.default_rng(seed)
    ref = (rng.normal(0, 1, n) * np.exp(rng.normal(0, 8, n))).astype(np.float32)
    with np.errstate(over="ignore"):
        x = (ref.astype(np.float64) * scale * (1 + rng.normal(0, 1e-6, n))).astype(np.float32)
    r, xb = ref.view(np.uint32), x.view(np.uint32)
    if specials and n:
        for a in (r, xb):
            idx = rng.integers(0, n, min(n, 50))
            a[idx] = rng.choice(SPECIALS, idx.size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(X, "_pick_transform", lambda mv, r_, d, level, trials=None: t)
        frame = codec.get_codec("xor", "F32", reference=r.tobytes(), scale=scale).encode(
            xb.tobytes())
    if n:
        assert _frame_scale(frame) == scale
        assert parse(frame).params[9] & ~X.T_SCALED == t
    assert codec.decode(frame, reference=r.tobytes()) == xb.tobytes()


def test_scaled_reference_touches_only_normal_values():
    """Normal values whose product is normal are multiplied and rounded once; zeros,
    subnormals, infinities, NaNs and products that would be subnormal or overflow keep
    their bits, so no step depends on the CPU's flush-to-zero mode."""
    rng = np.random.default_rng(5)
    v = np.concatenate([rng.normal(0, 1, 1000).astype(np.float32).view(np.uint32), SPECIALS,
                        np.array([0x01000000, 0x00FFFFFF, 0x7F000000], np.uint32)])
    for scale in (0.005, 0.5, 2.0 ** -10, 2.0 ** 10):
        got = X.scaled_reference(v, scale)
        with np.errstate(invalid="ignore"):
            f = v.view(np.float32).astype(np.float64) * scale
        e = (v >> 23) & 255
        normal_in = (e != 0) & (e != 255)
        with np.errstate(over="ignore", invalid="ignore"):
            ok = normal_in & (np.abs(f) >= 2.0 ** -126) & (np.abs(f) <= np.finfo(np.float32).max)
            want = np.where(ok, f.astype(np.float32).view(np.uint32), v)
        assert np.array_equal(got, want)
        assert (~ok).sum() >= len(SPECIALS) - 2  # the specials (and more) kept as they are
    # 2^-126 * 0.5 would be subnormal: kept; 2^127 * 2 overflows: kept
    assert X.scaled_reference(np.array([0x00800000], np.uint32), 0.5)[0] == 0x00800000
    assert X.scaled_reference(np.array([0x7F000000], np.uint32), 2.0)[0] == 0x7F000000


def test_scaled_frame_errors():
    """A wrong reference, a damaged or missing scale, or a scale on a 2-byte float are
    FrameErrors, never wrong bytes."""
    data, ref = _decayed(50, 6)
    frame = codec.encode(data, "F32", reference=ref)
    assert _frame_scale(frame) is not None
    bad_ref = bytearray(ref)
    bad_ref[7] ^= 1
    with pytest.raises(codec.FrameError, match="wrong reference"):
        codec.decode(frame, reference=bytes(bad_ref))
    assert codec.decode(repack(frame), reference=ref) == data  # the repacking is faithful
    h = parse(frame)
    for params in (h.params[:-8] + struct.pack("<d", float("nan")),
                   h.params[:-8] + struct.pack("<d", 0.0),
                   h.params[:10]):
        bad = repack(frame, params)
        with pytest.raises(codec.FrameError):
            codec.decode(bad, reference=ref)
    # the scale changed (still a valid float): the content hash catches it
    other = repack(frame, h.params[:-8] + struct.pack("<d", 0.5))
    with pytest.raises(codec.FrameError):
        codec.decode(other, reference=ref)
    f16 = np.frombuffer(data, np.float32).astype(np.float16).tobytes()
    r16 = np.frombuffer(ref, np.float32).astype(np.float16).tobytes()
    f16_frame = codec.encode(f16, "F16", codec="xor", reference=r16)
    forged = repack(f16_frame, X._with_scale(parse(f16_frame).params, 0.5))
    with pytest.raises(codec.FrameError, match="scale"):
        codec.decode(forged, reference=r16)
