"""Reading .mth files: :class:`MthFile` validates the frame and index, then decodes on demand."""
from __future__ import annotations

import mmap
import os
import stat
from collections import Counter

import numpy as np

from . import backends, container, loading, torchio, tree as tree_mod
from .container import TensorEntry
from .cpu import decode_all, decode_rows, default_threads
from .errors import (BaseMismatchError, CorruptFileError, FormatError, MissingBaseError, MithrilError,
                     NotMithrilFileError, UnsupportedVersionError, short)
from .slices import TensorSlice

MAX_CHAIN = 64     # the longest chain of delta bases a reader follows
CHECK_BATCH_BYTES = 32 << 20   # check() decodes tensors in batches of about this many bytes
MAX_MESSAGE = 600              # characters of an error message from decoding (names are cut)

#: pass as ``base=`` to read a delta file's index without opening its base (no tensor of it
#: that depends on the base can then be decoded)
SKIP_BASE = object()


class MthFile:
    """An open .mth file. Nothing is decoded until asked for.

    >>> with mithril_gpu.open("ckpt.mth") as f:
    ...     f.keys(); f.info("model/fc.weight"); w = f.get_tensor("model/fc.weight")
    """

    def __init__(self, path, *, verify: bool = True, threads: int | None = None, base=None, _depth: int = 0,
                 _written=None, _want: str | None = None, _chain: frozenset = frozenset()):
        self._closed = False
        # _want: the identity a delta records for this file as its base (internal): checked from
        # the trailer before the index is read, so a wrong base (or a chain that loops back on
        # itself) costs 32 bytes, not a parse. _chain: the (device, inode) of the files of the
        # chain above this one; meeting one again is a loop.
        self._want = _want
        # _written: the Index this library wrote to ``path`` (internal: a Checkpointer's next delta
        # opens the file it just wrote as its base). It is taken instead of reading and parsing the
        # index only if the file's trailer names the very index bytes it was written as (its
        # identity, the xxh64 of those bytes) at the same place (offset and length): the same
        # bytes parse to the same entries. (Its payload_bytes, plane_bytes and tensor_bytes stay 0:
        # nothing reads them on this path.)
        self._written = _written
        self.path = os.fsdecode(os.fspath(path))     # (a bytes path: joined with recorded str paths)
        self.verify = verify
        self.threads = threads or default_threads()
        self._mm = None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {self.path}") from None
        if (st.st_dev, st.st_ino) in _chain and stat.S_ISREG(st.st_mode):
            raise CorruptFileError("its delta chain loops back to this file")
        self._chain = _chain | {(st.st_dev, st.st_ino)}
        if not stat.S_ISREG(st.st_mode):    # (opening a FIFO would wait for a writer; a file is read by seeking)
            if stat.S_ISDIR(st.st_mode):
                inside = sorted(n for n in os.listdir(self.path) if n.endswith(".mth"))[:1] \
                    if os.access(self.path, os.R_OK) else []
                raise NotMithrilFileError(f"{short(self.path)} is a folder: give one of its .mth files"
                                          + (f" (such as {short(os.path.join(self.path, inside[0]))})" if inside
                                             else ""))
            raise NotMithrilFileError(f"{short(self.path)} is not a regular file (a pipe, a device or a socket): "
                                      "a .mth file is read by seeking in it")
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
        try:
            off, length, digest = container.read_frame(head, tail, size)
        except UnsupportedVersionError:
            if self._is_sound_current_version(head, tail, size):
                version = int.from_bytes(head[8:10], "little")
                raise CorruptFileError(
                    f"the preamble says format version {version}, but the rest is a sound version-"
                    f"{container.VERSION} file: the preamble is damaged") from None
            raise
        if self._want is not None and f"{digest:016x}" != self._want:
            raise _NotThatBase(f"{digest:016x}")
        w = self._written
        written = w is not None and getattr(w, "identity", None) == f"{digest:016x}" \
            and getattr(w, "frame", None) == (off, length)
        if written:
            self.index = w
        else:
            self._fh.seek(off)
            raw = self._fh.read(length)
            if len(raw) != length:
                raise CorruptFileError("file changed while being read")
            self.index = container.parse_index(raw, digest, off)
        #: identity of this file, what a delta written against it records (FORMAT.md "Deltas")
        self.identity = f"{digest:016x}"
        self.size = size
        n = len(self.index.tensors)
        for ref in () if written else tree_mod.tensor_refs(self.index.tree):
            if type(ref) is not int or not 0 <= ref < n:
                raise CorruptFileError(f"corrupt index: tree refers to tensor {ref!r} of {n}")
        self._by_name = {e.name: e for e in self.index.tensors}
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._buf = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        self.base_file: MthFile | None = None
        if self.index.base is not None and base is not SKIP_BASE:
            self.base_file = self._open_base(base, depth)

    def _is_sound_current_version(self, head: bytes, tail: bytes, size: int) -> bool:
        """Whether the file, its version field aside, is a sound file of this reader's version
        (then a version field that reads newer was damaged, not written by a newer writer)."""
        try:
            off, length, digest = container.read_frame(container.as_current_version(head), tail, size)
            self._fh.seek(off)
            d = container.decode_index_json(self._fh.read(length), digest)
        except (MithrilError, OSError):
            return False
        return isinstance(d, dict) and d.get("mithril") == container.VERSION

    def _open_base(self, base, depth) -> "MthFile":
        """The delta base: ``base`` if given (a file, a folder, an open MthFile), else the path the
        file records. Only regular files are candidates; every failure is a typed, one-line error."""
        want = self.index.base["xxh64"]
        rec = self.index.base.get("path")
        if depth >= MAX_CHAIN:
            raise CorruptFileError(f"delta chain is longer than {MAX_CHAIN} files (or loops)")
        if isinstance(base, MthFile):
            bf = base
            self._base_given = True          # the caller's file: theirs to close, not ours
        else:
            cand = []
            if base is not None and os.path.isdir(os.fspath(base)):
                cand.append(os.path.join(os.fspath(base), os.path.basename(str(rec or ""))))
            elif base is not None:
                cand.append(os.fspath(base))
            if isinstance(rec, str) and rec:
                # from the real folder, as writers record it; then from the real file's folder (a
                # file that is itself a link, as in the Hugging Face cache), then as written
                here = os.path.abspath(self.path)
                for d in (os.path.realpath(os.path.dirname(here)), os.path.dirname(os.path.realpath(here)),
                          os.path.dirname(here)):
                    c = os.path.join(d, rec)
                    if c not in cand:
                        cand.append(c)
            found = next((c for c in cand if _is_regular_file(c)), None)
            if found is None:
                raise MissingBaseError(
                    f"{short(self.path)} is a delta against {short(repr(rec))} (identity {want}), which was not "
                    "found (or is not a regular file); pass base=PATH (CLI: --base PATH)")
            # a base passed in applies to this file only; its own base is found from its record
            bf = _open_base_file(found, self, depth + 1)
        if bf.identity != want:
            if bf is not base:
                bf.close()
            raise _not_the_base(bf.path, self, bf.identity)
        return bf

    # ------------------------------------------------------------ inspection

    def keys(self) -> list[str]:
        """The tensors' names, in file order (a nested object's are its '/'-joined key paths)."""
        return [e.name for e in self.index.tensors]

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.index.tensors)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {short(repr(name))} in {short(self.path)}") from None
        except TypeError:    # unhashable
            raise KeyError(f"no tensor named {short(repr(name))} in {short(self.path)}") from None

    def info(self, name: str) -> dict:
        """What tensor ``name`` is, without decoding it: ``dtype`` (the .mth name: "BF16"...),
        ``shape`` (a tuple), ``nbytes`` (decoded), ``stored`` (its chunks' bytes in the file),
        ``transform``, ``delta`` (None, or the delta op: "xor", "zigzag", "same") and ``xxh64``
        (its checksum, 16 hex digits)."""
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

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"I/O operation on closed file {short(self.path)}: open it again to decode tensors")

    def _closed_midway(self) -> None:
        """A decode that failed because another thread closed the file (its memory went away): say
        so, rather than call the file damaged."""
        if self._closed:
            raise ValueError(f"{short(self.path)} was closed (by another thread) while it was being decoded: "
                             "the file is not damaged; open it again to decode tensors") from None

    def decode_into(self, entries: list[TensorEntry], outs: list[np.ndarray], progress=None, *,
                    verify: bool | None = None) -> None:
        """Decode entries into the given uint8 buffers (resolving delta bases), verifying checksums
        (``verify``: None means as the file was opened; it applies to the bases decoded too)."""
        self._check_open()
        verify = self.verify if verify is None else verify
        need = [(e, out) for e, out in zip(entries, outs) if e.delta is not None]
        bases: dict[str, np.ndarray] = {}
        if need:
            if self.base_file is None:
                raise CorruptFileError(f"tensor {short(need[0][0].name)!r} is a delta in a file without a base")
            base_entries = []
            asked = Counter(e.delta["base"] for e, _ in need)
            for e, out in need:
                name = e.delta["base"]
                be = self._base_entry(e)
                if name not in bases:
                    # a base that one requested output alone needs is decoded into that output, and
                    # the delta applied over it there (every delta coding reads an element's base
                    # just before writing it): no second buffer, down a chain
                    inplace = asked[name] == 1 and be.nbytes == e.nbytes == out.size and out.dtype == np.uint8 \
                        and out.ndim == 1 and out.flags.c_contiguous and out.flags.writeable
                    bases[name] = out if inplace else _alloc(be)
                    base_entries.append(be)
            self.base_file.decode_into(base_entries, [bases[be.name] for be in base_entries], verify=verify)
        work = [(e, out, bases[e.delta["base"]] if e.delta is not None else None) for e, out in zip(entries, outs)]
        try:
            decode_all(self._buf, work, self.threads, verify, progress)
        except MithrilError as exc:      # whatever a file holds, its errors stay one short line
            self._closed_midway()
            msg = str(exc)
            if len(msg) > MAX_MESSAGE or not msg.isprintable():
                raise type(exc)(short(msg, MAX_MESSAGE)) from None
            raise

    def _base_entry(self, e: TensorEntry) -> TensorEntry:
        """The base tensor delta entry ``e`` is stored against (a typed error if the base lacks it)."""
        if self.base_file is None:
            raise CorruptFileError(f"tensor {short(e.name)!r} is a delta in a file without a base")
        name = e.delta["base"]
        be = self.base_file.entry(name) if name in self.base_file else None
        if be is None or be.dtype != e.dtype or be.shape != e.shape:
            raise BaseMismatchError(
                f"the base {short(self.base_file.path)} has no tensor {short(name)!r} of {e.dtype.name} "
                f"{list(e.shape)}, which delta tensor {short(e.name)!r} needs: it is not the right base, "
                "or the file is damaged")
        return be

    def get_slice(self, name: str) -> TensorSlice:
        """Tensor ``name`` for partial reads: ``get_shape()``, ``get_dtype()`` and indexing
        (``f.get_slice("w")[:, 100:200]``) decode only the rows that cover the box asked for, each
        checked against its row digest (see :class:`~mithril_gpu.slices.TensorSlice`)."""
        self._check_open()
        return TensorSlice(self, self.entry(name))

    def decode_range(self, e: TensorEntry, start: int, stop: int):
        """The bytes of elements ``[start, stop)`` of entry ``e`` (C order), as a flat uint8 CPU
        tensor. Only the rows that cover them are decoded, and each is checked against its row
        digest (``verify``); the whole tensor is decoded instead when its rows cannot be checked one
        by one (a file written before row digests) or its coding is not row by row."""
        self._check_open()
        if not 0 <= start <= stop <= e.count:
            raise IndexError(f"elements [{start}, {stop}) of tensor {short(e.name)!r} of {e.count} elements")
        isz = e.dtype.itemsize
        if (e.delta or {}).get("op") == "same":
            be = self._base_entry(e)
            return self.base_file.decode_range(be, start, stop)
        ce = e.chunk_elems
        r0, r1 = start // ce, -(-stop // ce)
        rows_checkable = e.row_digests is not None or not self.verify
        if start == stop or getattr(e, "whole_only", False) or not rows_checkable or (r0 == 0 and r1 >= e.rows):
            if start == stop:
                return torchio.empty_u8(0, "an empty box")
            buf = torchio.empty_u8(e.nbytes, f"tensor {short(e.name)!r}")
            self.decode_into([e], [buf.numpy()])
            return buf[start * isz:stop * isz]
        lo, hi = r0 * ce, min(r1 * ce, e.count)
        out = torchio.empty_u8((hi - lo) * isz, f"rows of tensor {short(e.name)!r}")
        base = None
        if e.delta is not None:
            be = self._base_entry(e)
            base = self.base_file.decode_range(be, lo, hi).numpy()
        self._decode_rows(e, out.numpy(), base, r0, r1)
        return out[(start - lo) * isz:(stop - lo) * isz]

    def decode_rows_into(self, e: TensorEntry, out: np.ndarray, row0: int, row1: int) -> None:
        """Decode rows ``[row0, row1)`` of entry ``e`` into their place in ``out``, a uint8 buffer
        of the whole tensor's bytes (the rest of ``out`` is left as it is). For entries stored on
        their own (no delta) and row by row, with row digests when verifying: each row is checked
        against its digest."""
        self._check_open()
        if not self.rows_alone(e):
            raise ValueError(f"tensor {short(e.name)!r} cannot be decoded row by row on its own")
        if not 0 <= row0 <= row1 <= e.rows or out.size != e.nbytes:
            raise ValueError(f"rows [{row0}, {row1}) of tensor {short(e.name)!r} into a buffer of {out.size} bytes")
        rb = e.chunk_elems * e.dtype.itemsize
        self._decode_rows(e, out[row0 * rb:min(row1 * rb, e.nbytes)], None, row0, row1)

    def rows_alone(self, e: TensorEntry) -> bool:
        """Whether :meth:`decode_rows_into` takes entry ``e``: stored on its own (no delta), row by
        row (not context-sorted), with row digests when this file verifies."""
        return e.delta is None and not e.whole_only and (e.row_digests is not None or not self.verify)

    def _decode_rows(self, e: TensorEntry, out: np.ndarray, base, row0: int, row1: int) -> None:
        try:
            decode_rows(self._buf, e, out, base, row0, row1, self.threads, self.verify)
        except MithrilError as exc:
            self._closed_midway()
            msg = str(exc)
            if len(msg) > MAX_MESSAGE or not msg.isprintable():
                raise type(exc)(short(msg, MAX_MESSAGE)) from None
            raise

    def get_bytes(self, name: str) -> np.ndarray:
        self._check_open()
        e = self.entry(name)
        out = _alloc(e)
        self.decode_into([e], [out])
        return out

    def get_tensor(self, name: str, device: str = "cpu"):
        """Tensor ``name``, decoded whole (its delta base too, where it has one) and checked,
        on ``device`` ("cpu", "cuda", "cuda:1"...)."""
        self._check_open()
        e = self.entry(name)
        backends.check_load_device(device)
        if backends.use_gpu_for_load(device):
            from . import gpu

            return gpu.new_device_tensors(self, [e], device)[0]
        return torchio.to_device(torchio.new_tensors(self, [e])[0], device)

    def load(self, device: str = "cpu", progress=None, into=None, subtree=None, strict: bool = True):
        """The whole object (or ``subtree`` of it); see :func:`mithril_gpu.load`."""
        self._check_open()
        return loading._load_tree(self, device, progress, into, subtree, strict)

    def check(self, progress=None, *, chain: bool = False) -> int:
        """Decode every tensor and verify its checksum (whatever ``verify`` the file was opened
        with), and rebuild the tree as :meth:`load` does, keeping nothing: what ``mithril verify``
        runs. Tensors are decoded in batches of about 32 MB (a larger tensor alone), into one
        reused buffer, so memory stays at max(32 MB, the largest tensor) plus the base tensors a
        batch of deltas needs. ``chain``: then check every tensor of every base file too.

        Returns the number of tensor bytes decoded. Raises the error :meth:`load` would raise
        (a :class:`~mithril_gpu.errors.MithrilError`) at the first problem. ``progress`` is
        called with byte counts as work goes.
        """
        self._check_open()
        self._check_tree()
        entries = self.index.tensors
        buf = np.empty(0, np.uint8)
        total, i = 0, 0
        while i < len(entries):
            batch, pos = [], 0
            while i < len(entries) and (not batch or pos + entries[i].nbytes <= CHECK_BATCH_BYTES):
                batch.append(entries[i])
                pos += entries[i].nbytes
                i += 1
            if buf.size < pos:
                buf = None                   # the old buffer goes before the larger one comes
                buf = _alloc_bytes(pos, "checking tensors")
            outs, at = [], 0
            for e in batch:
                outs.append(buf[at:at + e.nbytes])
                at += e.nbytes
            self.decode_into(batch, outs, progress, verify=True)
            if progress:     # "same" entries are copies: decode_all reports no progress for them
                same = sum(e.nbytes for e in batch if (e.delta or {}).get("op") == "same")
                if same:
                    progress(same)
            total += pos
        if chain and self.base_file is not None:
            total += self.base_file.check(progress, chain=True)
        return total

    def _check_tree(self) -> None:
        """Rebuild the tree as load() does, with stand-ins for the tensors (none decoded)."""
        tree_mod.check(self.index.tree, [e.dtype.name for e in self.index.tensors])
        # load() gives ndarray nodes back as numpy arrays, which cannot be dict keys (unhashable),
        # while the stand-ins can: refuse such keys as load() would.
        bad = _ndarray_key(self.index.tree)
        if bad is not None:
            raise CorruptFileError(f"corrupt index: bad tree node {short(str(bad)[:80])}: a dict key holds an array")

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._closed = True
        if self.__dict__.get("base_file") is not None and not self.__dict__.get("_base_given"):
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
    return _alloc_bytes(e.nbytes, f"tensor {short(e.name)!r}")


