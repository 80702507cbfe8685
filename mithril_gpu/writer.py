"""Writing .mth files: atomic replacement and the streaming layout (payloads, then index, then trailer)."""
from __future__ import annotations

import errno
import io
import os
import stat
import sys
import tempfile
import threading

from . import codecs, container
from .container import Index, TensorEntry
from .cpu import EncodeItem, encode_all
from .errors import MithrilError, short

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
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return fd, tmp       # a filesystem without flock (Lustre without -o flock): unlocked, and
                                     # remove_stale_temps, which cannot lock it either, never removes it
            # else a cleaner holds it and will remove it
        os.close(fd)
    raise OSError(f"could not create a temp file in {directory}")


FLUSH_BYTES = 4 << 20        # payloads are handed to the writer thread in batches of about this size
QUEUE_BATCHES = 4            # at most this many batches wait for the writer thread (memory bound)
LEND = True                  # stored planes are written from the coder's buffers, not copied first
SYNC_EVERY = 64 << 20        # start writeback of what is written every this many bytes (Linux)
OLD_FILE_BYTES = 64 << 20    # a replaced file at least this big is freed off the critical path
RELEASE_REPLACED = True      # release_cache drops the page cache of big files a save replaces, as it starts
IOV_MAX = 512                # buffers per writev call (the system limit is at least 1024)
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    """libc's sync_file_range (Linux), or None: starts writeback of a range without waiting."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_start_writeback = _sync_file_range()


def _write_all(fd: int, bufs: list) -> int:
    """Write ``bufs`` (bytes) at the file's position with as few system calls as possible."""
    total = 0
    for i in range(0, len(bufs), IOV_MAX):
        group = bufs[i:i + IOV_MAX]
        want = sum(len(b) for b in group)
        done = os.writev(fd, group)
        while done < want:                      # a short write: go on from where it stopped
            rest, skip = [], done
            for b in group:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                rest.append(memoryview(b)[skip:])
                skip = 0
            group, want = rest, want - done
            done = os.writev(fd, group)
        total += sum(len(b) for b in bufs[i:i + IOV_MAX])
    return total


class _Writer:
    """A thread that writes batches of payloads in order, starting writeback as the file grows
    (so that the final fsync has little left to wait for). The first error it meets is kept and
    raised by the next :meth:`put` or :meth:`close`."""

    def __init__(self, fd: int):
        import queue

        self.fd, self.error, self.written, self.synced = fd, None, 0, 0
        self.q = queue.Queue(QUEUE_BATCHES)
        self.thread = threading.Thread(target=self._run, name="mithril-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            bufs, after = item
            try:
                if self.error is None:         # (else drain: the file is abandoned)
                    self.written += _write_all(self.fd, bufs)
                    if _start_writeback is not None and self.written - self.synced >= SYNC_EVERY:
                        _start_writeback(self.fd, self.synced, self.written - self.synced, _SYNC_FILE_RANGE_WRITE)
                        self.synced = self.written
            except BaseException as e:          # noqa: BLE001  (kept, raised on the caller's thread)
                self.error = e
            del bufs, item
            for fn in after:                    # the lent buffers of this batch are free again
                try:
                    fn()
                except BaseException as e:      # noqa: BLE001
                    if self.error is None:
                        self.error = e

    def put(self, bufs: list, after: list) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((bufs, after))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _FileView(io.RawIOBase):
    """``AtomicFile.file``: a write-only file object for code that wants one (``torch.save``)."""

    def __init__(self, owner: "AtomicFile"):
        super().__init__()
        self._owner = owner
        #: the first error a write raised (a full disk, a Ctrl-C): torch.save replaces it with
        #: an error of its own ("unexpected pos ..."), which callers re-raise this instead of
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        try:
            self._owner.write(bytes(b))
        except BaseException as e:
            if self.error is None:
                self.error = e
            raise
        return n

    def fileno(self) -> int:
        return self._owner.fd


_old_fds: set = set()          # replaced files held open, from before their name goes until a
_old_lock = threading.Lock()   # background thread closes them (freeing them); the lock is held
                               # while one is closed, and across fork(), so that a child's copy of
                               # the set names exactly the descriptors it inherited open


def close_quietly(fds: set) -> None:
    """Close every descriptor in ``fds`` (ignoring errors) and empty it: what a forked child does
    with the descriptors its parent holds for a while (this module's and the Checkpointer's)."""
    for fd in list(fds):
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _open_old(path) -> int | None:
    """An open descriptor of ``path`` if it is a regular file of ``OLD_FILE_BYTES`` or more with
    one link (whose blocks its removal would free), else None. POSIX only: there a file stays
    whole while open, whatever happens to its name."""
    if os.name != "posix":
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size >= OLD_FILE_BYTES:
            _old_fds.add(fd)           # (no lock: a save's commit never waits for a background close)
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _free_old(fd: int) -> None:
    with _old_lock:
        _old_fds.discard(fd)
        try:
            os.close(fd)             # the last reference: the file system frees the blocks now, here
        except OSError:
            pass


def _close_in_background(fd: int) -> None:
    try:
        threading.Thread(target=_free_old, args=(fd,), name="mithril-free-old", daemon=True).start()
    except RuntimeError:           # no thread to be had (a limit, interpreter shutdown): free it here
        _free_old(fd)


def _old_fds_in_child() -> None:
    """A forked child closes its copies of the descriptors its parent is freeing (a DataLoader
    worker must not keep a replaced checkpoint's blocks for its lifetime)."""
    global _old_lock
    close_quietly(_old_fds)
    _old_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _old_lock.acquire(), after_in_parent=lambda: _old_lock.release(),
                        after_in_child=_old_fds_in_child)


