"""The Python API: save, load, open. The only module that converts between torch and bytes."""
from __future__ import annotations

import os

import numpy as np

from . import backends, container, dtypes, tree as tree_mod
from .cpu import EncodeItem, default_threads
from .deltaplan import plan_deltas
from .errors import StateMismatchError, UnsupportedValueError, short
from .reader import MthFile, _alloc
from .transforms import default_transform
from .writer import write_mth


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def tensor_u8(t):
    """A tensor's little-endian bytes as a flat uint8 torch tensor on its own device (a copy only
    if it is not contiguous or has a lazy conjugate/negation bit). The caller's tensor is never
    written to."""
    import torch

    if t.layout != torch.strided:
        raise UnsupportedValueError(f"cannot store a {t.layout} tensor: convert it to dense first")
    if t.is_quantized or t.device.type == "meta":
        raise UnsupportedValueError(f"cannot store a {'quantized' if t.is_quantized else 'meta'} tensor")
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def tensor_bytes(t) -> np.ndarray:
    """The bytes of a CPU tensor as a read-only numpy uint8 view (see :func:`tensor_u8`)."""
    a = tensor_u8(t).numpy()
    a.flags.writeable = False
    return a


def _source_for(t):
    """Bytes of a tensor, or a callable that fetches them later (device tensors: one at a time)."""
    if t.device.type == "cpu":
        return tensor_bytes(t)
    return lambda: tensor_bytes(t.detach().to("cpu"))


def save(obj, path, *, level: int | None = None, threads: int | None = None,
         chunk_elems: int = container.DEFAULT_CHUNK_ELEMS, metadata: dict | None = None,
         base=None, device: str = "auto", progress=None, _base_tensors: dict | None = None,
         _mode: int | None = None) -> None:
    """Compress a state dict (or any nest of dicts, lists, tuples, tensors and plain values) to ``path``.

    Args:
        obj: a ``{name: tensor}`` dict, or a training state such as
            ``{"model": ..., "optimizer": ..., "step": 1200}``.
        path: where to write; replaced atomically (an interrupted save leaves it as it was).
        level: ``None`` (default, tuned for float planes) or a zstd level 1..22.
        threads: CPU threads (default: all cores this process may use).
        chunk_elems: elements per chunk (a power of two is best; default 131072).
        metadata: optional ``{str: str}`` stored in the file.
        base: a previous checkpoint of the same run (path or :class:`MthFile`); tensors that
            match it by name, dtype and shape are stored as a delta against it.
        device: ``"auto"`` (GPU when the tensors are on CUDA and the GPU backend can run),
            ``"cpu"`` or ``"cuda"``.
        progress: ``True`` for a progress bar on stderr, or a callable receiving the number of
            input bytes done, as work goes.
    """
    if not isinstance(chunk_elems, int) or not 1 <= chunk_elems <= (8 << 20):
        raise ValueError(f"chunk_elems must be an int in [1, {8 << 20}], got {chunk_elems!r}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str")
    for text in (metadata or {}).items():
        for t in text:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise UnsupportedValueError(f"metadata string {short(t)!r} is not valid Unicode "
                                            "(a lone surrogate): it cannot be stored as UTF-8") from None
    tree, leaves = tree_mod.encode(obj, _is_tensor)
    items = []
    for name, t in leaves:
        dt = dtypes.from_torch(t.dtype)
        items.append(EncodeItem(name, dt, tuple(t.shape), _source_for(t), default_transform(dt), chunk_elems,
                                device_tensor=t if t.device.type == "cuda" else None))
    encoder = backends.choose_encoder(device, [t for _, t in leaves])
    with _progress(progress, sum(it.nbytes for it in items), "save") as bar:
        write_items(path, items, tree=tree, metadata=metadata, base=base, level=level, threads=threads,
                    progress=bar, encoder=encoder, base_tensors=_base_tensors, mode=_mode)


def write_items(path, items: list[EncodeItem], *, tree, metadata=None, source=None, base=None, level=None,
                threads=None, progress=None, encoder=None, base_tensors: dict | None = None, mode: int | None = None):
    """Write prepared items (the common end of save() and the CLI), planning deltas against ``base``."""
    threads = threads or default_threads()
    base_file, base_record, same = None, None, {}
    try:
        if base is not None:
            base_file = base if isinstance(base, MthFile) else MthFile(base, threads=threads)
            if os.path.abspath(base_file.path) == os.path.abspath(os.fspath(path)):
                raise ValueError(f"cannot write {os.fspath(path)!r} as a delta against itself: the new file would "
                                 "replace its own base; write it under another name")
            base_record = {"xxh64": base_file.identity, "path": _relative(base_file.path, path)}
            same = plan_deltas(items, base_file, base_tensors)
            matched = sum(it.nbytes for i, it in enumerate(items) if i in same or it.delta_op is not None)
            total = sum(it.nbytes for it in items)
            if total and matched < total / 2:
                import warnings

                from .writer import BaseNote

                warnings.warn(f"mithril: only {100 * matched / total:.0f}% of the bytes have a tensor of the same name, "
                              f"dtype and shape in the base {short(base_file.path)}", BaseNote, stacklevel=3)
        return write_mth(path, items, tree=tree, metadata=metadata, source=source, base=base_record, same=same,
                         level=level, threads=threads, progress=progress, encode=encoder, mode=mode)
    finally:
        if base_file is not None and base_file is not base:
            base_file.close()


