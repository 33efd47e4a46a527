"""python -m codec FILE.safetensors [--bound B] [--codecs a,b] [--chunk MiB] [--protect]

Reports, per codec, the ratio, encode/decode MB/s (one thread) and max error over the
file's tensors, chunked like the filesystem chunks them (<= 4 MiB per tensor);
``--protect``: with a parity of the sign+exponent streams (the ``protect`` policy).
Reads safetensors files; `elvesfs compress` reads every model format elvesfs parses."""
from __future__ import annotations

import argparse
import os
import sys

from .dtypes import BY_NAME
from .report import add_arguments, chunked, report
from .safetensors_io import open_file, tensors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m codec", description=__doc__.splitlines()[0])
    add_arguments(ap)
    a = ap.parse_args(argv)
    try:
        buf = open_file(a.file)
        found = [(dt if dt in BY_NAME else None, mv) for _n, dt, _s, mv in tensors(buf)]
    except OSError as exc:
        print(f"python -m codec: {a.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # not safetensors, or an empty file
        print(f"python -m codec: {a.file}: {exc} (`elvesfs compress` also reads PyTorch, "
              "TorchScript and GGUF files)", file=sys.stderr)
        return 2
    chunks = chunked(found, int(a.chunk * (1 << 20)))
    try:
        print(f"{a.file}: {len(chunks)} chunks, {sum(c.nbytes for _, c in chunks) / 1e6:.1f} MB")
        rc = report(chunks, a.codecs, a.bound, a.protect)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:  # `python -m codec F | head`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