def free_in_background(path: str) -> None:
    """Remove ``path``. Its name is gone when this returns (a folder listed or removed right after
    sees nothing of it). A file of ``OLD_FILE_BYTES`` or more is held open across the unlink and
    closed on a background thread: freeing a big file's blocks takes the file system ~0.1 s per
    GB, which need not be on the caller's critical path. Its space comes back when that thread
    closes it, or when the process ends, however it ends."""
    fd = _open_old(path)
    try:
        os.unlink(path)
    except OSError:
        if fd is not None:
            _free_old(fd)
        return
    if fd is not None:
        _close_in_background(fd)


def _drop_cached(fds: list) -> None:
    """Drop the cached pages of the open files ``fds``, and close them."""
    for fd in fds:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def release_cache(paths):
    """Ask the kernel, on a background thread, to drop the cached pages of files that the save
    now starting replaces (``posix_fadvise(DONTNEED)``; their data stays on disk, and they stay
    readable and restorable until the save commits). The files are opened here, before the save
    writes anything, so that the thread drops the pages of these very files, whatever is renamed
    over them meanwhile. Symbolic links, files that are not regular and files under
    ``OLD_FILE_BYTES`` are left alone. Best effort: does nothing where the call is missing or
    fails, and nothing at all with ``RELEASE_REPLACED`` off. Returns the thread, or None.

    Why: the new file needs as many page-cache pages as the old one holds. Freed just before,
    the old file's pages are at hand; otherwise the new file takes pages from the free pool,
    which in a virtual machine whose balloon reports free pages to the host (as on the
    machine where the benchmarks of STATUS.md ran) costs a host fault per page on first write:
    measured, a DCP rank file's save took 2x longer. The old file's pages would be freed anyway
    when it is removed after the commit."""
    if not RELEASE_REPLACED or not hasattr(os, "posix_fadvise"):
        return None
    fds = []
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    for p in paths:
        try:
            fd = os.open(p, flags)          # (non-blocking: a FIFO put in its place never hangs us)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size >= OLD_FILE_BYTES:
            fds.append(fd)
        else:
            os.close(fd)
    if not fds:
        return None
    t = threading.Thread(target=_drop_cached, args=(fds,), name="mithril-release-cache", daemon=True)
    try:
        t.start()
    except RuntimeError:
        _drop_cached(fds)       # no thread to be had: here, then
        return None
    return t