def _relative(base_path: str, path) -> str:
    d = os.path.dirname(os.path.abspath(os.fspath(path)))
    return os.path.relpath(os.path.abspath(base_path), d)


def open(path, *, verify: bool = True, threads: int | None = None, base=None) -> MthFile:  # noqa: A001
    """Open a .mth file for lazy access (``keys()``, ``info(name)``, ``get_tensor(name)``).

    ``base`` (a path, a directory or an open :class:`MthFile`) is where a delta file's base is;
    by default it is looked for where the file records it, relative to the file.
    """
    return MthFile(path, verify=verify, threads=threads, base=base)


def load(path, device: str = "cpu", *, verify: bool = True, threads: int | None = None, base=None,
         progress=None, into=None, subtree: str | None = None, strict: bool = True):
    """Decompress a whole .mth file: the object given to :func:`save`, every tensor bit-exact.

    ``device`` is where tensors go (``"cpu"``, ``"cuda"``, ``"cuda:1"``...). ``verify=False``
    skips checksum checks (faster; a damaged file may then decode to wrong values).

    ``subtree``: load only that part of the saved object, a ``/``-separated path of dict keys
    (``"model"`` picks the model's state dict out of ``{"model": ..., "optimizer": ..., "step": ...}``).

    ``into``: an existing state dict (or nest) whose tensors are filled in place, by name, like
    ``load_state_dict`` but without a second copy in memory (on a GPU: straight into the device
    tensors). Names are those of the loaded object (of ``subtree`` when given). With
    ``strict=True`` (the default) the names must match exactly: tensors the file has and
    ``into`` lacks, or the reverse, raise :class:`StateMismatchError` listing them, before
    anything is written. With ``strict=False`` the matching tensors are filled, the others are
    loaded fresh (or left as they are in ``into``), and a :class:`LoadReport` warning says what
    was filled and what was not. A load that would fill no tensor at all is an error either way.
    Every filled tensor must have the file's dtype and shape, checked before anything is
    written; the returned object holds those very tensors. If decoding fails midway, tensors in
    ``into`` may be partly written.
    """
    with MthFile(path, verify=verify, threads=threads, base=base) as f:
        return f.load(device, progress, into=into, subtree=subtree, strict=strict)


class _progress:
    """A byte-count progress bar on stderr for ``progress=True`` (``"auto"``: only when stderr is
    a terminal); a callable passes through; None/False: none. Used as a context manager."""

    def __init__(self, progress, total: int, desc: str):
        self.bar = None
        self.fn = progress if callable(progress) else None
        if progress is True or progress == "auto":
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, leave=False,
                            file=sys.stderr, disable=None if progress == "auto" else False)
            self.fn = self.bar.update

    def __enter__(self):
        return self.fn

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _torch_from_entries(f: MthFile, entries, progress=None) -> list:
    import torch

    outs, tensors = [], []
    for e in entries:
        try:
            buf = torch.empty(e.nbytes, dtype=torch.uint8)
        except RuntimeError:
            _alloc(e)   # raises the typed error
            raise
        outs.append(buf.numpy())
        tensors.append(buf)
    f.decode_into(entries, outs, progress)
    result = []
    for e, buf in zip(entries, tensors):
        td = dtypes.to_torch(e.dtype)
        result.append(buf.view(td).reshape(e.shape))
    return result


def _to_device(t, device):
    if device in (None, "cpu"):
        return t
    return t.to(device)


class LoadReport(UserWarning):
    """What ``load(into=..., strict=False)`` filled, and what it did not (a one-line warning)."""


def _load_tree(f: MthFile, device: str, progress=None, into=None, subtree=None, strict: bool = True):
    backends.check_load_device(device)
    node, prefix = _select(f.index.tree, subtree) if subtree is not None else (f.index.tree, "")
    refs = set(tree_mod.tensor_refs(node))
    entries = [e for i, e in enumerate(f.index.tensors) if i in refs]
    local = {e.name: e.name[len(prefix):] for e in entries}            # names relative to the subtree
    targets = _targets(entries, local, into, strict, subtree) if into is not None else {}
    rest = [e for e in entries if e.name not in targets]
    with _progress(progress, sum(e.nbytes for e in entries), "load") as bar:
        if targets:
            _load_into(f, targets, bar)
        if backends.use_gpu_for_load(device):
            fresh = _torch_on_device(f, rest, device)
        else:
            fresh = [_to_device(t, device) for t in _torch_from_entries(f, rest, bar)]
    by_name = dict(zip((e.name for e in rest), fresh))
    tensors = {i: targets[e.name][1] if e.name in targets else by_name[e.name]
               for i, e in enumerate(f.index.tensors) if i in refs}
    return tree_mod.decode(node, lambda i: tensors[i])