def _alloc_bytes(n: int, what: str) -> np.ndarray:
    try:
        return np.empty(n, np.uint8)
    except (MemoryError, ValueError):
        raise MithrilError(f"cannot allocate {n} bytes for {what}: not enough memory") from None


def _ndarray_key(node, depth: int = 0, in_key: bool = False):
    """The first dict node of ``node`` with an ``ndarray`` node inside one of its keys, or None."""
    if depth > tree_mod.MAX_DEPTH or not isinstance(node, dict):
        return None
    for kind, v in node.items():
        if kind == "ndarray" and in_key:
            return node
        if kind in ("dict", "odict"):
            pairs = v[0] if kind == "odict" and isinstance(v, list) and v else v
            for pair in pairs if isinstance(pairs, list) else ():
                if isinstance(pair, list):
                    for j, x in enumerate(pair):
                        if _ndarray_key(x, depth + 1, in_key or j == 0) is not None:
                            return node
            if kind == "odict" and isinstance(v, list) and len(v) == 2:
                found = _ndarray_key(v[1], depth + 1, in_key)
                if found is not None:
                    return found
        else:
            for x in tree_mod.children(kind, v):
                found = _ndarray_key(x, depth + 1, in_key)
                if found is not None:
                    return found
    return None


def _is_regular_file(path) -> bool:
    """Whether ``path`` names a regular file (symlinks followed): never a FIFO, a device, a folder."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):       # missing, unreadable, or a name the OS cannot take
        return False


class _NotThatBase(Exception):
    """A base candidate's trailer names another index than the delta recorded (args[0]: its identity)."""


