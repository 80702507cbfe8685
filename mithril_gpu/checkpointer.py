"""Checkpointer: frequent checkpoints of a training run, each a delta against the one before.

>>> ckpt = Checkpointer("ckpts/", full_every=10, keep=3)
>>> for step in range(...):
...     train_step()
...     if step % 100 == 0:
...         ckpt.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, step)
>>> state = ckpt.latest()
"""
from __future__ import annotations

import atexit
import contextlib
import concurrent.futures.thread  # noqa: F401  (imported before _at_exit is registered: see there)
import errno
import os
import re
import sys
import threading
import warnings
import weakref
from typing import NamedTuple

import numpy as np

from . import api, checksum, cpu, tree as tree_mod, writer
from .errors import BaseMismatchError, CorruptFileError, MissingBaseError, MithrilError, short
from .reader import MAX_CHAIN, SKIP_BASE, MthFile
from .torchio import writable_bytes
from .writer import remove_stale_temps

_NAME = re.compile(r"step-(\d+)\.mth\Z")
_instances: "weakref.WeakSet" = weakref.WeakSet()      # every live Checkpointer (a forked child resets their writers)
PRUNE_THREAD_BYTES = 64 << 20   # pruned files of this many bytes in all are deleted on a thread (Checkpointer._prune)
RECHOOSE_EVERY = 4      # deltas re-choose each tensor's coding every this many saves (the first of a chain too)

# what a checkpoint file in the directory is (Checkpointer._scan)
_OK = "ok"              # restorable: its file and every base of its chain are there and are the right files
_ORPHAN = "orphan"      # a base of its chain is missing, or is another file than the one it was written against
_DAMAGED = "damaged"    # it, or a base of its chain, cannot be read as a .mth file (or the chain is too long)
_GONE = "gone"          # deleted while the directory was being read


def _unlink_in_order(paths: list, errors: list | None = None) -> None:
    """Delete ``paths`` in order, stopping at the first error: raised, or with ``errors`` (on a
    thread, where there is nothing to raise it to) appended there for the owner to report. The
    next prune tries the files left again."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            if errors is None:
                raise
            errors.append((p, e))
            return


class CheckpointNote(UserWarning):
    """A one-line note about a file in a Checkpointer's directory that it skips or deletes."""


def _note_unpruned(errors: list, stacklevel: int) -> None:
    """A one-line note for each file a prune could not delete (the next prune tries again);
    ``stacklevel`` as the caller would give warnings.warn."""
    for p, e in errors:
        warnings.warn(CheckpointNote(f"mithril: could not delete the pruned {short(p)}: {short(e)}"),
                      stacklevel=stacklevel + 1)


