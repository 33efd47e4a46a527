"""Protected frames: the sign+exponent streams stored twice, a damaged copy read around."""

from __future__ import annotations

import numpy as np
import pytest

import codec
from codec import frame as fr

RNG = np.random.default_rng(7)
W = (RNG.standard_normal(1 << 16) * 0.02).astype(np.float32)
W2 = W + (RNG.standard_normal(W.size) * 1e-4).astype(np.float32)
BF16 = (W.view(np.uint32) >> 16).astype(np.uint16)

# (dtype, data, encode kwargs, the streams that must be copied)
CASES = {
    "f32 planes": ("F32", W, {}, ["exponent"]),
    "bf16 planes": ("BF16", BF16, {}, ["exponent"]),
    "f16 planes": ("F16", W.astype(np.float16), {}, ["byte1"]),
    "f32 elf": ("F32", W, {"bound": "native"}, ["outlier_pos", "outlier_val", "q0"]),
    "f32 xor": ("F32", W2, {"reference": W.tobytes()}, [f"c{c}.byte3" for c in range(8)]),
}


def _flip(frame: bytes, s: fr.Stream) -> bytes:
    """``frame`` with one byte in the middle of stream ``s``'s stored bytes flipped."""
    b = bytearray(frame)
    b[s.offset + s.stored_len // 2] ^= 0x5A
    return bytes(b)


@pytest.mark.parametrize("case", CASES)
def test_protected_frame_decodes_exactly_and_copies_the_significant_streams(case):
    dtype, data, kw, names = CASES[case]
    plain = codec.encode(data.tobytes(), dtype, **kw)
    prot = codec.encode(data.tobytes(), dtype, protect=True, **kw)
    ref = kw.get("reference")
    assert codec.decode(prot, reference=ref) == codec.decode(plain, reference=ref)
    assert codec.inspect(prot).protected == names
    assert codec.inspect(plain).protected == []
    # the copies are extra streams, not seen by the codecs; they cost their stored size
    h, hp = fr.parse(plain), fr.parse(prot)
    assert [s.name for s in hp.streams] == [s.name for s in h.streams]
    copied = sum(s.stored_len for s in hp.streams if s.backup is not None)
    assert copied < len(plain) < len(prot) <= len(plain) + copied + 32 * len(names)


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_significant_stream_is_read_from_its_copy(case):
    dtype, data, kw, names = CASES[case]
    ref = kw.get("reference")
    want = codec.decode(codec.encode(data.tobytes(), dtype, **kw), reference=ref)
    prot = codec.encode(data.tobytes(), dtype, protect=True, **kw)
    plain = codec.encode(data.tobytes(), dtype, **kw)
    for s in fr.parse(prot).streams:
        if s.backup is None or s.stored_len == 0:
            continue
        assert codec.decode(_flip(prot, s), reference=ref) == want, s.name
        assert codec.decode(_flip(prot, s.backup), reference=ref) == want, s.name
        both = _flip(_flip(prot, s), s.backup)
        with pytest.raises(codec.FrameError) as e:
            codec.decode(both, reference=ref)
        assert s.name in e.value.damaged
        # the same damage without protection is an error, never wrong bytes
        ps = next(x for x in fr.parse(plain).streams if x.name == s.name)
        with pytest.raises(codec.FrameError):
            codec.decode(_flip(plain, ps), reference=ref)


def test_damage_outside_the_protected_streams_is_still_an_error_but_fidelity_reads():
    prot = codec.encode(W.tobytes(), "F32", bound="native", protect=True)
    low = fr.parse(prot).streams[-1]  # the lowest ELF plane: not copied
    assert low.backup is None
    bad = _flip(prot, low)
    with pytest.raises(codec.FrameError):
        codec.decode(bad)
    approx = np.frombuffer(codec.decode(bad, fidelity=7), np.float32)
    assert np.abs(approx - W).max() < 2 ** -7


@pytest.mark.parametrize("dtype,data", [(None, W), ("I32", W.view(np.int32))])
def test_frames_without_a_sign_exponent_stream_are_left_alone(dtype, data):
    plain = codec.encode(data.tobytes(), dtype)
    assert codec.encode(data.tobytes(), dtype, protect=True) == plain


def test_a_copy_that_matches_no_stream_is_a_frame_error():
    prot = codec.encode(W.tobytes(), "F32", protect=True)
    h = fr.parse(prot)
    mv = memoryview(prot)
    streams = [fr.Stream(s.name, s.method, s.raw_len, mv[s.offset:s.offset + s.stored_len])
               for s in h.streams]
    streams.append(fr.Stream("nothing~", 0, 3, b"abc"))
    bad = fr.pack(h.codec, h.dtype_id, h.raw_size, h.params, streams, h.content_hash)
    with pytest.raises(codec.FrameError, match="copy"):
        codec.decode(bad)


@pytest.mark.parametrize("which", ["primary", "copy", "both"])
def test_mend_rewrites_the_damaged_copy_from_the_intact_one(which):
    prot = codec.encode(W.tobytes(), "F32", bound="native", protect=True)
    s = fr.parse(prot).streams[2]  # q0, the top ELF plane
    bad = prot
    if which in ("primary", "both"):
        bad = _flip(bad, s)
    if which in ("copy", "both"):
        bad = _flip(bad, s.backup)
    mended, names = fr.mend(bad)
    if which == "both":
        assert (mended, names) == (bad, [])
    else:
        assert (mended, names) == (prot, ["q0"])
    assert fr.mend(prot) == (prot, [])
