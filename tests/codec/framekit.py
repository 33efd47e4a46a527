"""Helpers for tests that take frames apart: rebuild one with other parameters or
streams, and check that flipped bytes never decode."""
import numpy as np
import pytest

import codec
from codec.frame import Stream, pack, parse, stream_view


def repack(frame: bytes, params: bytes | None = None, streams=None) -> bytes:
    """``frame`` packed again (a delta frame), with ``params`` instead of its own and
    ``streams(its streams)`` instead of its streams (Stream objects holding their bytes)."""
    h = parse(frame)
    ss = [Stream(s.name, s.method, s.raw_len, bytes(stream_view(frame, s))) for s in h.streams]
    return pack(h.codec, h.dtype_id, h.raw_size, h.params if params is None else params,
                ss if streams is None else streams(ss), h.content_hash, needs_reference=True)


def assert_flips_raise(frame: bytes, reference: bytes, n: int = 300, seed: int = 0) -> None:
    """``n`` frames with one byte flipped at a random place each: every decode raises."""
    rng = np.random.default_rng(seed)
    for pos in rng.integers(0, len(frame), n):
        bad = bytearray(frame)
        bad[pos] ^= int(rng.integers(1, 256))
        with pytest.raises(codec.FrameError):
            codec.decode(bytes(bad), reference=reference)
