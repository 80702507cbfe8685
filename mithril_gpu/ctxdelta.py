"""Base-conditioned deltas (feature ``"ctxdelta"``): the numpy reference of FORMAT.md
"Context-sorted deltas".

A delta entry with ``ctx: [s, w]`` stores its delta elements ``d`` (the ``xor`` or ``zigzag`` of
:mod:`mithril_gpu.delta`, in natural order) permuted: the elements are stably sorted by the
*context* of their base element ``y``,

    c(y) = (y >> s) & (2^w - 1)        (y read as an unsigned integer of the dtype's width)

so that for floats with ``s`` = the mantissa width and ``w`` = the exponent width, all changes of
weights of one binade come together. The sorted stream ``t`` (``t[j] = d[perm[j]]``, ``perm``
the stable counting sort of the element indices by context) is cut into segments of ``segs[k]``
elements, each coded as a row of the entry's transform. Only the base is needed to rebuild
``perm``, so a decoder that holds the base recomputes it; a wrong base gives a wrong permutation,
which the checksum (over the original bytes, natural order) catches.

This module is the definition; ``_accel.ctx_encode`` / ``ctx_decode`` must give the same bytes
(tests compare them), and the GPU plan is the same counting sort as a prefix sum.
"""
from __future__ import annotations

import numpy as np

from . import delta as delta_ref
from .dtypes import DType

MAX_CTX_BITS = 12            # at most 4096 contexts (a histogram that fits a GPU block's shared memory)
_UINT = delta_ref._UINT


def valid_ctx(dt: DType, s: int, w: int) -> bool:
    return 1 <= w <= MAX_CTX_BITS and 0 <= s and s + w <= 8 * dt.itemsize


def default_ctx(dt: DType) -> tuple[int, int] | None:
    """The context a writer tries for ``dt``: the exponent field of floats (None: no default)."""
    if not delta_ref.is_float(dt) or dt.exp_bits == 0:
        return None
    return dt.man_bits, dt.exp_bits


def contexts(dt: DType, base: np.ndarray, s: int, w: int) -> np.ndarray:
    """c(y) of every base element (``base``: uint8 bytes of whole elements)."""
    y = base.view(_UINT[dt.itemsize])
    return ((y >> y.dtype.type(s)) & y.dtype.type((1 << w) - 1)).astype(np.int64)


def counts(dt: DType, base: np.ndarray, s: int, w: int) -> np.ndarray:
    """Elements per context, contexts 0 .. 2^w - 1."""
    return np.bincount(contexts(dt, base, s, w), minlength=1 << w)


def permutation(dt: DType, base: np.ndarray, s: int, w: int) -> np.ndarray:
    """perm[j]: the natural index of the j-th element of the sorted stream (stable by context)."""
    return np.argsort(contexts(dt, base, s, w), kind="stable")


def encode(op: str, dt: DType, x: np.ndarray, base: np.ndarray, s: int, w: int) -> np.ndarray:
    """The sorted stream of delta elements (uint8 bytes, same size as ``x``)."""
    d = np.empty_like(x)
    delta_ref.encode(op, dt, x, base, d)
    ut = _UINT[dt.itemsize]
    return d.view(ut)[permutation(dt, base, s, w)].view(np.uint8)


def decode(op: str, dt: DType, t: np.ndarray, base: np.ndarray, s: int, w: int, out: np.ndarray) -> None:
    """Inverse of :func:`encode`: rebuild the original bytes into ``out`` from the sorted stream."""
    ut = _UINT[dt.itemsize]
    d = np.empty(out.size // dt.itemsize, ut)
    d[permutation(dt, base, s, w)] = t.view(ut)
    delta_ref.decode(op, dt, d.view(np.uint8), base, out)


# ---------------------------------------------------------------- writer policy (not format)

MIN_SEG = 1024               # a segment is cut at a context change once it holds this many elements
# (measured on the real run's pairs: 1024 and 4096 within 1% of each other; 16384 loses up to 5% and 65536
# up to 15% on early 1-step pairs; counting nonzero deltas instead, for masked segments, gained
# 0.4% at most and cost a fifth of the sort's time)


def segments(ctx_counts, chunk_elems: int, min_seg: int | None = None) -> list[list[int]]:
    """How mithril-gpu cuts the sorted stream: at context changes once a segment holds
    ``min_seg`` elements, and always at multiples of ``chunk_elems`` (so that the segments of
    sorted positions [r * chunk_elems, (r + 1) * chunk_elems) can be coded by one job, as a row
    is). Returns, per such block of ``chunk_elems`` sorted positions, its segment sizes."""
    min_seg = MIN_SEG if min_seg is None else min_seg
    c = np.asarray(ctx_counts)
    counts = c[c != 0].tolist()      # (the contexts present, in order: a call per tensor per save)
    total = sum(counts)
    rows = -(-total // chunk_elems) if total else 0
    bounds = []                      # sorted positions where a context changes and a cut pays (ascending)
    pos = start = 0
    for c in counts:
        if pos > start and pos - start >= min_seg:
            bounds.append(pos)
            start = pos
        pos += c
        if pos // chunk_elems > start // chunk_elems:     # crossed a row boundary: a segment starts there
            start = (pos // chunk_elems) * chunk_elems
    out, i = [], 0
    for r in range(rows):
        a, b = r * chunk_elems, min((r + 1) * chunk_elems, total)
        while i < len(bounds) and bounds[i] <= a:
            i += 1
        j = i
        while j < len(bounds) and bounds[j] < b:
            j += 1
        cuts = [a] + bounds[i:j] + [b]
        i = j
        out.append([q - p for p, q in zip(cuts, cuts[1:])])
    return out
