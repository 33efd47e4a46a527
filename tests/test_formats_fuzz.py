"""Corrupted, truncated and lying model files: the parsers never raise and always cover the file."""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elvesfs.formats import ParsedFile, dtype_itemsize, parse
from elvesfs.formats.pickle_walk import FormatError, find_storages, walk

FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def check(blob: bytes) -> ParsedFile:
    """parse() must not raise, must not touch the bytes, and must cover [0, size) exactly."""
    before = bytes(blob)
    f = io.BytesIO(blob)
    p = parse(f, len(blob))
    assert f.getvalue() == before
    pos = 0
    for s in p.segments:
        assert s.offset == pos and s.length > 0 and s.kind in ("bytes", "tensor")
        if s.kind == "tensor" and s.shape is not None and dtype_itemsize(s.dtype or "") is not None:
            assert s.length == math.prod(s.shape) * dtype_itemsize(s.dtype), s  # whole elements
        pos += s.length
    assert pos == len(blob)
    if p.format == "plain":
        assert len(p.segments) == (1 if blob else 0)
    return p


# ---------------------------------------------------------------- fixtures (built once)


@functools.cache
def safetensors_blob() -> bytes:
    from safetensors.numpy import save

    rng = np.random.default_rng(1)
    return save(
        {
            "w": rng.standard_normal((4, 6)).astype(np.float32),
            "b": rng.standard_normal(6).astype(np.float16),
            "ids": np.arange(5, dtype=np.int64),
            "e": np.zeros((0,), dtype=np.float32),
        },
        metadata={"format": "pt"},
    )


@functools.cache
def gguf_blob() -> bytes:
    import tempfile
    from pathlib import Path

    import zoo
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as d:
        return zoo.write_gguf(Path(d) / "m.gguf", {
            "w": rng.standard_normal((4, 8)).astype(np.float32),
            "h": rng.standard_normal(16).astype(np.float16),
            "q": (rng.standard_normal((2, 32)).astype(np.float32), "Q8_0"),
        }, vocab=5).read_bytes()


def _torch_state():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 5)).sum().backward()
    opt.step()
    return torch, {"model": m.state_dict(), "optimizer": opt.state_dict(), "h": torch.ones(3).half()}


@functools.cache
def zip_blob() -> bytes:
    torch, obj = _torch_state()
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@functools.cache
def legacy_blob() -> bytes:
    torch, obj = _torch_state()
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def boundaries(blob: bytes) -> set[int]:
    p = parse(io.BytesIO(blob), len(blob))
    cuts = set()
    for s in p.segments:
        for d in (-1, 0, 1):
            cuts.update((s.offset + d, s.offset + s.length + d))
    return {c for c in cuts if 0 <= c < len(blob)}


# ---------------------------------------------------------------- random inputs


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06", LEGACY_MAGIC, b"\x80\x02", b"\x10\0\0\0\0\0\0\0{",
                            b"GGUF\x03\0\0\0"]),
    body=st.binary(max_size=600),
)
def test_random_bytes(prefix: bytes, body: bytes) -> None:
    check(prefix + body)


@FUZZ
@given(st.binary(max_size=400))
def test_pickle_walker_only_raises_format_error(data: bytes) -> None:
    try:
        root, end = walk(b"\x80\x02" + data)
    except FormatError:
        return
    assert 0 < end <= len(data) + 2
    find_storages(root)


def test_deeply_nested_pickle() -> None:
    """Deep nesting must not hit Python's recursion limit."""
    n = 50_000
    data = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    root, end = walk(data)
    assert end == len(data)
    assert find_storages(root) == {}


# ---------------------------------------------------------------- safetensors


def test_safetensors_every_truncation() -> None:
    blob = safetensors_blob()
    assert check(blob).format == "safetensors"
    for n in range(len(blob)):
        assert check(blob[:n]).format == "plain", n


@FUZZ
@given(pos=st.integers(min_value=0), val=st.integers(min_value=0, max_value=255))
def test_safetensors_header_byte_flips(pos: int, val: int) -> None:
    blob = bytearray(safetensors_blob())
    hdr_end = 8 + struct.unpack_from("<Q", blob)[0]
    blob[pos % hdr_end] = val
    check(bytes(blob))


@pytest.mark.parametrize("n", [2**64 - 1, 2**63, 100 * 1024 * 1024 + 1, 0, 1, 10**9])
def test_safetensors_huge_or_tiny_header_length(n: int) -> None:
    blob = bytearray(safetensors_blob())
    struct.pack_into("<Q", blob, 0, n)
    assert check(bytes(blob)).format == "plain"


_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "XX", "F4"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=9), max_size=3),
        "data_offsets": st.lists(st.integers(min_value=-4, max_value=140), min_size=0, max_size=3),
    }
)