def _stat_key(path: str) -> tuple:
    """What tells one version of a file from another (a file replaced or rewritten changes it)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _Info(NamedTuple):
    identity: str                   # the file's identity (what a delta against it records)
    base_step: int | None           # the step whose file is its base, if it is a delta against one of ours
    base_identity: str | None       # the identity its base must have


class Checkpointer:
    """Writes ``step-NNNNNNNNN.mth`` files into ``directory``.

    Args:
        directory: created if missing. Existing checkpoints in it are picked up (resume), and
            temp files that killed writers left in it are removed (never one a live process is
            still writing).
        full_every: every N-th save is a full checkpoint; the ones between are deltas against
            the previous save (so a chain is at most N files long). 1 means never a delta.
        keep: the newest M checkpoints stay restorable; older files are deleted once no kept
            checkpoint needs them as a base. ``None`` keeps everything.
        keep_base_in_memory: keep a copy of the last saved tensors (on the device they came
            from), so a delta never re-reads its base from disk. Costs one copy of the tensors.
        **save_kwargs: passed to :func:`mithril_gpu.save` (level, threads, ...).

    Files are deleted newest first, so that a base always goes after every delta that needs it:
    a process killed while pruning never leaves a delta without its base. Pruned files of 64 MB
    and more (``PRUNE_THREAD_BYTES``) are deleted in that order on a thread, off the save's
    critical path; the next save, :meth:`wait`, :meth:`close` and interpreter exit wait for it.
    A save also asks the kernel to drop the cached pages of the files it will prune, as it
    starts (see ``writer.release_cache``).

    Saves into one folder take turns, across processes and Checkpointers: each holds an advisory
    lock (``flock``) on the folder from choosing its base to the end of its write and prune (a
    background save until its write is done). So two processes saving the same step at once
    (every rank of a job that forgot ``if rank == 0``) no longer both write it, the last rename
    silently winning: the second finds the step taken and raises ``ValueError``. Use one folder
    per rank for per-rank states (or :mod:`mithril_gpu.dcp`).

    Checkpoints that cannot be restored are never listed by :meth:`steps` (so neither
    :meth:`latest` nor a resume uses them), and each gets a one-line :class:`CheckpointNote`
    warning:

    * an *orphan*, a delta whose base (or a base further down its chain) is missing or is another
      file than the one it was written against (left by a process killed mid-prune by an older
      version, or by files deleted by hand), is unrecoverable: the next :meth:`save` deletes it.
      If the newest file in the directory is one (or is damaged), that save is a full checkpoint.
    * a *damaged* file, one that cannot be read as a .mth file (and any delta that needs it), is
      left where it is for you to look at; it is never deleted (a save of its step renames it to
      ``<name>.damaged`` first, with a note).

    With ``blocking=False``, a save still running when the interpreter exits (the script's end,
    ``sys.exit()``, or an uncaught exception) is finished before exit. If it fails, or failed
    earlier without anyone calling :meth:`wait`, one ``mithril: ERROR`` line on stderr says so,
    and the exit status is made non-zero (120, CPython's status for a failed exit, when it would
    otherwise be 0). A killed process (SIGKILL, or SIGTERM without a handler) cannot finish it:
    the previous checkpoints are then intact, and the new one is not there.
    """

    def __init__(self, directory, full_every: int = 10, keep: int | None = 3, keep_base_in_memory: bool = True,
                 **save_kwargs):
        if not isinstance(full_every, int) or not 1 <= full_every <= MAX_CHAIN:
            raise ValueError(f"full_every must be an int in [1, {MAX_CHAIN}]")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError("keep must be None or an int >= 1")
        self.directory = os.fspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(f"{short(self.directory)} is a file, not a folder for checkpoints")
        if "threads" in save_kwargs:
            api._check_threads(save_kwargs["threads"])
        os.makedirs(self.directory, exist_ok=True)
        remove_stale_temps(self.directory)
        self.full_every, self.keep = full_every, keep
        self.keep_base_in_memory = keep_base_in_memory
        self.save_kwargs = save_kwargs
        self._base_tensors: dict | None = None       # name -> tensor copy of the last save
        self._last_step = None                        # the step of that save
        self._since_full = None                       # deltas written since the last full save
        self._executor = None                         # one background writer, for blocking=False
        _instances.add(self)
        self._pruning = None                          # (thread, its errors) deleting pruned files, or None
        self._pending = None
        self._pending_done = None
        self._infos: dict[int, tuple] = {}            # step -> (stat key, _Info): files already read
        self._noted: set = set()                      # (step, stat key) already warned about
        self._choices: dict | None = None             # name -> how a delta codes it (deltaplan), reused a few saves
        self._last_index: tuple | None = None        # (path, Index) of the file last written

    # ------------------------------------------------------------ listing

    def path(self, step: int) -> str:
        """The file of ``step``: ``<directory>/step-NNNNNNNNN.mth`` (nine digits or more)."""
        return os.path.join(self.directory, f"step-{step:09d}.mth")

    def steps(self) -> list[int]:
        """Steps of the restorable checkpoints in the directory, oldest first (see the class
        docstring for what happens to the others). A pending background save is finished first
        (its error raised), as :meth:`load` and :meth:`latest` do."""
        self.wait()
        return sorted(s for s, st in self._scan().items() if st == _OK)

    def _files(self) -> list[int]:
        out = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m and name == os.path.basename(self.path(int(m.group(1)))):
                out.append(int(m.group(1)))
        return sorted(out)

    def _info(self, step: int) -> _Info:
        """What the file of ``step`` is (read once per version of the file). Raises
        FileNotFoundError if it is not there, a FormatError or OSError if it cannot be read."""
        path = self.path(step)
        k = _stat_key(path)
        hit = self._infos.get(step)
        if hit is not None and hit[0] == k:
            return hit[1]
        with MthFile(path, verify=False, base=SKIP_BASE, threads=1) as f:
            info = self._info_of(f.identity, f.index.base)
        if _stat_key(path) == k:             # the file did not change while it was read
            self._infos[step] = (k, info)
        return info

    def _info_of(self, identity: str, rec: dict | None) -> _Info:
        base_step = base_identity = None
        if rec is not None:
            base_identity = rec.get("xxh64")
            p = rec.get("path")
            if isinstance(p, str) and p:
                d = os.path.abspath(self.directory)
                target = os.path.normpath(os.path.join(d, p))
                m = _NAME.match(os.path.basename(target))
                if m and os.path.dirname(target) == os.path.normpath(d) and \
                        os.path.basename(target) == os.path.basename(self.path(int(m.group(1)))):
                    base_step = int(m.group(1))
            # a base outside this directory is not the Checkpointer's to track: the chain ends there
        return _Info(identity, base_step, base_identity)

    def _set_aside(self, step: int) -> None:
        """Rename the damaged file of ``step`` to ``<name>.damaged`` (``.damaged-2``, ...), with a
        one-line note: a save of that step would replace it, and a damaged file is left for you."""
        path = self.path(step)
        k, dst = 1, path + ".damaged"
        while os.path.lexists(dst):
            k += 1
            dst = f"{path}.damaged-{k}"
        os.rename(path, dst)
        self._infos.pop(step, None)
        warnings.warn(CheckpointNote(f"mithril: the damaged checkpoint of step {step} is kept as {short(dst)}; "
                                     "the new one takes its name"), stacklevel=4)

    def _still_ours(self, step: int) -> bool:
        """Whether the file of ``step`` is still the one this Checkpointer wrote last (its copy in
        memory is that file's content only while it is: a file replaced behind its back, by
        another process or by hand, has other values, and a delta coded against the copy would not
        decode against the file)."""
        last = self._last_index
        if last is None or last[0] != self.path(step):
            return False
        try:
            return self._info(step).identity == last[1].identity
        except (OSError, MithrilError):
            return False

    def _remember(self, path: str, index) -> None:
        """Note what the file just written at ``path`` (one of ours) is, from the index written (no re-read)."""
        step = int(_NAME.match(os.path.basename(path)).group(1))
        self._last_index = (path, index)     # the next delta's base index, if the file still holds it
        try:
            self._infos[step] = (_stat_key(path), self._info_of(index.identity, index.base))
        except OSError:                      # gone already: the next scan reads what is there
            pass

    def _scan(self) -> dict[int, str]:
        """The status (_OK, _ORPHAN, _DAMAGED or _GONE) of every checkpoint file in the directory."""
        files = set(self._files())
        for s in list(self._infos):
            if s not in files:
                self._infos.pop(s, None)
        memo: dict[int, tuple[str, int]] = {}
        notes = []

        def status(s: int) -> tuple[str, int]:           # (status, length of its chain)
            if s in memo:
                return memo[s]
            memo[s] = (_DAMAGED, MAX_CHAIN + 2)           # provisional: a chain that loops back is damaged
            try:
                info = self._info(s)
            except FileNotFoundError:
                memo[s] = (_GONE, 0)
                return memo[s]
            except (MithrilError, OSError) as e:
                notes.append((s, f"it cannot be read ({short(e, 200)})"))
                memo[s] = (_DAMAGED, 1)
                return memo[s]
            result = (_OK, 1)
            if info.base_step is not None:
                b, why = info.base_step, None
                try:
                    binfo = self._info(b)
                except FileNotFoundError:
                    why = f"its base {os.path.basename(self.path(b))} is missing"
                except (MithrilError, OSError):
                    binfo = None
                if why is None and binfo is not None and binfo.identity != info.base_identity:
                    why = f"its base {os.path.basename(self.path(b))} is another file than the one it was written against"
                if why is not None:
                    result = (_ORPHAN, 1)
                    notes.append((s, why))
                else:
                    bst, blen = status(b)
                    bst = _ORPHAN if bst == _GONE else bst
                    if bst == _OK and blen + 1 > MAX_CHAIN + 1:
                        bst = _DAMAGED
                        notes.append((s, f"its chain of bases is longer than {MAX_CHAIN + 1} files (or loops)"))
                    elif bst != _OK:
                        notes.append((s, f"its base {os.path.basename(self.path(b))} cannot be restored"))
                    result = (bst, blen + 1)
            memo[s] = result
            return result

        for s in sorted(files):
            status(s)
        for s, why in notes:
            hit = self._infos.get(s)
            mark = (s, hit[0] if hit else None, why)
            if mark in self._noted:
                continue
            self._noted.add(mark)
            what = ("it is unrecoverable and is not listed; the next save deletes it" if memo[s][0] == _ORPHAN
                    else "it is not listed, and is left in place")
            warnings.warn(f"mithril: checkpoint {short(self.path(s))} cannot be restored: {why}; {what}",
                          CheckpointNote, stacklevel=3)
        return {s: st for s, (st, _) in memo.items() if st != _GONE}

    def chain(self, step: int) -> list[int]:
        """The steps whose files restoring ``step`` needs, newest first.

        Raises FileNotFoundError if there is no checkpoint of ``step``, :class:`MissingBaseError`
        if a base of its chain is missing, :class:`BaseMismatchError` if a base is another file
        than the one its delta was written against, and a :class:`FormatError` if a file of the
        chain cannot be read. A pending background save is finished first (its error raised).
        """
        self.wait()
        return self._chain(step)

    def _chain(self, step: int) -> list[int]:
        """:meth:`chain` without waiting (what a save, maybe a background one, calls)."""
        try:
            info = self._info(step)
        except FileNotFoundError:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}") from None
        out = [step]
        while info.base_step is not None:
            if len(out) > MAX_CHAIN:
                raise CorruptFileError(f"checkpoint chain of step {step} is longer than {MAX_CHAIN + 1} files "
                                       "(or loops)")
            b, at = info.base_step, os.path.basename(self.path(out[-1]))
            try:
                binfo = self._info(b)
            except FileNotFoundError:
                raise MissingBaseError(f"checkpoint of step {step} cannot be restored: {at} is a delta against "
                                       f"{os.path.basename(self.path(b))}, which is missing") from None
            if binfo.identity != info.base_identity:
                raise BaseMismatchError(f"checkpoint of step {step} cannot be restored: {at} is a delta against "
                                        f"another file than the {os.path.basename(self.path(b))} now there "
                                        f"(identity {binfo.identity}, expected {info.base_identity})")
            out.append(b)
            info = binfo
        return out

    # ------------------------------------------------------------ saving

    def save(self, state, step: int, *, blocking: bool = True):
        """Write the checkpoint of ``step`` (full or delta) and prune old files.

        Returns its path; with ``blocking=False``, a ``concurrent.futures.Future`` of it: the
        tensors are copied first (on their own devices), so training may change them at once,
        and the compression and writing happen on a background thread. One write runs at a
        time, in order: the next ``save`` (or :meth:`wait`) first finishes the previous one and
        raises its error, if it failed. A background save still running at interpreter exit is
        finished first (see the class docstring).
        """
        self.wait()
        if type(step) is not int or step < 0:        # (True is an int, and no step)
            raise ValueError("step must be a non-negative int")
        # One save at a time in the folder, across processes (and Checkpointers): from the scan
        # that picks the base to the end of the write and the prune. Without it, two processes
        # saving the same step at once (every rank of a job that forgot ``if rank == 0``, or
        # sharded states in one folder) both wrote it, and the last rename silently won; now the
        # second one finds the step taken and raises.
        lock = _lock_folder(self.directory)
        handed = []
        try:
            return self._save_locked(state, step, blocking, lock, handed)
        finally:
            if not handed:
                _unlock_folder(lock)

    def _save_locked(self, state, step: int, blocking: bool, lock, handed: list):
        """:meth:`save` with the folder's lock held; a background save takes the lock with it
        (``handed``) and lets it go when its write is done."""
        scan = self._scan()
        ok = sorted(s for s, st in scan.items() if st == _OK)
        if ok and step <= ok[-1]:
            raise ValueError(f"step {step} is not after the newest checkpoint (step {ok[-1]})")
        if scan.get(step) == _DAMAGED:      # never deleted: moved aside, out of the new file's way
            self._set_aside(step)
            scan = self._scan()
        prev = ok[-1] if ok else None
        # a full save if there is nothing to be a delta of, or if the newest file's chain is broken
        full = prev is None or max(scan) != prev
        if not full:
            if self._since_full is None or self._last_step != prev:     # resuming: count the chain on disk
                self._since_full = len(self._chain(prev)) - 1
            full = self._since_full + 1 >= self.full_every
        base_tensors = None
        if not full and self._base_tensors is not None and self._last_step == prev and self._still_ours(prev):
            base_tensors = {n: api.tensor_bytes(t) if t.device.type == "cpu" else (lambda t=t: api.tensor_bytes(t.to("cpu")))
                            for n, t in self._base_tensors.items()}     # (CPU bytes at hand: views, no copies)
        choices = None
        if not full:     # a tensor's coding is chosen at the chain's first delta and every few deltas after
            if self._choices is None or self._since_full % RECHOOSE_EVERY == 0:
                self._choices = {}
            choices = self._choices
        base_path = None if full else self.path(prev)
        try:        # the files this save makes prunable: their cached pages go now, for the new file to use
            writer.release_cache([self.path(s) for s in self._doomed(scan, (step, None if full else prev))])
        except (MithrilError, OSError):
            pass
        enc = _cpu_tree(state) if blocking and self.keep_base_in_memory else None
        if enc is not None:
            # A blocking save of CPU tensors codes the state as it is; the copy kept for the next
            # delta is taken afterwards, into the previous copy's memory where the layouts match (no
            # snapshot first, no fresh pages to fault in), and checked against the file's
            # checksums. Had anything (another thread) changed the state meanwhile, the file or the
            # copy could disagree with the state: the save is then done again from a snapshot.
            # The context sort writes what it codes over the copy it sorts against (``refreshed``: those
            # names, and the ones stored as "same", already hold what the file holds): no second pass.
            refreshed = set() if base_tensors is not None and REFRESH_IN_PLACE else None
            keep = {n: a for n, t in self._base_tensors.items()
                    if (a := writable_bytes(t)) is not None} if refreshed is not None else None
            try:
                index = self._write(state, self.path(step), base_path, base_tensors, choices, encoded=enc,
                                    keep=keep, refreshed=refreshed)
            except BaseException:
                if refreshed is not None:       # the copy may be part old, part new: never a base again
                    self._base_tensors = None
                raise
            old, self._base_tensors = self._base_tensors, None
            leaves = None
            try:
                leaves = _refresh(old or {}, enc[1], index, refreshed or ())
            except Exception as e:      # the checkpoint is written; only the next delta's shortcut is lost
                warnings.warn(CheckpointNote(f"mithril: could not keep step {step}'s tensors in memory "
                                             f"({short(e)}); the next delta reads its base from disk"), stacklevel=2)
            if leaves is _CHANGED:
                snapshot, leaves = _snapshot(state)
                self._write(snapshot, self.path(step), base_path, None, choices)
            self._after_write(step, full, leaves)
            return self.path(step)
        snapshot, leaves = state, None
        if self.keep_base_in_memory or not blocking:        # CUDA tensors: copied on their device first
            snapshot, leaves = _snapshot(state)
        if blocking or not cpu.pools_ok():   # (at interpreter exit no background thread may start: done now)
            self._write(snapshot, self.path(step), base_path, base_tensors, choices)
            self._after_write(step, full, leaves)
            if blocking:
                return self.path(step)
            from concurrent.futures import Future

            done = Future()
            done.set_result(self.path(step))
            return done
        job = (snapshot, self.path(step), base_path, base_tensors, choices)
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mithril-ckpt")

        def run():
            try:
                self._write(*job)
            finally:
                _unlock_folder(lock)
            return self.path(step)
        with _sigint_held():          # (a Ctrl-C in the hand-off would free the lock, or drop the save)
            pending = cpu.submit(self._executor, run)     # (at interpreter exit: run now)
            handed.append(True)
            self._pending = pending
            self._pending_done = (step, full, leaves)
            _track(pending, self.path(step))
        return pending

    def wait(self):
        """Finish the pending background save, if any; returns its path (or None), raises its error.
        Files it (or an earlier save) pruned are deleted by then."""
        pending, self._pending = self._pending, None
        if pending is None:
            self._settle()
            return None
        try:
            path = pending.result()
        except BaseException:
            if not pending.done():           # interrupted while waiting (Ctrl-C): still pending, its
                self._pending = pending      # outcome still to be told by the next wait, save or close
                raise
            _untrack(pending)
            self._settle()
            raise
        _untrack(pending)
        self._settle()
        self._after_write(*self._pending_done)
        return path

    def _write(self, state, path, base_path, base_tensors, choices, encoded=None, keep=None, refreshed=None):
        """Write one checkpoint file and prune; returns the index written. ``encoded``: the
        state's (tree, named leaves), where the caller has them already; ``keep`` and
        ``refreshed``: see ``api.write_items`` (this Checkpointer's copy, refreshed in place)."""
        written: list = []
        if base_path is None:
            api.save(state, path, _written=written, _encoded=encoded, **self.save_kwargs)
        else:
            last = self._last_index
            api.save(state, path, base=base_path, _base_tensors=base_tensors, _choices=choices, _written=written,
                     _encoded=encoded, _base_index=last[1] if last is not None and last[0] == base_path else None,
                     _keep=keep, _refreshed=refreshed, **self.save_kwargs)
        self._remember(path, written[0])
        self._prune()
        return written[0]

    def _after_write(self, step: int, full: bool, leaves) -> None:
        """Record a written save; ``leaves``: the named tensors kept in memory as its copy (None:
        none kept)."""
        self._base_tensors = None            # first: never a copy labelled with the wrong step
        self._since_full = 0 if full else self._since_full + 1
        self._last_step = step
        if self.keep_base_in_memory and leaves is not None:
            self._base_tensors = dict(leaves)

    def _doomed(self, scan: dict, new: tuple[int, int | None] | None = None) -> set:
        """The steps whose files a prune removes; ``new`` = (step, its base step or None): as if
        that save had been written."""
        doomed = {s for s, st in scan.items() if st == _ORPHAN}
        if self.keep is not None:
            ok = sorted(s for s, st in scan.items() if st == _OK)
            needed = set()
            if new is not None:
                needed.update(self._chain(new[1]) if new[1] is not None else ())
                keep = ok[-(self.keep - 1):] if self.keep > 1 else []
            else:
                keep = ok[-self.keep:]
            for s in keep:
                needed.update(self._chain(s))
            doomed.update(s for s in ok if s not in needed)
        return doomed

    def _prune(self) -> None:
        """Delete the orphans, and (with ``keep``) the files no kept checkpoint needs.

        Dependents go before their bases (newest first where nothing depends on anything), so
        whenever the process is killed here, every file left is restorable or was already an
        orphan. When the files hold ``PRUNE_THREAD_BYTES`` or more (freeing a file system's
        blocks takes ~0.15 s per GB here), they are deleted in that order on a thread of their
        own, off the save's critical path; the next save, :meth:`wait` and :meth:`close` wait
        for it, and interpreter exit does too."""
        doomed = self._doomed(self._scan())
        base_of = {}
        for s in doomed:
            hit = self._infos.get(s)
            base_of[s] = hit[1].base_step if hit else None
        order = []
        while doomed:
            needed_by_doomed = {base_of[s] for s in doomed}
            ready = sorted((s for s in doomed if s not in needed_by_doomed), reverse=True) or sorted(doomed)
            for s in ready:
                order.append(self.path(s))
                doomed.discard(s)
                self._infos.pop(s, None)
        size = 0
        for p in order:
            try:
                size += os.stat(p).st_size
            except OSError:
                pass
        if size < PRUNE_THREAD_BYTES:
            # (the save itself is written: a file that cannot be deleted is a note, as on the
            # prune thread, never an error that makes a written checkpoint look lost)
            errors: list = []
            _unlink_in_order(order, errors)
            _note_unpruned(errors, 4)
            return
        self._settle()
        errors: list = []
        t = threading.Thread(target=_unlink_in_order, args=(order, errors), name="mithril-prune")
        try:
            t.start()
        except RuntimeError:          # no thread to be had: here, then
            _unlink_in_order(order, errors)
            _note_unpruned(errors, 4)
            return
        self._pruning = (t, errors)

    def _settle(self) -> None:
        """Wait for the files of an earlier prune to be deleted; a file it could not delete is
        said in a one-line note (the next prune tries again)."""
        pruning, self._pruning = self._pruning, None
        if pruning is None:
            return
        t, errors = pruning
        t.join()
        _note_unpruned(errors, 3)

    # ------------------------------------------------------------ loading

    def load(self, step: int, device: str = "cpu", **kw):
        """The state saved at ``step`` (a pending background save is finished first); ``kw`` as
        for :func:`mithril_gpu.load` (``into=``, ``subtree=``, ``verify=``...)."""
        self.wait()
        if not os.path.exists(self.path(step)):
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (have: {self.steps()})")
        return api.load(self.path(step), device, **kw)

    def latest(self, device: str = "cpu", **kw):
        """The newest restorable checkpoint's state, or None if there is none."""
        self.wait()
        steps = self.steps()
        return self.load(steps[-1], device, **kw) if steps else None

    def close(self) -> None:
        """Finish any background save and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _snapshot(state):
    """A copy of ``state`` whose tensors are clones (on their own devices), and its named leaves."""
    node, leaves = tree_mod.encode(state, _is_tensor)
    clones = _map_leaves(lambda nt: (nt[0], _clone(nt[1])), leaves)
    return tree_mod.decode(node, lambda i: clones[i][1]), clones


def _map_leaves(fn, leaves: list) -> list:
    """``[fn(leaf) for leaf in leaves]`` (named tensors), on two threads for a state over 64 MB:
    copies release the GIL, and two threads halve a large state's copy time."""
    big = sum(t.numel() * t.element_size() for _, t in leaves) > (64 << 20)
    if big and len(leaves) > 1 and cpu.pools_ok():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2, thread_name_prefix="mithril-snap") as ex:
            return [f.result() for f in [cpu.submit(ex, fn, nt) for nt in leaves]]
    return [fn(nt) for nt in leaves]


