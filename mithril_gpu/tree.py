"""The object tree of a checkpoint (FORMAT.md "Tree"): nested containers and plain values, no pickle.

Every node is a JSON object with exactly one key naming its type::

    {"tensor": i}          index into the file's tensor list (two leaves may share one tensor)
    {"ndarray": [i, d]}    tensor i, given back as a numpy array of numpy dtype string d ("<f4", ">u2", "|b1"...)
    {"dict": [[k, v], ...]} keys are nodes too (optimizer state uses int keys), order kept
    {"list": [...]}  {"tuple": [...]}
    {"str": s}  {"int": "decimal"}  {"float": "repr"}  {"bool": b}  {"none": null}
    {"bytes": "base64"}
    {"odict": [[[k, v], ...], m]}   a collections.OrderedDict; m is the node of its ``_metadata``
                                     attribute (what load_state_dict reads), or null if it has none
    {"torch_size": ["2", "3"]}  {"torch_dtype": "bfloat16"}  {"torch_device": "cuda:0"}

Ints are decimal strings (JSON numbers lose precision in many decoders), floats their Python
``repr`` (exact, and covers nan, inf and -0.0).
"""
from __future__ import annotations

import base64
import re
import warnings
from collections import OrderedDict

import numpy as np

from . import dtypes
from .errors import CorruptFileError, UnsupportedValueError, short

MAX_DEPTH = 100
MAX_NODES = 2_000_000     # values a checkpoint's shared containers may repeat (written out again)

#: numpy dtype codes (kind + itemsize) an ``ndarray`` node may name, and the .mth dtype that
#: stores their elements (little-endian)
NDARRAY_CODES = {"b1": "BOOL", "u1": "U8", "i1": "I8", "i2": "I16", "u2": "U16", "i4": "I32", "u4": "U32",
                 "i8": "I64", "u8": "U64", "f2": "F16", "f4": "F32", "f8": "F64"}
#: the numpy dtype strings (``numpy.dtype.str``) an ``ndarray`` node may hold: one-byte types
#: with "|", the others with "<" (little-endian) or ">" (big-endian)
NDARRAY_DESCRS = frozenset(("|" + c) if c[1] == "1" else (o + c) for c in NDARRAY_CODES
                           for o in ("<", ">"))
#: numpy array types stored as arrays (subclasses such as masked arrays carry more than their
#: elements and are refused)
NDARRAY_TYPES = (np.ndarray, np.memmap)
#: node kinds that need the "torch" feature (torch values that torch.load(weights_only=True) allows)
TORCH_KINDS = frozenset(("odict", "torch_size", "torch_dtype", "torch_device"))
#: kinds whose value is a list of [key, value] pairs
_PAIR_KINDS = ("dict", "odict")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,40}")
_DIM = re.compile(r"-?[0-9]{1,19}")
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,40}(:[0-9]{1,6})?")


def _key_label(k) -> str:
    return k if isinstance(k, str) else str(k)


