"""Choosing, per tensor, how to store it against a base checkpoint (FORMAT.md "Deltas").

* same name, dtype and shape, identical bytes   -> "same": a reference, no payload
* otherwise, of no delta / xor / zigzag, each with the plain (bytegroup) or masked layout, the
  one whose planes have the smallest estimated size (order-0 entropy of the planes of a sample
  of the tensor), decided when the tensor's bytes are first needed, so a base is decoded once.
"""
from __future__ import annotations

import numpy as np

from . import checksum, codecs, transforms
from .cpu import EncodeItem, delta_apply, split_masked, split_planes

try:
    from ._accel import entropy as _accel_entropy
except ImportError:
    _accel_entropy = None

SAMPLE_BLOCKS = 16
BLOCK_ELEMS = 4096


def _entropy_bytes(plane: np.ndarray) -> float:
    """Order-0 entropy of a whole plane, in bytes."""
    if _accel_entropy is not None:
        return _accel_entropy(plane, 1) * plane.size / 8
    counts = np.bincount(plane, minlength=256)
    p = counts[counts > 0] / plane.size
    return float(-(p * np.log2(p)).sum()) * plane.size / 8


def _sample(x: np.ndarray, itemsize: int) -> np.ndarray:
    n = x.size // itemsize
    if n <= SAMPLE_BLOCKS * BLOCK_ELEMS:
        return x
    starts = np.linspace(0, n - BLOCK_ELEMS, SAMPLE_BLOCKS).astype(np.int64)
    return np.concatenate([x[s * itemsize:(s + BLOCK_ELEMS) * itemsize] for s in starts])


def estimate(item: EncodeItem, op: str | None, transform: str, x: np.ndarray, b: np.ndarray) -> float:
    """Estimated coded bytes of sample ``x`` (base sample ``b``) under ``op`` (None: no delta)."""
    dt = item.dtype
    src = x
    if op is not None:
        src = np.empty_like(x)
        delta_apply(op, dt, x, b, src, inverse=False)
    if transform == "raw":
        planes = [src]
    elif transform == "masked":
        planes = split_masked(dt, src)[1]
    else:
        count = src.size // dt.itemsize
        planes = [np.empty(count * w, np.uint8) for w in transforms.plane_widths(dt, transform)]
        split_planes(dt, transform, src, planes)
    total = 0.0
    for p in planes:
        if p.size == 0:
            continue
        bits = _entropy_bytes(p)
        # a chunk that would not shrink is stored (see codecs.ChunkCoder)
        total += p.size if bits * 8 / p.size > codecs.STORE_ENTROPY_BITS else bits
    return total


def candidates(dt) -> list[tuple[str | None, str]]:
    """(delta op, transform) pairs a tensor may be stored with against a base."""
    plain = "raw" if dt.itemsize == 1 else "bytegroup"
    out = [(None, transforms.default_transform(dt))]
    for op in ("xor", "zigzag"):
        out += [(op, plain), (op, "masked")]
    return out


def choose(item: EncodeItem, x: np.ndarray, b: np.ndarray) -> tuple[str | None, str]:
    xs, bs = _sample(x, item.dtype.itemsize), _sample(b, item.dtype.itemsize)
    costs = {c: estimate(item, c[0], c[1], xs, bs) for c in candidates(item.dtype)}
    # ties go to no delta (no base needed to decode), then to the simpler layout
    return min(costs, key=lambda c: (round(costs[c], 3), c[0] is not None, c[1] == "masked"))


class _Planned:
    """Defers the op choice to when an item's bytes and its base's bytes are first fetched."""

    def __init__(self, item: EncodeItem, fetch_data, fetch_base):
        self.item, self.fetch_data, self.fetch_base = item, fetch_data, fetch_base

    def data(self):
        x = self.fetch_data() if callable(self.fetch_data) else self.fetch_data
        b = self.fetch_base()
        op, transform = choose(self.item, x, b)
        it = self.item
        it.transform = transform
        if op is None:
            it.delta_op, it.base, it.base_name = None, None, None
        else:
            it.delta_op, it.base = op, b
        return x


def plan_deltas(items: list[EncodeItem], base_file, base_tensors: dict | None = None) -> dict[int, tuple[str, int]]:
    """Mark items that can be stored against ``base_file``; return, for the items identical to a
    base tensor ("same"), {item position: (base name, checksum)}.

    ``base_tensors`` (name -> CPU uint8 bytes or callable) spares decoding the base from disk.
    """
    same = {}
    for i, it in enumerate(items):
        if it.name not in base_file:
            continue
        be = base_file.entry(it.name)
        if be.dtype != it.dtype or be.shape != tuple(it.shape) or it.nbytes == 0:
            continue
        it.resolve()
        digest = checksum.tensor_checksum(it.data, be.chunk_elems * be.dtype.itemsize)
        if digest == be.checksum:
            same[i] = (it.name, digest)
            it.chunk_elems = be.chunk_elems
            continue
        src = (base_tensors or {}).get(it.name)
        if src is not None:
            fetch_base = src if callable(src) else (lambda s=src: s)
        else:
            fetch_base = (lambda name=it.name: base_file.get_bytes(name))
        planned = _Planned(it, it.data, fetch_base)
        it.delta_op, it.base_name, it.base = "pending", it.name, None
        it.data = planned.data
    return same
