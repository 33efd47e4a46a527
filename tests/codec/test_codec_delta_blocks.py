"""xor's sub+blocks transform (deltas grouped by their block's width): exact on every
2/4-byte dtype and chunk length, written where whole rows only decay, and damaged
frames raise."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import xor as X
from codec.frame import Stream, parse
from framekit import assert_flips_raise, repack

SET = settings(max_examples=40, deadline=None)
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I16": 2, "U32": 4}


def _forced(t, data, dt, ref):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(X, "_pick_transform", lambda mv, r, d, level, trials=None: t)
        mp.setattr(X, "estimate_scale", lambda mv, r, d: 1.0)
        return codec.encode(data, dt, codec="xor", reference=ref)


def _rows(n_rows: int, seed: int, touched: float = 0.3) -> tuple[bytes, bytes]:
    """fp32 weights where most rows barely move (a few units in the last place) and the
    touched rows take steps in proportion to their size: the word embeddings of a
    training checkpoint, as far as block widths see them."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 0.05, (n_rows, 384)).astype(np.float32)
    new = ref + rng.normal(0, 2e-9, ref.shape).astype(np.float32)  # a few units in the last place
    seen = rng.random(n_rows) < touched
    step = 1 + 1e-3 * rng.normal(0, 1, (int(seen.sum()), 384))  # steps in proportion
    new[seen] = (ref[seen] * step).astype(np.float32)
    return new.tobytes(), ref.tobytes()


@SET
@given(st.sampled_from(sorted(SIZES)), st.integers(0, 3000), st.integers(0, 2**32 - 1),
       st.sampled_from(["random", "close", "same", "rows"]))
def test_blocks_roundtrip_exact(dt, n, seed, kind):
    """Any 2/4-byte dtype, any length (a short last block), random bits (NaN payloads,
    infinities, subnormals included), deltas of every width, identical data."""
    rng = np.random.default_rng(seed)
    size = SIZES[dt]
    ut = {2: np.uint16, 4: np.uint32}[size]
    ref = rng.integers(0, 2 ** (8 * size), n, dtype=np.uint64).astype(ut)
    if kind == "random":
        x = rng.integers(0, 2 ** (8 * size), n, dtype=np.uint64).astype(ut)
    elif kind == "same":
        x = ref.copy()
    else:  # small deltas, in runs of rows that only decay (rows) or everywhere (close)
        d = rng.integers(-300, 300, n)
        if kind == "rows":
            d[(np.arange(n) // 200) % 3 == 0] = 0
        x = (ref.astype(np.int64) + d).astype(ut)
    data, r = x.tobytes(), ref.tobytes()
    frame = _forced(X.T_SUB_BLOCKS, data, dt, r)
    if n:
        assert parse(frame).params[9] == X.T_SUB_BLOCKS
    assert codec.decode(frame, reference=r) == data


def test_blocks_are_chosen_where_rows_only_decay(monkeypatch):
    """Decaying rows beside stepping rows: sub+blocks is written (without sub+ctx's
    per-element gather) and is smaller than plain sub."""
    data, ref = _rows(800, 1)
    frame = codec.encode(data, "F32", reference=ref)
    assert parse(frame).params[9] == X.T_SUB_BLOCKS
    sub = _forced(X.T_SUB, data, "F32", ref)
    assert len(frame) < 0.97 * len(sub), (len(frame), len(sub))
    assert codec.decode(frame, reference=ref) == data
    # all-zero blocks cost nothing but their width byte
    same = codec.encode(ref, "F32", codec="xor", reference=ref)
    assert len(_forced(X.T_SUB_BLOCKS, ref, "F32", ref)) < 200 and codec.decode(
        same, reference=ref) == ref


def test_damaged_blocks_frames_raise():
    data, ref = _rows(60, 2)
    frame = _forced(X.T_SUB_BLOCKS, data, "F32", ref)
    assert codec.decode(repack(frame), reference=ref) == data  # the repacking is faithful
    h = parse(frame)
    bad_params = [h.params[:-3] + struct.pack("<HB", 0, 2),  # block size 0
                  h.params[:-3] + struct.pack("<HB", 64, 2),  # another block size
                  h.params[:-1] + bytes([0]),  # width step 0
                  h.params[:-1] + bytes([1]),  # another width step
                  h.params[:-1]]  # short
    for p in bad_params:
        with pytest.raises(codec.FrameError):
            codec.decode(repack(frame, params=p), reference=ref)

    def widths_to(value):
        def edit(ss):
            w = bytearray(ss[0].stored)
            w[0] = value
            return [Stream("widths", 0, len(w), bytes(w))] + ss[1:]
        return edit
    for edit in (widths_to(200), widths_to(0), lambda ss: ss[:-1], lambda ss: ss[1:],
                 lambda ss: ss[:1] + ss[2:] + ss[1:2]):
        with pytest.raises(codec.FrameError):
            codec.decode(repack(frame, streams=edit), reference=ref)
    assert_flips_raise(frame, ref)


def test_protect_guards_the_widths_and_every_top_plane():
    """Streams come most significant first (every class's top plane, then the next), so
    `protect` guards the widths and each class's top byte; damage to one of them is
    read around."""
    data, ref = _rows(800, 1)
    frame = codec.encode(data, "F32", reference=ref, protect=True)
    h = parse(frame)
    assert h.params[9] == X.T_SUB_BLOCKS
    tops = {}
    for s in h.streams:
        k, j = s.name[1:].split(".byte") if s.name != "widths" and "^" not in s.name \
            else (None, None)
        if k is not None:
            tops[k] = max(tops.get(k, -1), int(j))
    assert codec.inspect(frame).protected == ["widths"] + [f"w{k}.byte{j}" for k, j in
                                                            tops.items()]
    for s in h.streams:
        if s.name in ("widths", "w5.byte1"):
            bad = bytearray(frame)
            bad[s.offset + s.stored_len // 2] ^= 0x5A
            assert codec.decode(bytes(bad), reference=ref) == data


def test_protect_guards_a_delta_of_top_bytes_only_whole():
    """bf16 rows that barely move (deltas under 8 bits, rows of zeros): every stream of
    the sub+blocks frame is a top byte, and all of them get a parity (other frames made
    of leading streams only, such as one zstd stream, are left as they are)."""
    rng = np.random.default_rng(3)
    ref = rng.integers(0x3C00, 0x3D00, 200 * 384).astype(np.uint16)
    row = np.arange(ref.size) // 384
    d = np.where(row % 3 == 0, 0, np.where(row % 3 == 1, rng.integers(-2, 3, ref.size),
                                           rng.integers(-100, 100, ref.size)))
    data, r = (ref.astype(np.int64) + d).astype(np.uint16).tobytes(), ref.tobytes()
    frame = codec.encode(data, "BF16", reference=r, protect=True)
    h = parse(frame)
    assert h.params[9] == X.T_SUB_BLOCKS
    assert codec.inspect(frame).protected == [s.name for s in h.streams]
    for s in h.streams:
        bad = bytearray(frame)
        bad[s.offset + s.stored_len // 2] ^= 0x5A
        assert codec.decode(bytes(bad), reference=r) == data
