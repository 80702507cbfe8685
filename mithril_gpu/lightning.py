"""Lightning: :class:`MithrilCheckpointIO`, a ``CheckpointIO`` plugin that writes .mth files.

>>> trainer = lightning.Trainer(plugins=[MithrilCheckpointIO()])                 # full files
>>> trainer = lightning.Trainer(plugins=[MithrilCheckpointIO(deltas=True)])      # small deltas
>>> trainer = lightning.Trainer(plugins=[AsyncCheckpointIO(MithrilCheckpointIO(deltas=True))])

Checkpoints keep the names Lightning gives them (``epoch=3-step=400.ckpt``, ``last.ckpt``) and
load through the same plugin (``Trainer.fit(ckpt_path=...)``) or with :func:`mithril_gpu.load`.

Deltas. ``ModelCheckpoint`` deletes and overwrites its files in an order no plugin can foresee
(the best k by a metric; ``last.ckpt`` rewritten every time), so a checkpoint Lightning can see is
never the base of another. Instead, every ``full_every``-th save also writes a full *anchor*,
``.mithril-anchor-<n>.mth`` in the same folder, and each checkpoint Lightning sees is a delta
against the newest anchor (the one written at the same step holds nothing but "same" references).
``remove_checkpoint`` then deletes exactly what Lightning asks, and an anchor is deleted once no
checkpoint in its folder needs it. A killed save leaves every earlier file loadable. Copy an
anchor along with a checkpoint that needs it (``mithril info FILE`` names it).

Importing this module needs Lightning (``pip install mithril-gpu[lightning]``).
"""
from __future__ import annotations

import os
import re
import threading
from typing import Any

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # the standalone pytorch_lightning package
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

from . import api, tree as tree_mod
from .formats import LIGHTNING_ANCHOR as _ANCHOR
from .reader import SKIP_BASE, MthFile


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _local(path) -> str:
    """``path`` as a local path; a URL (``s3://``, ``memory://``: Lightning hands fsspec paths on
    as they are) is refused, never written to a local folder named after it (``file://`` is local)."""
    path = os.fspath(path)
    if isinstance(path, str) and _URL.match(path):
        if path.startswith("file://"):
            return path[len("file://"):]
        raise ValueError(f"MithrilCheckpointIO writes local files only, and {path[:200]!r} is a URL: give "
                         "ModelCheckpoint a local dirpath (and copy the folder to remote storage yourself)")
    return path


class MithrilCheckpointIO(CheckpointIO):
    """Save and load Lightning checkpoints as .mth files.

    Args:
        deltas: store each checkpoint as a delta against a full anchor written every
            ``full_every`` saves (see the module docstring). Off by default: every file is full.
        full_every: saves per anchor, with ``deltas=True``.
        keep_base_in_memory: keep a CPU copy of the anchor's tensors so a delta never decodes
            its anchor from disk (one copy of the state in host memory).
        **save_kwargs: passed to :func:`mithril_gpu.save` (``level``, ``threads``, ``device``...).
    """

    def __init__(self, deltas: bool = False, full_every: int = 10, keep_base_in_memory: bool = True, **save_kwargs):
        if not isinstance(full_every, int) or full_every < 1:
            raise ValueError("full_every must be an int >= 1")
        self.deltas, self.full_every = deltas, full_every
        self.keep_base_in_memory = keep_base_in_memory
        self.save_kwargs = save_kwargs
        self._lock = threading.Lock()        # saves and removals in order (AsyncCheckpointIO saves on a thread)
        self._anchor: str | None = None      # path of the current anchor
        self._anchor_tensors: dict | None = None
        self._since_anchor = 0

    # ------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = _local(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with self._lock:
            if not self.deltas:
                api.save(checkpoint, path, **self.save_kwargs)
                return
            folder = os.path.dirname(os.path.abspath(path))
            anchor = self._anchor
            if (anchor is None or os.path.dirname(anchor) != folder or not os.path.exists(anchor)
                    or self._since_anchor >= self.full_every):
                anchor = self._write_anchor(checkpoint, folder)
            base_tensors = None
            if self._anchor_tensors is not None:
                base_tensors = {n: (lambda t=t: api.tensor_bytes(t)) for n, t in self._anchor_tensors.items()}
            api.save(checkpoint, path, base=anchor, _base_tensors=base_tensors, **self.save_kwargs)
            self._since_anchor += 1
            self._collect(folder)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``path`` (``weights_only`` is moot: .mth files hold no pickle).
        ``map_location``: a device (``"cuda"``, ``torch.device``) to load onto; other forms
        (callables, dicts) load onto the CPU."""
        device = "cpu"
        if isinstance(map_location, str) or type(map_location).__name__ == "device":
            device = str(map_location)
        return api.load(_local(path), device=device)

    def remove_checkpoint(self, path) -> None:
        path = _local(path)
        with self._lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            if self.deltas:
                self._collect(os.path.dirname(os.path.abspath(path)))

    # ------------------------------------------------------------ anchors

    def _write_anchor(self, checkpoint, folder: str) -> str:
        existing = [int(m.group(1)) for m in map(_ANCHOR.match, os.listdir(folder)) if m]
        path = os.path.join(folder, f".mithril-anchor-{max(existing, default=0) + 1:06d}.mth")
        api.save(checkpoint, path, **self.save_kwargs)
        self._anchor, self._since_anchor = path, 0
        self._anchor_tensors = None
        if self.keep_base_in_memory:
            _, leaves = tree_mod.encode(checkpoint, api._is_tensor)
            self._anchor_tensors = {name: t.detach().to("cpu", copy=True) for name, t in leaves}
        return path

    def _collect(self, folder: str) -> None:
        """Delete the anchors of ``folder`` that no file in it needs (never the current one)."""
        names = os.listdir(folder)
        anchors = {os.path.join(folder, n) for n in names if _ANCHOR.match(n)}
        needed = {self._anchor}
        for n in names:
            p = os.path.join(folder, n)
            if p in anchors or n.startswith(".") or not os.path.isfile(p):
                continue
            try:
                with MthFile(p, verify=False, base=SKIP_BASE) as f:
                    rec = f.index.base
            except Exception:  # noqa: BLE001  (not a .mth file: another tool's, or a partial copy)
                continue
            if rec is not None and isinstance(rec.get("path"), str):
                needed.add(os.path.normpath(os.path.join(folder, rec["path"])))
        for a in anchors - needed:
            try:
                os.unlink(a)
            except FileNotFoundError:
                pass
