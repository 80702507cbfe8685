"""Other checkpoint formats in and out: safetensors (byte-exact) and torch .pt (weights_only).

safetensors is parsed here directly (8-byte little-endian header length, JSON header, data), so
that a file compressed and decompressed comes back byte-identical: the original header bytes
are kept in the .mth index and the tensors are written back at their original offsets.
"""
from __future__ import annotations

import base64
import errno
import json
import math
import mmap
import os
import stat
import re
import struct

import numpy as np

from . import container, dtypes
from .errors import CorruptFileError, MithrilError, short

SAFETENSORS_MAX_HEADER = 100 << 20
# The full anchors MithrilCheckpointIO(deltas=True) writes beside Lightning's checkpoints, which are
# deltas against them (lightning.py). A folder's decompression leaves them out: no file it writes
# needs them.
LIGHTNING_ANCHOR = re.compile(r"\.mithril-anchor-(\d+)\.mth\Z")


class InputFormatError(MithrilError):
    """An input checkpoint (safetensors or torch) cannot be read."""


class NotPlainTorchError(InputFormatError):
    """A torch file that ``torch.load(weights_only=True)`` refuses to unpickle: it holds objects
    other than tensors, numeric numpy arrays and plain values (a Trainer's ``training_args.bin``,
    a pickled model). Compressing a folder copies such a file as it is; it is never unpickled."""


def in_dcp_folder(path) -> bool:
    """Whether file ``path`` is part of a ``torch.distributed.checkpoint`` folder (its folder holds
    DCP's ``.metadata``): its ``.distcp`` files are not torch files, however their first bytes
    look, and such a folder is compressed as a whole (``mithril compress DIR OUT``), not file by file."""
    return os.path.isfile(os.path.join(os.path.dirname(os.fspath(path)), ".metadata"))


