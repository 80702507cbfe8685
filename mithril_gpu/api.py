"""The Python API: save, load, open (tensors become bytes and back in :mod:`mithril_gpu.torchio`)."""
from __future__ import annotations

import os

from . import backends, container, dtypes, tree as tree_mod
from .cpu import EncodeItem, default_threads
from .deltaplan import plan_deltas
from .errors import BaseConflictError, UnsupportedValueError, short
from .loading import LoadReport  # noqa: F401  (part of the API: the warning load(strict=False) gives)
from .progress import Progress
from .reader import MAX_CHAIN, SKIP_BASE, MthFile
from .torchio import check_storable, is_tensor, source_for, tensor_bytes, tensor_u8  # noqa: F401  (tensor_bytes, tensor_u8: for tools)
from .transforms import default_transform
from .writer import write_mth

_is_tensor = is_tensor     # older name, used by tools


def save(obj, path, *, level: int | None = None, threads: int | None = None,
         chunk_elems: int = container.DEFAULT_CHUNK_ELEMS, metadata: dict | None = None,
         base=None, device: str = "auto", progress=None, _base_tensors: dict | None = None,
         _mode: int | None = None, _choices: dict | None = None, _written: list | None = None,
         _encoded: tuple | None = None, _base_index=None, _keep: dict | None = None,
         _refreshed: set | None = None) -> None:
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
    if type(chunk_elems) is not int or not 1 <= chunk_elems <= (8 << 20):     # (True is an int, and no size)
        raise ValueError(f"chunk_elems must be an int in [1, {8 << 20}], got {chunk_elems!r}")
    _check_threads(threads)
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str")
    for text in (metadata or {}).items():
        for t in text:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise UnsupportedValueError(f"metadata string {short(t)!r} is not valid Unicode "
                                            "(a lone surrogate): it cannot be stored as UTF-8") from None
    tree, leaves = _encoded if _encoded is not None else tree_mod.encode(obj, is_tensor)   # (the Checkpointer's)
    items = []
    for name, t in leaves:
        check_storable(t)               # (before its shape is asked for: a nested tensor has none)
        dt = dtypes.from_torch(t.dtype)
        items.append(EncodeItem(name, dt, tuple(t.shape), source_for(t), default_transform(dt), chunk_elems,
                                device_tensor=t if t.device.type == "cuda" else None))
    encoder = backends.choose_encoder(device, [t for _, t in leaves], level)
    with Progress(progress, sum(it.nbytes for it in items), "save") as bar:
        index = write_items(path, items, tree=tree, metadata=metadata, base=base, level=level, threads=threads,
                            progress=bar, encoder=encoder, base_tensors=_base_tensors, mode=_mode, choices=_choices,
                            base_index=_base_index, keep=_keep, refreshed=_refreshed)
    if _written is not None:          # the index written (with its identity), for the Checkpointer
        _written.append(index)


def write_items(path, items: list[EncodeItem], *, tree, metadata=None, source=None, base=None, level=None,
                threads=None, progress=None, encoder=None, base_tensors: dict | None = None, mode: int | None = None,
                choices: dict | None = None, base_index=None, keep: dict | None = None,
                refreshed: set | None = None):
    """Write prepared items (the common end of save() and the CLI), planning deltas against ``base``.

    ``keep`` and ``refreshed`` (the Checkpointer's): ``keep`` (name -> writable uint8 array) is the
    memory of the caller's copy of the base, the same bytes as ``base_tensors``, which this call
    may turn into a copy of what it writes, tensor by tensor; the names of the tensors whose copy
    holds the very bytes written are added to ``refreshed`` (those stored as "same", and those whose
    context sort wrote the coded bytes there). If the call raises, the copy may be part old, part new."""
    threads = threads or default_threads()
    if isinstance(base, (bytes, bytearray)):         # a bytes path, as open() and load(base=) take
        base = os.fsdecode(bytes(base))
    base_file, base_record, same = None, None, {}
    try:
        if base is not None:
            base_file = base if isinstance(base, MthFile) else _open_base(base, threads, items, base_tensors, base_index)
            chain = base_file.chain()         # (the base alone where the Checkpointer skips its chain)
            here = os.path.realpath(os.fspath(path))
            if os.path.realpath(base_file.path) == here:     # (links too)
                raise BaseConflictError(f"cannot write {os.fspath(path)!r} as a delta against itself: the new file would "
                                 "replace its own base; write it under another name")
            if any(os.path.realpath(p) == here for p in chain[1:]):
                raise BaseConflictError(f"cannot write {os.fspath(path)!r} as a delta against {short(base_file.path)!r}, "
                                 "whose chain of bases holds the file being replaced: neither would load again; "
                                 "write it under another name, or without base=")
        if base_file is not None and len(chain) > MAX_CHAIN:
            import warnings

            from .writer import BaseNote
            warnings.warn(f"mithril: {short(base_file.path)} ends a chain of {len(chain)} files, the most a reader "
                          f"follows: {short(os.fspath(path))} is saved whole, not as a delta against it", BaseNote,
                          stacklevel=3)
            if base_file is not base:
                base_file.close()
            base_file = None
        if base_file is not None:
            base_record = {"xxh64": base_file.identity, "path": _relative(base_file.path, path)}
            same = plan_deltas(items, base_file, base_tensors, choices, keep=keep if refreshed is not None else None)
            matched = sum(it.nbytes for i, it in enumerate(items) if i in same or it.delta_op is not None)
            total = sum(it.nbytes for it in items)
            if total and matched < total / 2:
                import warnings

                from .writer import BaseNote

                if matched == 0:
                    # nothing can be stored against it: one note, and the writer records no base
                    warnings.warn(f"mithril: no tensor has one of the same name, dtype and shape in the base "
                                  f"{short(base_file.path)}: written as a full checkpoint that does not need it",
                                  BaseNote, stacklevel=3)
                    base_record = None
                else:
                    warnings.warn(f"mithril: only {100 * matched / total:.0f}% of the bytes have a tensor of the same "
                                  f"name, dtype and shape in the base {short(base_file.path)}", BaseNote, stacklevel=3)
        index = write_mth(path, items, tree=tree, metadata=metadata, source=source, base=base_record, same=same,
                          level=level, threads=threads, progress=progress, encode=encoder, mode=mode)
        if refreshed is not None and keep:
            refreshed.update(it.name for it in items if it.kept)
            refreshed.update(items[i].name for i in same if items[i].name in keep)
        return index
    finally:
        if base_file is not None and base_file is not base:
            base_file.close()


