"""A pickle stack machine that builds inert placeholders, so torch pickles can be read safely.

Nothing is imported or called: GLOBAL becomes a ``Global`` name, REDUCE/NEWOBJ/BUILD
record their operands, and persistent ids (torch storages) become ``PersRef``.  Then
``find_storages`` walks the resulting graph to recover each storage's key, dtype,
element count and the state-dict key path where it first appears.
"""

from __future__ import annotations

import io
import math
import pickletools
from dataclasses import dataclass

from . import FormatError, dtype_itemsize

MAX_OPS = 20_000_000


class PickleTruncated(FormatError):
    """The pickle ran off the end of the bytes given: a longer read may fix it."""


@dataclass(frozen=True, slots=True)
class Global:
    """A GLOBAL reference, never resolved."""

    module: str
    name: str


class Obj:
    """Result of REDUCE/NEWOBJ/OBJ/INST: the callable, its args, and what was added later."""

    __slots__ = ("func", "args", "state", "items", "elems")

    def __init__(self, func: object, args: object) -> None:
        self.func = func
        self.args = args
        self.state: object = None
        self.items: list[tuple[object, object]] = []
        self.elems: list[object] = []


class PDict:
    """A dict as an ordered list of pairs (keys may be unhashable placeholders)."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[object, object]] | None = None) -> None:
        self.items = items if items is not None else []


class PList:
    """A list or set."""

    __slots__ = ("elems",)

    def __init__(self, elems: list[object] | None = None) -> None:
        self.elems = elems if elems is not None else []


class PersRef:
    """A persistent id: in torch files, a storage reference tuple."""

    __slots__ = ("pid",)

    def __init__(self, pid: object) -> None:
        self.pid = pid


class Opaque:
    """Anything the walker does not model (extension codes, out-of-band buffers)."""

    __slots__ = ()


_OPAQUE = Opaque()
_SIMPLE_PUSH = frozenset(
    """INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT STRING BINSTRING
    SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 UNICODE BINUNICODE
    SHORT_BINUNICODE BINUNICODE8""".split()
)


def walk(data: bytes, max_ops: int = MAX_OPS) -> tuple[object, int]:
    """Run the pickle at the start of ``data`` symbolically; return (root, end offset)."""
    bio = io.BytesIO(data)
    stack: list[object] = []
    metastack: list[list[object]] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list[object]:
        nonlocal stack
        if not metastack:
            raise FormatError("pickle: mark stack underflow")
        items = stack
        stack = metastack.pop()
        return items

    def pop() -> object:
        if not stack:
            raise FormatError("pickle: stack underflow")
        return stack.pop()

    def top() -> object:
        if not stack:
            raise FormatError("pickle: stack underflow")
        return stack[-1]

    n = 0
    try:
        for op, arg, pos in pickletools.genops(bio):
            n += 1
            if n > max_ops:
                raise FormatError(f"pickle: more than {max_ops} opcodes")
            name = op.name
            if name in _SIMPLE_PUSH:
                stack.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = top()
            elif name == "MEMOIZE":
                memo[len(memo)] = top()
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                if arg not in memo:
                    raise FormatError(f"pickle: memo key {arg} missing")
                stack.append(memo[arg])
            elif name == "MARK":
                metastack.append(stack)
                stack = []
            elif name == "TUPLE":
                items = pop_mark()  # rebinds stack: never inline into stack.append(...)
                stack.append(tuple(items))
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "TUPLE1":
                stack.append((pop(),))
            elif name == "TUPLE2":
                b = pop()
                stack.append((pop(), b))
            elif name == "TUPLE3":
                c = pop()
                b = pop()
                stack.append((pop(), b, c))
            elif name == "EMPTY_DICT":
                stack.append(PDict())
            elif name == "DICT":
                items = pop_mark()
                stack.append(PDict(list(zip(items[::2], items[1::2]))))
            elif name == "SETITEM":
                v = pop()
                k = pop()
                _add_items(top(), [(k, v)])
            elif name == "SETITEMS":
                items = pop_mark()
                _add_items(top(), list(zip(items[::2], items[1::2])))
            elif name in ("EMPTY_LIST", "EMPTY_SET"):
                stack.append(PList())
            elif name in ("LIST", "FROZENSET"):
                items = pop_mark()
                stack.append(PList(items))
            elif name == "APPEND":
                v = pop()
                _add_elems(top(), [v])
            elif name in ("APPENDS", "ADDITEMS"):
                items = pop_mark()
                _add_elems(top(), items)
            elif name == "NONE":
                stack.append(None)
            elif name == "NEWTRUE":
                stack.append(True)
            elif name == "NEWFALSE":
                stack.append(False)
            elif name == "GLOBAL":
                mod, _, nm = str(arg).partition(" ")
                stack.append(Global(mod, nm))
            elif name == "STACK_GLOBAL":
                nm = pop()
                mod = pop()
                stack.append(Global(str(mod), str(nm)))
            elif name in ("REDUCE", "NEWOBJ"):
                args = pop()
                stack.append(Obj(pop(), args))
            elif name == "NEWOBJ_EX":
                pop()  # kwargs
                args = pop()
                stack.append(Obj(pop(), args))
            elif name == "OBJ":
                items = pop_mark()
                if not items:
                    raise FormatError("pickle: OBJ without class")
                stack.append(Obj(items[0], tuple(items[1:])))
            elif name == "INST":
                mod, _, nm = str(arg).partition(" ")
                items = pop_mark()
                stack.append(Obj(Global(mod, nm), tuple(items)))
            elif name == "BUILD":
                state = pop()
                t = top()
                if isinstance(t, Obj):
                    t.state = state
            elif name == "BINPERSID":
                stack.append(PersRef(pop()))
            elif name == "PERSID":
                stack.append(PersRef(arg))
            elif name == "POP":
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(top())
            elif name in ("EXT1", "EXT2", "EXT4", "NEXT_BUFFER"):
                stack.append(_OPAQUE)
            elif name in ("PROTO", "FRAME", "READONLY_BUFFER"):
                pass
            elif name == "STOP":
                if len(stack) != 1 or metastack:
                    raise FormatError("pickle: malformed stack at STOP")
                return stack[0], pos + 1
            else:
                raise FormatError(f"pickle: unsupported opcode {name}")
    except FormatError:
        raise
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, IndexError, TypeError) as e:
        if bio.tell() >= len(data):
            raise PickleTruncated(f"pickle: truncated ({e})") from None
        raise FormatError(f"pickle: {e}") from None
    raise PickleTruncated("pickle: no STOP opcode")


def _add_items(target: object, pairs: list[tuple[object, object]]) -> None:
    if isinstance(target, (PDict, Obj)):
        target.items.extend(pairs)


def _add_elems(target: object, elems: list[object]) -> None:
    if isinstance(target, (PList, Obj)):
        target.elems.extend(elems)


# Typed storage class names, as torch pickles them, to safetensors dtype names.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
    "QInt8Storage": "I8",
    "QUInt8Storage": "U8",
    "QInt32Storage": "I32",
    "QUInt4x2Storage": "U8",
    "QUInt2x4Storage": "U8",
}

# torch.<dtype> names (GLOBAL 'torch float8_e4m3fn') to safetensors dtype names.
TORCH_DTYPES: dict[str, str] = {
    "float64": "F64",
    "double": "F64",
    "float32": "F32",
    "float": "F32",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    "float4_e2m1fn_x2": "F4_E2M1_X2",
    "int64": "I64",
    "long": "I64",
    "int32": "I32",
    "int": "I32",
    "int16": "I16",
    "short": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "complex32": "C32",
    "complex64": "C64",
    "cfloat": "C64",
    "complex128": "C128",
    "cdouble": "C128",
    "qint8": "I8",
    "quint8": "U8",
    "qint32": "I32",
}


@dataclass
class StorageRef:
    """What a pickle says about one storage; numel is in elements of dtype."""

    key: str
    dtype: str
    numel: int
    path: str | None
    shape: tuple[int, ...]
    nbytes: int
    untyped: bool  # pickled as UntypedStorage: its legacy on-disk count is in bytes


# Module attribute containers that only add noise to a key path.
_SKIP_ATTRS = frozenset({"_parameters", "_buffers", "_modules"})


def _storage_info(pid: object) -> tuple[str, str | None, int] | None:
    """(key, dtype or None for untyped, count) from a torch ('storage', type, key, loc, numel, ...) pid."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        return None
    stype, key, count = pid[1], pid[2], pid[4]
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        return None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return None
    if not isinstance(stype, Global):
        return None
    if stype.name == "UntypedStorage":
        return str(key), None, count
    dtype = STORAGE_DTYPES.get(stype.name)
    if dtype is None:
        return None
    return str(key), dtype, count


