"""Model files through a real mount: real writers and readers, dedup, delta, lossy policy."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402
from conftest import sha_file as sha  # noqa: E402

from elvesfs.policy import Policy  # noqa: E402



def stats(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "elvesfs.cli", "stats", "--json", str(path)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def file_stats(path: Path) -> dict:
    (f,) = stats(path)["files"]
    return f


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two real torch.save training checkpoints (model + AdamW state) a few steps apart."""
    out = tmp_path_factory.mktemp("ckpt")
    return zoo.train_checkpoints(out, steps=4, every=2)


def test_safetensors_writer_and_mmap_reader(mnt, tmp_path):
    from safetensors import safe_open
    tensors = {
        "w32": torch.randn(300, 70),
        "w16": torch.randn(64, 33).half(),
        "wbf": torch.randn(128).bfloat16(),
        "w64": torch.randn(17).double(),
        "ids": torch.arange(1000, dtype=torch.int64),
        "mask": torch.rand(50) > 0.5,
        "empty": torch.zeros(0),
    }
    ref = tmp_path / "ref.safetensors"
    safetensors_torch.save_file(tensors, str(ref), metadata={"k": "v"})
    dst = mnt.path / "m.safetensors"
    safetensors_torch.save_file(tensors, str(dst), metadata={"k": "v"})
    mnt.sync()
    assert sha(dst) == sha(ref)
    assert file_stats(dst)["format"] == "safetensors"
    mnt.remount()
    with safe_open(str(dst), framework="pt") as f:  # mmap through FUSE
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert sha(dst) == sha(ref)