_CHANGED = object()      # _refresh: the state is not what the file holds


def _cpu_tree(state):
    """``state``'s (tree, named leaves) when every tensor is on the CPU, else None."""
    node, leaves = tree_mod.encode(state, _is_tensor)
    return (node, leaves) if all(t.device.type == "cpu" for _, t in leaves) else None


_held_folders: set = set()    # descriptors of the folder locks this process holds


def _lock_folder(directory: str):
    """An exclusive advisory lock (``flock``) on the folder itself, waited for; None where the
    platform has none. Released by :func:`_unlock_folder`, or by the kernel if the process dies.
    The descriptor is not inherited by programs this process starts, and a child forked while
    the lock is held (a DataLoader worker during a background save) closes its copy at once:
    otherwise the child would keep the lock held after the parent let it go."""
    try:
        import fcntl
    except ImportError:                    # (not POSIX: no lock)
        return None
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:                   # a filesystem without flock (Lustre without -o flock): no lock
        os.close(fd)
        if e.errno == errno.EINTR:
            raise
        return None
    except BaseException:
        os.close(fd)
        raise
    _held_folders.add(fd)
    return _Held(fd)


@contextlib.contextmanager
def _sigint_held():
    """SIGINT held back (on the main thread, where Python takes it) for the few statements that
    hand a save to the background thread: a Ctrl-C then lands after them, as a KeyboardInterrupt
    that finds the save pending and its lock owned by it."""
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Held:
    """A held folder lock: released once, whoever releases it (a Ctrl-C between handing a save to
    the background thread and noting that it was handed must not have both let it go: the second
    close would close whatever file had reused the descriptor's number meanwhile)."""

    def __init__(self, fd: int):
        self.fd, self.released = fd, False