def sniff(path) -> str:
    """'safetensors', 'torch', 'mth' or 'unknown', from the first bytes of the file.

    A safetensors file is recognised first, by its shape (a header length that fits the file, then
    "{"): its first byte is the low byte of that length, which is 0x80, a pickle's first byte, for
    one header length in 32, and "PK", a zip's, for one length of all.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(b"\x89MTH"):
        return "mth"
    st = len(head) >= 9 and head[8:9] == b"{"
    if st:
        (n,) = struct.unpack("<Q", head[:8])
        if n <= SAFETENSORS_MAX_HEADER and 8 + n <= size:
            return "safetensors"
    if head[:2] == b"PK" or head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "torch"
    # a damaged safetensors file (its reader then says what is wrong) only by its name: any file
    # with "{" at byte 8 (a JSON config such as {"cfg": {...) is not one
    return "safetensors" if st and os.fsdecode(os.fspath(path)).endswith(".safetensors") else "unknown"


class SafetensorsFile:
    """A .safetensors file mapped read-only; tensors are zero-copy uint8 views of the map."""

    def __init__(self, path):
        self.path = os.fspath(path)
        where = short(self.path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise InputFormatError(f"{where}: too short to be a safetensors file")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self._mm[:8])
        if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise InputFormatError(f"{where}: safetensors header length {n} does not fit the file")
        self.header_bytes = bytes(self._mm[:8 + n])
        try:
            header = json.loads(self.header_bytes[8:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputFormatError(f"{where}: safetensors header is not valid JSON ({short(e, 100)})") from None
        if not isinstance(header, dict):
            raise InputFormatError(f"{where}: safetensors header is not an object")
        self.metadata = header.pop("__metadata__", None)
        if self.metadata is not None and not (isinstance(self.metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items())):
            raise InputFormatError(f"{where}: safetensors __metadata__ must map strings to strings")
        for text in list(header) + list((self.metadata or {}).items()):
            for t in (text if isinstance(text, tuple) else (text,)):
                if not _utf8(t):
                    raise InputFormatError(f"{where}: the header holds the string {short(t, 60)}, with a lone "
                                           "surrogate, which a .mth index (UTF-8) cannot store")
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors = []       # (name, DType, shape, begin, end) in file order
        for name, info in header.items():
            try:
                dt = dtypes.from_name(info["dtype"])
                shape, offs = info["shape"], info["data_offsets"]
                # JSON integers only, as the safetensors format has them ("12" and 12.0 are not a
                # size), and what a .mth index can hold (rank, sizes): never a file no reader opens
                if type(shape) is not list or type(offs) is not list or len(offs) != 2 \
                        or not all(type(x) is int for x in shape + offs):
                    raise ValueError
                shape = tuple(shape)
                b, e = offs
                why = None if any(x < 0 for x in shape) else container.shape_problem(shape, dt.itemsize)
                if why:
                    raise InputFormatError(f"{where}: tensor {short(name)}'s shape {short(shape, 80)} {why}: a .mth "
                                           "file cannot hold it")
            except KeyError:
                dtype = info.get("dtype") if isinstance(info, dict) else None
                raise InputFormatError(f"{where}: tensor {short(name)} has unsupported dtype "
                                       f"{short(repr(dtype), 40)} or a malformed entry") from None
            except (TypeError, ValueError, OverflowError):
                raise InputFormatError(f"{where}: tensor {short(name)} has a malformed entry") from None
            if any(x < 0 for x in shape) or not 0 <= b <= e <= data_len \
                    or e - b != math.prod(shape) * dt.itemsize:
                raise InputFormatError(f"{where}: tensor {short(name)} offsets do not match its shape")
            self.tensors.append((name, dt, shape, b, e))
        self.tensors.sort(key=lambda t: (t[3], t[4]))
        pos = 0
        for name, _, _, b, e in self.tensors:
            if b != pos:
                raise InputFormatError(f"{where}: tensor data is not contiguous at {short(name)} "
                                       "(safetensors requires it)")
            pos = e
        if pos != data_len:
            raise InputFormatError(f"{where}: {data_len - pos} bytes after the last tensor")
        self._data_start = data_start

    def data(self, begin: int, end: int) -> np.ndarray:
        return np.frombuffer(self._mm, np.uint8, end - begin, self._data_start + begin)

    def release(self, begin: int, end: int) -> None:
        """Drop the mapped pages of a tensor already compressed from this process's memory
        (they stay in the page cache), so compressing a file never holds the whole input."""
        page = mmap.PAGESIZE
        lo = (self._data_start + begin + page - 1) // page * page
        hi = (self._data_start + end) // page * page
        if hi > lo and hasattr(self._mm, "madvise"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def source_record(self) -> dict:
        return {"format": "safetensors", "header": base64.b64encode(self.header_bytes).decode("ascii")}

    def close(self):
        try:
            self._mm.close()
        except BufferError:
            pass


def safetensors_header(entries, metadata: dict | None) -> bytes:
    """A fresh safetensors header (with its length prefix) for entries in the given order."""
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for e in entries:
        header[e.name] = {"dtype": e.dtype.name, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def original_safetensors_layout(source: dict | None, entries) -> tuple[bytes, list] | None:
    """If the .mth was made from a safetensors file, its header bytes and tensors in file order.

    None if the file records no safetensors source (a fresh header is then written). A source
    record that is there but malformed, or that does not describe exactly the file's tensors
    (names, dtypes, shapes, contiguous offsets), is a :class:`CorruptFileError`: writing it out
    would give a file that is not the original, or not valid safetensors.
    """
    if not isinstance(source, dict) or source.get("format") != "safetensors":
        return None

    def bad(why: str):
        raise CorruptFileError(f"corrupt index: the stored safetensors header (source record) {why}")

    if not isinstance(source.get("header"), str):
        bad("is not a base64 string")
    try:
        raw = base64.b64decode(source["header"], validate=True)
    except ValueError:
        bad("is not valid base64")
    if len(raw) < 8 or struct.unpack("<Q", raw[:8])[0] != len(raw) - 8:
        bad("has a length prefix that does not match its size")
    try:
        header = json.loads(raw[8:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        bad("is not valid JSON")
    if not isinstance(header, dict):
        bad("is not a JSON object")
    header.pop("__metadata__", None)
    by_name = {e.name: e for e in entries}
    if len(header) != len(by_name) or any(name not in by_name for name in header):
        bad("does not list the file's tensors")
    spans = []
    for name, info in header.items():
        e = by_name[name]
        if not isinstance(info, dict) or info.get("dtype") != e.dtype.name or info.get("shape") != list(e.shape) \
                or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2 \
                or not all(type(x) is int for x in info["data_offsets"]):
            bad(f"does not match tensor {short(name)}")
        b, end = info["data_offsets"]
        if end - b != e.nbytes:
            bad(f"gives tensor {short(name)} offsets that do not match its size")
        spans.append((b, end, e))
    spans.sort(key=lambda t: (t[0], t[1]))
    pos = 0
    for b, end, e in spans:
        if b != pos:
            bad(f"does not place the tensors back to back (at {short(e.name)})")
        pos = end
    return raw, [e for _, _, e in spans]


def _np_dtype(*args):
    """numpy.dtype as torch.load(weights_only=True) may call it: numeric dtypes only (arrays of
    objects, strings or records are refused while unpickling, before they exist)."""
    import pickle

    d = np.dtype(*args)
    if d.kind not in "biuf" or d.fields is not None:
        raise pickle.UnpicklingError(f"numpy arrays of dtype {short(d, 40)} are not allowed (numeric dtypes only)")
    return d


def _np_reconstruct(subtype, *args):
    """numpy's array constructor for pickles, for plain numpy arrays only."""
    import pickle

    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"numpy array subclass {short(subtype, 60)} is not allowed")
    return np._core.multiarray._reconstruct(subtype, *args)


