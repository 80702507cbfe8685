"""Loading a whole file, or a part of it, into torch tensors: what ``load`` and
``MthFile.load`` run (fresh tensors, or in place into a caller's state dict)."""
from __future__ import annotations

from . import backends, dtypes, torchio, tree as tree_mod
from .errors import CorruptFileError, StateMismatchError, short
from .progress import Progress


class LoadReport(UserWarning):
    """What ``load(into=..., strict=False)`` filled, and what it did not (a one-line warning)."""


def _load_tree(f, device: str, progress=None, into=None, subtree=None, strict: bool = True):
    backends.check_load_device(device)
    node, prefix = _select(f.index.tree, subtree) if subtree is not None else (f.index.tree, "")
    refs = set(tree_mod.tensor_refs(node))
    entries = [e for i, e in enumerate(f.index.tensors) if i in refs]
    local = {e.name: e.name[len(prefix):] for e in entries}            # names relative to the subtree
    targets = _targets(f, node, local, into, strict, subtree) if into is not None else {}
    rest = [e for e in entries if e.name not in targets]
    with Progress(progress, sum(e.nbytes for e in entries), "load") as bar:
        if targets:
            _load_into(f, targets, bar)
        if backends.use_gpu_for_load(device):
            from . import gpu

            fresh = gpu.new_device_tensors(f, rest, device)
        else:
            fresh = [torchio.to_device(t, device) for t in torchio.new_tensors(f, rest, bar)]
    by_name = dict(zip((e.name for e in rest), fresh))
    tensors = {i: targets[e.name][1] if e.name in targets else by_name[e.name]
               for i, e in enumerate(f.index.tensors) if i in refs}
    return tree_mod.decode(node, lambda i: tensors[i])


