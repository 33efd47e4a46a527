"""ELF's joint layout (sign and quantized magnitude as one wide Huffman symbol):
the same values as the byte planes, smaller on real fp16 weights, and safe on bad input."""
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import dtypes, elf, frame as fr, wide

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: zoo
import zoo  # noqa: E402
from test_codec_elf import NP, adversarial  # noqa: E402

N = 2 * elf.JOINT_MIN


def _streams(frame) -> list[str]:
    return [name for name, _ in codec.inspect(frame).streams]


def _check_bound(x, frame, dt):
    info = codec.inspect(frame)
    y = np.frombuffer(codec.decode(frame), NP[dt])
    ut = dtypes.BY_NAME[dt].uint
    fin = np.isfinite(x)
    assert (x.view(ut)[~fin] == y.view(ut)[~fin]).all()  # NaN payloads, inf: bit exact
    err = np.abs(y[fin].astype(np.float64) - x[fin].astype(np.float64))
    assert err.max() <= info.bound and err.max() == info.max_error
    assert (np.signbit(y[fin]) == np.signbit(x[fin])).all()  # -0.0 too
    return y


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([("F16", "native", 0.05), ("F16", 1e-3, 0.2), ("F32", 1e-3, 0.2),
                        ("F64", 1e-3, 0.2), ("F16", 2 ** -9, 0.05), ("F32", 5e-4, 0.05)]),
       st.integers(0, 2 ** 31))
def test_joint_layout_keeps_the_bound_and_the_planes_values(case, seed):
    """Weights with adversarial values among them (NaN payloads, inf, -0.0,
    subnormals, 1 - ulp, huge): the bound holds, and every value is the one the
    byte-plane layout gives."""
    dt, bound, sigma = case
    rng = np.random.default_rng(seed)
    x = rng.normal(0, sigma, N).astype(NP[dt])
    x[rng.choice(N, 400, replace=False)] = adversarial(dt, 400, seed)
    x[:2] = [0.98, -0.98]  # the grid's whole range is in use: sign + q of 9..12 bits
    frame = codec.encode(x, dt, codec="elf", bound=bound)
    assert "qsym" in _streams(frame)
    y = _check_bound(x, frame, dt)
    planes = codec.ElfCodec(dtype=dt, bound=bound, joint=False).encode(x)
    assert "qsym" not in _streams(planes)
    assert len(frame) <= len(planes)
    assert codec.decode(planes) == y.tobytes()
    # a fidelity request reads the whole stream: exact to the grid
    assert codec.decode(frame, fidelity=2) == y.tobytes()


def test_joint_every_f16_bit_pattern():
    """Every fp16 pattern among weights (few enough outliers that the grid stays sign
    + 10 bits): bound or bit exact, and the same values as the planes. (Every symbol
    in use forces flat 12-bit codes, so the encoder itself would keep the planes.)"""
    rng = np.random.default_rng(3)
    u = np.concatenate([np.arange(65536, dtype=np.uint16),
                        rng.normal(0, 0.05, 80 * elf.JOINT_MIN).astype(np.float16).view(np.uint16)])
    x = rng.permutation(u).view(np.float16)
    assert "qsym" not in _streams(codec.encode(x, "F16", codec="elf", bound="native"))
    frame = codec.ElfCodec(dtype="F16", joint="always").encode(x)
    assert "qsym" in _streams(frame)
    y = _check_bound(x, frame, "F16")
    assert codec.decode(codec.ElfCodec(dtype="F16", joint=False).encode(x)) == y.tobytes()


def test_joint_always_falls_back_where_it_does_not_apply():
    """joint="always" on a chunk too small for the joint layout, or whose sign + q take
    more than 12 bits: the planes, decodable."""
    x = np.random.default_rng(6).normal(0, 0.05, 1000).astype(np.float16)
    y = np.random.default_rng(6).normal(0, 0.05, N).astype(np.float32)
    y[0] = 0.9  # q up to 4500: sign + q take 14 bits
    for arr, dt, bound in ((x, "F16", "native"), (y, "F32", 1e-4)):
        frame = codec.ElfCodec(dtype=dt, bound=bound, joint="always").encode(arr)
        assert "qsym" not in _streams(frame)
        _check_bound(arr, frame, dt)