def _is_rebuild(o: Obj) -> bool:
    f = o.func
    return isinstance(f, Global) and f.module == "torch._utils" and f.name.startswith("_rebuild_")


def _int_tuple(v: object) -> tuple[int, ...] | None:
    if isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return v  # type: ignore[return-value]
    return None


def _contiguous(size: tuple[int, ...], stride: object) -> bool:
    st = _int_tuple(stride)
    if st is None or len(st) != len(size):
        return False
    expect = 1
    for d, s in zip(reversed(size), reversed(st)):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


# A key path as a cons list (parent, component): extending it is O(1) however deep the graph.
_Path = tuple | None


def _join(path: _Path) -> str | None:
    parts: list[str] = []
    while path is not None:
        path, comp = path
        parts.append(comp)
    return ".".join(reversed(parts)) if parts else None


def find_storages(root: object, prefix: str = "") -> dict[str, StorageRef]:
    """Storages in order of first appearance (depth-first, dict order), each with its key path."""
    found: dict[str, StorageRef] = {}
    seen: set[int] = set()
    # (node, path, transparent): tuples inside a torch.* call's args add no path component,
    # so Parameter(_rebuild_tensor(...)) and tensor subclasses keep their state-dict key.
    todo: list[tuple[object, _Path, bool]] = [(root, (None, prefix) if prefix else None, False)]
    while todo:
        node, path, transparent = todo.pop()
        if node is None or isinstance(node, (str, bytes, bytearray, int, float, Global, Opaque)):
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        kids: list[tuple[object, _Path, bool]] = []
        if isinstance(node, PersRef):
            _record(found, node, path, None)
        elif isinstance(node, Obj):
            args = node.args
            torch_call = isinstance(node.func, Global) and node.func.module.split(".")[0] == "torch"
            if torch_call and _is_rebuild(node) and isinstance(args, tuple) and args and isinstance(args[0], PersRef):
                _record(found, args[0], path, args)
                seen.add(id(args[0]))
                kids.extend((a, path, True) for a in args[1:])
            else:
                kids.append((args, path, torch_call))
            st = node.state
            if isinstance(st, PDict):
                kids.extend(_keyed(st.items, path))
            elif st is not None:
                kids.append((st, path, True))
            kids.extend(_keyed(node.items, path))
            kids.extend((e, (path, str(i)), False) for i, e in enumerate(node.elems))
        elif isinstance(node, PDict):
            kids.extend(_keyed(node.items, path))
        elif isinstance(node, PList):
            kids.extend((e, (path, str(i)), False) for i, e in enumerate(node.elems))
        elif isinstance(node, tuple):
            if transparent:
                kids.extend((e, path, True) for e in node)
            else:
                kids.extend((e, (path, str(i)), False) for i, e in enumerate(node))
        todo.extend(reversed(kids))
    return found


