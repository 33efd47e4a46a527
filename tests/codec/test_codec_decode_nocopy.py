"""decode(copy=False): the filesystem decodes frames that live in LMDB's memory map and
keeps the result in its chunk cache, so a result that aliased the frame (or the
reference) would change or vanish under it. Every codec must hand back bytes equal to
decode()'s, read-only, and independent of the buffers it was decoded from."""

import numpy as np
import pytest

import codec

RNG = np.random.default_rng(3)
W = (RNG.standard_normal(1 << 16) * 0.02).astype(np.float32)
CASES = [
    ("raw", None, RNG.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes(), None),
    ("zstd", None, b"elvesfs " * 8192, None),
    ("planes", "F32", W.tobytes(), None),
    ("planes", "BF16", (W.view(np.uint32) >> 16).astype(np.uint16).tobytes(), None),
    ("planes", "F16", W.astype(np.float16).tobytes(), None),
    ("elf", "F32", W.tobytes(), None),
    ("xor", "F32", (W + np.float32(1e-4)).tobytes(), W.tobytes()),
    ("planes", "F32", np.zeros(1 << 14, np.float32).tobytes(), None),  # constant planes
    # one raw byte plane: the decoder's array is a view of the frame itself
    ("planes", "U8", RNG.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes(), None),
    ("planes", "F8_E4M3", RNG.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes(), None),
]


@pytest.mark.parametrize("name,dtype,data,ref", CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_decode_without_copy_is_exact_read_only_and_unaliased(name, dtype, data, ref):
    bound = "native" if name == "elf" else None
    frame = bytearray(codec.encode(data, dtype, codec=name, bound=bound, reference=ref))
    refbuf = bytearray(ref) if ref is not None else None
    want = codec.decode(bytes(frame), reference=ref)
    got = codec.decode(memoryview(frame), reference=refbuf, copy=False)
    assert bytes(got) == want
    if isinstance(got, memoryview):
        assert got.readonly and got.format == "B" and got.nbytes == len(want)
    # scribble over the buffers it came from: the result must not change
    frame[:] = bytes(len(frame))
    if refbuf is not None:
        refbuf[:] = bytes(len(refbuf))
    assert bytes(got) == want


def test_decode_copy_default_returns_bytes():
    frame = codec.encode(W.tobytes(), "F32")
    assert type(codec.decode(frame)) is bytes