_release_guard = threading.Lock()


def _unlock_folder(lock) -> None:
    if lock is None:
        return
    with _release_guard:
        if lock.released:
            return
        lock.released = True
        _held_folders.discard(lock.fd)
        os.close(lock.fd)                  # (closing the last descriptor releases the flock)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: writer.close_quietly(_held_folders))


# A blocking delta save of CPU tensors lets the context sort write what it codes over the copy it
# sorts against (the copy then needs no second pass: no copy, no checksums). False: every tensor
# is copied and checked after the write, as before (the reference the tests compare with).
REFRESH_IN_PLACE = True


def _copy_bytes(dst, src) -> None:
    """dst[...] = src for two uint8 arrays (numpy: 5x torch's copy for bf16; releases the GIL)."""
    np.copyto(dst, src)


def _refresh(old: dict, leaves: list, index, done=()) -> dict | object:
    """Copies of a state's named tensors ``leaves`` (all on the CPU), written into the tensors of
    ``old`` (the previous copies) where name, dtype and shape match, fresh clones elsewhere; or
    ``_CHANGED`` if a copy's checksum is not the one ``index`` (the file just written from the
    state) holds for it. The names in ``done`` already hold the very bytes the file holds (the
    save wrote them there): they are taken as they are."""
    entries = {e.name: e for e in index.tensors}

    def copy(nt):
        name, t = nt
        o, ov = old.get(name), None
        t = t.detach()
        bad = o is None or o.dtype != t.dtype or o.shape != t.shape or o.device != t.device or not o.is_contiguous() \
            or t.layout is not torch_strided() or o.layout is not torch_strided() or t.is_quantized \
            or t.is_conj() or t.is_neg() or o.is_inference()
        if name in done and not bad and o.device.type == "cpu":
            return name, o, True
        if bad:
            o = _clone(t)
        elif t.is_contiguous() and t.numel():
            ov = api.tensor_u8(o).numpy()
            _copy_bytes(ov, api.tensor_u8(t).numpy())
        else:
            o.copy_(t)
        e = entries.get(name)
        same = e is not None and checksum.tensor_checksum(api.tensor_u8(o).numpy() if ov is None else ov,
                                                          e.chunk_elems * e.dtype.itemsize) == e.checksum
        return name, o, same

    out = _map_leaves(copy, leaves)
    if not all(same for _, _, same in out):
        return _CHANGED
    return {name: o for name, o, _ in out}


