"""python -m codec FILE.safetensors [--bound B] [--codecs a,b] [--chunk MiB] [--protect]

Reports, per codec, the ratio, encode/decode MB/s (one thread) and max error over the
file's tensors, chunked like the filesystem chunks them (<= 4 MiB per tensor);
``--protect``: with the sign+exponent streams stored twice (the ``protect`` policy)."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import available_codecs, decode, encode, inspect
from .safetensors_io import open_file, tensors

NPF = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m codec", description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--bound", default=None, help="absolute error bound for ELF, or 'native'")
    ap.add_argument("--codecs", default="zstd,planes,elf,auto")
    ap.add_argument("--chunk", type=float, default=4.0, help="chunk size in MiB")
    ap.add_argument("--protect", action="store_true",
                    help="store the sign+exponent streams twice (what the policy costs)")
    a = ap.parse_args(argv)
    bound = a.bound if a.bound in (None, "native") else float(a.bound)
    buf = open_file(a.file)
    step = int(a.chunk * (1 << 20))
    chunks = [(dt, mv[o:o + step]) for _n, dt, _s, mv in tensors(buf)
              for o in range(0, max(mv.nbytes, 1), step)]
    print(f"{a.file}: {len(chunks)} chunks, {sum(c.nbytes for _, c in chunks) / 1e6:.1f} MB")
    print(f"{'codec':8s} {'ratio':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s} {'max error':>10s}  picks")
    for name in a.codecs.split(","):
        if name != "auto" and name not in available_codecs():
            print(f"{name}: unknown codec", file=sys.stderr)
            return 2
        if name == "elf" and bound is None:
            b = "native"
        else:
            b = bound
        # untimed: the largest chunk of each dtype first, so the speeds do not include
        # loading (or, the first time ever, compiling) the codec's numba kernels
        largest = {}
        for dt, c in chunks:
            if c.nbytes > largest.get(dt, c[:0]).nbytes:
                largest[dt] = c
        for dt, c in largest.items():
            decode(encode(c, dt, codec=name, bound=b, protect=a.protect))
        raw = stored = 0
        te = td = 0.0
        err = 0.0
        picks: dict[str, int] = {}
        for dt, c in chunks:
            t0 = time.perf_counter()
            f = encode(c, dt, codec=name, bound=b, protect=a.protect)
            t1 = time.perf_counter()
            out = decode(f)
            td += time.perf_counter() - t1
            te += t1 - t0
            raw += c.nbytes
            stored += len(f)
            info = inspect(f)
            picks[info.codec] = picks.get(info.codec, 0) + 1
            if info.lossy:
                x = np.frombuffer(c, NPF[dt]).astype(np.float64)
                y = np.frombuffer(out, NPF[dt]).astype(np.float64)
                ok = np.isfinite(x)
                if ok.any():
                    err = max(err, float(np.abs(x[ok] - y[ok]).max()))
            elif out != c:
                print(f"{name}: round trip mismatch!", file=sys.stderr)
                return 1
        print(f"{name:8s} {raw / stored:6.3f}x {raw / te / 1e6:9.0f} {raw / td / 1e6:9.0f} "
              f"{err:10.3g}  {picks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
