"""Protected frames: the sign+exponent streams carry a parity (or, in older frames, a copy);
damage they cover is read around, damage beyond them is an error, never wrong bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import codec
from codec import frame as fr

RNG = np.random.default_rng(7)
W = (RNG.standard_normal(1 << 16) * 0.02).astype(np.float32)
W2 = W + (RNG.standard_normal(W.size) * 1e-4).astype(np.float32)
BF16 = (W.view(np.uint32) >> 16).astype(np.uint16)
BF16_2 = (W2.view(np.uint32) >> 16).astype(np.uint16)

# (dtype, data, encode kwargs, the streams that must be copied)
CASES = {
    "f32 planes": ("F32", W, {}, ["exponent"]),
    "bf16 planes": ("BF16", BF16, {}, ["exponent"]),
    "f16 planes": ("F16", W.astype(np.float16), {}, ["byte1"]),
    "f32 elf": ("F32", W, {"bound": "native"}, ["outlier_pos", "outlier_val", "q0"]),
    # fp32: plain sub (sub+ctx saves too little there), bf16: sub+ctx, a top plane per class
    "f32 xor": ("F32", W2, {"reference": W.tobytes()}, ["byte3"]),
    "bf16 xor": ("BF16", BF16_2, {"reference": BF16.tobytes()}, [f"c{c}.byte1" for c in range(8)]),
}


def _flip(frame: bytes, s: fr.Stream, at: int | None = None) -> bytes:
    """``frame`` with one byte of stream ``s``'s stored bytes flipped (the middle one, or
    the one at offset ``at`` in the stream)."""
    b = bytearray(frame)
    b[s.offset + (s.stored_len // 2 if at is None else at)] ^= 0x5A
    return bytes(b)


def _parity_k(frame: bytes, s: fr.Stream) -> int:
    return frame[s.parity.offset]


def _with_copies(frame: bytes, elements: int) -> bytes:
    """``frame`` as protect() wrote it before parity: a copy ``X~`` of each stream it
    guards now (any parities dropped), in a v2 frame. Such frames are in stores and must
    go on reading."""
    guarded = {s.name for s in fr.parse(fr.protect(frame, elements)).streams if s.protected}
    h = fr.parse(frame)
    mv = memoryview(frame)
    streams = [fr.Stream(x.name, x.method, x.raw_len, mv[x.offset:x.offset + x.stored_len])
               for x in h.streams]
    streams += [replace(x, name=x.name + fr.COPY) for x in streams if x.name in guarded]
    return fr.pack(h.codec, h.dtype_id, h.raw_size, h.params, streams, h.content_hash,
                   lossy=h.lossy, needs_reference=h.needs_reference, bound=h.bound,
                   max_error=h.max_error)


def _protect(frame: bytes, elements: int, scheme: str) -> bytes:
    return fr.protect(frame, elements) if scheme == "parity" else _with_copies(frame, elements)


def _encode(case, protect=True, scheme="parity"):
    dtype, data, kw, names = CASES[case]
    if not protect:
        return codec.encode(data.tobytes(), dtype, **kw)
    if scheme == "parity":
        return codec.encode(data.tobytes(), dtype, protect=True, **kw)
    # the frame protect=True codes (ELF in byte planes), its parities swapped for copies
    return _with_copies(codec.encode(data.tobytes(), dtype, protect=True, **kw), data.size)


@pytest.mark.parametrize("case", CASES)
def test_protected_frame_decodes_exactly_and_guards_the_significant_streams(case):
    dtype, data, kw, names = CASES[case]
    plain = _encode(case, protect=False)
    prot = _encode(case)
    ref = kw.get("reference")
    assert codec.decode(prot, reference=ref) == codec.decode(plain, reference=ref)
    assert codec.inspect(prot).protected == names
    assert codec.inspect(plain).protected == []
    assert codec.inspect(prot).version == fr.PARITY_VERSION  # readers before parity refuse it
    # the parities are extra streams, not seen by the codecs; each costs ~1/k of its
    # stream (k stripes, 8 for streams of 8 x 4 KiB and more) plus a few header bytes
    h, hp = fr.parse(plain), fr.parse(prot)
    assert [s.name for s in hp.streams] == [s.name for s in h.streams]
    guarded = [s for s in hp.streams if s.protected]
    assert all(s.backup is None for s in guarded)
    par = 0
    for s in guarded:
        k = _parity_k(prot, s)
        assert k == max(1, min(8, s.stored_len // 4096))
        assert s.parity.stored_len == 1 + 4 * k + -(-s.stored_len // k)
        par += s.parity.stored_len
    assert len(plain) + par < len(prot) <= len(plain) + par + 24 * len(names)
    if case == "f16 planes":  # its top byte, 45 KB here: 8 stripes, +12.6 % (a copy: +100 %)
        (s,) = guarded
        assert _parity_k(prot, s) == 8 and s.parity.stored_len <= s.stored_len / 8 + 40


@pytest.mark.parametrize("case", CASES)
def test_damage_within_one_stripe_is_rebuilt_from_the_parity(case):
    dtype, data, kw, names = CASES[case]
    ref = kw.get("reference")
    want = codec.decode(_encode(case, protect=False), reference=ref)
    prot = _encode(case)
    plain = _encode(case, protect=False)
    for s in fr.parse(prot).streams:
        if not s.protected or s.stored_len == 0:
            continue
        k = _parity_k(prot, s)
        m = -(-s.stored_len // k)
        for i in range(k):  # any one stripe, at its first, middle and last byte
            for at in (i * m, min(i * m + m // 2, s.stored_len - 1),
                       min((i + 1) * m, s.stored_len) - 1):
                assert codec.decode(_flip(prot, s, at), reference=ref) == want, (s.name, i, at)
        burst = bytearray(prot)  # a whole stripe overwritten (a bad sector, say)
        burst[s.offset:s.offset + min(m, s.stored_len)] = bytes(min(m, s.stored_len))
        assert codec.decode(bytes(burst), reference=ref) == want, s.name
        assert codec.decode(_flip(prot, s.parity), reference=ref) == want, s.name
        beyond = [_flip(_flip(prot, s), s.parity)]  # the stream and its parity
        if k > 1:  # two stripes
            beyond.append(_flip(_flip(prot, s, 0), s, s.stored_len - 1))
        for bad in beyond:
            with pytest.raises(codec.FrameError) as e:
                codec.decode(bad, reference=ref)
            assert s.name in e.value.damaged
        # the same damage without protection is an error, never wrong bytes
        ps = next(x for x in fr.parse(plain).streams if x.name == s.name)
        with pytest.raises(codec.FrameError):
            codec.decode(_flip(plain, ps), reference=ref)


@pytest.mark.parametrize("case", CASES)
def test_frames_with_copies_still_read_around_damage_to_either(case):
    """Protected frames written before parity carry a second copy (``X~``) instead."""
    dtype, data, kw, names = CASES[case]
    ref = kw.get("reference")
    want = codec.decode(_encode(case, protect=False), reference=ref)
    prot = _encode(case, scheme="copy")
    assert codec.inspect(prot).version == fr.FORMAT_VERSION
    assert codec.inspect(prot).protected == names
    for s in fr.parse(prot).streams:
        if s.backup is None or s.stored_len == 0:
            continue
        assert s.parity is None
        assert codec.decode(_flip(prot, s), reference=ref) == want, s.name
        assert codec.decode(_flip(prot, s.backup), reference=ref) == want, s.name
        with pytest.raises(codec.FrameError) as e:
            codec.decode(_flip(_flip(prot, s), s.backup), reference=ref)
        assert s.name in e.value.damaged


@settings(max_examples=60, deadline=None)
@given(n=st.integers(256, 300_000), seed=st.integers(0, 2**32 - 1),
       where=st.floats(0, 1, exclude_max=True), burst=st.integers(1, 5000))
def test_any_damage_inside_one_stripe_reads_back_exact(n, seed, where, burst):
    """fp16 weights of any length (so protected streams of any size and stripe count):
    a burst of garbage anywhere inside one stripe of the protected stream is repaired."""
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(n) * 0.05).astype(np.float16).tobytes()
    prot = codec.encode(data, "F16", protect=True)
    guarded = [x for x in fr.parse(prot).streams if x.protected]
    assume(guarded)  # (a chunk that codes no better than raw is stored raw, unguarded)
    (s,) = guarded
    k = _parity_k(prot, s)
    m = -(-s.stored_len // k)
    at = int(where * s.stored_len)
    end = min(at + burst, (at // m + 1) * m, s.stored_len)  # not past its stripe
    bad = bytearray(prot)
    bad[s.offset + at:s.offset + end] = rng.integers(0, 256, end - at, dtype=np.uint8).tobytes()
    assert codec.decode(bytes(bad)) == data
    mended, names = fr.mend(bytes(bad))
    assert (mended, names) == ((prot, ["byte1"]) if bytes(bad) != prot else (prot, []))


def test_damage_outside_the_protected_streams_is_still_an_error_but_fidelity_reads():
    prot = codec.encode(W.tobytes(), "F32", bound="native", protect=True)
    low = fr.parse(prot).streams[-1]  # the lowest ELF plane: not copied
    assert not low.protected
    bad = _flip(prot, low)
    with pytest.raises(codec.FrameError):
        codec.decode(bad)
    approx = np.frombuffer(codec.decode(bad, fidelity=7), np.float32)
    assert np.abs(approx - W).max() < 2 ** -7


@pytest.mark.parametrize("dtype,data", [(None, W), ("I32", W.view(np.int32))])
def test_frames_without_a_sign_exponent_stream_are_left_alone(dtype, data):
    plain = codec.encode(data.tobytes(), dtype)
    assert codec.encode(data.tobytes(), dtype, protect=True) == plain


@pytest.mark.parametrize("guard", ["nothing~", "nothing^"])
def test_a_copy_or_parity_that_matches_no_stream_is_a_frame_error(guard):
    prot = codec.encode(W.tobytes(), "F32")
    h = fr.parse(prot)
    mv = memoryview(prot)
    streams = [fr.Stream(s.name, s.method, s.raw_len, mv[s.offset:s.offset + s.stored_len])
               for s in h.streams]
    streams.append(fr.Stream(guard, 0, 3, b"abc"))
    bad = fr.pack(h.codec, h.dtype_id, h.raw_size, h.params, streams, h.content_hash,
                  version=fr.PARITY_VERSION)
    with pytest.raises(codec.FrameError, match="copy" if guard.endswith("~") else "parity"):
        codec.decode(bad)


@pytest.mark.parametrize("scheme", ["parity", "copy"])
@pytest.mark.parametrize("which", ["primary", "guard", "both"])
def test_mend_rewrites_what_is_damaged_from_what_is_intact(scheme, which):
    prot = _protect(codec.encode(W.tobytes(), "F32", bound="native"), W.size, scheme)
    s = fr.parse(prot).streams[2]  # q0, the top ELF plane
    assert s.name == "q0" and s.protected
    guard = s.parity if scheme == "parity" else s.backup
    bad = prot
    if which in ("primary", "both"):
        bad = _flip(bad, s)
    if which in ("guard", "both"):
        bad = _flip(bad, guard)
    mended, names = fr.mend(bad)
    if which == "both":
        assert (mended, names) == (bad, [])
    else:
        assert (mended, names) == (prot, ["q0"])
    assert fr.mend(prot) == (prot, [])


@pytest.mark.parametrize("scheme", ["parity", "copy"])
def test_protected_delta_with_split_planes_keeps_every_bucket_stream(monkeypatch, scheme):
    """A sub+ctx+hi delta whose lower planes are split in buckets has several streams
    of one name; guarding its top planes must not drop any of them (parsing a guarded
    frame once kept one stream per name: the frame then failed to decode)."""
    from codec import xor as X
    monkeypatch.setattr(X, "_pick_transform", lambda *a, **k: X.T_SUBCTX_HI)

    def every_lower_plane(h):  # split matrix (plane, class): all but the top plane
        split = np.ones(h.shape[:2], bool)
        split[0] = False
        return split
    monkeypatch.setattr(X, "_splits", every_lower_plane)
    adam = W - (1e-4 * np.sign(RNG.standard_normal(W.size))).astype(np.float32)
    data, ref = adam.tobytes(), W.tobytes()
    plain = codec.encode(data, "F32", reference=ref)
    names = [s.name for s in fr.parse(plain).streams]
    assert len(names) > len(set(names))  # bucket streams share their plane's name
    prot = _protect(plain, W.size, scheme)
    assert [s.name for s in fr.parse(prot).streams] == names
    assert codec.decode(prot, reference=ref) == data
    for s in fr.parse(prot).streams:
        if s.protected and s.stored_len:
            assert codec.decode(_flip(prot, s), reference=ref) == data, s.name


@settings(max_examples=25, deadline=None)
@given(dt=st.sampled_from(["F32", "BF16", "F16"]), n=st.integers(1000, 200_000),
       seed=st.integers(0, 2**32 - 1), delta=st.sampled_from([None, "steps", "decay"]))
def test_any_protected_frame_decodes_like_its_unprotected_twin(dt, n, seed, delta):
    """Weights of any size, alone or as a delta (Adam-like steps everywhere, or only in
    some rows while the others decay: split planes): the protected frame decodes to the
    same bytes as the unprotected one, and a flipped byte in any guarded stream is
    repaired."""
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal(n) * 0.05).astype(np.float32)
    new = ref.copy()
    if delta == "steps":
        new -= (1e-4 * np.sign(rng.standard_normal(n))).astype(np.float32)
    elif delta == "decay":
        rows = (rng.random(n // 64 + 1) < 0.3).repeat(64)[:n]
        new = new * np.float32(1 - 2e-7)
        new[rows] -= (1e-4 * np.sign(rng.standard_normal(int(rows.sum())))).astype(np.float32)

    def as_dt(x):
        if dt == "BF16":
            return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        return x.astype(np.float16 if dt == "F16" else np.float32).tobytes()
    data, r = as_dt(new), (as_dt(ref) if delta else None)
    plain = codec.encode(data, dt, reference=r)
    prot = codec.encode(data, dt, reference=r, protect=True)
    assert codec.decode(prot, reference=r) == codec.decode(plain, reference=r) == data
    for s in fr.parse(prot).streams:
        if s.protected and s.stored_len:
            assert codec.decode(_flip(prot, s), reference=r) == data, s.name
