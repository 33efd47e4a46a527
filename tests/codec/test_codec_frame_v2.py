"""The compact v2 frame: small headers, exact round trips, every corruption caught, and
v1 frames (the old layout) still decode."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import frame as fr
from codec.frame import Stream, hash64, pack, parse

SET = settings(max_examples=40, deadline=None)


def _as_v1(frame, data: bytes) -> bytes:
    """The same streams re-packed in the v1 layout (what the first version wrote)."""
    h = parse(frame)
    streams = [Stream(s.name, s.method, s.raw_len, bytes(fr.stream_view(frame, s)))
               for s in h.streams]
    return pack(h.codec, h.dtype_id, h.raw_size, h.params, streams, hash64(data),
                lossy=h.lossy, needs_reference=h.needs_reference, bound=h.bound,
                max_error=h.max_error, version=1)


@SET
@given(st.integers(0, 2**64 - 1))
def test_varint_roundtrip(x):
    b = fr.varint(x)
    assert fr.read_varint(memoryview(b), 0) == (x, len(b))
    assert len(b) == max(1, -(-x.bit_length() // 7))


def test_overlong_varint_is_frame_error():
    with pytest.raises(codec.FrameError):
        fr.read_varint(memoryview(b"\x80" * 11), 0)


@SET
@given(st.sampled_from(["F32", "F16", "BF16", "I64", None]), st.integers(0, 40000),
       st.sampled_from(["raw", "zstd", "planes", "auto", "elf", "xor"]), st.integers(0, 2**32 - 1))
def test_v2_and_v1_layouts_decode_alike(dt, nbytes, name, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, nbytes // 4 + 1).astype(np.float32)
    data = w.tobytes()[:nbytes]
    ref = bytes(rng.integers(0, 256, len(data), dtype=np.uint8)) if name == "xor" else None
    kw = {"bound": "native"} if name == "elf" else {}
    if name == "elf" and dt not in ("F32", "F16"):
        return
    frame = codec.encode(data, dt, codec=name, reference=ref, **kw)
    h = parse(frame)
    assert h.version == fr.FORMAT_VERSION == 2
    assert h.check_bits == (64 if len(data) >= fr.WIDE_FROM else 32)
    out = codec.decode(frame, reference=ref)
    if name != "elf":
        assert out == data
    old = _as_v1(frame, out)
    assert parse(old).version == 1
    assert codec.decode(old, reference=ref) == out
    assert len(frame) < len(old)


def test_small_frames_pay_a_small_header():
    """A 768-byte fp16 LayerNorm vector: v1 paid ~115 header bytes, v2 ~40."""
    w = np.random.default_rng(0).normal(1, 0.05, 384).astype(np.float16)
    for name in ("raw", "planes", "auto"):
        h = parse(codec.encode(w, "F16", codec=name))
        assert h.header_size <= 41, (name, h.header_size)
    h = parse(codec.encode(w.tobytes()[:100], None, codec="raw"))
    assert h.header_size <= 26


def test_literal_stream_names_and_lossy_fields_roundtrip():
    s = [Stream("not-in-the-table", fr.METHOD_RAW, 3, b"abc"), Stream("q1", fr.METHOD_CONST, 9, b"x")]
    f = pack("elf", 2, 12, b"\x01\x02", s, 1234, lossy=True, bound=1e-3, max_error=5e-4)
    h = parse(f)
    assert [x.name for x in h.streams] == ["not-in-the-table", "q1"]
    assert (h.lossy, h.needs_reference, h.bound, h.max_error) == (True, False, 1e-3, 5e-4)
    assert h.params == b"\x01\x02" and h.content_hash == 1234
    assert bytes(fr.stream_view(f, h.streams[0])) == b"abc"
    h = parse(pack("raw", 0, 3, b"", s[:1], 1))
    assert h.bound is None and h.max_error is None and not h.lossy


@pytest.mark.parametrize("name,nbytes", [("planes", 768), ("raw", 768), ("zstd", 3000),
                                         ("planes", 70000)])
def test_every_flipped_byte_is_caught(name, nbytes):
    """Each byte of a small v2 frame, flipped three ways: FrameError, never wrong data."""
    w = np.random.default_rng(1).normal(0, 0.05, nbytes // 2).astype(np.float16)
    frame = codec.encode(w, "F16", codec=name)
    step = max(1, len(frame) // 3000)
    for pos in range(0, len(frame), step):
        for mask in (1, 0x80, 0xFF):
            bad = bytearray(frame)
            bad[pos] ^= mask
            with pytest.raises(codec.FrameError):
                codec.decode(bytes(bad))


def test_unknown_version_and_codec_are_frame_errors():
    frame = bytearray(codec.encode(b"hello world" * 20, None, codec="zstd"))
    bad = bytearray(frame)
    bad[4] = 4
    with pytest.raises(codec.FrameError, match="version 4"):
        codec.decode(bytes(bad))
    s = [Stream("bytes", fr.METHOD_RAW, 3, b"abc")]
    f = bytearray(pack("raw", 0, 3, b"", s, hash64(b"abc")))
    f[5] = (f[5] & 0xF0) | 9  # codec id 9, header checksum fixed up
    h = parse(pack("raw", 0, 3, b"", s, hash64(b"abc")))
    body = bytes(f[:h.header_size - 4])
    f[h.header_size - 4:h.header_size] = (hash64(body) & 0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(codec.FrameError, match="unknown codec id 9"):
        codec.decode(bytes(f))