def _keyed(items: list[tuple[object, object]], path: _Path) -> list[tuple[object, _Path, bool]]:
    out = []
    for k, v in items:
        ks = str(k) if isinstance(k, (str, int, float)) else "?"
        out.append((v, path if ks in _SKIP_ATTRS else (path, ks), False))
    return out


def _record(found: dict[str, StorageRef], ref: PersRef, path: _Path, args: tuple | None) -> None:
    info = _storage_info(ref.pid)
    if info is None:
        return
    key, dtype, count = info
    if key in found:
        return
    untyped = dtype is None
    nbytes = count * (dtype_itemsize(dtype) or 1) if dtype else count
    if untyped:  # count is bytes; the dtype is a rebuild argument
        hint = args[6] if args is not None and len(args) > 6 else None
        dtype = TORCH_DTYPES.get(hint.name, "U8") if isinstance(hint, Global) and hint.module == "torch" else "U8"
        isz = dtype_itemsize(dtype) or 1
        if count % isz:
            dtype, isz = "U8", 1
        count //= isz
    shape: tuple[int, ...] = (count,)
    if args is not None and len(args) >= 4:
        size = _int_tuple(args[2])
        if size is not None and args[1] == 0 and math.prod(size) == count and _contiguous(size, args[3]):
            shape = size
    found[key] = StorageRef(key, dtype, count, _join(path), shape, nbytes, untyped)
