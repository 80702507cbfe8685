"""Reading .mth files: :class:`MthFile` validates the frame and index, then decodes on demand."""
from __future__ import annotations

import mmap
import os

import numpy as np

from . import container, tree as tree_mod
from .container import TensorEntry
from .cpu import decode_all, default_threads
from .errors import CorruptFileError, MithrilError, MissingBaseError, BaseMismatchError

MAX_CHAIN = 64     # the longest chain of delta bases a reader follows

#: pass as ``base=`` to read a delta file's index without opening its base (no tensor of it
#: that depends on the base can then be decoded)
SKIP_BASE = object()


class MthFile:
    """An open .mth file. Nothing is decoded until asked for.

    >>> with mithril_gpu.open("ckpt.mth") as f:
    ...     f.keys(); f.info("model/fc.weight"); w = f.get_tensor("model/fc.weight")
    """

    def __init__(self, path, *, verify: bool = True, threads: int | None = None, base=None, _depth: int = 0):
        self.path = os.fspath(path)
        self.verify = verify
        self.threads = threads or default_threads()
        self._mm = None
        try:
            self._fh = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {self.path}") from None
        try:
            self._open(base, _depth)
        except BaseException:
            self.close()
            raise

    def _open(self, base, depth):
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(container.PREAMBLE_SIZE)
        self._fh.seek(max(0, size - container.TRAILER_SIZE))
        tail = self._fh.read(container.TRAILER_SIZE)
        off, length, digest = container.read_frame(head, tail, size)
        self._fh.seek(off)
        raw = self._fh.read(length)
        if len(raw) != length:
            raise CorruptFileError("file changed while being read")
        self.index = container.parse_index(raw, digest, off)
        #: identity of this file, what a delta written against it records (FORMAT.md "Deltas")
        self.identity = f"{digest:016x}"
        self.size = size
        n = len(self.index.tensors)
        for ref in tree_mod.tensor_refs(self.index.tree):
            if type(ref) is not int or not 0 <= ref < n:
                raise CorruptFileError(f"corrupt index: tree refers to tensor {ref!r} of {n}")
        self._by_name = {e.name: e for e in self.index.tensors}
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._buf = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        self.base_file: MthFile | None = None
        if self.index.base is not None and base is not SKIP_BASE:
            self.base_file = self._open_base(base, depth)

    def _open_base(self, base, depth) -> "MthFile":
        want = self.index.base["xxh64"]
        if depth >= MAX_CHAIN:
            raise CorruptFileError(f"delta chain is longer than {MAX_CHAIN} files (or loops)")
        if isinstance(base, MthFile):
            bf = base
        else:
            cand = []
            if base is not None and os.path.isdir(os.fspath(base)):
                cand.append(os.path.join(os.fspath(base), os.path.basename(str(self.index.base.get("path", "")))))
            elif base is not None:
                cand.append(os.fspath(base))
            rec = self.index.base.get("path")
            if isinstance(rec, str) and rec:
                cand.append(os.path.join(os.path.dirname(os.path.abspath(self.path)), rec))
            found = next((c for c in cand if os.path.isfile(c)), None)
            if found is None:
                raise MissingBaseError(
                    f"{self.path} is a delta against {self.index.base.get('path')!r} "
                    f"(identity {want}), which was not found; pass base=PATH (CLI: --base PATH)")
            # a base passed in applies to this file only; its own base is found from its record
            bf = MthFile(found, verify=self.verify, threads=self.threads, _depth=depth + 1)
        if bf.identity != want:
            raise BaseMismatchError(
                f"{bf.path} is not the base {self.path} was written against "
                f"(identity {bf.identity}, expected {want}); pass the right base file")
        return bf

    # ------------------------------------------------------------ inspection

    def keys(self) -> list[str]:
        return [e.name for e in self.index.tensors]

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.index.tensors)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None

    def info(self, name: str) -> dict:
        e = self.entry(name)
        return {"dtype": e.dtype.name, "shape": e.shape, "nbytes": e.nbytes, "stored": e.stored_bytes,
                "transform": e.transform, "delta": (e.delta or {}).get("op"), "xxh64": f"{e.checksum:016x}"}

    @property
    def metadata(self) -> dict | None:
        return self.index.metadata

    def chain(self) -> list[str]:
        """Paths of this file and its bases, newest first."""
        out, f = [], self
        while f is not None:
            out.append(f.path)
            f = f.base_file
        return out

    # ------------------------------------------------------------ decoding

    def decode_into(self, entries: list[TensorEntry], outs: list[np.ndarray], progress=None) -> None:
        """Decode entries into the given uint8 buffers (resolving delta bases), verifying checksums."""
        need = [e for e in entries if e.delta is not None]
        bases: dict[str, np.ndarray] = {}
        if need:
            if self.base_file is None:
                raise CorruptFileError(f"tensor {need[0].name!r} is a delta in a file without a base")
            base_entries = []
            for e in need:
                name = e.delta["base"]
                be = self.base_file.entry(name) if name in self.base_file else None
                if be is None or be.nbytes != e.nbytes:
                    raise BaseMismatchError(f"base has no tensor {name!r} of {e.nbytes} bytes")
                if name not in bases:
                    bases[name] = _alloc(be)
                    base_entries.append(be)
            self.base_file.decode_into(base_entries, [bases[be.name] for be in base_entries])
        work = [(e, out, bases[e.delta["base"]] if e.delta is not None else None) for e, out in zip(entries, outs)]
        decode_all(self._buf, work, self.threads, self.verify, progress)

    def get_bytes(self, name: str) -> np.ndarray:
        e = self.entry(name)
        out = _alloc(e)
        self.decode_into([e], [out])
        return out

    def get_tensor(self, name: str, device: str = "cpu"):
        from . import backends
        from .api import _to_device, _torch_from_entries, _torch_on_device

        e = self.entry(name)
        if backends.use_gpu_for_load(device):
            return _torch_on_device(self, [e], device)[0]
        return _to_device(_torch_from_entries(self, [e])[0], device)

    def load(self, device: str = "cpu", progress=None, into=None):
        from .api import _load_tree

        return _load_tree(self, device, progress, into)

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self.__dict__.get("base_file") is not None:
            self.base_file.close()
        buf = self.__dict__.get("_buf")
        if buf is not None:
            buf.release()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:   # tensors still view it; the map goes when they do
                pass
            self._mm = None
        if getattr(self, "_fh", None) is not None:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"<MthFile {self.path!r}: {len(self)} tensors>"


def _alloc(e: TensorEntry) -> np.ndarray:
    try:
        return np.empty(e.nbytes, np.uint8)
    except (MemoryError, ValueError):
        raise MithrilError(f"cannot allocate {e.nbytes} bytes for tensor {e.name!r}") from None
