"""Real programs, unmodified, on a real mount: cp, rsync, tar, editors' write-temp-and-rename,
sqlite, git, the Hugging Face cache (hf_hub_download against a loopback server), safetensors
and torch. Every result is compared with the source or with the same work on a plain
directory."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import sha_file



def run(*cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.stdout}{r.stderr}"
    return r


def snapshot(root: Path, *, times: bool = True, xattrs: bool = True) -> dict:
    """Everything a faithful copy keeps: kinds, modes, sizes, bytes, link targets,
    hard-link groups, mtimes, user xattrs."""
    out = {}
    groups: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            s = os.lstat(p)
            rel = str(p.relative_to(root))
            mode = stat.S_IMODE(s.st_mode)
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("link", os.readlink(p))
                continue
            x = tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p))) if xattrs else ()
            if stat.S_ISDIR(s.st_mode):
                out[rel] = ("dir", mode, x)
            else:
                first = groups.setdefault(s.st_ino, rel)
                out[rel] = ("file", mode, s.st_size, sha_file(p), s.st_nlink, first,
                            s.st_mtime_ns if times else 0, x)
    return out


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A tree with what trips copiers up: empty and odd-sized files, a sparse file, hard and
    relative symbolic links, xattrs, unusual modes, fixed mtimes, deep directories."""
    src = tmp_path_factory.mktemp("src") / "tree"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "empty").write_bytes(b"")
    for n in (1, 4095, 4096, 65_537, 1 << 20, (5 << 20) + 3):
        (src / "a" / f"rand{n}").write_bytes(os.urandom(n))
    (src / "a" / "b" / "zeros").write_bytes(bytes(3 << 20))
    (src / "a" / "b" / "c" / "dup").write_bytes((src / "a" / "rand1048576").read_bytes())
    with open(src / "sparse", "wb") as f:
        f.seek(64 << 20)
        f.write(b"tail")
    os.link(src / "a" / "rand4096", src / "a" / "b" / "hardlink")
    os.symlink("../rand4096", src / "a" / "b" / "rel")
    os.symlink("b/c", src / "a" / "dirlink")
    os.symlink("missing", src / "dangling")
    os.chmod(src / "a" / "rand1", 0o600)
    os.chmod(src / "a" / "rand4095", 0o755)
    os.chmod(src / "a" / "b" / "c", 0o700)
    os.setxattr(src / "a" / "rand65537", "user.origin", b"test")
    os.setxattr(src / "a" / "b", "user.dir", b"attr")
    (src / ("name with spaces & ünïcödé")).write_bytes(b"odd name")
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321),
                     follow_symlinks=False)
    return src


def test_cp_a(source_tree, shared_dir, shared_mount):
    run("cp", "-a", source_tree, shared_dir / "cp")
    want = snapshot(source_tree)
    assert snapshot(shared_dir / "cp") == want
    run("diff", "-r", "--no-dereference", source_tree, shared_dir / "cp")
    shared_mount.sync()
    assert snapshot(shared_dir / "cp") == want
    # and back out of the mount
    out = Path(str(source_tree) + "-back-cp")
    run("cp", "-a", shared_dir / "cp", out)
    assert snapshot(out) == want
    assert os.stat(shared_dir / "cp" / "sparse").st_blocks * 512 < 1 << 20


def test_rsync(source_tree, shared_dir, shared_mount):
    if not shutil.which("rsync"):
        pytest.skip("rsync is not installed (apt-get install rsync)")
    run("rsync", "-aHX", f"{source_tree}/", f"{shared_dir / 'rs'}/")
    want = snapshot(source_tree)
    assert snapshot(shared_dir / "rs") == want
    # an incremental run after changes on the source: rsync's delta transfer rewrites in
    # place (--inplace) or through a temp file + rename (default)
    changed = Path(str(source_tree) + "-changed")
    run("cp", "-a", source_tree, changed)
    with open(changed / "a" / "rand1048576", "r+b") as f:
        f.seek(500_000)
        f.write(b"changed!")
    (changed / "a" / "new").write_bytes(b"new file")
    os.unlink(changed / "a" / "rand1")
    run("rsync", "-aHX", "--delete", f"{changed}/", f"{shared_dir / 'rs'}/")
    assert snapshot(shared_dir / "rs") == snapshot(changed)
    shared_mount.sync()
    with open(changed / "a" / "rand4095", "ab") as f:
        f.write(b"more")
    run("rsync", "-aHX", "--inplace", "--no-whole-file", f"{changed}/", f"{shared_dir / 'rs'}/")
    assert snapshot(shared_dir / "rs") == snapshot(changed)
    back = Path(str(source_tree) + "-back-rsync")
    run("rsync", "-aHX", f"{shared_dir / 'rs'}/", f"{back}/")
    assert snapshot(back) == snapshot(changed)
    run("rsync", "-aHXc", "--dry-run", "--itemize-changes", f"{changed}/", f"{shared_dir / 'rs'}/")