def _is_tensor(x) -> bool:
    f = getattr(api, "is_tensor", None) or getattr(api, "_is_tensor")
    return f(x)


def _clone(t):
    """A copy of tensor ``t``. A CPU tensor is copied through numpy: measured 5x faster than
    ``Tensor.clone`` for bf16 (1.1 against 6.2 GB/s), which decided whether a Checkpointer delta
    save keeps up with a full save."""
    t = t.detach()
    if t.device.type != "cpu" or t.layout is not torch_strided() or t.is_quantized or not t.is_contiguous() \
            or t.is_conj() or t.is_neg() or t.numel() == 0:
        return t.clone()
    import torch

    raw = api.tensor_u8(t).numpy().copy()
    return torch.from_numpy(raw).view(t.dtype).reshape(t.shape)


def torch_strided():
    import torch

    return torch.strided


# ---------------------------------------------------------------- interpreter exit
#
# A background save is a future on a Checkpointer's writer thread, and api.save runs thread pools
# of its own. Once the interpreter begins to exit, concurrent.futures refuses new work
# ("cannot schedule new futures after interpreter shutdown"), so a save still running then would
# fail, and nobody would see its error. _at_exit waits for every save no one has waited for yet,
# before that happens: threading._register_atexit hooks run last registered first, when the main
# thread is done and before non-daemon threads are joined, and concurrent.futures.thread (imported
# above) registered its own hook before this module registers _at_exit.

