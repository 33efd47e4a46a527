"""The CLI around the mount: errors users see, fsck finding and repairing damage, stats vs du."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from elvesfs.chunkstore import CHUNK, ChunkRecord

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elvesfs.cli", *args], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=300)


def test_mount_errors_are_one_clear_line(mnt, tmp_path):
    r = cli("mount", str(tmp_path / "missing"))
    assert r.returncode != 0 and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("mount", str(mnt.path), "--store", str(tmp_path / "other"))
    assert r.returncode != 0 and "already a mountpoint" in r.stderr
    other = tmp_path / "mnt2"
    other.mkdir()
    r = cli("mount", str(other), "--store", str(mnt.store))
    assert r.returncode != 0 and "in use" in r.stderr
    r = cli("fsck", str(mnt.store))
    assert r.returncode != 0 and "in use" in r.stderr
    # libfuse's own reason, not pyfuse3's "fuse_session_new() failed"
    r = cli("mount", str(other), "--store", str(tmp_path / "s3"), "-o", "bogus_opt")
    assert r.returncode != 0 and "unknown option" in r.stderr and "bogus_opt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # would mount, then end at the kernel's INIT: refused up front
    r = cli("mount", str(other), "--store", str(tmp_path / "s4"), "-o", "max_read=65536")
    assert r.returncode != 0 and "max_read" in r.stderr
    assert not os.path.ismount(other)
    # a directory that is no store: fsck says what to pass instead
    r = cli("fsck", str(other))
    assert r.returncode != 0 and "pass the store directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_mount_refused_dev_fuse_says_what_the_user_lacks(monkeypatch):
    """libfuse's own line, and what to do about it (/dev/fuse is mode 0600 on some
    machines: a user who may not open it cannot mount)."""
    import pyfuse3

    from elvesfs import daemon
    from elvesfs.errors import ElvesError

    def refused(ops, mountpoint, options):
        os.write(2, b"fuse: failed to open /dev/fuse: Permission denied\n")
        raise RuntimeError("fuse_session_new() failed")
    monkeypatch.setattr(pyfuse3, "init", refused)
    with pytest.raises(ElvesError, match=r"/dev/fuse: Permission denied \(this user may "
                                         r"not use FUSE"):
        daemon._fuse_init(None, "/mnt/x", set())


def test_corrupt_store_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "data.mdb").write_bytes(os.urandom(65536))
    m = tmp_path / "m"
    m.mkdir()
    r = cli("mount", str(m), "--store", str(store))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.ismount(m)


def _open_env(store: Path) -> tuple[lmdb.Environment, dict]:
    env = lmdb.open(str(store), max_dbs=20, subdir=True)
    names = ["chunks", "refs", "zero", "layouts"]
    return env, {n: env.open_db(n.encode()) for n in names}


def test_fsck_clean_then_detects_and_repairs(mnt):
    for i in range(5):
        (mnt.path / f"f{i}").write_bytes(os.urandom(200_000) + bytes(50_000))
    (mnt.path / "dup").write_bytes((mnt.path / "f0").read_bytes())
    mnt.umount()
    r = cli("fsck", str(mnt.store), "--verify-data")
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr

    env, t = _open_env(mnt.store)
    with env.begin(write=True) as txn:
        cid, raw = next(iter(txn.cursor(db=t["refs"])))
        rc, *rest = CHUNK.unpack(raw)
        txn.put(cid, CHUNK.pack(rc + 5, *rest), db=t["refs"])  # wrong refcount
    env.close()
    r = cli("fsck", str(mnt.store))
    assert r.returncode == 1 and "refcount" in (r.stdout + r.stderr)
    r = cli("fsck", str(mnt.store), "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in cli("fsck", str(mnt.store)).stdout

    env, t = _open_env(mnt.store)
    with env.begin(write=True) as txn:  # flip a byte inside one chunk's frame
        cid, frame = next(iter(txn.cursor(db=t["chunks"])))
        bad = bytearray(frame)
        bad[len(bad) // 2] ^= 0xFF
        txn.put(cid, bytes(bad), db=t["chunks"])
    env.close()
    r = cli("fsck", str(mnt.store), "--verify-data")
    assert r.returncode == 1 and "does not verify" in (r.stdout + r.stderr)
    env, t = _open_env(mnt.store)
    with env.begin(write=True) as txn:  # a frame without its header: stats still report
        cid, frame = list(txn.cursor(db=t["chunks"]))[1]
        txn.put(cid, b"junk" + bytes(frame)[4:], db=t["chunks"])
    env.close()
    r = cli("stats", "--json", "--store", str(mnt.store))
    assert r.returncode == 0, r.stderr
    assert "unreadable" in json.loads(r.stdout)["store"]["codecs"], r.stdout

    mnt.mount()  # a damaged chunk reads as EIO, never as wrong bytes
    errors = 0
    for f in sorted(mnt.path.iterdir()):
        try:
            f.read_bytes()
        except OSError as exc:
            assert exc.errno == 5
            errors += 1
    assert errors >= 1


def test_stats_agree_with_du_and_df(mnt):
    data = os.urandom(1_000_000)
    for name in ("a", "b", "c"):
        (mnt.path / name).write_bytes(data)
    (mnt.path / "z").write_bytes(bytes(3_000_000))
    mnt.sync()
    r = cli("stats", "--json", str(mnt.path))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    files = {Path(f["path"]).name: f for f in s["files"]}
    assert files["a"]["logical"] == 1_000_000
    assert files["b"]["dedup_saved"] == 1_000_000
    store = s["store"]
    assert store["logical"] == 6_000_000
    assert store["ratio"] > 2.5
    du = subprocess.run(["du", "-s", "-B1", str(mnt.path)], capture_output=True, text=True)
    du_bytes = int(du.stdout.split()[0])
    assert abs(du_bytes - store["stored"]) < 64 * 1024, (du_bytes, store["stored"])
    app = subprocess.run(["du", "-s", "-B1", "--apparent-size", str(mnt.path)],
                         capture_output=True, text=True)
    assert int(app.stdout.split()[0]) >= 6_000_000
    st = os.statvfs(mnt.path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    assert store["stored"] <= used < store["stored"] + 64 * 2**20
    assert st.f_bavail > 0


def test_mount_with_auto_unmount(make_mount):
    """-o auto_unmount (libfuse then runs a fusermount3 beside the daemon, started while
    the daemon's stderr is captured for libfuse's messages): the mount returns, works
    and unmounts as usual."""
    m = make_mount("-o", "auto_unmount")
    (m.path / "f").write_bytes(b"x" * 100_000)
    m.sync()
    assert (m.path / "f").read_bytes() == b"x" * 100_000
    m.umount()
    assert not os.path.ismount(m.path)


def test_mount_lossy_takes_a_bare_bound(make_mount):
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    m = make_mount("--lossy", "1e-3")
    w = (np.random.default_rng(0).standard_normal((256, 256)) * 0.05).astype(np.float32)
    st.save_file({"layer.weight": w}, str(m.path / "w.safetensors"))
    m.sync()
    r = cli("stats", "--json", str(m.path / "w.safetensors"))
    (f,) = json.loads(r.stdout)["files"]
    assert f["policy"] == "elf=0.001"
    assert 0 < f["max_error"] <= 1e-3
    back = st.load_file(str(m.path / "w.safetensors"))["layer.weight"]
    assert np.abs(back - w).max() <= 1e-3


@pytest.mark.parametrize("which", ["primary", "parity"])
def test_fsck_mends_a_damaged_protected_stream_or_its_parity(make_mount, which):
    """`fsck --verify-data` reports a protected stream whose parity (or the stream
    itself) is damaged and, with --repair, writes it back rebuilt: the frame is
    byte-identical again."""
    import numpy as np
    from safetensors.numpy import save_file

    from codec import frame as fr
    from elvesfs.chunkstore import PROTECTED
    m = make_mount("--protect")
    w = (np.random.default_rng(3).standard_normal((512, 512)) * 0.05).astype(np.float32)
    save_file({"w": w}, str(m.path / "w.safetensors"))
    m.sync()
    want = (m.path / "w.safetensors").read_bytes()
    m.umount()
    env, t = _open_env(m.store)
    with env.begin(write=True) as txn:
        cid, frame = max(((bytes(k), bytes(v)) for k, v in txn.cursor(db=t["chunks"])
                          if ChunkRecord.unpack(txn.get(k, db=t["refs"])).flags & PROTECTED),
                         key=lambda kv: len(kv[1]))
        s = fr.parse(frame).streams[0]
        assert s.name == "exponent" and s.parity is not None
        s = s if which == "primary" else s.parity
        bad = bytearray(frame)
        bad[s.offset + s.stored_len // 2] ^= 0xFF
        txn.put(cid, bytes(bad), db=t["chunks"])
    env.close()
    r = cli("fsck", str(m.store), "--verify-data")
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "protected stream(s) exponent" in out, out
    assert "does not verify" not in out  # the chunk itself still decodes exactly
    r = cli("fsck", str(m.store), "--verify-data", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in cli("fsck", str(m.store), "--verify-data").stdout
    env, t = _open_env(m.store)
    with env.begin() as txn:
        assert bytes(txn.get(cid, db=t["chunks"])) == frame
    env.close()
    m.mount()
    assert (m.path / "w.safetensors").read_bytes() == want


def _two_versions(m) -> tuple[bytes, bytes]:
    """A base and a fine-tune of one float tensor written through the mount (the second
    a delta of the first), unmounted; returns both files' bytes."""
    import numpy as np
    from safetensors.numpy import save_file
    w = (np.random.default_rng(5).standard_normal((512, 512)) * 0.05).astype(np.float32)
    save_file({"w": w}, str(m.path / "base.safetensors"))
    m.sync()
    save_file({"w": w + np.float32(1e-4)}, str(m.path / "tuned.safetensors"))
    m.sync()
    out = (m.path / "base.safetensors").read_bytes(), (m.path / "tuned.safetensors").read_bytes()
    m.umount()
    return out