def _check_text(s: str, where: str) -> None:
    """A string must be encodable as UTF-8 (the index is UTF-8 JSON): refuse lone surrogates."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(s[e.start])
        raise UnsupportedValueError(
            f"cannot store the string {short(s, 60)} at {short(where)}: it holds a lone surrogate (U+{bad:04X}), "
            "which UTF-8 cannot encode (a file name decoded with surrogateescape?); decode it properly "
            "first") from None


def _array_leaf(a: np.ndarray, where: str):
    """The torch tensor that stores numpy array ``a`` (its elements, little-endian, C order), and
    the dtype string its node records."""
    import torch

    descr = a.dtype.str
    if descr[1:] not in NDARRAY_CODES or a.dtype.fields is not None or descr not in NDARRAY_DESCRS:
        why = (": its elements are Python objects, which only pickle could store" if a.dtype.kind == "O" else "")
        raise UnsupportedValueError(
            f"cannot store a numpy array of dtype {short(a.dtype, 40)} at {short(where)}{why}; mithril stores "
            "numpy arrays of bool, int8-64, uint8-64 and float16/32/64 (either byte order): convert it first")
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    if descr[0] == ">":                    # stored little-endian, given back big-endian
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    with warnings.catch_warnings():        # read-only arrays: the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a), descr


def encode(obj, is_tensor) -> tuple[object, list[tuple[str, object]]]:
    """Return (tree node, [(name, tensor), ...]). Tensors seen twice (by identity) are stored once.

    Tensor names are the '/'-joined path of keys, or the key itself for a flat dict; they are
    what lazy access and delta matching use. Numpy arrays of numeric dtypes become ``ndarray``
    nodes whose elements are stored as a tensor (a torch view of the array where it is
    little-endian and C-contiguous, a copy otherwise).
    """
    leaves: list[tuple[str, object]] = []
    seen: dict[int, int] = {}
    names: set[str] = set()

    def name_for(path):
        base = "/".join(path) if path else "tensor"
        n, k = base, 1
        while n in names:
            n, k = f"{base}#{k}", k + 1
        names.add(n)
        return n

    count, repeated, sizes = [0], [0], {}

    def walk(o, path, depth):
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(f"checkpoint nests deeper than {MAX_DEPTH} levels at "
                                        f"{short('/'.join(path))}")
        count[0] += 1
        if isinstance(o, (dict, list)) or type(o) is tuple:
            # A container met again (shared) is written out again in full: lists that hold one
            # list twice, 40 deep, are 2^40 values from a 2 KB file. What repeats is bounded, by
            # the sizes its first visits found (so it is refused before it is walked again).
            size = sizes.get(id(o))
            if size is not None:
                repeated[0] += size
                if repeated[0] > MAX_NODES:
                    raise UnsupportedValueError(
                        f"the checkpoint's containers are shared over and over: written out, they repeat "
                        f"more than {MAX_NODES:,} values (at {short('/'.join(path))})")
            start = count[0]
            node = walk_container(o, path, depth)
            sizes[id(o)] = count[0] - start + 1
            return node
        return walk_value(o, path, depth)

    def walk_container(o, path, depth):
        if isinstance(o, dict):
            pairs = []
            for k, v in o.items():
                if _is_plain_key(k):
                    if type(k) is str:
                        _check_text(k, "/".join(path + ["<key>"]))
                    key = _scalar(k)
                else:
                    key = walk(k, path + ["<key>"], depth + 1)
                pairs.append([key, walk(v, path + [_key_label(k)], depth + 1)])
            if isinstance(o, OrderedDict):
                meta = getattr(o, "_metadata", _ABSENT)
                return {"odict": [pairs, None if meta is _ABSENT else walk(meta, path + ["<_metadata>"], depth + 1)]}
            return {"dict": pairs}
        if isinstance(o, list):
            return {"list": [walk(v, path + [str(i)], depth + 1) for i, v in enumerate(o)]}
        return {"tuple": [walk(v, path + [str(i)], depth + 1) for i, v in enumerate(o)]}

    def walk_value(o, path, depth):
        if is_tensor(o):
            i = seen.get(id(o))
            if i is None:
                i = seen[id(o)] = len(leaves)
                leaves.append((name_for(path), o))
            return {"tensor": i}
        if type(o) in NDARRAY_TYPES:
            i = seen.get(id(o))
            descr = o.dtype.str
            if i is None:
                t, descr = _array_leaf(o, "/".join(path) or "<top level>")
                i = seen[id(o)] = len(leaves)
                leaves.append((name_for(path), t))
            return {"ndarray": [i, descr]}
        torch_node = _torch_value(o)
        if torch_node is not None:
            return torch_node
        if type(o) is str:
            _check_text(o, "/".join(path) or "<top level>")
        try:
            return _scalar(o)
        except UnsupportedValueError as e:
            where = "/".join(path) or "<top level>"
            if type(o) is int:           # (too long an int: _scalar says why)
                raise UnsupportedValueError(f"at {short(where)}: {e}") from None
            raise UnsupportedValueError(
                f"cannot store a value of type {type(o).__module__}.{type(o).__qualname__} at {short(where)}: "
                "mithril stores tensors, numpy arrays, dicts, lists, tuples, str, int, float, bool, None, "
                "bytes, torch.Size, torch.dtype and torch.device (no pickle); convert it first") from None

    tree = walk(obj, [], 0)
    return tree, leaves


_ABSENT = object()


def _torch_value(o):
    """The node of a torch.Size, torch.dtype or torch.device, or None for anything else (torch
    is looked at only if it is already imported: a value of it cannot exist otherwise)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if type(o) is torch.Size:
        return {"torch_size": [str(int(d)) for d in o]}
    if isinstance(o, torch.dtype):
        return {"torch_dtype": str(o).removeprefix("torch.")}
    if isinstance(o, torch.device):
        return {"torch_device": str(o)}
    return None