_unwaited: dict[int, tuple] = {}        # id(future) -> (future, path): background saves no one waited for
_unwaited_lock = threading.Lock()


def _track(future, path: str) -> None:
    with _unwaited_lock:
        _unwaited[id(future)] = (future, path)

    def forget_if_ok(f):                # a save that worked needs nothing at exit (its Checkpointer may be gone)
        if not f.cancelled() and f.exception() is None:
            _untrack(f)
    future.add_done_callback(forget_if_ok)


def _untrack(future) -> None:
    with _unwaited_lock:
        _unwaited.pop(id(future), None)


def _at_exit() -> None:
    """Finish the background saves still pending (or failed, unseen) at exit; say so loudly if one fails."""
    with _unwaited_lock:
        todo = list(_unwaited.values())
        _unwaited.clear()
    failed = False
    for future, path in todo:
        try:
            future.result()
        except BaseException as e:      # noqa: BLE001  (an error here must be reported, never raised)
            failed = True
            if isinstance(e, KeyboardInterrupt) and not future.done():
                line = f"checkpoint {short(path)} may NOT be written: interrupted while waiting for its background save"
            else:
                line = (f"checkpoint {short(path)} was NOT written: its background save failed: "
                        f"{short(f'{type(e).__name__}: {e}', 400)}")
            try:
                print(f"mithril: ERROR: {line}", file=sys.stderr, flush=True)
            except Exception:           # noqa: BLE001  (no stderr to write to)
                pass
    if failed:
        _fail_exit_status()