def _records(store: Path) -> dict[bytes, ChunkRecord]:
    env, t = _open_env(store)
    with env.begin() as txn:
        recs = {bytes(k): ChunkRecord.unpack(v) for k, v in txn.cursor(db=t["refs"])}
    env.close()
    return recs


def test_store_of_format_1_is_upgraded(make_mount):
    """A store written before chunk records counted their delta users (format
    elvesfs-1) is upgraded when first opened for writing: fsck finds it clean, every
    reference chunk gets its count, and the files read back."""
    from elvesfs.chunkstore import CHUNK_V1
    m = make_mount()
    want = _two_versions(m)
    recs = _records(m.store)
    assert sorted(r.deps for r in recs.values() if r.deps) == [1], recs  # one base
    env = lmdb.open(str(m.store), max_dbs=20, subdir=True)
    refs, meta, orphans = (env.open_db(n) for n in (b"refs", b"meta", b"orphans"))
    with env.begin(write=True) as txn:  # back to elvesfs-1: records without deps
        for cid, r in recs.items():
            txn.put(cid, CHUNK_V1.pack(r.refcount, r.raw, r.stored, r.ref, r.flags), db=refs)
        txn.put(b"format", b"elvesfs-1", db=meta)
        txn.drop(orphans, delete=True)  # and no orphans table
    env.close()
    r = cli("stats", "--store", str(m.store), "--json")  # a read-only open: no upgrade
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["store"]["stored"] == sum(x.stored for x in recs.values())
    r = cli("fsck", str(m.store))
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    assert _records(m.store) == recs
    env = lmdb.open(str(m.store), max_dbs=20, subdir=True)
    meta = env.open_db(b"meta")
    with env.begin() as txn:
        assert txn.get(b"format", db=meta) == b"elvesfs-2"
    env.close()
    m.mount()
    assert ((m.path / "base.safetensors").read_bytes(),
            (m.path / "tuned.safetensors").read_bytes()) == want


