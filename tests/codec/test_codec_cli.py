"""`python -m codec FILE` (also `elvesfs compress`): the per-codec report on a model file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

st = pytest.importorskip("safetensors.numpy")

ROOT = Path(__file__).resolve().parents[2]


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codec", *args], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=300)


def rows(out: str) -> dict[str, list[str]]:
    """codec name -> its columns (ratio, enc MB/s, dec MB/s, max error, picks...)."""
    lines = out.strip().splitlines()
    assert lines[1].split()[:2] == ["codec", "ratio"]
    return {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("cli") / "m.safetensors"
    st.save_file({"layer.weight": (rng.standard_normal((512, 1024)) * 0.02).astype(np.float32),
                  "layer.bias": np.zeros(1024, np.float32),
                  "ids": np.arange(4096, dtype=np.int64)}, str(p))
    return p


def test_report_every_codec(model):
    r = report(str(model))
    assert r.returncode == 0, r.stderr
    got = rows(r.stdout)
    assert set(got) == {"zstd", "planes", "elf", "auto"}
    ratio = {k: float(v[0].rstrip("x")) for k, v in got.items()}
    # N(0, 0.02) weights: byte planes beat zstd, ELF's native bound beats the planes
    assert ratio["planes"] > ratio["zstd"] > 1.0
    assert ratio["elf"] > ratio["planes"]
    assert ratio["auto"] == ratio["planes"]  # lossless unless a bound is given
    assert float(got["zstd"][3]) == 0 and float(got["auto"][3]) == 0
    assert 0 < float(got["elf"][3]) <= 2.0 ** -24  # float32 native bound
    assert all(float(v[1]) > 0 and float(v[2]) > 0 for v in got.values())


def test_report_bound_and_protect(model):
    r = report(str(model), "--codecs", "auto", "--bound", "1e-3")
    assert r.returncode == 0, r.stderr
    auto = rows(r.stdout)["auto"]
    assert 0 < float(auto[3]) <= 1e-3 and float(auto[0].rstrip("x")) > 4
    plain = rows(report(str(model), "--codecs", "planes").stdout)["planes"]
    prot = rows(report(str(model), "--codecs", "planes", "--protect").stdout)["planes"]
    assert float(prot[0].rstrip("x")) < float(plain[0].rstrip("x"))  # the copies cost


def test_unknown_codec_is_one_clear_error(model):
    r = report(str(model), "--codecs", "nope")
    assert r.returncode == 2 and "nope: unknown codec" in r.stderr


def test_a_file_that_is_not_safetensors_is_one_clear_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04" + bytes(100))
    r = report(str(tmp_path / "x.bin"))
    assert r.returncode == 2 and "not a safetensors file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [("--bound", "abc"), ("--bound", "-1"), ("--chunk", "0")])
def test_bad_options_are_usage_errors(model, args):
    r = report(str(model), *args)
    assert r.returncode == 2 and f"argument {args[0]}" in r.stderr and "Traceback" not in r.stderr