def _select(tree, subtree: str):
    """(node, name prefix) of the part of the saved object at ``subtree`` ("model", "a/b")."""
    node, path = tree, []
    for key in str(subtree).strip("/").split("/"):
        pairs = None
        if isinstance(node, dict) and len(node) == 1:
            kind = next(iter(node))
            pairs = node[kind] if kind == "dict" else (node[kind][0] if kind == "odict" and isinstance(node[kind], list)
                                                        and node[kind] else None)
        if not isinstance(pairs, list):
            raise KeyError(f"subtree {short(subtree)!r}: {short('/'.join(path) or 'the saved object')} is not a dict")
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], dict) and len(p[0]) == 1 for p in pairs):
            raise CorruptFileError(f"corrupt index: a dict of the tree at {short('/'.join(path) or 'the top')!r} "
                                   "is not a list of [key, value] pairs")
        found = [v for k, v in pairs if k.get("str") == key or k.get("int") == key]
        if not found:
            keys = [str(next(iter(k.values()))) for k, _ in pairs if isinstance(k, dict)]
            raise KeyError(f"subtree {short(subtree)!r}: no key {short(key)!r} in {short('/'.join(path) or 'the saved object')}"
                           f" (its keys: {short(', '.join(keys), 200)})")
        node, path = found[0], path + [key]
    return node, "/".join(path) + "/"


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(short(n, 60) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _targets(f, node, local: dict, into, strict: bool, subtree) -> dict:
    """{file name: (entry, tensor)} for the file's tensors (under ``node``) that ``into`` holds at
    the same place, after checking them all. Places are compared as paths of keys and positions
    (``tree.leaf_paths``), not as names: a key holding "/" can name two places alike."""
    itree, leaves = tree_mod.encode(into, torchio.is_tensor)
    given: dict = {}                      # path -> (name in into, tensor)
    for p, i in tree_mod.leaf_paths(itree):
        given.setdefault(p, leaves[i])
    wanted: dict = {}                     # path -> file entry
    for p, i in tree_mod.leaf_paths(node):
        wanted.setdefault(p, f.index.tensors[i])
    missing = [local[e.name] for p, e in wanted.items() if p not in given]       # in the file, not in into
    unexpected = [n for p, (n, _) in given.items() if p not in wanted]          # in into, not in the file
    matched = len(wanted) - len(missing)
    if matched == 0 or (strict and (missing or unexpected)):
        hint = ""
        if subtree is None:
            names = set(n for n, _ in given.values())
            heads = {n.split("/", 1)[0] for n in (local[e.name] for e in wanted.values())
                     if "/" in n and n.split("/", 1)[1] in names}
            if heads:
                hint = f"; the file keeps them under {_names(heads, 3)}: pass subtree={sorted(heads)[0]!r}"
        parts = [f"{len(missing)} tensors of the file are not in into ({_names(missing)})" if missing else "",
                 f"{len(unexpected)} tensors of into are not in the file ({_names(unexpected)})" if unexpected else ""]
        raise StateMismatchError(f"load(into=) {'would fill no tensor' if matched == 0 else 'does not match'}: "
                                 + "; ".join(p for p in parts if p) + hint
                                 + ("" if matched == 0 else "; pass strict=False to fill only the tensors that match"))
    out = {}
    for p, (name, t) in given.items():
        e = wanted.get(p)
        if e is None:
            continue
        want = dtypes.to_torch(e.dtype)
        if t.dtype != want or tuple(t.shape) != e.shape:
            raise StateMismatchError(f"cannot load tensor {short(name)!r} ({e.dtype.name} {list(e.shape)}) into a "
                                     f"tensor of {t.dtype} {list(t.shape)}")
        if e.name in out and not _same_memory(out[e.name][1], t):
            raise StateMismatchError(f"the file holds one tensor ({short(local[e.name])!r}) in places where into "
                                     f"holds two ({short(out[e.name][2])!r} and {short(name)!r}): load without into")
        out[e.name] = (e, t, name)
    if missing or unexpected:
        import warnings

        warnings.warn(f"mithril: load(into=) filled {len(out)} tensors; {len(missing)} of the file were not in into "
                      f"and were loaded fresh{' (' + _names(missing) + ')' if missing else ''}; {len(unexpected)} of "
                      f"into are not in the file and were left as they were"
                      f"{' (' + _names(unexpected) + ')' if unexpected else ''}", LoadReport, stacklevel=5)
    return {k: v[:2] for k, v in out.items()}


def _same_memory(a, b) -> bool:
    """Whether tensors ``a`` and ``b`` are one (or views of the same elements: tied weights that
    ``state_dict()`` hands out as two tensors)."""
    return a is b or (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                      and a.data_ptr() == b.data_ptr())


def _load_into(f, targets: dict, progress=None) -> None:
    """Decode straight into the given tensors: CPU ones through their memory, CUDA ones on the GPU
    (or through a CPU buffer, one tensor at a time, when the GPU backend cannot run)."""
    import torch

    direct = torchio.takes_bytes

    cpu_pairs = [(e, t) for e, t in targets.values() if t.device.type == "cpu" and direct(t)]
    dev_pairs = [(e, t) for e, t in targets.values() if t.device.type == "cuda" and direct(t)]
    other = [(e, t) for e, t in targets.values() if not direct(t) or t.device.type not in ("cpu", "cuda")]
    if cpu_pairs:
        f.decode_into([e for e, _ in cpu_pairs], [torchio.tensor_u8(t).numpy() for _, t in cpu_pairs], progress)
    if dev_pairs and backends.use_gpu_for_load(str(dev_pairs[0][1].device)):
        from . import gpu

        gpu.decode_into_device(f, [e for e, _ in dev_pairs], [torchio.tensor_u8(t) for _, t in dev_pairs], verify=f.verify)
        dev_pairs = []
    for e, t in dev_pairs + other:
        fresh = torchio.new_tensors(f, [e], progress)[0]
        with torch.no_grad():
            t.copy_(fresh)
