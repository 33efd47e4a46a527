"""PyTorch zip checkpoints (torch.save >= 1.6, TorchScript archives): stored entries */data/N."""

from __future__ import annotations

import os
import struct
import zipfile

from . import FormatError, Segment, Window, assemble, role_for
from .pickle_walk import StorageRef, find_storages, walk

MAX_PICKLE = 256 * 1024 * 1024
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, 30 bytes

# Pickles whose storages are model tensors (TorchScript keeps frozen weights in constants).
_WEIGHT_PICKLES = {"data", "constants"}


def parse(w: Window, size: int) -> list[Segment]:
    """List the central directory, read the pickles, map data/<key> entries to tensors."""
    w.max_read = MAX_PICKLE + (1 << 20)  # a lying end record cannot make zipfile read GBs
    try:
        zf = zipfile.ZipFile(w)  # type: ignore[arg-type]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise FormatError(f"bad zip: {e}") from None
    with zf:
        infos = zf.infolist()
        by_name = {i.filename: i for i in infos}
        pickles = [i for i in infos if i.filename.endswith(".pkl") and i.filename.count("/") <= 1]
        if not any(i.filename.rsplit("/", 1)[-1] == "data.pkl" for i in pickles):
            raise FormatError("zip has no data.pkl: not a torch checkpoint")
        storages: dict[str, tuple[StorageRef, str]] = {}  # entry name -> (ref, pickle stem)
        for info in pickles:
            base = info.filename[: -len(".pkl")]  # "archive/data" -> storages in "archive/data/"
            stem = base.rsplit("/", 1)[-1]
            if info.file_size > MAX_PICKLE:
                raise FormatError(f"{info.filename} is {info.file_size} bytes (cap {MAX_PICKLE})")
            try:
                with zf.open(info) as fh:
                    raw = fh.read(MAX_PICKLE + 1)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
                raise FormatError(f"cannot read {info.filename}: {e}") from None
            if len(raw) > MAX_PICKLE:
                raise FormatError(f"{info.filename} exceeds {MAX_PICKLE} bytes")
            try:
                root, _end = walk(raw)
            except FormatError:
                if stem == "data":
                    raise
                continue  # a side pickle (constants, traced inputs) we cannot read: its entries stay bytes
            refs = find_storages(root, "" if stem == "data" else stem)
            for key, ref in refs.items():
                storages.setdefault(f"{base}/{key}", (ref, stem))
        starts = _check_entries(w, infos, by_name, getattr(zf, "start_dir", size))
        tensors: list[Segment] = []
        for info in infos:
            hit = storages.get(info.filename)
            if hit is None or info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
                continue
            ref, stem = hit
            if ref.nbytes != info.file_size or info.compress_size != info.file_size:
                continue  # the pickle and the entry disagree: keep those bytes plain
            start = starts[info.filename]
            if start + info.file_size > size:
                raise FormatError(f"{info.filename}: data past end of file")
            role = role_for(ref.path) if stem in _WEIGHT_PICKLES else "other"
            tensors.append(Segment(start, info.file_size, "tensor", ref.path, ref.dtype, ref.shape, role))
    return assemble(size, tensors)


_DESCRIPTOR = b"PK\x07\x08"


def prefix_segments(f, available: int) -> list[Segment] | None:
    """Tensor segments of a torch.save archive still being written (its first `available`
    bytes), read from the local headers as they stream by: data.pkl comes first and gives
    every data/<key> entry's dtype and size. None if this is not such an archive (yet).

    Only a plan to get ahead with: the final seal uses the central directory (parse())
    and keeps a pre-sealed piece only if it is exactly what that plan wants."""
    fd = f.fileno()

    def local(pos: int) -> tuple[str, int, int | None] | None:
        """(name, data start, size if the header knows it) of the local header at pos."""
        if pos + _LOCAL.size > available:
            return None
        hdr = _LOCAL.unpack(os.pread(fd, _LOCAL.size, pos))
        if hdr[0] != b"PK\x03\x04" or hdr[3] != 0:  # only stored (uncompressed) entries
            return None
        name = os.pread(fd, hdr[9], pos + _LOCAL.size).decode("utf-8", "replace")
        start = pos + _LOCAL.size + hdr[9] + hdr[10]
        return name, start, None if hdr[2] & 8 else hdr[7]

    first = local(0)
    if first is None or not first[0].endswith("/data.pkl") or first[0].count("/") != 1:
        return None
    name, start, size = first
    base = name[: -len(".pkl")]
    n = 1 << 16
    while True:  # read the pickle in growing steps: it is usually a few KiB
        raw = os.pread(fd, min(n, available - start), start)
        try:
            root, end = walk(raw)
            break
        except FormatError:
            if len(raw) < n or n >= MAX_PICKLE:
                return None  # not all there yet, or not a pickle we can read
            n *= 4
    refs = find_storages(root, "")
    tensors: list[Segment] = []
    pos, size = start, end if size is None else size
    while True:
        pos = _next_header(fd, pos + size, available)
        entry = local(pos) if pos is not None else None
        if entry is None:
            return tensors
        name, pos, size = entry
        ref = refs.get(name[len(base) + 1:]) if name.startswith(base + "/") else None
        if ref is not None and size in (None, ref.nbytes):
            size = ref.nbytes
            tensors.append(Segment(pos, size, "tensor", ref.path, ref.dtype, ref.shape,
                                   role_for(ref.path)))
        elif size is None:  # a small side entry (version, byteorder ...): find its end
            size = _descriptor_size(fd, pos, available)
            if size is None:
                return tensors


def _next_header(fd: int, pos: int, available: int) -> int | None:
    """Where the next local header starts after an entry's data ending at pos (a data
    descriptor of 16 or 24 bytes may sit in between)."""
    for skip in (0, 16, 24, 12, 20):
        if pos + skip + 4 <= available and os.pread(fd, 4, pos + skip) == b"PK\x03\x04":
            return pos + skip
    return None


def _descriptor_size(fd: int, start: int, available: int, window: int = 1 << 16) -> int | None:
    """The size of a small entry written with a data descriptor: the first descriptor
    signature after `start` whose compressed-size field equals the distance to it."""
    buf = os.pread(fd, min(window, available - start), start)
    i = buf.find(_DESCRIPTOR)
    while i >= 0 and i + 12 <= len(buf):
        if struct.unpack_from("<L", buf, i + 8)[0] == i:
            return i
        i = buf.find(_DESCRIPTOR, i + 1)
    return None


def _data_offset(w: Window, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: the local header's own name and extra lengths count."""
    hdr = _LOCAL.unpack(w.pread(info.header_offset, _LOCAL.size))
    if hdr[0] != b"PK\x03\x04":
        raise FormatError(f"{info.filename}: bad local header signature")
    return info.header_offset + _LOCAL.size + hdr[9] + hdr[10]


def _check_entries(w: Window, infos: list[zipfile.ZipInfo], by_name: dict, cd_start: int) -> dict[str, int]:
    """Entries must not overlap (a lying directory could alias tensor bytes); returns data offsets."""
    if len(by_name) != len(infos):
        raise FormatError("duplicate entry names in zip")
    starts: dict[str, int] = {}
    prev_end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < prev_end:
            raise FormatError(f"{info.filename}: overlaps the previous entry")
        starts[info.filename] = _data_offset(w, info)
        prev_end = starts[info.filename] + info.compress_size
    if prev_end > cd_start:
        raise FormatError("last entry runs into the central directory")
    return starts
