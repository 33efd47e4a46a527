"""Stream formats: frames written by earlier versions still decode; the v2 Huffman
coder (blocks of four interleaved streams) round-trips on large and odd inputs."""
import glob
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import huffman, kernels
from codec.frame import hash64

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(DATA, "v1_*.bin"))))
def test_v1_frames_still_decode(path):
    """Frames made by the first codec version (v1 Huffman streams: one MSB-first bit
    stream, 12-bit codes) decode to the same bytes."""
    frame = open(path, "rb").read()
    want = int(open(path[:-4] + ".out.xxh").read())
    out = codec.decode(frame)
    assert hash64(out) == want
    # and a reduced-fidelity read still works on planes frames
    if codec.inspect(frame).codec == "planes" and codec.inspect(frame).dtype == "F32":
        assert len(codec.decode(frame, fidelity=7)) == len(out)


def test_v1_huffman_stream_roundtrip():
    rng = np.random.default_rng(3)
    a = (rng.geometric(0.3, 50000) % 256).astype(np.uint8)
    _, lens = huffman.estimate_v1(kernels.histogram(a))
    v1 = bytes(huffman.encode_v1(a, lens))
    assert np.array_equal(huffman.decode(v1, a.size), a)


def _sample(kind, n, rng):
    if kind == 0:
        return rng.integers(0, 256, n).astype(np.uint8)
    if kind == 1:
        return (rng.geometric(0.3, n) % 256).astype(np.uint8)
    if kind == 2:
        return np.where(rng.random(n) < 0.999, 5, 7).astype(np.uint8)
    if kind == 4:  # no short codes (one symbol per lookup) and the rare symbols, whose
        # codes are the longest, all together: windows of five 12-bit codes (_decode4s's
        # limit)
        return np.sort(np.where(rng.random(n) < 0.98, rng.integers(0, 64, n),
                                rng.integers(64, 256, n))).astype(np.uint8)
    # drifting statistics: per-block tables pay off
    return np.concatenate([(rng.geometric(0.3, n // 2) + 100).astype(np.uint8),
                           (rng.geometric(0.05, n - n // 2) % 256).astype(np.uint8)])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 20000), st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_huffman_v2_roundtrip(n, kind, seed):
    a = _sample(kind, n, np.random.default_rng(seed))
    h = kernels.histogram(a)
    assert np.array_equal(h, np.bincount(a, minlength=256))
    if (h > 0).sum() < 2:
        return
    est, lens, block = huffman.plan_blocks(a, h)
    enc = huffman.encode(a, lens, block)
    assert len(enc) <= est + 8
    # stored at an odd offset (frames do not align streams)
    assert np.array_equal(huffman.decode((b"x" + enc.tobytes())[1:], n), a)


@pytest.mark.parametrize("kind", [0, 1, 3, 4])
def test_huffman_v2_blocks(kind):
    n = 3 * huffman.BLOCK + 12345
    a = _sample(kind, n, np.random.default_rng(kind))
    est, lens, block = huffman.plan_blocks(a, kernels.histogram(a))
    if kind == 3:
        assert len(lens) == 4 and block == huffman.BLOCK
    enc = huffman.encode(a, lens, block)
    assert np.array_equal(huffman.decode(enc.tobytes(), n), a)
    # a damaged stream raises (or decodes to other bytes, which the frame's checksums
    # catch), it never hangs or crashes
    bad = bytearray(enc.tobytes())
    bad[len(bad) // 2] ^= 0x5A
    try:
        huffman.decode(bytes(bad), n)
    except codec.FrameError:
        pass
    with pytest.raises(codec.FrameError):
        huffman.decode(enc.tobytes()[:-4], n)


@pytest.mark.parametrize("dt", ["F32", "BF16", "F16"])
def test_large_planes_frames(dt):
    """Chunks big enough for per-block Huffman tables, with a stretch of repeats."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.03, 1 << 20).astype(np.float32)
    w[300000:400000] = w[:100000]
    if dt == "BF16":
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    elif dt == "F16":
        raw = w.astype(np.float16).tobytes()
    else:
        raw = w.tobytes()
    for c in ("planes", "auto"):
        f = codec.encode(raw, dt, codec=c)
        assert codec.decode(f) == raw
        assert len(f) < len(raw)


def test_f16_elf_matches_numpy_half_rounding():
    """The fp16 ELF kernels convert in numba; the result must be numpy's float16."""
    rng = np.random.default_rng(11)
    x = rng.normal(0, 0.2, 200000).astype(np.float16)
    for bound in ("native", 1e-3, 3e-4):
        f = codec.encode(x.tobytes(), "F16", codec="elf", bound=bound)
        y = np.frombuffer(codec.decode(f), np.float16)
        info = codec.inspect(f)
        err = np.abs(y.astype(np.float64) - x.astype(np.float64))
        assert err.max() <= info.bound and err.max() == info.max_error


@pytest.mark.parametrize("bound", ["native", 1e-3, 2e-5])
def test_f16_elf_every_bit_pattern(bound):
    """Large fp16 chunks go through a table over all 65536 bit patterns: every pattern
    (NaN payloads, inf, -0.0, subnormals, values >= 1) keeps the bound or comes back
    bit exact."""
    rng = np.random.default_rng(5)
    u = np.concatenate([np.arange(65536, dtype=np.uint16),
                        rng.integers(0, 65536, 30000).astype(np.uint16)])
    f = codec.encode(u.tobytes(), "F16", codec="elf", bound=bound)
    y = np.frombuffer(codec.decode(f), np.uint16)
    x = u.view(np.float16).astype(np.float64)
    yv = y.view(np.float16).astype(np.float64)
    fin = np.isfinite(x)
    assert np.array_equal(y[~fin], u[~fin])
    err = np.abs(yv[fin] - x[fin])
    info = codec.inspect(f)
    assert err.max() <= info.bound and err.max() == info.max_error
    # the small-chunk path gives the same bytes
    g = codec.encode(u[:5000].tobytes(), "F16", codec="elf", bound=bound)
    assert codec.decode(g) == bytes(y[:5000])


DELTAS = sorted(p for p in glob.glob(os.path.join(DATA, "v2_*.bin")) if "_ref" not in p)


@pytest.mark.parametrize("path", DELTAS)
def test_delta_frames_of_earlier_versions_still_decode(path):
    """xor, sub and sub+ctx+hi delta frames written before sub+blocks and the scaled
    reference (by 174769a) decode to the same bytes against their reference; so does an
    xor frame in the first params layout (no transform byte)."""
    from framekit import repack
    frame = open(path, "rb").read()
    want = int(open(path[:-4] + ".out.xxh").read())
    ref = open(path.rsplit("_", 1)[0] + "_delta_ref.bin", "rb").read()
    assert hash64(codec.decode(frame, reference=ref)) == want
    if path.endswith("_xor.bin"):
        oldest = repack(frame, params=codec.frame.parse(frame).params[:9])
        assert hash64(codec.decode(oldest, reference=ref)) == want
