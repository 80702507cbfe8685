"""Lazy, partial access to one tensor of an open file: ``MthFile.get_slice(name)``.

In the style of safetensors' ``safe_open(...).get_slice(name)``: the shape and dtype are known
without decoding anything, and indexing decodes only the rows (runs of ``chunk_elems``
elements, FORMAT.md) that cover the box asked for, checking each against the row digest the
index stores. ``read_into`` decodes straight into a caller's tensor when the box is the whole
tensor (what a distributed-checkpoint reader does with a shard saved whole).
"""
from __future__ import annotations

import math

from . import dtypes, torchio
from .errors import short


class TensorSlice:
    """One tensor of an open :class:`~mithril_gpu.reader.MthFile`, decoded a box at a time.

    >>> with mithril_gpu.open("model.mth") as f:
    ...     s = f.get_slice("embed.weight")
    ...     s.get_shape(), s.get_dtype()          # ([50304, 768], 'BF16'): nothing decoded
    ...     rows = s[1000:2000]                   # decodes the rows that cover them
    """

    def __init__(self, f, entry):
        self._f, self._e = f, entry

    # safetensors' names
    def get_shape(self) -> list[int]:
        return list(self._e.shape)

    def get_dtype(self) -> str:
        """The dtype's safetensors name: ``"BF16"``, ``"F32"``..."""
        return self._e.dtype.name

    @property
    def shape(self):
        import torch

        return torch.Size(self._e.shape)

    @property
    def dtype(self):
        return dtypes.to_torch(self._e.dtype)

    @property
    def ndim(self) -> int:
        return len(self._e.shape)

    def __len__(self) -> int:
        if not self._e.shape:
            raise TypeError("len() of a 0-d tensor")
        return self._e.shape[0]

    def numel(self) -> int:
        return self._e.count

    def __repr__(self) -> str:
        return f"<TensorSlice {self._e.name!r} {self._e.dtype.name} {list(self._e.shape)}>"

    def __getitem__(self, key):
        """The box ``key`` (ints, slices with positive steps, ``...``) as a fresh CPU tensor."""
        import torch

        box, drop = _box(key, self._e.shape)
        out_shape = [len(range(*s)) for s in box]
        if math.prod(out_shape) == 0:
            return torch.empty([n for d, n in enumerate(out_shape) if d not in drop], dtype=self.dtype)
        spans = _spans(box)
        sub = self._region(spans).as_strided([hi - a for a, hi, _ in spans], _strides(self._e.shape))
        sub = sub[tuple(slice(0, None, step) for _, _, step in box)]
        sub = sub.clone(memory_format=torch.contiguous_format)
        return sub.reshape([n for d, n in enumerate(out_shape) if d not in drop])

    def read_into(self, key, out) -> None:
        """Decode box ``key`` into tensor ``out`` (its shape, this tensor's dtype). When the box is
        the whole tensor and ``out`` is a contiguous CPU tensor, the bytes are decoded straight
        into its memory, with no second copy."""
        box, drop = _box(key, self._e.shape)
        want = [len(range(*s)) for d, s in enumerate(box) if d not in drop]
        if out.dtype != self.dtype or list(out.shape) != want:
            raise ValueError(f"read_into: out is {out.dtype} {list(out.shape)}, the box of "
                             f"{short(self._e.name)!r} is {self.dtype} {want}")
        whole = all(a == 0 and b == n and st == 1 for (a, b, st), n in zip(box, self._e.shape))
        mem = torchio.writable_bytes(out) if whole else None
        if mem is not None:
            self._f.decode_into([self._e], [mem])
            return
        import torch

        with torch.no_grad():
            out.copy_(self[key])

    def _region(self, spans):
        """The decoded elements from the box's first to its last, as a flat tensor (``spans``: see :func:`_spans`)."""
        strides = _strides(self._e.shape)
        first = sum(a * s for (a, _, _), s in zip(spans, strides))
        last = sum((hi - 1) * s for (_, hi, _), s in zip(spans, strides))
        raw = self._f.decode_range(self._e, first, last + 1)
        return torchio.as_tensor(raw, self._e.dtype, [last + 1 - first])


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def _spans(box):
    """Per dimension (first, one past the last index used, step)."""
    return [(a, b - (b - 1 - a) % st, st) for a, b, st in box]


def _box(key, shape):
    """``key`` as one (start, stop, step) per dimension with positive steps and stop > start
    unless empty, plus the dimensions an int index drops."""
    if not isinstance(key, tuple):
        key = (key,)
    n_ell = sum(k is Ellipsis for k in key)
    if n_ell > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if n_ell:
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1)
        if fill < 0:
            raise IndexError(f"too many indices for a tensor of {len(shape)} dimensions")
        key = key[:i] + (slice(None),) * fill + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for a tensor of {len(shape)} dimensions: {len(key)} given")
    key = key + (slice(None),) * (len(shape) - len(key))
    box, drop = [], set()
    for d, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, slice):
            a, b, st = k.indices(n)
            if st <= 0:
                raise ValueError("slices with negative or zero steps are not supported (as in torch)")
            if b <= a:
                a = b = min(a, n)
            box.append((a, b, st))
        elif hasattr(k, "__index__") and not isinstance(k, bool):
            i = k.__index__()
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for dimension {d} of size {n}")
            i %= n
            box.append((i, i + 1, 1))
            drop.add(d)
        else:
            raise TypeError(f"cannot index a tensor slice with {type(k).__name__}: use ints, slices and ...")
    return box, drop