def _torch_node(kind: str, v):
    """The torch value of a ``torch_*`` node (None if the node is malformed)."""
    import torch

    if kind == "torch_size" and isinstance(v, list) and len(v) <= 64 \
            and all(isinstance(d, str) and _DIM.fullmatch(d) and -2 ** 63 <= int(d) < 2 ** 63 for d in v):
        return torch.Size(int(d) for d in v)
    if kind == "torch_dtype" and isinstance(v, str) and _NAME.fullmatch(v):
        dt = getattr(torch, v, None)
        return dt if isinstance(dt, torch.dtype) else None
    if kind == "torch_device" and isinstance(v, str) and _DEVICE.fullmatch(v):
        try:
            d = torch.device(v)
        except (RuntimeError, ValueError):
            return None
        return d if str(d) == v else None    # (torch keeps an index below 64 and wraps others: refused)
    return None


def _is_plain_key(k) -> bool:
    return type(k) in (str, int, float, bool) or k is None


MAX_INT_CHARS = 4300      # an int node's text, sign included (Python's default limit on int(str))


def _scalar(o):
    if o is None:
        return {"none": None}
    if isinstance(o, bool):
        return {"bool": o}
    if isinstance(o, int) and type(o) in (int,):
        try:
            text = str(o)
        except ValueError:          # (over Python's digit limit for str(); a reader refuses it too)
            text = None
        if text is None or len(text) > MAX_INT_CHARS:
            raise UnsupportedValueError(f"an int of more than {MAX_INT_CHARS} characters cannot be stored (a "
                                        "reader refuses longer ones)") from None
        return {"int": text}
    if isinstance(o, float) and type(o) is float:
        return {"float": repr(o)}
    if isinstance(o, str) and type(o) is str:
        return {"str": o}
    if isinstance(o, (bytes, bytearray)):
        return {"bytes": base64.b64encode(bytes(o)).decode("ascii")}
    raise UnsupportedValueError(type(o).__name__)


class Stub:
    """A stand-in for tensor ``index`` of .mth dtype ``dtype`` (its name, "F32"...), for checking
    a tree without decoding any tensor (:func:`check`)."""

    __slots__ = ("index", "dtype")

    def __init__(self, index: int, dtype: str):
        self.index, self.dtype = index, dtype

    def __repr__(self) -> str:
        return f"<tensor {self.index} ({self.dtype})>"


def to_ndarray(t, descr: str, i: int = -1):
    """The numpy array of dtype string ``descr`` that tensor ``t`` (a torch tensor) stores. A
    :class:`Stub` or a meta tensor (stand-ins that hold no data, for checking a tree) is returned
    as it is once its dtype is checked."""
    want = NDARRAY_CODES[descr[1:]]
    if isinstance(t, Stub):
        have = t.dtype
    else:
        try:
            have = dtypes.from_torch(t.dtype).name
        except (UnsupportedValueError, AttributeError):
            have = None
    if have != want:
        raise CorruptFileError(f"corrupt index: ndarray node {descr} names tensor {i} of dtype {have}, "
                               f"not {want}")
    if isinstance(t, Stub) or t.device.type == "meta":
        return t
    a = t.detach().cpu().numpy()
    if descr[0] == ">":
        a = a.byteswap().view(np.dtype(descr))
    return a


def decode(node, tensor_at, depth: int = 0):
    """Rebuild the object from a tree node; ``tensor_at(i)`` returns tensor i (a torch tensor;
    ``ndarray`` nodes give it back as a numpy array, see :func:`to_ndarray`)."""
    if depth > MAX_DEPTH:
        raise CorruptFileError("corrupt index: tree nests too deep")
    if not isinstance(node, dict) or len(node) != 1:
        raise CorruptFileError(f"corrupt index: bad tree node {short(str(node)[:80])}")
    (kind, v), = node.items()
    try:
        if kind == "tensor":
            return tensor_at(v)
        if kind == "ndarray" and isinstance(v, list) and len(v) == 2 and type(v[0]) is int \
                and isinstance(v[1], str) and v[1] in NDARRAY_DESCRS:
            return to_ndarray(tensor_at(v[0]), v[1], v[0])
        if kind == "dict":
            out = {}
            for k, val in v:
                key = decode(k, tensor_at, depth + 1)
                out[key] = decode(val, tensor_at, depth + 1)
            return out
        if kind == "odict" and isinstance(v, list) and len(v) == 2 and isinstance(v[0], list):
            out = OrderedDict()
            for k, val in v[0]:
                key = decode(k, tensor_at, depth + 1)
                out[key] = decode(val, tensor_at, depth + 1)
            if v[1] is not None:
                out._metadata = decode(v[1], tensor_at, depth + 1)
            return out
        if kind in TORCH_KINDS:
            value = _torch_node(kind, v)
            if value is not None:
                return value
        if kind == "list":
            return [decode(x, tensor_at, depth + 1) for x in v]
        if kind == "tuple":
            return tuple(decode(x, tensor_at, depth + 1) for x in v)
        if kind == "str" and isinstance(v, str):
            return v
        if kind == "int" and isinstance(v, str) and len(v) <= MAX_INT_CHARS:
            return int(v)
        if kind == "float" and isinstance(v, str):
            return float(v)
        if kind == "bool" and isinstance(v, bool):
            return v
        if kind == "none" and v is None:
            return None
        if kind == "bytes" and isinstance(v, str):
            return base64.b64decode(v, validate=True)
    except CorruptFileError:
        raise
    except (TypeError, ValueError):
        pass
    raise CorruptFileError(f"corrupt index: bad tree node {short(str(node)[:80])}")


