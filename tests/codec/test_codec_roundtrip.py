"""Round trips for every codec and dtype (hypothesis), and the API contract."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import dtypes

SET = settings(max_examples=25, deadline=None)
ALL_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8",
              "U8", "BOOL", None]
LOSSLESS = ["raw", "zstd", "shuffle", "planes", "auto"]

SPECIALS32 = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754942e-38,
                       3.4028235e38, 1.0, 0.99999994, -0.9999999], np.float32)


def _bits32(v):
    return np.array(v, np.float32).view(np.uint32)


@st.composite
def chunks(draw, dtype=None):
    dt = draw(st.sampled_from(ALL_DTYPES)) if dtype is None else dtype
    size = dtypes.BY_NAME[dt].itemsize if dt else 1
    n = draw(st.integers(0, 3000))
    kind = draw(st.sampled_from(["random", "weights", "specials", "const"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random" or dt not in ("F32", "F16", "F64", "BF16"):
        raw = rng.integers(0, 256, n * size, dtype=np.uint8)
        if kind == "const":
            raw[:] = raw[0] if raw.size else 0
        data = raw.tobytes()
    else:
        w = rng.normal(0, 0.05, n)
        if kind == "specials":
            w[rng.integers(0, max(n, 1), min(n, 50))] = np.inf
            idx = rng.integers(0, max(n, 1), min(n, 50))
            w[idx] = rng.choice([np.nan, -0.0, 0.0, -np.inf, 1e-40, 1.0, 5e4, -1e-8], idx.size)
        if kind == "const":
            w[:] = 0.5
        if dt == "BF16":
            data = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            data = w.astype(dtypes.NUMPY_FLOAT[dt]).tobytes()
    if draw(st.booleans()) and data:  # odd length: opaque bytes
        data = data[:-1] if size > 1 else data
    return data, dt


@SET
@given(chunks(), st.sampled_from(LOSSLESS))
def test_lossless_roundtrip(chunk, name):
    data, dt = chunk
    frame = codec.encode(data, dt, codec=name)
    assert codec.decode(frame) == data
    info = codec.inspect(frame)
    assert info.raw_size == len(data) and info.stored_size == len(frame) and not info.lossy
    if name == "auto":
        assert len(frame) <= len(data) + 64 + 40  # never (much) larger than raw


@SET
@given(chunks(dtype="F32"), st.sampled_from(["F32", "BF16"]))
def test_planes_nan_payloads_exact(chunk, dt):
    data, _ = chunk
    rng = np.random.default_rng(len(data))
    raw = np.frombuffer(data[: len(data) // 4 * 4], np.uint32).copy()
    if raw.size:
        raw[rng.integers(0, raw.size, 20)] = rng.choice(
            _bits32([np.nan]).tolist() + [0x7F800001, 0xFFC00123, 0x7FFFFFFF, 0x80000000, 1], 20)
    frame = codec.encode(raw.tobytes(), dt, codec="planes")
    assert codec.decode(frame) == raw.tobytes()


@SET
@given(chunks(), chunks())
def test_xor_roundtrip_and_wrong_reference(a, b):
    data, dt = a
    rng = np.random.default_rng(len(data))
    ref = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    frame = codec.encode(data, dt, codec="xor", reference=ref)
    assert codec.inspect(frame).needs_reference
    assert codec.decode(frame, reference=ref) == data
    with pytest.raises(codec.FrameError):
        codec.decode(frame)
    with pytest.raises(codec.FrameError):
        codec.decode(frame, reference=ref + b"x")
    if ref:
        bad = bytearray(ref)
        bad[len(bad) // 2] ^= 1
        with pytest.raises(codec.FrameError):
            codec.decode(frame, reference=bytes(bad))
    auto = codec.encode(data, dt, reference=ref)
    assert codec.decode(auto, reference=ref) == data


def test_xor_similar_checkpoint_is_smaller():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, 200_000).astype(np.float32)
    b = (a + rng.normal(0, 1e-5, a.size)).astype(np.float32)
    alone = codec.encode(b, "F32", codec="planes")
    delta = codec.encode(b, "F32", codec="xor", reference=a)
    assert len(delta) < len(alone)
    assert codec.decode(codec.encode(b, "F32", reference=a), reference=a) == b.tobytes()


def test_empty_and_odd_lengths():
    for dt in ALL_DTYPES:
        for name in LOSSLESS:
            assert codec.decode(codec.encode(b"", dt, codec=name)) == b""
    f = codec.encode(b"abc", "F32", codec="planes")  # 3 bytes: opaque
    assert codec.inspect(f).dtype is None and codec.decode(f) == b"abc"


def test_numpy_memoryview_bytearray_inputs():
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    for data in (x, memoryview(x.tobytes()), bytearray(x.tobytes())):
        assert codec.decode(codec.encode(data, "F32")) == x.tobytes()


def test_upcast_bf16_compresses_well():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, 100_000).astype(np.float32)
    w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
    f = codec.encode(w, "F32")
    assert len(w.tobytes()) / len(f) > 2.5
    assert codec.decode(f) == w.tobytes()


def test_progressive_fidelity_planes():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.05, 50_000).astype(np.float32)
    f = codec.encode(w, "F32", codec="planes")
    for bits, tol in ((7, 2 ** -8), (15, 2 ** -16), (23, 0)):
        y = np.frombuffer(codec.decode(f, fidelity=bits), np.float32)
        rel = np.abs(y.astype(np.float64) - w) / np.abs(w)
        assert rel.max() <= tol
        assert (np.signbit(y) == np.signbit(w)).all()


def test_api_misc():
    assert codec.available_codecs() == ["raw", "zstd", "shuffle", "planes", "elf", "xor"]
    assert issubclass(codec.FrameError, ValueError)
    c = codec.PlanesCodec(dtype="F32", level=5)
    assert type(c).from_config(c.get_config()) == c
    x = np.ones(100, np.float32)
    assert c.decode(c.encode(x)) == x.tobytes()
    with pytest.raises(ValueError):
        codec.encode(x, "F32", codec="nope")
    with pytest.raises(ValueError):
        codec.encode(x, "F32", codec="xor")
    # BF16 / ints are never lossy, even when asked
    b = np.arange(100, dtype=np.uint16).tobytes()
    assert not codec.inspect(codec.encode(b, "BF16", codec="elf", bound=0.1)).lossy
    assert not codec.inspect(codec.encode(b, "I16", bound=0.1)).lossy


def test_concurrent_threads():
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(3)
    xs = [rng.normal(0, 0.05, 300_000).astype(np.float32) for _ in range(6)]

    def job(x):
        f = codec.encode(x, "F32", bound="native" if x[0] > 0 else None)
        return codec.decode(f), codec.inspect(f)

    with ThreadPoolExecutor(4) as ex:
        for x, (y, info) in zip(xs, ex.map(job, xs)):
            if not info.lossy:
                assert y == x.tobytes()
            else:
                assert np.abs(np.frombuffer(y, np.float32) - x).max() <= info.bound
