"""Safetensors dtype names -> numeric ids and bit layouts (one module, one job)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    id: int
    itemsize: int
    kind: str  # "f" float, "i" signed int, "u" unsigned int, "b" bool
    ebits: int = 0  # exponent bits (floats)
    mbits: int = 0  # explicit mantissa bits (floats)

    @property
    def uint(self) -> np.dtype:
        return np.dtype(f"<u{self.itemsize}")

    @property
    def is_float(self) -> bool:
        return self.kind == "f"


_ALL = [
    DType("F64", 1, 8, "f", 11, 52),
    DType("F32", 2, 4, "f", 8, 23),
    DType("F16", 3, 2, "f", 5, 10),
    DType("BF16", 4, 2, "f", 8, 7),
    DType("F8_E4M3", 5, 1, "f", 4, 3),
    DType("F8_E5M2", 6, 1, "f", 5, 2),
    DType("I64", 7, 8, "i"),
    DType("I32", 8, 4, "i"),
    DType("I16", 9, 2, "i"),
    DType("I8", 10, 1, "i"),
    DType("U64", 11, 8, "u"),
    DType("U32", 12, 4, "u"),
    DType("U16", 13, 2, "u"),
    DType("U8", 14, 1, "u"),
    DType("BOOL", 15, 1, "b"),
    DType("F8_E8M0", 16, 1, "f", 8, 0),
    DType("C64", 17, 8, "c"),
]
BY_NAME = {d.name: d for d in _ALL}
BY_ID = {d.id: d for d in _ALL}

#: numpy dtypes for the float types ELF can reconstruct in.
NUMPY_FLOAT = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def lookup(name: str | None, nbytes: int) -> DType | None:
    """The DType for ``name``, or None for opaque bytes (unknown name, None, or a
    byte count that is not a whole number of elements)."""
    if name is None:
        return None
    d = BY_NAME.get(str(name).upper())
    if d is None or nbytes % d.itemsize:
        return None
    return d


def by_id(i: int) -> DType | None:
    return BY_ID.get(i) if i else None


#: element types the lossy codecs (ELF) may code; BF16 is never an ELF input
LOSSY_DTYPES = ("F32", "F16", "F64")


def lossy_allowed(dt: DType | None, bound) -> bool:
    """Whether a lossy coding with ``bound`` may be used for elements of ``dt``."""
    return bound is not None and dt is not None and dt.name in LOSSY_DTYPES
