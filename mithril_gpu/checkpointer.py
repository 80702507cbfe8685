"""Checkpointer: frequent checkpoints of a training run, each a delta against the one before.

>>> ckpt = Checkpointer("ckpts/", full_every=10, keep=3)
>>> for step in range(...):
...     train_step()
...     if step % 100 == 0:
...         ckpt.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, step)
>>> state = ckpt.latest()
"""
from __future__ import annotations

import os
import re

from . import api, tree as tree_mod
from .errors import MithrilError
from .reader import MAX_CHAIN, SKIP_BASE, MthFile

_NAME = re.compile(r"step-(\d+)\.mth\Z")


class Checkpointer:
    """Writes ``step-NNNNNNNNN.mth`` files into ``directory``.

    Args:
        directory: created if missing. Existing checkpoints in it are picked up (resume).
        full_every: every N-th save is a full checkpoint; the ones between are deltas against
            the previous save (so a chain is at most N files long). 1 means never a delta.
        keep: the newest M checkpoints stay restorable; older files are deleted once no kept
            checkpoint needs them as a base. ``None`` keeps everything.
        keep_base_in_memory: keep a copy of the last saved tensors (on the device they came
            from), so a delta never re-reads its base from disk. Costs one copy of the tensors.
        **save_kwargs: passed to :func:`mithril_gpu.save` (level, threads, ...).
    """

    def __init__(self, directory, full_every: int = 10, keep: int | None = 3, keep_base_in_memory: bool = True,
                 **save_kwargs):
        if not isinstance(full_every, int) or not 1 <= full_every <= MAX_CHAIN:
            raise ValueError(f"full_every must be an int in [1, {MAX_CHAIN}]")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError("keep must be None or an int >= 1")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.full_every, self.keep = full_every, keep
        self.keep_base_in_memory = keep_base_in_memory
        self.save_kwargs = save_kwargs
        self._base_tensors: dict | None = None       # name -> tensor copy of the last save
        self._since_full = None                       # deltas written since the last full save
        self._executor = None                         # one background writer, for blocking=False
        self._pending = None
        self._pending_done = None

    # ------------------------------------------------------------ listing

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:09d}.mth")

    def steps(self) -> list[int]:
        """Steps of the checkpoints in the directory, oldest first."""
        out = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def _base_of(self, step: int) -> int | None:
        with MthFile(self.path(step), verify=False, base=SKIP_BASE) as f:
            rec = f.index.base
        if rec is None:
            return None
        m = _NAME.match(os.path.basename(str(rec.get("path", ""))))
        return int(m.group(1)) if m else None

    def chain(self, step: int) -> list[int]:
        """The steps whose files restoring ``step`` needs, newest first."""
        out = [step]
        while len(out) <= MAX_CHAIN:
            b = self._base_of(out[-1])
            if b is None:
                return out
            out.append(b)
        raise MithrilError(f"checkpoint chain of step {step} is longer than {MAX_CHAIN}")

    # ------------------------------------------------------------ saving

    def save(self, state, step: int, *, blocking: bool = True):
        """Write the checkpoint of ``step`` (full or delta) and prune old files.

        Returns its path; with ``blocking=False``, a ``concurrent.futures.Future`` of it: the
        tensors are copied first (on their own devices), so training may change them at once,
        and the compression and writing happen on a background thread. One write runs at a
        time, in order: the next ``save`` (or :meth:`wait`) first finishes the previous one and
        raises its error, if it failed.
        """
        self.wait()
        if not isinstance(step, int) or step < 0:
            raise ValueError("step must be a non-negative int")
        steps = self.steps()
        if steps and step <= steps[-1]:
            raise ValueError(f"step {step} is not after the newest checkpoint (step {steps[-1]})")
        prev = steps[-1] if steps else None
        if prev is not None and self._since_full is None:          # resuming: count the chain on disk
            self._since_full = len(self.chain(prev)) - 1
        full = prev is None or self._since_full is None or self._since_full + 1 >= self.full_every
        base_tensors = None
        if not full and self._base_tensors is not None:
            base_tensors = {n: (lambda t=t: api.tensor_bytes(t.to("cpu"))) for n, t in self._base_tensors.items()}
        snapshot, leaves = state, None
        if self.keep_base_in_memory or not blocking:
            snapshot, leaves = _snapshot(state)
        job = (snapshot, self.path(step), None if full else self.path(prev), base_tensors)
        if blocking:
            self._write(*job)
            self._after_write(full, leaves)
            return self.path(step)
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mithril-ckpt")

        def run():
            self._write(*job)
            return self.path(step)
        self._pending = self._executor.submit(run)
        self._pending_done = (full, leaves)
        return self._pending

    def wait(self):
        """Finish the pending background save, if any; returns its path (or None), raises its error."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        path = pending.result()
        self._after_write(*self._pending_done)
        return path

    def _write(self, state, path, base_path, base_tensors) -> None:
        if base_path is None:
            api.save(state, path, **self.save_kwargs)
        else:
            api.save(state, path, base=base_path, _base_tensors=base_tensors, **self.save_kwargs)
        self._prune()

    def _after_write(self, full: bool, leaves) -> None:
        self._since_full = 0 if full else self._since_full + 1
        if self.keep_base_in_memory:
            self._base_tensors = dict(leaves)

    def _prune(self) -> None:
        if self.keep is None:
            return
        steps = self.steps()
        needed = set()
        for s in steps[-self.keep:]:
            needed.update(self.chain(s))
        for s in steps:
            if s not in needed:
                try:
                    os.unlink(self.path(s))
                except FileNotFoundError:
                    pass

    # ------------------------------------------------------------ loading

    def load(self, step: int, device: str = "cpu", **kw):
        self.wait()
        if not os.path.exists(self.path(step)):
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (have: {self.steps()})")
        return api.load(self.path(step), device, **kw)

    def latest(self, device: str = "cpu", **kw):
        """The newest checkpoint's state, or None if there is none."""
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
    node, leaves = tree_mod.encode(state, api._is_tensor)
    clones = [(name, t.detach().clone()) for name, t in leaves]
    return tree_mod.decode(node, lambda i: clones[i][1]), clones