class _FailingFlush:
    """Stands in for sys.stderr after a background save failed at exit: everything passes through,
    except that the first flush once the interpreter is finalizing fails, which makes CPython end
    with exit status 120 (it flushes stderr there, and says nothing when that fails)."""

    def __init__(self, stream):
        self._stream = stream
        self._armed = True

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text):
        return self._stream.write(text)

    def flush(self):
        self._stream.flush()
        if self._armed and sys.is_finalizing():
            self._armed = False
            raise OSError("mithril: a checkpoint was not written")


def _fail_exit_status() -> None:
    """Make the exit status non-zero, if it is not already, without cutting the exit short."""
    if getattr(sys, "last_exc", None) is not None or getattr(sys, "last_type", None) is not None:
        return                          # an uncaught exception ended the script: the status is 1 already
    if sys.stderr is None or isinstance(sys.stderr, _FailingFlush):
        return
    sys.stderr = _FailingFlush(sys.stderr)


def _forget_in_child() -> None:
    """A forked child has none of its parent's writer threads: their saves are not its to wait for,
    and each Checkpointer starts a writer of its own when it needs one (the inherited executor has
    no thread: a save submitted to it, or a wait for the parent's, never ended)."""
    global _unwaited_lock
    _unwaited.clear()
    _unwaited_lock = threading.Lock()
    for ck in list(_instances):
        ck._executor, ck._pending, ck._pending_done, ck._pruning = None, None, None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)

try:
    if hasattr(threading, "_register_atexit"):
        threading._register_atexit(_at_exit)
    else:                               # no such hook: at least report a failure at exit
        atexit.register(_at_exit)
except RuntimeError:                    # imported while the interpreter exits
    pass
