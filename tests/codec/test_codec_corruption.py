"""Corrupt or truncated frames raise FrameError; never wrong data."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec

SET = settings(max_examples=40, deadline=None)


def frames():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, 3000).astype(np.float32)
    w16 = w.astype(np.float16)
    ref = (w + rng.normal(0, 1e-4, w.size)).astype(np.float32)
    noise = rng.integers(0, 256, 70000, dtype=np.uint8).tobytes()
    return [
        (codec.encode(w, "F32", codec="raw"), w.tobytes(), None),
        (codec.encode(w, "F32", codec="zstd"), w.tobytes(), None),
        (codec.encode(w, "F32", codec="planes"), w.tobytes(), None),
        (codec.encode(w16, "F16", codec="planes"), w16.tobytes(), None),
        (codec.encode(w, "F32", codec="elf", bound="native"), None, None),
        (codec.encode(w, "F32", codec="elf", bound=1e-3), None, None),
        (codec.encode(w, "F32", codec="xor", reference=ref), w.tobytes(), ref.tobytes()),
        # incompressible opaque bytes: the raw frame, and zstd that did not pay; the
        # stream's checksum is their only check of the decoded bytes (hashed once)
        (codec.encode(noise, None), noise, None),
        (codec.encode(noise, None, codec="zstd"), noise, None),
        # an array in opaque bytes, shuffled (tail bytes in the parameters)
        (codec.encode(w.tobytes()[1:], None), w.tobytes()[1:], None),
    ]


FRAMES = frames()


@SET
@given(st.integers(0, len(FRAMES) - 1), st.data())
def test_flipped_bytes_never_return_wrong_data(i, data):
    frame, exact, ref = FRAMES[i]
    good = codec.decode(frame, reference=ref)
    if exact is not None:
        assert good == exact
    bad = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(bad) - 1))
        bad[pos] ^= data.draw(st.integers(1, 255))
    try:
        out = codec.decode(bytes(bad), reference=ref)
    except codec.FrameError as e:
        assert str(e)
    else:
        assert out == good  # only possible if the flips cancelled out


@SET
@given(st.integers(0, len(FRAMES) - 1), st.data())
def test_truncated_or_extended(i, data):
    frame, _, ref = FRAMES[i]
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(codec.FrameError):
        codec.decode(frame[:cut], reference=ref)
    with pytest.raises(codec.FrameError):
        codec.decode(frame + b"\0", reference=ref)
    with pytest.raises(codec.FrameError):
        codec.inspect(frame[:min(cut, 40)])


def test_damaged_low_mantissa_degrades_with_fidelity():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, 5000).astype(np.float32)
    frame = bytearray(codec.encode(w, "F32", codec="planes"))
    info = codec.inspect(bytes(frame))
    names = [n for n, _ in info.streams]
    assert names[0] == "exponent"  # most significant first
    frame[-3] ^= 0xFF  # inside the last (least significant) stream
    with pytest.raises(codec.FrameError) as e:
        codec.decode(bytes(frame))
    assert e.value.damaged == ("mant_lo",)
    y = np.frombuffer(codec.decode(bytes(frame), fidelity=15), np.float32)
    assert np.abs((y - w) / w).max() <= 2 ** -16


def test_garbage_is_frame_error():
    for junk in (b"", b"ELVC", b"x" * 100, bytes(200)):
        with pytest.raises(codec.FrameError):
            codec.decode(junk)