def _not_the_base(path, delta: MthFile, identity: str) -> BaseMismatchError:
    return BaseMismatchError(f"{short(path)} is not the base {short(delta.path)} was written against "
                             f"(identity {identity}, expected {delta.index.base['xxh64']}); pass the right base file")


def _open_base_file(found: str, delta: MthFile, depth: int) -> MthFile:
    """Open the base file ``found`` of ``delta``, every failure a typed one-line error naming it."""
    want = delta.index.base["xxh64"]
    try:
        return MthFile(found, verify=delta.verify, threads=delta.threads, _depth=depth, _want=want,
                       _chain=delta._chain)
    except _NotThatBase as e:
        raise _not_the_base(found, delta, e.args[0]) from None
    except OSError as e:     # unreadable, or a file that cannot be read like one (/proc/self/mem)
        raise MissingBaseError(
            f"{short(delta.path)} is a delta against {short(found)}, which cannot be read "
            f"({short(e.strerror or e, 80)}); pass base=PATH (CLI: --base PATH)") from None
    except NotMithrilFileError:
        raise BaseMismatchError(
            f"{short(found)} is not a .mth file, so not the base {short(delta.path)} was written against; "
            "pass the right base file") from None
    except FormatError as e:
        if getattr(e, "names_base", False):     # already says which base (a deeper link of the chain)
            raise
        err = type(e)(f"delta base {short(found)}: {e}")
        err.names_base = True
        raise err from None