@FUZZ
@given(entries=st.dictionaries(st.text(max_size=6), _entry, max_size=5), data_len=st.integers(0, 128))
def test_safetensors_lying_headers(entries: dict, data_len: int) -> None:
    hdr = json.dumps(entries).encode()
    blob = struct.pack("<Q", len(hdr)) + hdr + bytes(range(256))[:data_len]
    p = check(blob)
    if p.format == "safetensors":  # accepted: every tensor matches its (valid) entry
        base = 8 + len(hdr)
        for s in p.segments:
            if s.kind == "tensor":
                e = entries[s.name]
                assert s.offset == base + e["data_offsets"][0]
                assert s.length == e["data_offsets"][1] - e["data_offsets"][0]


def test_safetensors_overlap_and_out_of_range() -> None:
    blob = safetensors_blob()
    n = struct.unpack_from("<Q", blob)[0]
    hdr = json.loads(blob[8 : 8 + n])
    for name, mutate in [
        ("overlap", lambda h: h["b"].update(data_offsets=h["w"]["data_offsets"][:1] + [h["w"]["data_offsets"][0] + 12])),
        ("past end", lambda h: h["ids"].update(data_offsets=[10**6, 10**6 + 40])),
        ("negative", lambda h: h["ids"].update(data_offsets=[-40, 0])),
    ]:
        h = json.loads(json.dumps(hdr))
        mutate(h)
        raw = json.dumps(h).encode()
        bad = struct.pack("<Q", len(raw)) + raw + blob[8 + n :]
        p = check(bad)
        assert p.format == "plain", name


# ---------------------------------------------------------------- GGUF


def test_gguf_every_truncation() -> None:
    blob = gguf_blob()
    assert check(blob).format == "gguf"
    last = max(s.offset + s.length for s in check(blob).segments if s.kind == "tensor")
    for n in range(len(blob)):
        assert check(blob[:n]).format == ("gguf" if n >= last else "plain"), n


@FUZZ
@given(pos=st.integers(min_value=0), val=st.integers(min_value=0, max_value=255))
def test_gguf_header_byte_flips(pos: int, val: int) -> None:
    blob = bytearray(gguf_blob())
    first = min(s.offset for s in check(bytes(blob)).segments if s.kind == "tensor")
    blob[pos % first] = val
    check(bytes(blob))


# ---------------------------------------------------------------- torch zip


def test_zip_truncations() -> None:
    blob = zip_blob()
    assert check(blob).format == "torch-zip"
    cuts = boundaries(blob) | set(range(0, len(blob), 97)) | {len(blob) - 22, len(blob) - 1}
    for n in sorted(cuts):
        if n < len(blob):
            assert check(blob[:n]).format == "plain", n


def _central_dir(blob: bytes) -> tuple[int, int]:
    eocd = blob.rindex(b"PK\x05\x06")
    size, off = struct.unpack_from("<LL", blob, eocd + 12)
    return off, off + size


@FUZZ
@given(pos=st.integers(min_value=0), val=st.integers(0, 255))
def test_zip_central_directory_flips(pos: int, val: int) -> None:
    blob = bytearray(zip_blob())
    start, end = _central_dir(bytes(blob))
    region = list(range(start, end)) + list(range(len(blob) - 22, len(blob)))
    blob[region[pos % len(region)]] = val
    check(bytes(blob))


@FUZZ
@given(pos=st.integers(min_value=0), val=st.integers(0, 255))
def test_zip_local_header_flips(pos: int, val: int) -> None:
    blob = bytearray(zip_blob())
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as z:
        heads = [i.header_offset for i in z.infolist()]
    at = heads[pos % len(heads)] + (pos // len(heads)) % 30
    blob[at] = val
    check(bytes(blob))


def test_zip_lying_header_offset() -> None:
    """A central directory entry pointing into another entry's bytes is rejected."""
    blob = bytearray(zip_blob())
    start, end = _central_dir(bytes(blob))
    entries = []
    p = start
    while p < end and blob[p : p + 4] == b"PK\x01\x02":
        nlen, elen, clen = struct.unpack_from("<HHH", blob, p + 28)
        entries.append(p)
        p += 46 + nlen + elen + clen
    assert len(entries) > 3
    first_off = struct.unpack_from("<L", blob, entries[0] + 42)[0]
    struct.pack_into("<L", blob, entries[3] + 42, first_off)
    assert check(bytes(blob)).format == "plain"


def _rezip(blob: bytes, pkl: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as zi, zipfile.ZipFile(out, "w") as zo:
        for info in zi.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else zi.read(info)
            zo.writestr(info.filename, data)
    return out.getvalue()


@FUZZ
@given(pos=st.integers(min_value=0), val=st.integers(0, 255), cut=st.booleans())
def test_zip_corrupt_data_pkl(pos: int, val: int, cut: bool) -> None:
    blob = zip_blob()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        pkl = bytearray(z.read(name))
    i = pos % len(pkl)
    if cut:
        pkl = pkl[:i]
    else:
        pkl[i] = val
    check(_rezip(blob, bytes(pkl)))


def test_zip_pickle_lies_about_numel() -> None:
    """A storage whose recorded size disagrees with its entry stays bytes; the rest still parses."""
    blob = zip_blob()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        pkl = z.read(name)
    # first storage pid: ... BINUNICODE 'cpu' BINPUT n BININT1 <numel> TUPLE
    i = pkl.index(b"cpu") + 3
    assert pkl[i : i + 1] == b"q" and pkl[i + 2 : i + 3] == b"K"
    bad = pkl[: i + 3] + bytes([pkl[i + 3] + 1]) + pkl[i + 4 :]
    p = check(_rezip(blob, bad))
    assert p.format == "torch-zip"
    good = check(_rezip(blob, pkl))
    assert sum(s.kind == "tensor" for s in p.segments) == sum(s.kind == "tensor" for s in good.segments) - 1


# ---------------------------------------------------------------- legacy


def test_legacy_every_truncation() -> None:
    blob = legacy_blob()
    assert check(blob).format == "torch-legacy"
    for n in range(0, len(blob), 3):
        assert check(blob[:n]).format == "plain", n


@FUZZ
@given(pos=st.integers(min_value=0), val=st.integers(0, 255))
def test_legacy_byte_flips(pos: int, val: int) -> None:
    blob = bytearray(legacy_blob())
    blob[pos % len(blob)] = val
    check(bytes(blob))


def test_legacy_lying_storage_count() -> None:
    blob = bytearray(legacy_blob())
    p = parse(io.BytesIO(bytes(blob)), len(blob))
    first = next(s for s in p.segments if s.kind == "tensor")
    struct.pack_into("<Q", blob, first.offset - 8, 10**12)
    assert check(bytes(blob)).format == "plain"


# ---------------------------------------------------------------- random state dicts, real writers

_HAS_TORCH = __import__("importlib.util").util.find_spec("torch") is not None
_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"]
_state_dicts = st.dictionaries(
    st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True),
    st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3)),
    min_size=1,
    max_size=6,
)


