"""The fused decode kernels: sub+ctx's class gather (classes from the reference, class
sizes from the frame), the bucket ungroup, and fp16 ELF's two-plane table decode:
equal to the plain computation on odd sizes and every dtype, and corrupt inputs
rejected without reading out of bounds."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import elf, kernels
from codec import xor as X
from codec.dtypes import BY_NAME
from codec.frame import Stream, pack, parse, stream_view

SET = settings(max_examples=25, deadline=None)
UT = {"F16": np.uint16, "BF16": np.uint16, "F32": np.uint32, "F64": np.uint64}


def _gather_inputs(dt: str, n: int, seed: int):
    """A reference, its classes' lut and counts, and class-grouped zigzag values."""
    d = BY_NAME[dt]
    rng = np.random.default_rng(seed)
    ut = UT[dt]
    ref = rng.integers(0, np.iinfo(ut).max, n, dtype=ut, endpoint=True)
    exps = X._class_exponents(ref, d) if n else []
    lut = X._class_lut(d, exps)
    cls, counts = X._classes(ref, d, exps)
    g = rng.integers(0, np.iinfo(ut).max, 2 * n, dtype=ut, endpoint=True)
    return d, ref, lut, cls, counts, g


@SET
@given(st.sampled_from(list(UT)), st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_unsub_gather_matches_numpy(dt, n, seed):
    d, ref, lut, cls, counts, g = _gather_inputs(dt, n, seed)
    out = np.empty_like(ref)
    assert kernels.unsub_gather(g, ref, d.mbits, (1 << d.ebits) - 1, lut, counts, out)
    z = np.empty_like(ref)
    kernels.ungroup_by_class(g[:n], cls, counts, z)
    assert not kernels.unsub_gather(g[:max(2 * n - 1, 0)], ref, d.mbits, (1 << d.ebits) - 1,
                                    lut, counts, out) or n == 0
    one = ref.dtype.type(1)
    want = ref + ((z >> one) ^ (ref.dtype.type(0) - (z & one)))
    assert np.array_equal(out, want)


@pytest.mark.parametrize("dt", list(UT))
def test_unsub_gather_rejects_counts_that_disagree(dt):
    d, ref, lut, cls, counts, g = _gather_inputs(dt, 5001, 3)
    out = np.empty_like(ref)
    c = int(np.argmax(counts))
    moved = counts.copy()
    moved[c] -= 1
    moved[(c + 1) % len(counts)] += 1
    last = np.zeros_like(counts)
    last[-1] = len(ref)  # every element claimed by the last class: overruns by up to n
    first = np.zeros_like(counts)
    first[0] = len(ref)
    for bad in (moved, counts[::-1].copy(), counts + 1, last, first):
        if not np.array_equal(bad, counts):
            assert not kernels.unsub_gather(g, ref, d.mbits, (1 << d.ebits) - 1, lut, bad, out)


@SET
@given(st.integers(0, 5000), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_ungroup_by_bucket_inverts_group(n, nb, seed):
    rng = np.random.default_rng(seed)
    higher = np.where(rng.random(n) < 0.5, 0, rng.integers(0, 256, n)).astype(np.uint8)
    vals = rng.integers(0, 256, n, dtype=np.uint8)
    bc = np.zeros(nb, np.int64)
    kernels.bucket_counts(higher, nb, bc)
    grouped = np.empty_like(vals)
    kernels.group_by_bucket(vals, higher, bc, grouped)
    out = np.empty_like(vals)
    assert kernels.ungroup_by_bucket(grouped, higher, bc, out)
    assert np.array_equal(out, vals)
    if nb > 1 and n and bc[0] and bc[1] != bc[0]:
        bad = bc.copy()
        bad[0], bad[1] = bc[1], bc[0]
        assert not kernels.ungroup_by_bucket(grouped, higher, bad, out)


def test_ctx_frame_with_class_streams_swapped_raises():
    """Class sizes are taken from the frame: a frame whose class streams disagree with
    the reference's exponents (re-packed, so every checksum holds) raises."""
    rng = np.random.default_rng(9)
    ref = (rng.normal(0, 0.05, 4099) * np.exp(rng.normal(0, 1, 4099))).astype(np.float32)
    data = (ref - np.float32(1e-3)).tobytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(X, "_pick_transform", lambda mv, r, d, level, trials=None: X.T_SUBCTX)
        frame = codec.encode(data, "F32", codec="xor", reference=ref.tobytes())
    h = parse(frame)
    streams = [Stream(s.name, s.method, s.raw_len, bytes(stream_view(frame, s)))
               for s in h.streams]
    assert streams[0].raw_len != streams[1].raw_len
    for j in range(4):  # swap classes 0 and 1 in every plane
        streams[8 * j], streams[8 * j + 1] = streams[8 * j + 1], streams[8 * j]
    bad = pack("xor", h.dtype_id, h.raw_size, h.params, streams, h.content_hash,
               needs_reference=True)
    with pytest.raises(codec.FrameError):
        codec.decode(bad, reference=ref.tobytes())


@SET
@given(st.integers(0, 20000), st.integers(0, 2**32 - 1))
def test_fp16_elf_two_plane_table_decode(n, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 0.3, n) * np.exp(rng.normal(0, 1, n))).astype(np.float16)
    frame = codec.encode(x.tobytes(), "F16", codec="elf", bound="native")
    y = np.frombuffer(codec.decode(frame), np.float16)
    fin = np.isfinite(x)
    assert np.all(np.abs(y[fin].astype(np.float64) - x[fin]) <= elf.native_bound(BY_NAME["F16"]))
    # the table kernel equals the generic one, including planes with garbage high bits
    planes = rng.integers(0, 256, (2, n), dtype=np.uint8)
    a, b = np.empty(n, np.uint16), np.empty(n, np.uint16)
    step = 2.0 ** -10
    kernels.elf_unplanes2_f16(planes[0], planes[1], kernels.f16_lut(10, step), a)
    kernels.elf_unplanes_f16(planes & np.array([[7], [255]], np.uint8), 2, 2, 10, step, b)
    assert np.array_equal(a, b)


def _plain_ctx_planes(x: np.ndarray, ref: np.ndarray, d, nb: int):
    """sub+ctx's planes and histograms the plain way: zigzag delta, class grouping,
    byte planes, one joint histogram per plane and class, and group_by_bucket on the
    planes the split rule picks."""
    ut = ref.dtype
    exps = X._class_exponents(ref, d)
    cls, counts = X._classes(ref, d, exps)
    z = X._sub(x, ref, d)
    g = np.empty_like(z)
    kernels.group_by_class(z, cls, counts, g)
    size = ut.itemsize
    pl = g.view(np.uint8).reshape(-1, size)[:, ::-1].T
    off = np.concatenate([[0], np.cumsum(counts)])
    hist = np.zeros((size, X.NCLASSES, nb, 256), np.int64)
    split = np.zeros((size, X.NCLASSES), bool)
    out = pl.copy()
    for j in range(size):
        for c in range(X.NCLASSES):
            seg = pl[j, off[c]:off[c + 1]]
            higher = pl[j - 1, off[c]:off[c + 1]] if j else np.zeros_like(seg)
            hist[j, c] = kernels.joint_hist(higher, seg, nb)
            split[j, c] = j > 0 and nb > 1 and X._buckets_pay(hist[j, c])
            if split[j, c]:
                kernels.group_by_bucket(seg, higher, hist[j, c].sum(axis=1),
                                        out[j, off[c]:off[c + 1]])
    return exps, counts, out, hist, split


SPLIT_RULES = {"rule": None, "all": lambda jh: True,  # "odd": some planes split, some not
               "odd": lambda jh: bool(int(jh[:, 1::2].sum()) % 2)}


@SET
@given(st.sampled_from(list(UT)), st.integers(0, 3000), st.integers(0, 2**32 - 1),
       st.sampled_from([1, X.NBUCKETS]), st.sampled_from(list(SPLIT_RULES)))
def test_ctx_split_matches_plain_pipeline(dt, n, seed, nb, rule):
    if SPLIT_RULES[rule] is not None:
        with pytest.MonkeyPatch.context() as mp:
            rule = SPLIT_RULES[rule]
            mp.setattr(X, "_buckets_pay", rule)  # the plain pipeline's rule, plane by plane
            mp.setattr(X, "_splits", lambda h: np.array(
                [[j > 0 and rule(h[j, c]) for c in range(h.shape[1])] for j in range(h.shape[0])],
                bool).reshape(h.shape[:2]))
            return _check_ctx_split(dt, n, seed, nb)
    _check_ctx_split(dt, n, seed, nb)


def _check_ctx_split(dt: str, n: int, seed: int, nb: int) -> None:
    """X._ctx_planes equals the plain pipeline on a random pair with special values."""
    d = BY_NAME[dt]
    ut = UT[dt]
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, np.iinfo(ut).max, n, dtype=ut, endpoint=True)
    x = ref + rng.integers(-300, 300, n).astype(ut)  # small deltas of either sign, wrapping
    specials = np.array([0x7FC00000, 0xFFC00123, 0x7F800000, 0xFF800000, 0x80000000, 0, 1,
                         0x807FFFFF, 0xFFFFFFFF], np.uint64).astype(ut)  # NaN payloads, inf,
    for a in (x, ref):  # -0.0, subnormals (F32 bits; truncated for narrower types)
        a[rng.integers(0, max(n, 1), min(n, 30))] = rng.choice(specials, min(n, 30))
    exps, counts, pl, hist, split = X._ctx_planes(x.view(np.uint8), ref.view(np.uint8), d, nb)
    e2, c2, p2, h2, s2 = _plain_ctx_planes(x, ref, d, nb)
    assert exps == e2
    np.testing.assert_array_equal(counts, c2)
    np.testing.assert_array_equal(pl, p2)
    np.testing.assert_array_equal(hist, h2)
    np.testing.assert_array_equal(split, s2)