def test_fsck_repairs_a_wrong_count_of_delta_users(make_mount):
    """A reference chunk's count of the delta chunks that use it decides whether it is
    an orphan (kept only for them): fsck checks that count and the list of orphans
    against the records, and --repair restores both."""
    m = make_mount()
    _two_versions(m)
    recs = _records(m.store)
    base = next(c for c, r in recs.items() if r.deps)
    env, t = _open_env(m.store)
    orphans = env.open_db(b"orphans")
    with env.begin(write=True) as txn:
        rec = recs[base]
        rec.deps = 0
        txn.put(base, rec.pack(), db=t["refs"])
        txn.put(base, b"", db=orphans)  # it has a file: not an orphan
    env.close()
    r = cli("fsck", str(m.store))
    assert r.returncode == 1 and f"{base.hex()} refcount {rec.refcount} (0 from deltas), " \
        f"references {rec.refcount} (1 from deltas)" in r.stderr, r.stdout + r.stderr
    assert f"chunk {base.hex()} is not an orphan" in r.stderr, r.stderr
    r = cli("fsck", str(m.store), "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in cli("fsck", str(m.store)).stdout
    assert _records(m.store) == recs | {base: ChunkRecord(**{**vars(rec), "deps": 1})}


def test_sync_and_umount_start_without_the_codecs():
    """`elvesfs sync` follows every cp in scripts and benchmarks: importing codec/ (numba)
    or trio for it cost ~0.4 s per call. The CLI's common path must not load them."""
    code = ("import sys, elvesfs.cli, elvesfs.control; "
            "print(sorted(m for m in ('codec', 'numba', 'trio', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_compress_reports_any_model_format(tmp_path):
    """`elvesfs compress` parses the file as the filesystem does (here a torch.save zip
    checkpoint, which `python -m codec` cannot read) and reports every codec; a file
    that is no model format is one clear error."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(512, 1024, generator=g) * 0.02, "b": torch.zeros(1024),
          "step": torch.tensor(7)}
    torch.save(sd, tmp_path / "ckpt.pt")
    r = cli("compress", str(tmp_path / "ckpt.pt"), "--codecs", "zstd,auto")
    assert r.returncode == 0, r.stderr
    head, *lines = r.stdout.strip().splitlines()
    assert "torch-zip, 3 tensors" in head
    got = {ln.split()[0]: float(ln.split()[1].rstrip("x")) for ln in lines[1:]}
    assert got["auto"] > got["zstd"] > 1.0
    (tmp_path / "notes.txt").write_text("not a model\n" * 100)
    r = cli("compress", str(tmp_path / "notes.txt"))
    assert r.returncode == 1 and "not a model file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_stats_piped_into_head_exits_quietly(mnt):
    """`elvesfs stats --json | head` (the reader closes the pipe early): no error line,
    no traceback, the exit status of a process stopped by SIGPIPE."""
    d = mnt.path / "many"
    d.mkdir()
    for i in range(1500):  # ~200 KB of JSON: more than a pipe holds
        (d / f"file-{i:04d}.txt").write_bytes(b"x")
    mnt.sync()
    r = subprocess.run(["bash", "-o", "pipefail", "-c",
                        f"{sys.executable} -m elvesfs.cli stats --json {mnt.path} | head -c 100"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.stdout.startswith("{") and len(r.stdout) == 100
    assert r.stderr == "", r.stderr
    assert r.returncode == 141


def test_umount_of_a_busy_mount_says_why_and_keeps_it(make_mount):
    """A process with a file open in the mount: `elvesfs umount` fails with one line that
    says what to look for, and the mount stays up and whole; once the file is closed
    the unmount goes through."""
    m = make_mount()
    (m.path / "a.bin").write_bytes(b"kept" * 1000)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys; f = open(sys.argv[1], 'rb'); sys.stdin.read()",
                               str(m.path / "a.bin")], stdin=subprocess.PIPE)
    try:
        time.sleep(0.5)
        r = cli("umount", str(m.path))
        assert r.returncode == 1, r.stdout + r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and "busy" in line and f"fuser -vm {m.path}" in line, line
        assert (m.path / "a.bin").read_bytes() == b"kept" * 1000
    finally:
        holder.communicate(b"", timeout=30)
    m.umount()
    m.mount()
    assert (m.path / "a.bin").read_bytes() == b"kept" * 1000


def test_stats_of_an_empty_file_shows_no_ratio(mnt):
    """An empty file (nothing stored) has no ratio: '-' in the table, not 0.00; one file
    is '1 file'."""
    (mnt.path / "empty").write_bytes(b"")
    mnt.sync()
    r = cli("stats", str(mnt.path))
    assert r.returncode == 0, r.stderr
    (row,) = [x for x in r.stdout.splitlines() if x.endswith("/empty")]
    assert row.split()[:5] == ["0", "B", "0", "B", "-"], row
    assert "store: 1 file, logical 0 B" in r.stdout and "(ratio -)" in r.stdout, r.stdout


def _damage_stream(db, store_path: bytes, at: int, stream: str) -> None:
    """Flip a byte in the middle of stream ``stream`` of the chunk that holds byte ``at``
    of the file at ``store_path`` (a path under the store's root)."""
    from codec import frame as fr
    from elvesfs.accounting import layout_of
    from elvesfs.namespace import ROOT_INO, Namespace
    ns = Namespace(db)
    with db.write() as txn:
        ino = ROOT_INO
        for part in store_path.split(b"/"):
            ino = ns.lookup(txn, ino, part)
        lay = layout_of(txn, db.t, ino)
        cid = lay.chunk_id(lay.find(at))
        frame = bytearray(txn.get(cid, db=db.t["chunks"]))
        (s,) = [s for s in fr.parse(frame).streams if s.name == stream]
        frame[s.offset + s.stored_len // 2] ^= 0xFF
        txn.put(cid, bytes(frame), db=db.t["chunks"])


def test_salvage_keeps_what_a_damaged_file_still_holds(make_mount, tmp_path):
    """A file with a damaged chunk reads as EIO through the mount; `elvesfs salvage`
    writes it out anyway: intact chunks exact, a float chunk whose low mantissa stream is
    damaged at the precision its other streams give, one whose exponent stream is
    damaged as zeros, each named with its tensor; the next version's deltas of them at
    that precision or as zeros; the same from the unmounted store."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from elvesfs.db import Database
    rng = np.random.default_rng(5)
    tensors = {name: (rng.standard_normal((512, 512)) * 0.05).astype(np.float32)
               for name in ("a", "b", "c")}
    tensors["ids"] = np.arange(1000, dtype=np.int64)
    src = tmp_path / "w.safetensors"
    save_file(tensors, str(src))
    m = make_mount()
    (m.path / "d").mkdir()
    (m.path / "d" / "w.safetensors").write_bytes(src.read_bytes())
    (m.path / "intact.bin").write_bytes(src.read_bytes()[::-1])
    m.sync()
    nxt = {k: v + np.float32(1e-4) * rng.standard_normal(v.shape).astype(np.float32)
           if v.dtype == np.float32 else v for k, v in tensors.items()}
    save_file(nxt, str(tmp_path / "w2.safetensors"))  # the next version: coded as deltas
    (m.path / "d" / "w2.safetensors").write_bytes((tmp_path / "w2.safetensors").read_bytes())
    m.sync()
    m.umount()
    with open(src, "rb") as f:  # where each tensor's bytes start in the file
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    start = {k: 8 + n + v["data_offsets"][0] for k, v in head.items() if k != "__metadata__"}
    db = Database(str(m.store))
    try:
        _damage_stream(db, b"d/w.safetensors", start["a"], "mant_lo")
        _damage_stream(db, b"d/w.safetensors", start["b"], "exponent")
    finally:
        db.close()
    m.mount()
    with pytest.raises(OSError):
        (m.path / "d" / "w.safetensors").read_bytes()

    out = tmp_path / "salvaged.safetensors"
    r = cli("salvage", str(m.path / "d" / "w.safetensors"), str(out), "--json")
    assert r.returncode == 2, r.stderr
    damage = {d["tensors"][0]: d for d in json.loads(r.stdout)["damage"]}
    assert set(damage) == {"a", "b"}
    assert damage["a"]["outcome"] == "reduced" and damage["a"]["mantissa_bits"] == 15
    assert "mant_lo" in damage["a"]["reason"]
    assert damage["b"]["outcome"] == "lost" and "exponent" in damage["b"]["reason"]
    got = load_file(str(out))
    assert np.array_equal(got["c"], tensors["c"]) and np.array_equal(got["ids"], tensors["ids"])
    err = np.abs(got["a"] - tensors["a"]) / np.abs(tensors["a"])
    assert 0 < err.max() <= 2.0 ** -16
    assert not got["b"].any()
    assert out.read_bytes()[:start["a"]] == src.read_bytes()[:start["a"]]  # the header

    # the next version's tensors are deltas of the damaged ones: "a" against a's 15-bit
    # reconstruction, off by as much; "b" has no reference left
    r = cli("salvage", str(m.path / "d" / "w2.safetensors"), str(tmp_path / "w2.out"), "--json")
    assert r.returncode == 2, r.stderr
    damage = {d["tensors"][0]: d for d in json.loads(r.stdout)["damage"]}
    assert set(damage) == {"a", "b"}
    assert damage["a"]["outcome"] == "reduced" and damage["a"]["mantissa_bits"] == 15
    assert "reference chunk" in damage["a"]["reason"] and "mant_lo" in damage["a"]["reason"]
    assert damage["b"]["outcome"] == "lost" and "delta of a lost chunk" in damage["b"]["reason"]
    got = load_file(str(tmp_path / "w2.out"))
    assert np.array_equal(got["c"], nxt["c"])
    err = np.abs(got["a"] - nxt["a"]) / np.abs(nxt["a"])
    assert 0 < err.max() <= 2.0 ** -15
    assert not got["b"].any()

    r = cli("salvage", str(m.path / "intact.bin"), str(tmp_path / "intact.out"))
    assert r.returncode == 0 and "every byte exact" in r.stderr, r.stderr
    assert (tmp_path / "intact.out").read_bytes() == src.read_bytes()[::-1]
    # a file still open for writing is not sealed: its bytes come from its staging file
    fd = os.open(m.path / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        staged = os.urandom(300_000)
        os.write(fd, staged)
        os.fsync(fd)  # in the daemon's staging file (fsync does not seal)
        r = cli("salvage", str(m.path / "open.bin"), str(tmp_path / "open.out"))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "open.out").read_bytes() == staged
    finally:
        os.close(fd)
    m.umount()
    r = cli("fsck", str(m.store), "--verify-data")  # names the files and the way out
    out_err = r.stdout + r.stderr
    assert r.returncode == 1 and "damaged beyond repair" in r.stdout, out_err
    for name in ("/d/w.safetensors", "/d/w2.safetensors"):
        assert f"file {name}: 2 chunk(s) do not verify" in out_err, out_err
        assert f"elvesfs salvage --store {m.store} {name} OUT" in out_err, out_err
    assert "intact.bin" not in out_err
    r = cli("fsck", str(m.store), "--verify-data", "--repair")  # nothing repairs them
    out_err = r.stdout + r.stderr
    assert r.returncode == 1 and "found, the others repaired" in r.stdout, out_err
    assert "damaged beyond repair" in r.stdout, out_err
    assert not [line for line in out_err.splitlines()
                if "do not verify" in line and "(repaired)" in line], out_err
    r = cli("salvage", "/d/w.safetensors", str(tmp_path / "again"), "--store", str(m.store))
    assert r.returncode == 2 and "15 mantissa bits kept" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "again").read_bytes() == out.read_bytes()
    r = cli("salvage", "/nothing", str(tmp_path / "x"), "--store", str(m.store))
    assert r.returncode == 1 and "no such file" in r.stderr and not (tmp_path / "x").exists()


def test_scrub_checks_a_live_mount_and_mends_protected_chunks(make_mount, tmp_path):
    """`elvesfs scrub` verifies every chunk while the store stays mounted: it names the
    file whose chunk does not verify (with its salvage command) and the protected chunk
    whose parity repairs it; --repair has the daemon write that one back, after which a
    scrub finds it clean, and the protected file reads exact throughout."""
    import numpy as np
    from safetensors.numpy import save_file

    from elvesfs.db import Database
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((512, 512)) * 0.05).astype(np.float32)
    src = tmp_path / "w.safetensors"
    save_file({"w": w}, str(src))
    save_file({"v": w[::-1].copy()}, str(tmp_path / "v.safetensors"))  # not a delta of w
    m = make_mount()
    (m.path / "safe").mkdir()
    os.setxattr(m.path / "safe", "user.elvesfs.policy", b"protect")
    (m.path / "safe" / "p.safetensors").write_bytes(src.read_bytes())
    (m.path / "u.safetensors").write_bytes((tmp_path / "v.safetensors").read_bytes())
    m.sync()
    r = cli("scrub", str(m.path))
    assert r.returncode == 0 and "0 do not verify, 0 protected" in r.stdout, r.stdout + r.stderr
    count = r.stdout.split(": ")[-1].split(",")[0]  # "N chunks"
    assert int(count.split()[0]) >= 4, r.stdout  # two headers, two tensors at least
    m.umount()
    at = src.stat().st_size - w.nbytes  # the tensor's first byte
    db = Database(str(m.store))
    try:
        _damage_stream(db, b"safe/p.safetensors", at, "exponent")
        _damage_stream(db, b"u.safetensors", at, "exponent")
    finally:
        db.close()
    m.mount()
    r = cli("scrub", str(m.path))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert f"damaged: {m.path / 'u.safetensors'}: 1 chunk(s) do not verify" in r.stdout, out
    assert f"elvesfs salvage {m.path / 'u.safetensors'} OUT" in r.stdout, out
    assert "protected stream(s) exponent damaged, repairable" in r.stderr, out
    assert f"{count}, 1 do not verify, 1 protected with repairable damage" in r.stdout, out
    assert (m.path / "safe" / "p.safetensors").read_bytes() == src.read_bytes()
    r = cli("scrub", str(m.path), "--repair")
    assert "(1 mended)" in r.stdout and r.returncode == 1, r.stdout + r.stderr  # u stays bad
    r = cli("scrub", str(m.path))
    assert "1 do not verify, 0 protected" in r.stdout, r.stdout + r.stderr
    assert (m.path / "safe" / "p.safetensors").read_bytes() == src.read_bytes()
    r = cli("scrub", str(tmp_path))
    assert r.returncode == 1 and "not an elvesfs mount" in r.stderr


def test_version_is_the_installed_package_version():
    from importlib.metadata import version
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"elvesfs {version('elvesfs')}", r.stdout


def test_paths_with_spaces_tabs_commas_and_non_ascii(tmp_path):
    """mountinfo escapes whitespace and backslashes, libfuse splits options at commas and
    pyfuse3 passes them as ASCII: a store or mountpoint path with any of these still
    mounts, syncs, reports stats and unmounts."""
    from conftest import Mount
    m = Mount(tmp_path)
    m.path = tmp_path / "my models\tnew é"
    m.path.mkdir()
    m.store = tmp_path / "store,a b\\c%20ü"
    try:
        m.mount()
        (m.path / "f").write_bytes(b"x" * 1000)
        m.sync()
        r = cli("stats", "--json", str(m.path / "f"))
        assert r.returncode == 0, r.stderr
        (f,) = json.loads(r.stdout)["files"]
        assert f["path"] == str(m.path / "f") and f["logical"] == 1000
        m.umount()
        assert not os.path.ismount(m.path)
        m.mount()
        assert (m.path / "f").read_bytes() == b"x" * 1000
    finally:
        m.cleanup()


def test_quickstart_mount_with_the_default_store(tmp_path, monkeypatch):
    """The README's quickstart: `elvesfs mount MNT` with no --store keeps a per-user store
    (under $XDG_DATA_HOME, else ~/.local/share) that umount, mount again and fsck of the
    mountpoint all find on their own."""
    from conftest import Mount, _run_cli
    from elvesfs.mounts import default_store
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    m = Mount(tmp_path)
    m.store = Path(default_store(str(m.path)))
    assert m.store.parent == tmp_path / "xdg" / "elvesfs"
    try:
        r = _run_cli("mount", str(m.path))
        assert str(m.store) in r.stderr  # it says where the store is
        m.pid = int((m.store / "daemon.lock").read_text())
        data = os.urandom(3 << 20)
        (m.path / "model.bin").write_bytes(data)
        _run_cli("umount", str(m.path))
        m.pid = None
        assert (m.store / "data.mdb").exists()
        r = _run_cli("fsck", str(m.path))
        assert "clean" in r.stdout, r.stdout + r.stderr
        _run_cli("mount", str(m.path))
        m.pid = int((m.store / "daemon.lock").read_text())
        assert (m.path / "model.bin").read_bytes() == data
    finally:
        m.cleanup()