@pytest.mark.skipif(not _HAS_TORCH, reason="needs torch")
@settings(max_examples=25, deadline=None, database=None)
@given(spec=_state_dicts, fmt=st.sampled_from(["zip", "legacy", "safetensors"]))
def test_random_state_dicts_roundtrip_segments(spec: dict, fmt: str) -> None:
    """Whatever a real writer produces, every tensor segment holds exactly that tensor's bytes."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(len(spec))
    sd = {k: (torch.randn(shape, generator=g) * 4).to(getattr(torch, dt)) for k, (dt, shape) in spec.items()}
    if fmt == "safetensors":
        blob = save(sd)
    else:
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=fmt == "zip")
        blob = buf.getvalue()
    p = check(blob)
    assert p.format == {"zip": "torch-zip", "legacy": "torch-legacy", "safetensors": "safetensors"}[fmt], p.note
    segs = {s.name: s for s in p.segments if s.kind == "tensor"}
    assert set(segs) == {k for k, t in sd.items() if t.numel()}
    for name, s in segs.items():
        t = sd[name]
        assert blob[s.offset : s.offset + s.length] == t.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert s.length == t.numel() * t.element_size()
        assert s.shape == tuple(t.shape)


# ------------------------------------------------- planning a file still being written


def prefix_plan(blob: bytes, available: int, tmp_path) -> tuple[str, list | None]:
    from elvesfs.formats import parse_prefix
    path = tmp_path / "growing"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        return parse_prefix(f, available)


@pytest.mark.parametrize("make", [safetensors_blob, zip_blob, legacy_blob, gguf_blob])
def test_prefix_plan_agrees_with_the_final_parse(make, tmp_path) -> None:
    """What parse_prefix() plans from any prefix is what parse() finds in the whole file
    (the pre-seal relies on it only for speed, but a wrong plan would waste its work)."""
    blob = make()
    final = {(s.offset, s.length, s.name, s.dtype, s.role)
             for s in parse(io.BytesIO(blob), len(blob)).segments if s.kind == "tensor"}
    planned = 0
    for cut in sorted(boundaries(blob) | {len(blob)}):
        kind, segs = prefix_plan(blob, cut, tmp_path)
        assert kind in ("plain", "safetensors", "torch-zip", "gguf", "later")
        assert kind != "plain"  # a model file is never planned as plain bytes
        for s in segs or []:
            assert (s.offset, s.length, s.name, s.dtype, s.role) in final, s
            planned += 1
    if make is not legacy_blob:
        assert planned > 0


@FUZZ
@given(data=st.data())
def test_prefix_plan_never_raises_on_damaged_files(data, tmp_path_factory) -> None:
    blob = bytearray(data.draw(st.sampled_from([safetensors_blob, zip_blob, gguf_blob]))())
    for _ in range(data.draw(st.integers(0, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    kind, segs = prefix_plan(bytes(blob), cut, tmp_path_factory.mktemp("p"))
    assert kind in ("plain", "safetensors", "torch-zip", "gguf", "later")
    for s in segs or []:
        assert s.kind == "tensor" and s.offset >= 0 and s.length > 0
