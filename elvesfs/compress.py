"""`elvesfs compress FILE`: codec/'s per-codec report (ratio, MB/s, max error) on any
model file elvesfs parses (safetensors, PyTorch zip and legacy pickles, TorchScript,
GGUF): the file's tensors, cut into pieces as the filesystem cuts them. `python -m
codec` gives the same report on safetensors files only (codec/ knows no other format)."""

from __future__ import annotations

import argparse
import mmap
import os

from codec.dtypes import BY_NAME
from codec.report import add_arguments, chunked, report

from . import formats
from .errors import CliError


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="elvesfs compress", description=__doc__.splitlines()[0])
    add_arguments(ap)
    a = ap.parse_args(argv)
    try:
        with open(a.file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            parsed = formats.parse(f, size)
            if parsed.format == "plain":
                raise CliError(f"{a.file} is not a model file elvesfs parses "
                               f"({parsed.note or 'empty'}); it would be stored as plain bytes")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise CliError(f"{a.file}: {exc.strerror or exc}") from None
    mv = memoryview(buf)
    found = [(s.dtype if s.dtype in BY_NAME else None, mv[s.offset:s.offset + s.length])
             for s in parsed.segments if s.kind == "tensor"]
    chunks = chunked(found, int(a.chunk * (1 << 20)))
    print(f"{a.file}: {parsed.format}, {len(found)} tensors in {len(chunks)} chunks, "
          f"{sum(c.nbytes for _, c in chunks) / 1e6:.1f} MB of {size / 1e6:.1f} MB")
    return report(chunks, a.codecs, a.bound, a.protect)