def check(node, dtype_names: list[str]):
    """Check a whole tree as :func:`decode` would rebuild it, with :class:`Stub` for tensors
    (``dtype_names[i]`` is tensor i's .mth dtype): raises :class:`CorruptFileError` where a load
    would, decodes no tensor. Returns the rebuilt object (stubs in place of tensors)."""
    n = len(dtype_names)

    def stub(i):
        if type(i) is not int or not 0 <= i < n:
            raise CorruptFileError(f"corrupt index: tree refers to tensor {short(repr(i), 40)} of {n}")
        return Stub(i, dtype_names[i])
    return decode(node, stub)


def tensor_refs(node, depth: int = 0):
    """Yield every tensor index the tree refers to (for validation)."""
    if depth > MAX_DEPTH or not isinstance(node, dict):
        return
    for kind, v in node.items():
        if kind == "tensor":
            yield v
        elif kind == "ndarray" and isinstance(v, list) and v:
            yield v[0]
        else:
            for x in children(kind, v):
                yield from tensor_refs(x, depth + 1)


def leaf_paths(node, path: tuple = (), depth: int = 0):
    """Yield (path, tensor index) for every tensor (or numpy array) the tree holds, outside dict
    keys. A path is a tuple of steps: ("k", the key's node as JSON) into a dict's value, ("i", n)
    into a list's or tuple's item, ("m",) into an OrderedDict's ``_metadata``. Unlike tensor names
    ('/'-joined labels, made unique in order of appearance: {"a/b": x, "a": {"b": y}} names y
    "a/b#1"), two different places never share a path."""
    if depth > MAX_DEPTH or not isinstance(node, dict):
        return
    import json

    for kind, v in node.items():
        if kind == "tensor":
            yield path, v
        elif kind == "ndarray" and isinstance(v, list) and v:
            yield path, v[0]
        elif kind in ("dict", "odict"):
            odict = kind == "odict" and isinstance(v, list) and len(v) == 2
            pairs = v[0] if odict else v
            for pair in pairs if isinstance(pairs, list) else ():
                if isinstance(pair, list) and len(pair) == 2:
                    step = ("k", json.dumps(pair[0], sort_keys=True, separators=(",", ":")))
                    yield from leaf_paths(pair[1], path + (step,), depth + 1)
            if odict and isinstance(v[1], dict):
                yield from leaf_paths(v[1], path + (("m",),), depth + 1)
        elif kind in ("list", "tuple") and isinstance(v, list):
            for i, x in enumerate(v):
                yield from leaf_paths(x, path + (("i", i),), depth + 1)


def children(kind: str, v):
    """The child nodes of a node of ``kind`` with value ``v`` (keys too), as far as they are well formed."""
    if kind == "odict" and isinstance(v, list) and len(v) == 2:
        yield from children("dict", v[0])
        if isinstance(v[1], dict):
            yield v[1]
    elif kind == "dict" and isinstance(v, list):
        for pair in v:
            if isinstance(pair, list):
                yield from pair
    elif kind in ("list", "tuple") and isinstance(v, list):
        yield from v


def features(node) -> set[str]:
    """The optional format features (FORMAT.md "Index") a tree uses: ``"ndarray"`` if it holds an
    ``ndarray`` node, ``"torch"`` if it holds an ``odict`` or ``torch_*`` node. For the writer's
    ``features`` list."""
    found = set()
    stack = [(node, 0)]
    while stack:
        n, depth = stack.pop()
        if depth > MAX_DEPTH or not isinstance(n, dict):
            continue
        for kind, v in n.items():
            if kind == "ndarray":
                found.add("ndarray")
            elif kind in TORCH_KINDS:
                found.add("torch")
            stack.extend((x, depth + 1) for x in children(kind, v))
    return found