def _numpy_safe_globals() -> list:
    """What torch.load(weights_only=True) needs to rebuild numeric numpy arrays, which real
    checkpoints hold (RNG states): numpy's array constructor and dtype (under the names numpy 1
    and 2 pickle them with, both checked above), and the classes of numeric dtypes. No other
    global is allowed, so nothing else is unpickled."""
    kinds = [np.dtype(c) for c in "?bBhHiIlLqQefd"]
    allowed = [(_np_reconstruct, f"numpy.{core}.multiarray._reconstruct") for core in ("core", "_core")]
    allowed += [(_np_dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    allowed += sorted({type(d) for d in kinds}, key=lambda t: t.__name__)
    return allowed


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _torch_refusal(e: BaseException) -> str:
    """torch.load's exception as one short printable line: terminal colour codes removed, and
    for a weights_only refusal the reason itself (``Unsupported global: GLOBAL x.y``...) kept."""
    text = _ANSI.sub("", str(e))
    m = re.search(r"unsupported (?:global: )?GLOBAL (\S+?)\.?(?:\s|$)", text, re.IGNORECASE)
    if m:
        return f"Unsupported global: GLOBAL {short(m.group(1), 100)}"
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if m:
        line = m.group(1)
    else:
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        line = next((ln for ln in lines if not ln.startswith(boiler)), lines[0] if lines else type(e).__name__)
    return short(" ".join(line.split()), 200)


def load_torch(path):
    """Read a torch checkpoint without unpickling arbitrary objects (weights_only=True; numeric
    numpy arrays allowed, see :func:`_numpy_safe_globals`)."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise MithrilError(f"{short(path)}: out of memory while reading it as a torch checkpoint") from None
    except Exception as e:  # torch raises many types here; say what happened in one line
        hint = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "WeightsUnpickler" in str(e):
            hint = ("; it holds objects other than tensors, numeric numpy arrays and plain values (a pickled "
                    "model?): if you trust it, load it yourself and compress its state_dict() with "
                    "mithril_gpu.save")
        kind = NotPlainTorchError if hint else InputFormatError
        raise kind(f"{short(path)}: cannot be read as a torch checkpoint with weights_only=True "
                   f"({_torch_refusal(e)}){hint}") from None


# ---------------------------------------------------------------- output folders

STAGE_MARK = ".mithril-"
STAGE_SUFFIX = ".partial"


class StagedDir:
    """An output folder that appears whole or not at all (what ``mithril compress DIR OUT`` and
    ``mithril decompress DIR OUT`` write into).

    Everything is written into a hidden sibling, ``.<name>.mithril-<random>.partial`` (a sibling,
    so relative paths to delta bases outside it stay right once it is moved). :meth:`commit`
    renames it to ``path`` when ``path`` does not exist (one atomic rename), or, for an existing
    folder (``-f``), moves its files in one by one (each move atomic; files of other names
    already there are kept). A failure or interruption before :meth:`commit` (the context
    manager's exit with an exception) removes the sibling and leaves ``path`` as it was. A
    process killed outright leaves the hidden sibling, never a half-written ``path``; the sibling
    is locked (``flock``) while in use, and the next run for the same ``path`` removes the ones
    no live process holds.
    """

    def __init__(self, path, force: bool = False):
        self.given = os.path.abspath(os.fspath(path))
        # staged beside OUT's real place (OUT may be a link to a folder elsewhere): relative paths
        # from the staged files to delta bases are then those of the files moved into OUT
        self.path = os.path.realpath(self.given)
        self.force = force              # an OUT made by another run meanwhile is written into (as -f does)
        self.existed = os.path.lexists(self.path)
        parent, name = os.path.split(self.path)
        self.prefix = f".{name[:200]}{STAGE_MARK}"
        os.makedirs(parent, exist_ok=True)        # OUT's parents are made as before (only OUT is staged)
        _remove_stale_stages(parent, self.prefix)
        self._fd, self.tmp = _locked_stage(parent, self.prefix)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)      # what os.makedirs would give OUT (mkdtemp makes 0700)
        self.done = False

    def where(self, p: str) -> str:
        """Where a path under ``path`` is written until the commit."""
        rel = os.path.relpath(os.path.abspath(p), self.given)
        return self.tmp if rel == "." else os.path.join(self.tmp, rel)

    def commit(self) -> None:
        import shutil

        moved = False
        if not os.path.lexists(self.path):
            try:
                os.rename(self.tmp, self.path)
                moved = True
            except OSError as e:        # another run made OUT in the meantime (below)
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(self.path):
                    raise
        if not moved and not self.existed and not self.force:
            raise MithrilError(f"{short(self.path)} appeared while this run was writing it (another run?): "
                               "nothing of it was replaced; pass -f/--force to write into it")
        if not moved:
            # An existing OUT (-f): the stage takes hard links of OUT's other files, then the two
            # folders are exchanged in one step (renameat2 RENAME_EXCHANGE), so a kill leaves OUT
            # wholly old or wholly new, never a mix of two runs' files. Where the filesystem
            # cannot, files are moved in one by one, a checkpoint's commit file last (the old one
            # removed first): a kill midway leaves an uncommitted folder, never a commit that
            # names another run's data.
            if not (_link_rest(self.path, self.tmp) and _exchange(self.tmp, self.path)):
                moves = []
                for folder, dirs, files in os.walk(self.tmp):
                    dirs.sort()
                    target = os.path.join(self.path, os.path.relpath(folder, self.tmp))
                    os.makedirs(target, exist_ok=True)
                    moves += [(os.path.join(folder, n), os.path.join(target, n)) for n in sorted(files)]
                last = [(a, b) for a, b in moves if os.path.basename(b) in COMMIT_FILES]
                for _, b in last:
                    if os.path.lexists(b):
                        os.unlink(b)
                for a, b in [m for m in moves if m not in last] + last:
                    if os.path.lexists(a):          # (a link of OUT's own file is already there)
                        os.replace(a, b)
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True
        self._unlock()
        _fsync_dir(os.path.dirname(self.path))

    def abort(self) -> None:
        import shutil

        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
        return False


COMMIT_FILES = (".metadata", "mithril_dcp.json")     # a DCP folder's commit: moved in last


def _link_rest(out: str, stage: str) -> bool:
    """Hard links in ``stage`` of OUT's files that the run did not write (links as links), so
    that the stage holds what OUT will hold, and the stage's folders given OUT's modes. False
    (then files are moved in one by one) where an exchange would not leave OUT as it was but for
    the new files: OUT not a folder, owned by another user or group than this run's, carrying
    extended attributes (ACLs), a folder that cannot be read, a filesystem without hard links."""
    try:
        so, ss = os.stat(out), os.stat(stage)
    except OSError:
        return False
    if not stat.S_ISDIR(so.st_mode):
        return False
    made = []                                      # (stage folder, mode): set once all is linked

    def fail(e):
        raise e
    try:
        for folder, dirs, files in os.walk(out, onerror=fail):
            rel = os.path.relpath(folder, out)
            target = stage if rel == "." else os.path.join(stage, rel)
            if os.path.lexists(target) and not os.path.isdir(target):
                dirs[:] = []                       # a new file where OUT had a folder: the file wins
                continue
            st = os.stat(folder)            # (OUT itself first: its owner, group and attributes too)
            if (st.st_uid, st.st_gid) != (ss.st_uid, ss.st_gid) or _has_xattrs(folder):
                return False
            if not os.path.isdir(target):
                os.makedirs(target)
                made.append((target, stat.S_IMODE(st.st_mode)))
            for name in dirs + files:
                src, dst = os.path.join(folder, name), os.path.join(target, name)
                if os.path.lexists(dst):
                    continue                       # written by this run (or a folder to go into)
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                elif name in files:
                    os.link(src, dst)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
        for target, mode in reversed(made):        # (deepest first: a read-only folder last)
            os.chmod(target, mode)
        os.chmod(stage, stat.S_IMODE(so.st_mode))
        return True
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.EMLINK, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP,
                       errno.ENOENT):
            return False
        raise


def _has_xattrs(path: str) -> bool:
    """Whether a folder carries extended attributes (ACLs) an exchange would not carry over (True
    where that cannot be told)."""
    if not hasattr(os, "listxattr"):
        return False
    try:
        return bool(os.listxattr(path))
    except OSError:
        return True


def _exchange(a: str, b: str) -> bool:
    """Swap folders ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE); False where
    the system or filesystem cannot."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _locked_stage(parent: str, prefix: str) -> tuple[int | None, str]:
    """A new hidden folder in ``parent``, locked; as ``writer._locked_temp`` does for files: a
    cleaner that took it for a stale one in the instant before the lock makes us try another."""
    import tempfile

    from .writer import fcntl

    for _ in range(100):
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=STAGE_SUFFIX, dir=parent)
        if fcntl is None:
            return None, tmp
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:       # another run's cleaner took it for a stale one: try another
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)       # held until the fd closes or the process dies
            if os.fstat(fd).st_nlink > 0:
                return fd, tmp
        except OSError:
            pass
        os.close(fd)
    raise OSError(f"could not create a temp folder in {parent}")


def _remove_stale_stages(parent: str, prefix: str) -> None:
    """Remove the hidden folders ``prefix*.partial`` in ``parent`` that killed runs left: those
    whose lock can be taken (no live process holds them)."""
    import shutil

    from .writer import fcntl

    if fcntl is None:
        return
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(STAGE_SUFFIX)):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue                   # a live run is writing it
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