def test_tar(source_tree, shared_dir, shared_mount, tmp_path):
    want = snapshot(source_tree)
    # extract onto the mount
    (shared_dir / "x").mkdir()
    run("sh", "-c", f"tar -C '{source_tree}' --xattrs --sparse -cf - . | "
                    f"tar -C '{shared_dir / 'x'}' --xattrs --xattrs-include='user.*' -xpf -")
    assert snapshot(shared_dir / "x") == want
    # an archive written on the mount, listed and extracted elsewhere
    run("tar", "-C", source_tree, "--xattrs", "--sparse", "-czf", shared_dir / "t.tgz", ".")
    shared_mount.sync()
    run("tar", "-tzf", shared_dir / "t.tgz")
    out = tmp_path / "untar"
    out.mkdir()
    run("tar", "-C", out, "--xattrs", "--xattrs-include=user.*", "-xpzf", shared_dir / "t.tgz")
    assert snapshot(out) == want


def test_editors_write_temp_and_rename(shared_dir, shared_mount, tmp_path):
    text = "".join(f"line {i}: foo bar baz\n" for i in range(2000))
    results = {}
    for root in (shared_dir, tmp_path):
        p = root / "doc.txt"
        p.write_text(text)
        os.chmod(p, 0o640)
        if root == shared_dir:
            shared_mount.sync()
        # sed -i: writes a temp file, renames it over the original
        run("sed", "-i", "s/foo/FOO/g", p)
        # vim: default backup/writebackup dance, then :wq
        if shutil.which("vim"):
            run("vim", "-u", "NONE", "-i", "NONE", "-N", "-Es", "-c", "%s/bar/BAR/g",
                "-c", "set backup", "-c", "wq", p)
        # python's atomic replace
        tmp = root / ".doc.txt.tmp"
        with open(tmp, "w") as f:
            f.write(p.read_text().replace("baz", "BAZ"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, p)
        results[root] = (p.read_text(), stat.S_IMODE(p.stat().st_mode), p.stat().st_nlink,
                         sorted(x.name for x in root.iterdir()))
    assert results[shared_dir] == results[tmp_path]
    assert "FOO BAR BAZ" in results[tmp_path][0]
    shared_mount.sync()
    assert (shared_dir / "doc.txt").read_text() == results[tmp_path][0]


def test_sqlite(shared_dir, shared_mount):
    for mode in ("delete", "wal"):
        db = shared_dir / f"{mode}.db"
        con = sqlite3.connect(db)
        con.execute(f"pragma journal_mode={mode}")
        con.execute("create table t (k integer primary key, v blob)")
        for batch in range(20):
            with con:
                con.executemany("insert into t values (?, ?)",
                                [(batch * 500 + i, os.urandom(200)) for i in range(500)])
        with con:
            con.execute("delete from t where k % 7 = 0")
            con.execute("update t set v = zeroblob(50) where k % 11 = 0")
        con.execute("vacuum")
        assert con.execute("pragma integrity_check").fetchone() == ("ok",)
        n = con.execute("select count(*) from t").fetchone()[0]
        con.close()
        assert n == 10_000 - len([k for k in range(10_000) if k % 7 == 0])
    shared_mount.sync()
    for mode in ("delete", "wal"):
        con = sqlite3.connect(shared_dir / f"{mode}.db")
        assert con.execute("pragma integrity_check").fetchone() == ("ok",)
        con.close()


def test_git(shared_dir, tmp_path):
    if not shutil.which("git"):
        pytest.skip("git is not installed")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", HOME=str(tmp_path))
    repo = shared_dir / "repo"
    run("git", "init", "-q", repo, env=env)
    for i in range(3):
        for j in range(30):
            (repo / f"f{j}.txt").write_text(f"commit {i} file {j}\n" * (j + 1))
        (repo / "bin").write_bytes(os.urandom(200_000))
        run("git", "-C", repo, "add", "-A", env=env)
        run("git", "-C", repo, "commit", "-q", "-m", f"c{i}", env=env)
    run("git", "-C", repo, "gc", "-q", "--aggressive", env=env)
    run("git", "-C", repo, "fsck", "--full", "--strict", env=env)
    clone = tmp_path / "clone"
    run("git", "clone", "-q", repo, clone, env=env)
    assert (clone / "f29.txt").read_text() == (repo / "f29.txt").read_text()
    assert run("git", "-C", repo, "status", "--porcelain", env=env).stdout == ""


# -- the Hugging Face cache, for real: hf_hub_download from a loopback "hub" ----------------

class _Hub(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    commit = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args):
        pass

    def _find(self):
        # /{org}/{name}/resolve/{revision}/{filename}
        parts = self.path.split("?")[0].lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return self.files.get("/".join(parts[4:]))

    def _head(self, body):
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", '"%s"' % hashlib.sha256(body).hexdigest())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return True

    def do_HEAD(self):
        self._head(self._find())

    def do_GET(self):
        body = self._find()
        if self._head(body):
            self.wfile.write(body)


def test_hf_hub_download_into_mount(shared_dir, monkeypatch):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # other test modules (tests/zoo.py) switch the whole process to offline mode; our hub
    # is a loopback server, so it is allowed here
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    tensors = {"w": torch.randn(256, 512), "b": torch.arange(1000, dtype=torch.int64)}
    model = safetensors_torch.save(tensors)
    _Hub.files = {"config.json": b'{"hidden": 512}', "model.safetensors": model,
                  "sub/dir/tokenizer.json": os.urandom(50_000)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    cache = shared_dir / "hf"
    try:
        paths = {name: huggingface_hub.hf_hub_download("org/model", name, cache_dir=cache,
                                                       endpoint=endpoint)
                 for name in _Hub.files}
        again = huggingface_hub.hf_hub_download("org/model", "model.safetensors",
                                                cache_dir=cache, endpoint=endpoint)
    finally:
        server.shutdown()
        server.server_close()
    assert again == paths["model.safetensors"]
    repo = cache / "models--org--model"
    for name, body in _Hub.files.items():
        p = Path(paths[name])
        assert p.is_symlink() and p.parent.parts[-1 - name.count("/")] == _Hub.commit
        target = os.readlink(p)
        assert not os.path.isabs(target) and target.startswith("../")
        blob = (p.parent / target).resolve()
        assert blob.parent == (repo / "blobs").resolve()
        assert p.read_bytes() == body
    assert (repo / "refs" / "main").read_text() == _Hub.commit
    leftovers = [str(x) for x in repo.rglob("*.incomplete")]
    assert leftovers == []
    assert any((cache / ".locks").rglob("*.lock"))
    with safe_open(paths["model.safetensors"], framework="pt") as f:   # mmap'd read
        assert torch.equal(f.get_tensor("w"), tensors["w"])
        assert torch.equal(f.get_tensor("b"), tensors["b"])
    cached = huggingface_hub.try_to_load_from_cache("org/model", "config.json", cache_dir=cache)
    assert cached == paths["config.json"]


def test_flock_and_posix_locks(shared_dir):
    """HF's .lock files (flock) and sqlite-style fcntl locks between processes."""
    import fcntl
    p = shared_dir / "x.lock"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code = ("import fcntl,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\n"
                "try:\n fcntl.flock(fd,fcntl.LOCK_EX|fcntl.LOCK_NB)\n print('got')\n"
                "except BlockingIOError:\n print('busy')\n"
                "try:\n fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB,10,0)\n print('got')\n"
                "except OSError:\n print('busy')\n")
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        out = run(sys.executable, "-c", code, p).stdout.split()
        assert out == ["busy", "busy"]
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        out = run(sys.executable, "-c", code, p).stdout.split()
        assert out == ["got", "got"]
    finally:
        os.close(fd)


# -- safetensors and torch ------------------------------------------------------------------

def _tensors(torch):
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(1000, 256, generator=g),
        "layer.0.attn.q.weight": torch.randn(256, 256, generator=g).to(torch.float16),
        "layer.0.attn.k.weight": torch.randn(256, 256, generator=g).to(torch.bfloat16),
        "layer.0.norm.weight": torch.ones(256),
        "layer.0.counts": torch.randint(0, 1 << 40, (5000,), generator=g),
        "mask": torch.rand(3000, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 7),
    }


def test_safetensors_and_torch(shared_dir, shared_mount, tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    tensors = _tensors(torch)
    st.save_file(tensors, shared_dir / "model.safetensors", metadata={"format": "pt"})
    st.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    # two checkpoints of a training run: the second shares most tensors with the first
    state = {"model": tensors, "step": 10, "optim": {"exp_avg": torch.randn(1000, 256)}}
    torch.save(state, shared_dir / "ckpt1.pt")
    state["model"] = dict(tensors, **{"layer.0.norm.weight": torch.full((256,), 1.01)})
    torch.save(state, shared_dir / "ckpt2.pt")
    torch.save(state, tmp_path / "ckpt2.pt")
    legacy = shared_dir / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)

    def check():
        assert sha_file(shared_dir / "model.safetensors") == sha_file(tmp_path / "model.safetensors")
        loaded = st.load_file(shared_dir / "model.safetensors")
        assert loaded.keys() == tensors.keys()
        for k, v in tensors.items():
            assert torch.equal(loaded[k], v), k
        with safe_open(shared_dir / "model.safetensors", framework="pt") as f:   # mmap
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), tensors[k]), k
            sl = f.get_slice("embed.weight")
            assert torch.equal(sl[10:20, :5], tensors["embed.weight"][10:20, :5])
        for name, mmap in (("ckpt2.pt", True), ("ckpt2.pt", False), ("legacy.pt", False)):
            got = torch.load(shared_dir / name, mmap=mmap, weights_only=True)
            assert got["step"] == 10
            for k, v in state["model"].items():
                assert torch.equal(got["model"][k], v), (name, k)
            assert torch.equal(got["optim"]["exp_avg"], state["optim"]["exp_avg"])
        assert torch.load(shared_dir / "ckpt1.pt", weights_only=True)["model"][
            "layer.0.norm.weight"].eq(1).all()
        # the same object saved to the mount and to a plain directory: same tensors, and
        # (torch writes a random serialization id) the same size
        assert os.path.getsize(shared_dir / "ckpt2.pt") == os.path.getsize(tmp_path / "ckpt2.pt")

    check()                  # staged
    shared_mount.sync()
    check()                  # sealed through the model-aware ingest
    before = {n: sha_file(shared_dir / n) for n in ("model.safetensors", "ckpt1.pt", "ckpt2.pt",
                                                     "legacy.pt")}
    # rewrite a tensor in place through a shared mmap, as some tools do (on both copies)
    import json
    import mmap as mm
    for root in (shared_dir, tmp_path):
        with open(root / "model.safetensors", "r+b") as f:
            m = mm.mmap(f.fileno(), 0)
            hlen = int.from_bytes(m[:8], "little")
            start = json.loads(m[8:8 + hlen])["embed.weight"]["data_offsets"][0]
            m[8 + hlen + start:8 + hlen + start + 4] = b"\x00\x00\x80\x3f"   # 1.0
            m.close()
    tensors["embed.weight"] = tensors["embed.weight"].clone()  # the checkpoints keep theirs
    tensors["embed.weight"][0, 0] = 1.0
    shared_mount.remount()
    check()
    for n in ("ckpt1.pt", "ckpt2.pt", "legacy.pt"):
        assert sha_file(shared_dir / n) == before[n]