class AtomicFile:
    """A file that replaces ``path`` only when complete: temp file, fsync, rename, fsync dir.

    If anything fails (or the process is interrupted) before :meth:`commit`, the temp file is
    removed and whatever was at ``path`` before is untouched. ``mode``: the permission bits the
    file gets (default: 0o666 less the umask), set before it appears under ``path``. A process killed outright (SIGKILL,
    power loss) leaves its temp file behind: it is named ``.<name>.mithril-<random>.tmp`` and
    locked while written, and the next :class:`AtomicFile` in the same directory removes it
    (:func:`remove_stale_temps`).

    The I/O overlaps the caller's work: :meth:`write` keeps a reference to ``bytes`` payloads
    (no copy; other buffers are copied, since their owner may reuse them) and hands batches of
    about 4 MB to a writer thread, which writes each batch with one ``writev`` and starts the
    kernel's writeback every 64 MB (``sync_file_range``, on Linux), so the fsync at the end
    waits for little. A big file that is replaced is held open across the rename and closed on a
    background thread after the commit, so that its blocks are freed off the critical path; no
    name of it is left behind, and a process killed first frees it as it dies.
    """

    def __init__(self, path: str | os.PathLike, mode: int | None = None):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a directory")
        if not os.path.basename(self.path):        # "" or "dir/": refused now, not after the work
            raise IsADirectoryError(f"{self.path!r} names no file" + (" (it ends in a '/')" if self.path else ""))
        self._dir = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(self._dir):            # (said of the path given, not of a temp name)
            raise FileNotFoundError(errno.ENOENT, f"no folder {self._dir} to write {os.path.basename(self.path)} in",
                                    self.path)
        try:
            st = os.stat(self.path)
        except (OSError, ValueError):
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            # a device or a FIFO would be replaced by a regular file (as root, /dev/null itself)
            raise MithrilError(f"{short(self.path)} is not a regular file (a device, a pipe or a socket): mithril "
                               f"replaces its output atomically, by renaming a finished file over it; write to a "
                               f"file instead")
        remove_stale_temps(self._dir)
        release_cache([self.path])
        self._prefix = "." + os.path.basename(self.path)[:200] + TEMP_MARK
        fd, self.tmp = _locked_temp(self._dir, self._prefix)
        try:
            if mode is None:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            if hasattr(os, "fchmod"):          # mkstemp makes 0600; give the usual (or the asked) permissions
                os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp)
            raise
        self.fd = fd
        self.offset = 0
        self._batch: list = []
        self._after: list = []               # called once the current batch is written
        self._batch_bytes = 0
        self._writer: _Writer | None = None
        self.file = _FileView(self)

    def write(self, data, lent: bool = False) -> int:
        """Append ``data``; return the offset it starts at. ``data`` may be reused once this returns,
        unless ``lent``: then it is written from where it is, with no copy, and must not change
        until a function given to :meth:`after_written` after it has been called."""
        at = self.offset
        if lent:
            data = memoryview(data).cast("B")
        elif type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        if n:
            self._batch.append(data)
            self._batch_bytes += n
            self.offset += n
            if self._batch_bytes >= FLUSH_BYTES:
                self._hand_over()
        return at

    def after_written(self, fn) -> None:
        """Call ``fn()`` (on the writer thread, or at once if nothing waits) once everything
        written so far is in the file, or was dropped because the file is abandoned: the moment
        the buffers lent to :meth:`write` before this call may be reused."""
        if not self._batch and self._writer is None:
            fn()
            return
        self._after.append(fn)

    def _hand_over(self) -> None:
        if self._writer is None:
            self._writer = _Writer(self.fd)
        batch, after, self._batch, self._after, self._batch_bytes = self._batch, self._after, [], [], 0
        self._writer.put(batch, after)

    def _finish_writes(self) -> None:
        """Every byte written to the file (the writer thread stopped)."""
        if self._writer is not None:
            if self._batch or self._after:
                self._hand_over()
            writer, self._writer = self._writer, None
            writer.close()
        elif self._batch:
            _write_all(self.fd, self._batch)
        after, self._batch, self._after, self._batch_bytes = self._after, [], [], 0
        for fn in after:
            fn()

    def commit(self) -> None:
        self._finish_writes()
        os.fsync(self.fd)
        old = _open_old(self.path)      # the replaced file, held open across the rename: its blocks are
        # freed when it is closed, after the commit, on a background thread (no name of it is left).
        # Rename while the lock is still held, so no cleaner can take a complete file for a stale one.
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            if old is not None:
                _free_old(old)
            raise
        os.close(self.fd)
        self.fd = -1
        try:
            dfd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        if old is not None:
            _close_in_background(old)

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except BaseException:      # noqa: BLE001  (the write failed; the file goes anyway)
                pass
        self._batch, self._after = [], []
        try:
            os.unlink(self.tmp)        # while still locked: no cleaner can be racing for it
        except OSError:
            pass
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        try:
            os.unlink(self.tmp)        # where an open file cannot be unlinked (Windows)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                if self.fd >= 0:           # failed before the rename: the temp file goes
                    self.abort()
                raise
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
        results = iter(encode_all(todo, out.write, coder, threads, progress, lend=out if LEND else None) if encode is None
                       else encode(todo, out.write, coder, threads, progress))
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
        trailer = container.pack_trailer(at, raw)
        out.write(trailer)
    index.identity = trailer[16:24][::-1].hex()     # the file's identity (FORMAT.md "Deltas"): its index_xxh64
    index.frame = (at, len(raw))                    # where its index lies in the file (offset, length)
    return index