def _plain_buckets_pay(jh: np.ndarray) -> bool:
    """The split rule in plain Python (float for float as the kernel computes it)."""
    n = int(jh.sum())
    if n < 4096:
        return False
    one = n * float(kernels.entropy_bits(jh.sum(axis=0)))
    parts = sum(float(jh[b].sum()) * float(kernels.entropy_bits(jh[b])) for b in range(len(jh)))
    return (one - parts) / 8 > 0.01 * n + 150 * (len(jh) - 1)


@SET
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 4]), st.floats(0.0, 3.0))
def test_buckets_pay_matches_plain_rule(seed, nb, skew):
    rng = np.random.default_rng(seed)
    jh = (rng.pareto(1 + skew, (nb, 256)) * rng.integers(1, 200, (nb, 1))).astype(np.int64)
    assert X._buckets_pay(jh) == _plain_buckets_pay(jh)


@pytest.mark.parametrize("n", [1, 384, 1536, 5000])
def test_small_chunk_reuses_its_trial_frame(n, monkeypatch):
    """A chunk that is its own sample is coded once; the frame is what coding it
    again with the chosen transform gives."""
    rng = np.random.default_rng(n)
    ref = rng.normal(0, 0.05, n).astype(np.float32)
    x = (ref + rng.normal(0, 1e-4, n).astype(np.float32)).tobytes()
    frame = codec.encode(x, "F32", codec="xor", reference=ref.tobytes())
    t = parse(frame).params[9]
    monkeypatch.setattr(X, "_pick_transform", lambda mv, r, d, level, trials=None: t)
    assert codec.encode(x, "F32", codec="xor", reference=ref.tobytes()) == frame
    assert codec.decode(frame, reference=ref.tobytes()) == x


@SET
@given(st.integers(0, 2**32 - 1), st.integers(1, 256), st.integers(1, 10**6))
def test_huffman_stable_order_is_mergesort_argsort(seed, nsym, top):
    """The Huffman builder's symbol order (ties: lower symbol first) is exactly
    np.argsort(kind="mergesort")'s, so code lengths do not change."""
    from codec import huffman
    rng = np.random.default_rng(seed)
    f = np.zeros(256, np.int64)
    f[rng.choice(256, nsym, replace=False)] = rng.integers(1, top, nsym, endpoint=True)
    sym = np.flatnonzero(f > 0)
    np.testing.assert_array_equal(huffman._stable_order(f, sym),
                                  sym[np.argsort(f[sym], kind="mergesort")])