def _open_base(base, threads: int, items, base_tensors: dict | None, written=None) -> MthFile:
    """The base file of a delta save. When the caller holds the base's tensors in memory (the
    Checkpointer does), only the base's own index is read, not the files of its chain: a base
    tensor is then decoded from disk only if it is missing from ``base_tensors``, and only a
    tensor that is itself a delta needs the chain (then it is opened whole). ``written``: the base's
    index as this process wrote it, taken if the file still holds that very index (the Checkpointer's
    next delta then does not parse again what it just wrote)."""
    if not base_tensors:
        return MthFile(base, threads=threads)
    f = MthFile(base, threads=threads, base=SKIP_BASE, _written=written)
    if f.index.base is not None and any(it.name in f and it.name not in base_tensors and f.entry(it.name).delta
                                        for it in items):
        f.close()
        f = MthFile(base, threads=threads)
    return f


def _relative(base_path: str, path) -> str:
    """The base's path as a delta at ``path`` records it: relative to the real folder of ``path``
    (a reader joins it to the folder it opened the delta from, and the system resolves ".." from
    the real folder: a path made from a symlinked folder at another depth led nowhere)."""
    d = os.path.realpath(os.path.dirname(os.path.abspath(os.fspath(path))))
    return os.path.relpath(os.path.realpath(base_path), d)


def _check_threads(threads) -> None:
    """``threads`` is None (all cores) or an int >= 1: 0 and -1 (python-zstandard's "all cores")
    used to mean one thread, silently."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None (all cores) or an int >= 1, got {threads!r}")


def open(path, *, verify: bool = True, threads: int | None = None, base=None) -> MthFile:  # noqa: A001
    """Open a .mth file for lazy access (``keys()``, ``info(name)``, ``get_tensor(name)``,
    ``get_slice(name)[...]``: only the rows a box needs are decoded, each checked).

    ``verify=False`` skips checksum checks; ``threads``: CPU threads for decoding (default: all
    cores). ``base`` (a path, a directory or an open :class:`MthFile`, which stays the caller's
    to close) is where a delta file's base is; by default it is looked for where the file
    records it, relative to the file's real folder.
    """
    _check_threads(threads)
    return MthFile(path, verify=verify, threads=threads, base=base)


def load(path, device: str = "cpu", *, verify: bool = True, threads: int | None = None, base=None,
         progress=None, into=None, subtree: str | None = None, strict: bool = True):
    """Decompress a whole .mth file: the object given to :func:`save`, every tensor bit-exact.

    ``device`` is where tensors go (``"cpu"``, ``"cuda"``, ``"cuda:1"``...). ``verify=False``
    skips checksum checks (faster; a damaged file may then decode to wrong values). ``threads``:
    CPU threads (default: all cores). ``base``: where a delta file's base is (a path, a folder or
    an open :class:`MthFile`), if not where the file records it. ``progress``: ``True`` for a
    progress bar on stderr, or a callable given the bytes decoded as work goes.

    ``subtree``: load only that part of the saved object, a ``/``-separated path of dict keys
    (``"model"`` picks the model's state dict out of ``{"model": ..., "optimizer": ..., "step": ...}``).

    ``into``: an existing state dict (or nest) whose tensors are filled in place, key by key, like
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
    _check_threads(threads)
    with MthFile(path, verify=verify, threads=threads, base=base) as f:
        return f.load(device, progress, into=into, subtree=subtree, strict=strict)


