"""The byte shuffle for opaque bytes: exact at every stride, length and rotation; the
selector takes it for arrays in files we do not parse (and only there); damaged
frames raise FrameError."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import shuffle
from codec.frame import hash64, pack, parse

SET = settings(max_examples=40, deadline=None)


def _floats(n: int, dtype=np.float32, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).normal(0, 0.02, n).astype(dtype).tobytes()


@SET
@given(st.sampled_from(shuffle.STRIDES), st.integers(0, 5000), st.integers(0, 2**32 - 1),
       st.sampled_from(["floats", "random", "const", "ints"]))
def test_roundtrip_every_stride_and_length(k, n, seed, kind):
    rng = np.random.default_rng(seed)
    data = {"floats": lambda: _floats(n // 4 + 2, seed=seed)[:n],
            "random": lambda: rng.integers(0, 256, n, dtype=np.uint8).tobytes(),
            "const": lambda: bytes([seed % 256]) * n,
            "ints": lambda: rng.integers(0, 1000, n // 8 + 1).astype("<i8").tobytes()[:n]}[kind]()
    frame = codec.encode(data, None, codec="shuffle")  # default stride 4
    assert codec.decode(frame) == data
    frame = codec.get_codec("shuffle", stride=k).encode(data)
    assert codec.decode(frame) == data
    assert parse(frame).params == bytes([k]) + data[len(data) - len(data) % k:]


@pytest.mark.parametrize("dtype,k", [(np.float32, 4), (np.float16, 2), (np.float64, 8)])
@pytest.mark.parametrize("rotation", [0, 1, 3])
def test_arrays_in_opaque_bytes_are_shuffled_and_smaller_than_zstd(dtype, k, rotation):
    """A content-defined chunk starts anywhere inside a record: every rotation of the
    lanes is found and codes smaller than zstd, exactly."""
    data = _floats(120000, dtype)[rotation:rotation + 250001]
    frame = codec.encode(data, None)
    info = codec.inspect(frame)
    assert (info.codec, parse(frame).params[0]) == ("shuffle", k)
    assert len(frame) < 0.95 * len(codec.encode(data, None, codec="zstd"))
    assert codec.decode(frame) == data


def test_bytes_without_records_keep_zstd_or_raw():
    rng = np.random.default_rng(1)
    words = [w.encode() for w in "the a weights of model tensor checkpoint store file "
             "chunk read write byte float entropy lane stride sample zstd frame".split()]
    text = b" ".join(rng.choice(words, 60000).tolist()).replace(b"e t", b"e\nt")
    assert shuffle.probe(memoryview(text)) == 1
    assert codec.inspect(codec.encode(text, None)).codec == "zstd"
    noise = rng.integers(0, 256, 300000, dtype=np.uint8).tobytes()
    assert shuffle.probe(memoryview(noise)) == 1
    assert codec.inspect(codec.encode(noise, None)).codec == "raw"
    small = _floats(1000)  # below SHUFFLE_MIN: not probed
    assert codec.inspect(codec.encode(small[:4000], None)).codec != "shuffle"


def test_repeated_records_still_get_zstd_when_it_wins():
    """A block of records repeated many times: lanes show structure, but zstd's
    matches win; the selector keeps the smaller."""
    block = _floats(2000)
    data = block * 40
    auto = codec.encode(data, None)
    assert len(auto) <= len(codec.encode(data, None, codec="zstd"))
    assert codec.decode(auto) == data


@pytest.mark.parametrize("kind", ["records then csv", "periodic text"])
def test_the_selector_never_picks_a_larger_shuffle(kind):
    """Content whose lanes look like records but whose repeats zstd codes: auto is no
    larger than either coding."""
    if kind == "records then csv":
        data = _floats(30000) + b"".join(b"%d,%d\n" % (i, i * i) for i in range(20000))
    else:  # lines of nearly equal length: lanes show structure, lines repeat
        data = b"".join(b"line %d: the quick brown fox jumps over %d lazy dogs\n" % (i, i * 7)
                        for i in range(6000))
    k = shuffle.probe(memoryview(data))
    assert k > 1
    auto = codec.encode(data, None)
    assert codec.decode(auto) == data
    assert len(auto) <= min(len(codec.encode(data, None, codec="zstd")),
                            len(codec.get_codec("shuffle", stride=k).encode(data)))


@pytest.mark.parametrize("case", ["stride", "tail", "lane length", "lane count"])
def test_inconsistent_tables_are_frame_errors(case):
    data = _floats(3000)[:11999]  # 3 tail bytes at stride 4
    params, streams = shuffle.shuffle_streams(memoryview(data), 4, 3)
    raw_size = len(data)
    assert codec.decode(pack("shuffle", 0, raw_size, params, streams, hash64(data))) == data
    if case == "stride":
        params = bytes([3]) + params[1:]
    elif case == "tail":
        params = params[:-1]
    elif case == "lane length":
        streams[1].raw_len -= 1
    else:
        streams = streams[:3]
    with pytest.raises(codec.FrameError, match="shuffle frame"):
        codec.decode(pack("shuffle", 0, raw_size, params, streams, hash64(data)))
