"""Writing .mth files: atomic replacement and the streaming layout (payloads, then index, then trailer)."""
from __future__ import annotations

import io
import os
import tempfile

from . import codecs, container
from .container import Index, TensorEntry
from .cpu import EncodeItem, encode_all
from .errors import short

WRITER_NAME = "mithril-gpu 0.1.0"


class BaseNote(UserWarning):
    """A one-line note about a delta's base: few or none of the tensors matched it."""


TEMP_MARK = ".mithril-"     # temp files are ".<target name>.mithril-<random>.tmp"
TEMP_SUFFIX = ".tmp"

try:
    import fcntl
except ImportError:     # no advisory locks (Windows): stale temp files are then left alone
    fcntl = None


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file name that :class:`AtomicFile` makes."""
    return name.startswith(".") and TEMP_MARK in name and name.endswith(TEMP_SUFFIX)


def remove_stale_temps(directory) -> list[str]:
    """Delete the temp files that writers killed mid-save left in ``directory``; return their paths.

    A writer holds an exclusive advisory lock (``flock``) on its temp file for as long as it
    writes, and the kernel drops the lock when the process dies, however it dies (SIGKILL
    included). A temp file whose lock can be taken therefore belongs to no live writer, and only
    such files are removed: never one that another process is still writing. Where there are no
    advisory locks, nothing is removed.
    """
    if fcntl is None:
        return []
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        if not is_temp_name(name):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not os.path.isfile(path):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                       # a live writer holds it
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


def _locked_temp(directory: str, prefix: str) -> tuple[int, str]:
    """A new temp file in ``directory``, locked. A cleaner in another process may have taken the
    file for a stale one in the instant between its creation and the lock; then it is either
    locked by that cleaner or already unlinked, and another name is tried."""
    for _ in range(100):
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=directory)
        if fcntl is None:
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # held until the fd closes (or the process dies)
            if os.fstat(fd).st_nlink > 0:
                return fd, tmp
        except OSError:
            pass                                             # a cleaner holds it and will remove it
        os.close(fd)
    raise OSError(f"could not create a temp file in {directory}")


class AtomicFile:
    """A file that replaces ``path`` only when complete: temp file, fsync, rename, fsync dir.

    If anything fails (or the process is interrupted) before :meth:`commit`, the temp file is
    removed and whatever was at ``path`` before is untouched. ``mode``: the permission bits the
    file gets (default: 0o666 less the umask), set before it appears under ``path``. A process killed outright (SIGKILL,
    power loss) leaves its temp file behind: it is named ``.<name>.mithril-<random>.tmp`` and
    locked while written, and the next :class:`AtomicFile` in the same directory removes it
    (:func:`remove_stale_temps`).
    """

    def __init__(self, path: str | os.PathLike, mode: int | None = None):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a directory")
        directory = os.path.dirname(os.path.abspath(self.path))
        remove_stale_temps(directory)
        fd, self.tmp = _locked_temp(directory, "." + os.path.basename(self.path)[:200] + TEMP_MARK)
        try:
            if mode is None:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            if hasattr(os, "fchmod"):          # mkstemp makes 0600; give the usual (or the asked) permissions
                os.fchmod(fd, mode)
            self.file = io.BufferedWriter(io.FileIO(fd, "wb", closefd=True), buffer_size=4 << 20)
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp)
            raise
        self.offset = 0

    def write(self, data) -> int:
        """Append ``data``; return the offset it starts at."""
        at = self.offset
        self.file.write(data)
        self.offset += len(data)
        return at

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        # rename while the lock is still held, so no cleaner can take a complete file for a stale one
        os.replace(self.tmp, self.path)
        self.file.close()
        try:
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def abort(self) -> None:
        try:
            os.unlink(self.tmp)        # while still locked: no cleaner can be racing for it
        except OSError:
            pass
        finally:
            self.file.close()
        try:
            os.unlink(self.tmp)        # where an open file cannot be unlinked (Windows)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def write_mth(path, items: list[EncodeItem], *, tree, metadata=None, source=None, base=None,
              same: dict[int, tuple[str, int]] | None = None, level=None, threads: int = 1, progress=None,
              encode=None, mode: int | None = None) -> Index:
    """Write a complete .mth file atomically and return its index.

    ``same`` maps item positions to (base tensor name, checksum) for tensors stored as a
    reference to an identical base tensor (they get no payload). ``encode`` swaps in another backend's
    encoder with the signature of :func:`mithril_gpu.cpu.encode_all`.
    """
    same = same or {}
    coder = codecs.ChunkCoder(level)
    with AtomicFile(path, mode) as out:
        out.write(container.pack_preamble())
        todo = [it for i, it in enumerate(items) if i not in same]
        results = iter((encode or encode_all)(todo, out.write, coder, threads, progress))
        entries = []
        for i, it in enumerate(items):
            if i in same:
                base_name, digest = same[i]
                entries.append(TensorEntry(it.name, it.dtype, tuple(it.shape), it.transform, it.chunk_elems,
                                           digest, [], {"op": "same", "base": base_name}))
                continue
            res = next(results)         # (checksum, chunks[, row digests]): an encoder may omit the digests
            digest, chunks = res[0], res[1]
            d = {"op": it.delta_op, "base": it.base_name} if it.delta_op else None
            entries.append(TensorEntry(it.name, it.dtype, tuple(it.shape), it.transform, it.chunk_elems,
                                       digest, chunks, d, it.nnz if it.transform == "masked" else None,
                                       row_digests=list(res[2]) if len(res) > 2 else None))
            if it.ctx is not None:          # a context-sorted delta (feature "ctxdelta")
                entries[-1].ctx, entries[-1].segs = list(it.ctx), list(it.segs)
        if base is not None and not any(e.delta for e in entries):
            import warnings

            warnings.warn(f"mithril: no tensor was stored against the base {short(base.get('path'))}: "
                          "written as a full checkpoint that does not need it", BaseNote, stacklevel=4)
            base = None                     # a file records a base only if it uses it
        index = Index(entries, tree, metadata, source, base, WRITER_NAME)
        raw = index.to_bytes()
        at = out.write(raw)
        out.write(container.pack_trailer(at, raw))
    return index