def _select(tree, subtree: str):
    """(node, name prefix) of the part of the saved object at ``subtree`` ("model", "a/b")."""
    node, path = tree, []
    for key in str(subtree).strip("/").split("/"):
        pairs = node.get("dict") if isinstance(node, dict) else None
        if not isinstance(pairs, list):
            raise KeyError(f"subtree {short(subtree)!r}: {short('/'.join(path) or 'the saved object')} is not a dict")
        found = [v for k, v in pairs if isinstance(k, dict) and (k.get("str") == key or k.get("int") == key)]
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


def _targets(entries, local: dict, into, strict: bool, subtree) -> dict:
    """{file name: (entry, tensor)} for the file's tensors that ``into`` holds, after checking them all."""
    _, leaves = tree_mod.encode(into, _is_tensor)
    given = dict(leaves)
    wanted = {local[e.name]: e for e in entries}
    missing = [n for n in wanted if n not in given]           # in the file, not in into
    unexpected = [n for n in given if n not in wanted]        # in into, not in the file
    matched = len(wanted) - len(missing)
    if matched == 0 or (strict and (missing or unexpected)):
        hint = ""
        if subtree is None:
            heads = {n.split("/", 1)[0] for n in wanted if "/" in n and n.split("/", 1)[1] in given}
            if heads:
                hint = f"; the file keeps them under {_names(heads, 3)}: pass subtree={sorted(heads)[0]!r}"
        parts = [f"{len(missing)} tensors of the file are not in into ({_names(missing)})" if missing else "",
                 f"{len(unexpected)} tensors of into are not in the file ({_names(unexpected)})" if unexpected else ""]
        raise StateMismatchError(f"load(into=) {'would fill no tensor' if matched == 0 else 'does not match'}: "
                                 + "; ".join(p for p in parts if p) + hint
                                 + ("" if matched == 0 else "; pass strict=False to fill only the tensors that match"))
    out = {}
    for name, t in given.items():
        e = wanted.get(name)
        if e is None:
            continue
        want = dtypes.to_torch(e.dtype)
        if t.dtype != want or tuple(t.shape) != e.shape:
            raise StateMismatchError(f"cannot load tensor {short(name)!r} ({e.dtype.name} {list(e.shape)}) into a "
                                     f"tensor of {t.dtype} {list(t.shape)}")
        out[e.name] = (e, t)
    if missing or unexpected:
        import warnings

        warnings.warn(f"mithril: load(into=) filled {len(out)} tensors; {len(missing)} of the file were not in into "
                      f"and were loaded fresh{' (' + _names(missing) + ')' if missing else ''}; {len(unexpected)} of "
                      f"into are not in the file and were left as they were"
                      f"{' (' + _names(unexpected) + ')' if unexpected else ''}", LoadReport, stacklevel=5)
    return out


def _load_into(f: MthFile, targets: dict, progress=None) -> None:
    """Decode straight into the given tensors: CPU ones through their memory, CUDA ones on the GPU
    (or through a CPU buffer, one tensor at a time, when the GPU backend cannot run)."""
    import torch

    def direct(t):   # its memory can take the bytes as they are (tensor_u8 is then a view of it)
        return t.is_contiguous() and not t.is_conj() and not t.is_neg()

    cpu_pairs = [(e, t) for e, t in targets.values() if t.device.type == "cpu" and direct(t)]
    dev_pairs = [(e, t) for e, t in targets.values() if t.device.type == "cuda" and direct(t)]
    other = [(e, t) for e, t in targets.values() if not direct(t) or t.device.type not in ("cpu", "cuda")]
    if cpu_pairs:
        f.decode_into([e for e, _ in cpu_pairs], [tensor_u8(t).numpy() for _, t in cpu_pairs], progress)
    if dev_pairs and backends.use_gpu_for_load(str(dev_pairs[0][1].device)):
        from . import gpu

        gpu.decode_into_device(f, [e for e, _ in dev_pairs], [tensor_u8(t) for _, t in dev_pairs], verify=f.verify)
        dev_pairs = []
    for e, t in dev_pairs + other:
        fresh = _torch_from_entries(f, [e], progress)[0]
        with torch.no_grad():
            t.copy_(fresh)



def _torch_on_device(f: MthFile, entries, device) -> list:
    """Decode straight into CUDA tensors with the GPU backend (compressed bytes cross PCIe)."""
    import torch

    from . import gpu

    bufs = [torch.empty(e.nbytes, dtype=torch.uint8, device=device) for e in entries]
    gpu.decode_into_device(f, entries, bufs, verify=f.verify)
    return [b.view(dtypes.to_torch(e.dtype)).reshape(e.shape) for e, b in zip(entries, bufs)]
