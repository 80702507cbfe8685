"""Writing .mth files: atomic replacement and the streaming layout (payloads, then index, then trailer)."""
from __future__ import annotations

import io
import os
import tempfile

from . import codecs, container
from .container import Index, TensorEntry
from .cpu import EncodeItem, encode_all

WRITER_NAME = "mithril-gpu 0.1.0"


class AtomicFile:
    """A file that replaces ``path`` only when complete: temp file, fsync, rename, fsync dir.

    If anything fails (or the process is interrupted) before :meth:`commit`, the temp file is
    removed and whatever was at ``path`` before is untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp",
                                        dir=directory)
        umask = os.umask(0)
        os.umask(umask)
        if hasattr(os, "fchmod"):          # mkstemp makes 0600; give the usual permissions (POSIX)
            os.fchmod(fd, 0o666 & ~umask)
        self.file = io.BufferedWriter(io.FileIO(fd, "wb", closefd=True), buffer_size=4 << 20)
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
        self.file.close()
        os.replace(self.tmp, self.path)
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
            self.file.close()
        finally:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
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
              encode=None) -> Index:
    """Write a complete .mth file atomically and return its index.

    ``same`` maps item positions to (base tensor name, checksum) for tensors stored as a
    reference to an identical base tensor (they get no payload). ``encode`` swaps in another backend's
    encoder with the signature of :func:`mithril_gpu.cpu.encode_all`.
    """
    same = same or {}
    coder = codecs.ChunkCoder(level)
    with AtomicFile(path) as out:
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
            digest, chunks = next(results)
            d = {"op": it.delta_op, "base": it.base_name} if it.delta_op else None
            entries.append(TensorEntry(it.name, it.dtype, tuple(it.shape), it.transform, it.chunk_elems,
                                       digest, chunks, d, it.nnz if it.transform == "masked" else None))
        index = Index(entries, tree, metadata, source, base, WRITER_NAME)
        raw = index.to_bytes()
        at = out.write(raw)
        out.write(container.pack_trailer(at, raw))
    return index
