"""The selector skips candidates that cannot win without losing ratio: float chunks go
to planes first, zstd is tried only where planes saw repeats; low-entropy streams skip
the zstd probes only when they show no runs."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import kernels, zstd_codec as zc
from codec.frame import METHOD_HUF, METHOD_ZSTD

SET = settings(max_examples=25, deadline=None)


def _weights(n, seed=0):
    return np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)


@pytest.mark.parametrize("n", [3000, 300000])
def test_float_weights_go_to_planes(n):
    w = _weights(n)
    assert codec.encode(w, "F32") == codec.encode(w, "F32", codec="planes")


@pytest.mark.parametrize("dt", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("n", [5000, 600000])
def test_repeats_still_find_zstd(dt, n):
    """Tiled rows (repeated embedding rows): auto is never worse than plain zstd."""
    row = _weights(384, 1)
    x = np.tile(row, n // 384 + 1)[:n]
    data = (x.view(np.uint32) >> 16).astype(np.uint16) if dt == "BF16" else \
        x.astype(np.float16) if dt == "F16" else x
    auto = codec.encode(data, dt)
    assert len(auto) <= len(codec.encode(data, dt, codec="zstd"))
    assert codec.decode(auto) == np.ascontiguousarray(data).tobytes()


@SET
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.9), st.sampled_from(["F32", "BF16"]))
def test_sparse_chunks_roundtrip_and_beat_both(seed, zero_frac, dt):
    """Sparse optimizer state (zero rows): exact, and no larger than planes or zstd."""
    rng = np.random.default_rng(seed)
    x = _weights(200000, seed).reshape(-1, 400)
    x[rng.random(x.shape[0]) < zero_frac] = 0
    data = x.reshape(-1)
    if dt == "BF16":
        data = (data.view(np.uint32) >> 16).astype(np.uint16)
    auto = codec.encode(data, dt)
    assert codec.decode(auto) == data.tobytes()
    assert len(auto) <= min(len(codec.encode(data, dt, codec=c)) for c in ("planes", "zstd")) + 8


def test_runs_detector():
    rng = np.random.default_rng(2)
    iid = rng.choice(np.arange(120, 128, dtype=np.uint8), 200000)
    runs = np.repeat(iid[:20000], 10)
    for a, want in ((iid, False), (runs, True)):
        h = kernels.histogram(a)
        assert zc._has_runs(a, h, a.size) is want
    assert kernels.equal_neighbours(np.array([1, 1, 2, 2, 2, 3], np.uint8)) == 3


def test_exponent_streams_pick_the_smaller_coder():
    rng = np.random.default_rng(3)
    iid = (126 - rng.geometric(0.4, 300000)).astype(np.uint8)
    runs = np.where(np.repeat(rng.random(300000 // 400) < 0.5, 400), iid, 0).astype(np.uint8)
    s = zc.code_stream("exponent", iid)
    assert s.method == METHOD_HUF
    s = zc.code_stream("exponent", runs)
    assert s.method == METHOD_ZSTD


@SET
@given(st.integers(0, 2**32 - 1), st.integers(1, 5000))
def test_sub_vs_raw_bits4_matches_the_generic_kernel(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**32, n, dtype=np.uint32)
    r = x + rng.integers(-300, 300, n).astype(np.uint32)  # small deltas, wrapping
    r[rng.random(n) < 0.1] = rng.integers(0, 2**32, dtype=np.uint32)  # and large ones
    assert kernels.sub_vs_raw_bits4(x, r) == pytest.approx(kernels.sub_vs_raw_bits(x, r, 32))


@pytest.mark.parametrize("n", [3000, 300000])  # a small chunk (whole) and a sampled one
def test_a_close_reference_takes_xor_without_trials(n, monkeypatch):
    """A fine-tune of its reference: the order-0 estimate says xor, no candidate is coded
    on trial and the frame is xor's; against an unrelated tensor the trials run."""
    from codec import selector
    built = []
    make = selector._make
    monkeypatch.setattr(selector, "_make", lambda c, *a, **k: built.append(c) or make(c, *a, **k))
    base = _weights(n, 1)
    tuned = base + np.random.default_rng(2).normal(0, 1e-4, n).astype(np.float32)
    auto = codec.encode(tuned, "F32", reference=base)
    assert built == ["xor"]
    assert auto == codec.encode(tuned, "F32", codec="xor", reference=base)
    assert codec.decode(auto, reference=base) == tuned.tobytes()
    built.clear()
    codec.encode(tuned, "F32", reference=_weights(n, 3))
    assert "planes" in built
