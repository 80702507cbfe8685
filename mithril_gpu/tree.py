"""The object tree of a checkpoint (FORMAT.md "Tree"): nested containers and plain values, no pickle.

Every node is a JSON object with exactly one key naming its type::

    {"tensor": i}          index into the file's tensor list (two leaves may share one tensor)
    {"dict": [[k, v], ...]} keys are nodes too (optimizer state uses int keys), order kept
    {"list": [...]}  {"tuple": [...]}
    {"str": s}  {"int": "decimal"}  {"float": "repr"}  {"bool": b}  {"none": null}
    {"bytes": "base64"}

Ints are decimal strings (JSON numbers lose precision in many decoders), floats their Python
``repr`` (exact, and covers nan, inf and -0.0).
"""
from __future__ import annotations

import base64

from .errors import CorruptFileError, UnsupportedValueError

MAX_DEPTH = 100


def _key_label(k) -> str:
    return k if isinstance(k, str) else str(k)


def encode(obj, is_tensor) -> tuple[object, list[tuple[str, object]]]:
    """Return (tree node, [(name, tensor), ...]). Tensors seen twice (by identity) are stored once.

    Tensor names are the '/'-joined path of keys, or the key itself for a flat dict; they are
    what lazy access and delta matching use.
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

    def walk(o, path, depth):
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(f"checkpoint nests deeper than {MAX_DEPTH} levels at {'/'.join(path)}")
        if is_tensor(o):
            i = seen.get(id(o))
            if i is None:
                i = seen[id(o)] = len(leaves)
                leaves.append((name_for(path), o))
            return {"tensor": i}
        if isinstance(o, dict):
            return {"dict": [[walk(k, path + ["<key>"], depth + 1) if not _is_plain_key(k) else _scalar(k),
                              walk(v, path + [_key_label(k)], depth + 1)] for k, v in o.items()]}
        if isinstance(o, list):
            return {"list": [walk(v, path + [str(i)], depth + 1) for i, v in enumerate(o)]}
        if isinstance(o, tuple) and type(o) is tuple:
            return {"tuple": [walk(v, path + [str(i)], depth + 1) for i, v in enumerate(o)]}
        try:
            return _scalar(o)
        except UnsupportedValueError:
            where = "/".join(path) or "<top level>"
            raise UnsupportedValueError(
                f"cannot store a value of type {type(o).__module__}.{type(o).__qualname__} at {where}: "
                "mithril stores tensors, dicts, lists, tuples, str, int, float, bool, None and bytes "
                "(no pickle); convert it first") from None

    tree = walk(obj, [], 0)
    return tree, leaves


def _is_plain_key(k) -> bool:
    return isinstance(k, (str, int, float, bool)) or k is None


def _scalar(o):
    if o is None:
        return {"none": None}
    if isinstance(o, bool):
        return {"bool": o}
    if isinstance(o, int) and type(o) in (int,):
        return {"int": str(o)}
    if isinstance(o, float) and type(o) is float:
        return {"float": repr(o)}
    if isinstance(o, str) and type(o) is str:
        return {"str": o}
    if isinstance(o, (bytes, bytearray)):
        return {"bytes": base64.b64encode(bytes(o)).decode("ascii")}
    raise UnsupportedValueError(type(o).__name__)


def decode(node, tensor_at, depth: int = 0):
    """Rebuild the object from a tree node; ``tensor_at(i)`` returns tensor i."""
    if depth > MAX_DEPTH:
        raise CorruptFileError("corrupt index: tree nests too deep")
    if not isinstance(node, dict) or len(node) != 1:
        raise CorruptFileError(f"corrupt index: bad tree node {str(node)[:80]}")
    (kind, v), = node.items()
    try:
        if kind == "tensor":
            return tensor_at(v)
        if kind == "dict":
            out = {}
            for k, val in v:
                key = decode(k, tensor_at, depth + 1)
                out[key] = decode(val, tensor_at, depth + 1)
            return out
        if kind == "list":
            return [decode(x, tensor_at, depth + 1) for x in v]
        if kind == "tuple":
            return tuple(decode(x, tensor_at, depth + 1) for x in v)
        if kind == "str" and isinstance(v, str):
            return v
        if kind == "int" and isinstance(v, str) and len(v) <= 4300:
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
    raise CorruptFileError(f"corrupt index: bad tree node {str(node)[:80]}")


def tensor_refs(node, depth: int = 0):
    """Yield every tensor index the tree refers to (for validation)."""
    if depth > MAX_DEPTH or not isinstance(node, dict):
        return
    for kind, v in node.items():
        if kind == "tensor":
            yield v
        elif kind == "dict" and isinstance(v, list):
            for pair in v:
                if isinstance(pair, list):
                    for x in pair:
                        yield from tensor_refs(x, depth + 1)
        elif kind in ("list", "tuple") and isinstance(v, list):
            for x in v:
                yield from tensor_refs(x, depth + 1)