def test_joint_is_smaller_on_real_fp16_weights():
    """MiniLM's word embeddings in fp16: the planes' top plane (sign + two rare bits)
    takes 1.5 bits of Huffman code per value for ~1 bit of entropy; the joint symbol
    does not lose that."""
    from codec import safetensors_io
    buf = safetensors_io.open_file(str(zoo.minilm_safetensors()))
    w = next(np.frombuffer(mv, np.float32) for name, dt, _s, mv in safetensors_io.tensors(buf)
             if name.endswith("word_embeddings.weight"))
    x = w[:1 << 21].astype(np.float16)
    joint = codec.encode(x, "F16", codec="elf", bound="native")
    planes = codec.ElfCodec(dtype="F16", joint=False).encode(x)
    assert "qsym" in _streams(joint)
    assert len(joint) < 0.975 * len(planes), (len(joint), len(planes))  # measured 0.964
    assert codec.decode(joint) == codec.decode(planes)


@pytest.mark.parametrize("fill", ["zeros", "sparse", "wide"])
def test_dominant_symbol_takes_the_planes(fill):
    """Where one symbol dominates, whole-bit Huffman codes are poor (>= 1 bit per
    value); the planes (constant or zstd streams) are kept. Likewise a near-uniform
    low byte (a wide distribution), where the planes store that byte raw."""
    x = np.zeros(N, np.float16)
    if fill == "sparse":
        x[::97] = 0.01
    if fill == "wide":
        x = np.random.default_rng(4).uniform(-0.999, 0.999, N).astype(np.float16)
    frame = codec.encode(x, "F16", codec="elf", bound="native")
    assert "qsym" not in _streams(frame)
    if fill != "wide":
        assert len(frame) < x.nbytes / 20
    assert len(frame) <= len(codec.ElfCodec(dtype="F16", joint=False).encode(x))
    assert codec.decode(frame) == codec.decode(codec.ElfCodec(dtype="F16", joint=False).encode(x))


def test_protect_keeps_the_planes():
    """A protected frame copies its leading streams (outliers and the top plane): the
    joint layout has no top plane of its own, so protection writes the planes."""
    x = np.random.default_rng(1).normal(0, 0.05, N).astype(np.float16)
    x[:2] = [0.98, -0.98]
    assert "qsym" in _streams(codec.encode(x, "F16", codec="elf", bound="native"))
    for c in ("elf", "auto"):
        frame = codec.encode(x, "F16", codec=c, bound="native", protect=True)
        info = codec.inspect(frame)
        assert "qsym" not in _streams(frame) and "q0" in info.protected
        assert codec.decode(frame) == codec.decode(codec.encode(x, "F16", codec="elf",
                                                                bound="native"))


def test_damaged_joint_frame_raises():
    x = np.random.default_rng(2).normal(0, 0.05, N).astype(np.float16)
    x[:2] = [0.98, -0.98]
    frame = codec.encode(x, "F16", codec="elf", bound="native")
    h = fr.parse(frame)
    qs = next(s for s in h.streams if s.name == "qsym")
    rng = np.random.default_rng(0)
    for pos in [qs.offset, qs.offset + 5, *rng.integers(qs.offset, len(frame), 30)]:
        bad = bytearray(frame)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(codec.FrameError):
            codec.decode(bytes(bad))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 3000), st.integers(0, 1 << 30))
def test_wide_decoder_never_reads_out_of_bounds(data, n, seed):
    """Garbage and mutated streams (no frame checksum in front): a FrameError or n
    values from the table, never a crash or a value from outside it."""
    rng = np.random.default_rng(seed)
    vlut = np.arange(2048, dtype=np.uint16) + 7
    sym = rng.integers(0, 2048, max(n, 1)).astype(np.uint16)
    _, lens, _ = wide.plan(sym, 2048)
    good = bytearray(wide.encode(sym, lens).tobytes())
    if data:  # overwrite a slice of a valid stream, or take the bytes as they are
        at = int(rng.integers(0, len(good)))
        good[at:at + len(data)] = data[:max(0, len(good) - at)]
    for stored in (bytes(good), data):
        out = np.zeros(n, np.uint16)
        try:
            wide.decode(stored, vlut, out)
        except codec.FrameError:
            continue
        assert ((out >= 7) & (out < 2048 + 7)).all() or n == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4096), st.integers(0, 6000), st.floats(0.5, 2000), st.integers(0, 1 << 30))
def test_wide_round_trip(a, n, spread, seed):
    """Any alphabet up to 4096 symbols, any length (sub-streams of 0..n/4 symbols),
    skewed or flat, one symbol or many: every value comes back."""
    rng = np.random.default_rng(seed)
    sym = np.minimum(np.abs(rng.normal(0, spread, n)), a - 1).astype(np.uint16)
    vlut = rng.integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32)
    size, lens, _ = wide.plan(sym, a)
    stored = wide.encode(sym, lens)
    assert size - 16 <= stored.nbytes <= size
    out = np.empty(n, np.uint32)
    wide.decode(stored.tobytes(), vlut, out)
    assert np.array_equal(out, vlut[sym])