def test_torch_save_and_mmap_load(mnt, checkpoints):
    dst = mnt.path / "c.pt"
    shutil.copyfile(checkpoints[0], dst)
    mnt.remount()
    assert sha(dst) == sha(checkpoints[0])
    assert file_stats(dst)["format"] == "torch-zip"
    a = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    b = torch.load(dst, map_location="cpu", weights_only=True, mmap=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_save_pretrained_sharded_and_from_pretrained(mnt):
    model = zoo.load_bert(zoo.minilm_dir())
    out = mnt.path / "bert"
    model.save_pretrained(str(out), max_shard_size="20MB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    mnt.remount()
    again = zoo.load_bert(out)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert all(file_stats(s)["format"] == "safetensors" for s in shards)


def test_same_tensors_in_bin_and_safetensors_stored_once(mnt, tmp_path):
    sd = safetensors_torch.load_file(str(zoo.minilm_safetensors()))
    st = mnt.path / "model.safetensors"
    shutil.copyfile(zoo.minilm_safetensors(), st)
    bn = mnt.path / "pytorch_model.bin"
    torch.save(sd, bn)
    mnt.sync()
    s_bn = file_stats(bn)
    tensor_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    assert s_bn["format"] == "torch-zip"
    assert s_bn["dedup_saved"] >= 0.99 * tensor_bytes
    # du charges each file half of the shared tensors: the two cost about one copy
    du = (st.stat().st_blocks + bn.stat().st_blocks) * 512
    alone = stats(st)["store"]["stored"]
    assert du <= alone * 1.02


def test_checkpoint_series_uses_delta(mnt, checkpoints):
    for c in checkpoints:
        shutil.copyfile(c, mnt.path / c.name)
        mnt.sync()
    last = file_stats(mnt.path / checkpoints[-1].name)
    assert last["delta_raw"] > 0 and last["delta_saved"] > 0
    mnt.remount()
    for c in checkpoints:
        assert sha(mnt.path / c.name) == sha(c)
    # deleting the reference never breaks a file coded against it
    os.unlink(mnt.path / checkpoints[0].name)
    mnt.remount()
    assert sha(mnt.path / checkpoints[-1].name) == sha(checkpoints[-1])


def delta_depths(store: Path) -> list[int]:
    """The delta-chain depth of every stored chunk (read beside the running daemon)."""
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.db import Database
    db = Database(str(store), readonly=True)
    try:
        with db.read() as txn:
            cs = ChunkStore(db)
            return [cs.depth(txn, bytes(k)) for k, _ in txn.cursor(db=db.t["refs"])]
    finally:
        db.close()


def test_every_version_is_a_delta_within_bounded_chains(mnt):
    """Each new version of a tensor is a delta of the newest version a read can reach
    within MAX_DELTA_DEPTH hops (with one hop: the version stored alone), never a longer
    chain. Deleting versions in any order keeps the others exact and the store consistent."""
    from conftest import check_store
    from elvesfs.chunkstore import MAX_DELTA_DEPTH
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 256, generator=g) * 0.05
    n = MAX_DELTA_DEPTH + 3
    want = {}
    for k in range(n):
        w = w + torch.randn(256, 256, generator=g) * 1e-5  # a small training step
        path = mnt.path / f"v{k}.safetensors"
        safetensors_torch.save_file({"layer.weight": w}, str(path))
        want[path.name] = sha(path)
        mnt.sync()
        new = file_stats(path)
        assert new["delta_raw"] == (0 if k == 0 else w.numel() * 4), (k, new)
        assert max(delta_depths(mnt.store)) == min(k, MAX_DELTA_DEPTH)
    mnt.remount()
    assert all(sha(mnt.path / name) == h for name, h in want.items())
    for k in dict.fromkeys([1, 0, n - 2, 2]):  # a middle version, then the reference, ...
        name = f"v{k}.safetensors"
        os.unlink(mnt.path / name)
        del want[name]
        mnt.remount()
        assert all(sha(mnt.path / name) == h for name, h in want.items())
    mnt.umount()
    assert check_store(mnt.store) == []


def test_lossless_embeddings_identical(mnt):
    model = zoo.copy_model_dir(mnt.path / "minilm")
    mnt.remount()
    for f in zoo.minilm_dir().iterdir():
        if f.is_file():
            assert sha(model / f.name) == sha(f), f.name
    np.testing.assert_array_equal(zoo.embed(model), zoo.embed(zoo.minilm_dir()))


@pytest.mark.parametrize("policy,bound", [("elf", 2.0 ** -24), ("elf=1e-4", 1e-4)])
def test_lossy_elf_keeps_embeddings_and_bound(make_mount, policy, bound):
    m = make_mount("--lossy", policy)
    model = zoo.copy_model_dir(m.path / "minilm")
    m.sync()
    s = file_stats(model / "model.safetensors")
    assert s["policy"] == str(Policy.parse(policy))
    assert s["lossy_bytes"] > 0 and 0 < s["max_error"] <= bound
    assert s["stored"] < file_stats(model / "model.safetensors")["logical"] / 1.3
    m.remount()
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        assert sha(model / name) == sha(zoo.minilm_dir() / name)
    orig = safetensors_torch.load_file(str(zoo.minilm_safetensors()))
    back = safetensors_torch.load_file(str(model / "model.safetensors"))
    for k, v in orig.items():
        err = (back[k].double() - v.double()).abs().max().item()
        assert err <= bound, (k, err)
    # the header is exact: same tensor table, same metadata
    with open(zoo.minilm_safetensors(), "rb") as a, open(model / "model.safetensors", "rb") as b:
        n = int.from_bytes(a.read(8), "little")
        assert b.read(8 + n)[8:] == a.read(n)
    e0, e1 = zoo.embed(zoo.minilm_dir()), zoo.embed(model)
    cos = (e0 * e1).sum(1) / np.linalg.norm(e0, axis=1) / np.linalg.norm(e1, axis=1)
    assert cos.min() >= 0.9999


def test_lossy_elf_on_an_fp16_model(mnt):
    """fp16 weights under the native ELF bound (2^-11): sign and q take 11 bits, coded
    as one symbol per value (codec.elf's joint layout): ~2.0x where byte planes gave
    1.90x; every value within the bound, the header exact."""
    d = mnt.path / "fp16"
    d.mkdir()
    os.setxattr(d, "user.elvesfs.policy", b"elf")
    orig = {k: v.half() for k, v in safetensors_torch.load_file(str(zoo.minilm_safetensors())).items()}
    safetensors_torch.save_file(orig, str(d / "model.safetensors"))
    mnt.sync()
    s = file_stats(d / "model.safetensors")
    assert s["policy"] == "elf" and 0 < s["max_error"] <= 2.0 ** -11
    assert s["logical"] / s["stored"] > 1.95, s
    mnt.remount()
    back = safetensors_torch.load_file(str(d / "model.safetensors"))
    for k, v in orig.items():
        assert (back[k].double() - v.double()).abs().max().item() <= 2.0 ** -11, k


def test_lossy_never_touches_optimizer_state_or_integers(make_mount, checkpoints):
    m = make_mount("--lossy", "elf=1e-3")
    dst = m.path / "c.pt"
    shutil.copyfile(checkpoints[0], dst)
    m.remount()
    a = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    b = torch.load(dst, map_location="cpu", weights_only=True)
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert b["step"] == a["step"]
    errs = [(a["model"][k].double() - b["model"][k].double()).abs().max().item()
            for k in a["model"] if a["model"][k].is_floating_point()]
    assert max(errs) <= 1e-3
    for k, v in a["model"].items():
        if not v.is_floating_point():
            assert torch.equal(v, b["model"][k]), k
    stats = file_stats(dst)
    assert stats["lossy_bytes"] > 0, stats


def test_directory_policy_is_inherited(mnt):
    d = mnt.path / "lossy"
    d.mkdir()
    os.setxattr(d, "user.elvesfs.policy", b"elf=1e-3")
    (d / "sub").mkdir()
    assert os.getxattr(d / "sub", "user.elvesfs.policy") == b"elf=1e-3"
    with pytest.raises(OSError):
        os.setxattr(d, "user.elvesfs.policy", b"gzip-please")
    w = {"layer.weight": torch.randn(256, 256) * 0.05}
    safetensors_torch.save_file(w, str(d / "sub" / "w.safetensors"))
    safetensors_torch.save_file(w, str(mnt.path / "exact.safetensors"))
    mnt.sync()
    assert file_stats(d / "sub" / "w.safetensors")["policy"] == "elf=0.001"
    assert file_stats(mnt.path / "exact.safetensors")["policy"] == "lossless"
    back = safetensors_torch.load_file(str(d / "sub" / "w.safetensors"))["layer.weight"]
    assert (back - w["layer.weight"]).abs().max().item() <= 1e-3
    exact = safetensors_torch.load_file(str(mnt.path / "exact.safetensors"))["layer.weight"]
    assert torch.equal(exact, w["layer.weight"])


def test_malformed_model_files_are_stored_as_plain_bytes(mnt, tmp_path):
    good = tmp_path / "g.safetensors"
    safetensors_torch.save_file({"a": torch.randn(1000)}, str(good))
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    cases = {
        "truncated.safetensors": raw[: len(raw) // 2],
        "bad_len.safetensors": (10 ** 12).to_bytes(8, "little") + raw[8:],
        "bad_json.safetensors": raw[:8] + b"{" * n + raw[8 + n:],
        "lying_offsets.safetensors": raw[:8] + raw[8:8 + n].replace(b"4000", b"9000") + raw[8 + n:],
        "not_a_zip.pt": b"PK\x03\x04" + os.urandom(5000),
    }
    for name, data in cases.items():
        (mnt.path / name).write_bytes(data)
    mnt.remount()
    for name, data in cases.items():
        assert (mnt.path / name).read_bytes() == data, name
        assert file_stats(mnt.path / name)["format"] == "plain", name


def test_exact_file_delta_coded_against_a_lossy_reference_stays_exact(mnt):
    """A lossily stored tensor may serve as the delta reference of an exact file: the delta
    is taken against its decoded bytes, so the exact file still reads back bit for bit."""
    lossy, exact = mnt.path / "lossy", mnt.path / "exact"
    lossy.mkdir()
    exact.mkdir()
    os.setxattr(lossy, "user.elvesfs.policy", b"elf")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 512, generator=g) * 0.05
    tuned = base + torch.randn(512, 512, generator=g) * 1e-4
    safetensors_torch.save_file({"layer.weight": base}, str(lossy / "m.safetensors"))
    mnt.sync()
    assert file_stats(lossy / "m.safetensors")["lossy_bytes"] > 0
    safetensors_torch.save_file({"layer.weight": tuned}, str(exact / "m.safetensors"))
    mnt.sync()
    s = file_stats(exact / "m.safetensors")
    assert s["policy"] == "lossless" and s["delta_raw"] > 0 and s["lossy_bytes"] == 0
    mnt.remount()
    back = safetensors_torch.load_file(str(exact / "m.safetensors"))["layer.weight"]
    assert torch.equal(back, tuned)


def test_arrays_in_files_we_do_not_parse_are_byte_shuffled(mnt):
    """A file elvesfs does not parse that holds a float array (GGUF, ONNX, a raw dump;
    here 3 header bytes, so no chunk starts on a record boundary by chance) is stored
    byte-shuffled: exact, smaller than zstd gets it, and still so after a remount."""
    import zstandard
    arr = np.random.default_rng(7).normal(0, 0.02, 3 << 20).astype(np.float32)
    data = b"HDR" + arr.tobytes()
    (mnt.path / "weights.dat").write_bytes(data)
    mnt.remount()
    assert (mnt.path / "weights.dat").read_bytes() == data
    s = file_stats(mnt.path / "weights.dat")
    assert s["format"] == "plain" and "shuffle" in s["codecs"], s
    zstd_size = len(zstandard.ZstdCompressor(level=3).compress(data))
    assert s["stored"] < 0.95 * zstd_size, (s["stored"], zstd_size)


def test_gguf_fine_tune_is_a_delta_of_its_base(mnt):
    """GGUF files (llama.cpp, written by its `gguf` package) are parsed: a fine-tune of
    a base, both F16/F32 GGUF with a quantized tensor, stores its float tensors as XOR
    deltas against the base's, and both read back exactly after a remount."""
    rng = np.random.default_rng(11)
    base = {f"blk.{i}.attn_q.weight": rng.normal(0, 0.02, (256, 512)).astype(np.float16)
            for i in range(4)}
    base["output_norm.weight"] = np.ones(512, np.float32)
    base["blk.0.ffn_up.weight"] = (rng.normal(0, 0.02, (64, 256)).astype(np.float32), "Q8_0")
    ft = {k: (v if isinstance(v, tuple) else
              (v.astype(np.float32) + rng.normal(0, 1e-4, v.shape)).astype(v.dtype))
          for k, v in base.items()}
    zoo.write_gguf(mnt.path / "base.gguf", base, vocab=2000)
    zoo.write_gguf(mnt.path / "ft.gguf", ft, vocab=2000)
    want = {n: sha(mnt.path / n) for n in ("base.gguf", "ft.gguf")}
    mnt.remount()
    assert {n: sha(mnt.path / n) for n in want} == want
    s = file_stats(mnt.path / "ft.gguf")
    assert s["format"] == "gguf" and s["tensors"] == 5, s  # the typed ones (Q8_0: bytes)
    xor = s["codecs"].get("xor", {"raw": 0, "stored": 0})
    assert xor["raw"] > 0.9 * s["logical"], s  # every float tensor is a delta
    assert xor["stored"] < 0.5 * xor["raw"] and s["delta_saved"] > 0, s


def _weight_chunk(db, name: bytes):
    """(chunk id, flags, frame, all chunk ids) of the largest chunk of the file at `name`
    (a path under the mount's root)."""
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.layout import Layout
    from elvesfs.namespace import ROOT_INO, Namespace, key
    ns, chunks = Namespace(db), ChunkStore(db)
    with db.read() as txn:
        parent = ROOT_INO
        for part in name.split(b"/"):
            parent = ns.lookup(txn, parent, part)
        lay = Layout.from_bytes(txn.get(key(parent), db=db.t["layouts"]))
        i = max(range(len(lay)), key=lay.length)
        cid = lay.chunk_id(i)
        return cid, chunks.record(txn, cid).flags, bytes(chunks.frame(txn, cid)), set(lay.ids())


def test_protected_directory_reads_around_a_damaged_exponent_stream(make_mount, tmp_path):
    """Under the `protect` policy a float tensor's sign+exponent stream carries a parity:
    a zeroed 4 KiB run in it (a bad sector) is repaired on read (the unprotected twin
    gets EIO), and protected chunks never share storage with unprotected ones."""
    import codec
    from codec import frame as fr
    from elvesfs.chunkstore import PROTECTED
    from elvesfs.db import Database
    m = make_mount()
    d = m.path / "safe"
    d.mkdir()
    os.setxattr(d, "user.elvesfs.policy", b"protect")
    w = {"layer.weight": torch.randn(512, 512) * 0.05}
    src = tmp_path / "w.safetensors"
    safetensors_torch.save_file(w, str(src))
    shutil.copy(src, d / "w.safetensors")
    shutil.copy(src, m.path / "w.safetensors")
    m.sync()
    assert file_stats(d / "w.safetensors")["policy"] == "lossless,protect"
    m.umount()
    db = Database(str(m.store))
    try:
        pcid, pflags, pframe, pids = _weight_chunk(db, b"safe/w.safetensors")
        ucid, uflags, uframe, uids = _weight_chunk(db, b"w.safetensors")
        assert pflags & PROTECTED and not uflags & PROTECTED
        assert codec.inspect(pframe).protected == ["exponent"]
        assert codec.inspect(uframe).protected == []
        assert not pids & uids  # no chunk shared across the two policies
        with db.write() as txn:
            s = fr.parse(pframe).streams[0]  # the exponent plane
            at = s.offset + -(-s.stored_len // 8)  # the second of its 8 stripes
            assert s.name == "exponent" and s.stored_len > 9 * 4096
            b = bytearray(pframe)
            b[at:at + 4096] = bytes(4096)
            txn.put(pcid, bytes(b), db=db.t["chunks"])
            s = fr.parse(uframe).streams[0]  # its most significant stream
            b = bytearray(uframe)
            b[s.offset + s.stored_len // 2] ^= 0x5A
            txn.put(ucid, bytes(b), db=db.t["chunks"])
    finally:
        db.close()
    m.mount()
    assert sha(d / "w.safetensors") == sha(src)
    with pytest.raises(OSError) as e:
        (m.path / "w.safetensors").read_bytes()
    assert e.value.errno == errno.EIO


def test_protected_file_is_a_delta_of_protected_versions_only(make_mount, tmp_path):
    """A protected tensor is never coded against an unprotected version (a delta is no
    safer than its reference), but is against a protected one."""
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.db import Database
    m = make_mount()
    d = m.path / "safe"
    d.mkdir()
    os.setxattr(d, "user.elvesfs.policy", b"protect")
    base = torch.randn(512, 512) * 0.05
    versions = [base + torch.randn(512, 512) * 1e-4 * k for k in range(3)]
    for k, (where, w) in enumerate(zip((m.path, d, d), versions)):
        src = tmp_path / f"v{k}.safetensors"
        safetensors_torch.save_file({"layer.weight": w}, str(src))
        shutil.copy(src, where / f"v{k}.safetensors")
        m.sync()  # in order: each version is stored before the next is coded
    m.umount()
    db = Database(str(m.store))
    try:
        refs = {}
        for k, rel in ((1, b"safe/v1.safetensors"), (2, b"safe/v2.safetensors")):
            cid = _weight_chunk(db, rel)[0]
            with db.read() as txn:
                refs[k] = ChunkStore(db).record(txn, cid).is_delta
    finally:
        db.close()
    assert refs == {1: False, 2: True}


def test_protected_delta_with_bucket_split_planes_reads_back(make_mount, tmp_path):
    """A protected embedding-like tensor whose next version barely moves in most rows
    (tiny deltas) and takes Adam steps in the others: its delta splits lower planes in
    buckets (several streams of one name), its top planes carry parities. It reads back
    exact, before and after a remount (such frames once failed to parse: EIO)."""
    import codec
    from codec import frame as fr
    from elvesfs.db import Database
    m = make_mount()
    d = m.path / "safe"
    d.mkdir()
    os.setxattr(d, "user.elvesfs.policy", b"protect")
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1000, 384, generator=g) * 0.05 * torch.exp(torch.randn(1000, 384,
                                                                            generator=g))
    # rows that barely move (a few units in the last place; not a uniform decay, which
    # the scaled reference would take whole) and rows of fixed-size steps, whose delta
    # in units in the last place follows the exponent: sub+ctx+hi, with buckets
    new = base + 2e-9 * torch.randn(1000, 384, generator=g)
    seen = torch.rand(1000, generator=g) < 0.6
    new[seen] -= 1e-4 * torch.sign(torch.randn(int(seen.sum()), 384, generator=g))
    want = {}
    for k, w in enumerate((base, new)):
        src = tmp_path / f"v{k}.safetensors"
        safetensors_torch.save_file({"emb.weight": w}, str(src))
        shutil.copy(src, d / f"v{k}.safetensors")
        want[k] = sha(src)
        m.sync()
    assert sha(d / "v1.safetensors") == want[1]
    m.umount()
    db = Database(str(m.store))
    try:
        frame = _weight_chunk(db, b"safe/v1.safetensors")[2]
    finally:
        db.close()
    names = [s.name for s in fr.parse(frame).streams]
    assert codec.inspect(frame).needs_reference and len(names) > len(set(names))
    assert codec.inspect(frame).protected
    m.mount()
    assert [sha(d / f"v{k}.safetensors") for k in range(2)] == [want[0], want[1]]


def test_rotated_checkpoints_do_not_keep_a_deleted_base_alive(make_mount, tmp_path):
    """Checkpoint rotation (keep the last two, as Trainer's save_total_limit): deleting
    the version that later ones were coded against must not keep it stored for them.
    Its users are coded again without it (the most changed one alone, the others as
    deltas of that one), it is freed, and the next versions are deltas of those."""
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.db import Database
    m = make_mount()
    base = torch.randn(512, 512) * 0.05
    src = []
    for k in range(4):  # version k differs from the base by noise of size k * 1e-4
        src.append(tmp_path / f"v{k}.safetensors")
        w = base + torch.randn(512, 512) * 1e-4 * k
        safetensors_torch.save_file({"layer.weight": w}, str(src[k]))

    def save(k: int) -> None:
        (m.path / f"checkpoint-{k}").mkdir()
        shutil.copy(src[k], m.path / f"checkpoint-{k}" / "model.safetensors")
        m.sync()  # in order: each version is stored before the next is coded

    def weights(ks) -> tuple[dict, int]:
        """({version: (weight chunk, its reference or None)}, chunk records), unmounted."""
        m.umount()
        db = Database(str(m.store))
        try:
            got = {}
            for k in ks:
                cid = _weight_chunk(db, f"checkpoint-{k}/model.safetensors".encode())[0]
                with db.read() as txn:
                    rec = ChunkStore(db).record(txn, cid)
                got[k] = (cid, rec.ref if rec.is_delta else None)
            with db.read() as txn:
                records = txn.stat(db.t["refs"])["entries"]
        finally:
            db.close()
        m.mount()
        return got, records

    save(0)
    save(1)
    got, _ = weights([1])
    assert got[1][1] is not None, "version 1 is not a delta of version 0"
    shutil.rmtree(m.path / "checkpoint-0")  # version 1's delta needs it
    got, records = weights([1])
    assert got[1][1] is None, "version 1 still needs the deleted version 0"
    assert records <= 2, f"{records} chunk records: version 0 was not freed"
    v1 = got[1][0]
    save(2)
    save(3)
    got, _ = weights([2, 3])
    assert got[2][1] == got[3][1] == v1, "2 and 3 are not deltas of 1"
    shutil.rmtree(m.path / "checkpoint-1")
    got, records = weights([2, 3])
    assert got[3][1] is None and got[2][1] == got[3][0], \
        "the most changed version (3) is not stored alone with 2 a delta of it"
    assert records <= 4, f"{records} chunk records: version 1 was not freed"
    # `elvesfs stats` shows how they are stored now, not how they were sealed
    s2, s3 = (file_stats(m.path / f"checkpoint-{k}" / "model.safetensors") for k in (2, 3))
    assert s3["delta_raw"] == 0 and "xor" not in s3["codecs"], s3
    assert s2["delta_raw"] > 0 and "xor" in s2["codecs"], s2
    whole = stats(m.path)["store"]
    assert whole["delta_raw"] == s2["delta_raw"] and whole["codecs"]["xor"] == s2["codecs"]["xor"]
    for k in (2, 3):
        assert sha(m.path / f"checkpoint-{k}" / "model.safetensors") == sha(src[k])
    m.umount()
    from conftest import check_store
    assert check_store(m.store) == []


def test_an_orphan_that_cannot_be_recoded_stays_and_serves_no_new_delta(make_mount, tmp_path):
    """If the users of a deleted reference cannot be coded again (here: the one user's
    frame is damaged, so it cannot be decoded), the reference stays stored for it, is
    logged, and a new version is not coded against it (that would only cost a second
    coding of the new version at the next collection)."""
    from conftest import check_store
    from elvesfs.chunkstore import ChunkStore
    from elvesfs.db import Database
    m = make_mount()
    base = torch.randn(512, 512) * 0.05
    for k in range(3):
        safetensors_torch.save_file({"layer.weight": base + torch.randn(512, 512) * 1e-4 * k},
                                    str(tmp_path / f"v{k}.safetensors"))
    for k in (0, 1):
        shutil.copy(tmp_path / f"v{k}.safetensors", m.path / f"v{k}.safetensors")
        m.sync()
    m.umount()
    db = Database(str(m.store))
    try:
        v0 = _weight_chunk(db, b"v0.safetensors")[0]
        v1, _, frame, _ = _weight_chunk(db, b"v1.safetensors")
        with db.write() as txn:
            assert ChunkStore(db).record(txn, v1).ref == v0, "version 1 is not a delta of 0"
            bad = bytearray(frame)
            bad[len(bad) // 2] ^= 0xFF
            txn.put(v1, bytes(bad), db=db.t["chunks"])
    finally:
        db.close()
    m.mount()
    os.unlink(m.path / "v0.safetensors")  # v0 is an orphan whose one user cannot be decoded
    shutil.copy(tmp_path / "v2.safetensors", m.path / "v2.safetensors")
    m.sync()
    assert sha(m.path / "v2.safetensors") == sha(tmp_path / "v2.safetensors")
    s = file_stats(m.path / "v2.safetensors")  # how its seal coded it
    assert s["delta_saved"] == 0 and "xor" not in s["codecs"], \
        f"version 2 was coded against the orphan: {s}"
    m.umount()
    assert "could not re-code the users of orphaned chunk" in m.log()
    db = Database(str(m.store))
    try:
        with db.read() as txn:
            assert ChunkStore(db).orphans(txn) == [v0], "the orphan is no longer listed"
    finally:
        db.close()
    assert check_store(m.store) == []
