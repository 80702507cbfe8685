"""The CPU backend: numpy + zstandard, one thread pool, the same bytes as every other writer.

Work is cut into jobs of whole rows (a row is ``chunk_elems`` elements of one tensor and one
chunk of each of its planes). Jobs run on ``threads`` threads; their results are written in
job order, so the file is byte-identical whatever the thread count. Hot loops run in the
optional C helper ``_accel`` (GIL released) and otherwise in the numpy reference.

With ``_accel`` and python-zstandard's C backend, a job is "fused" (``FUSED``): one C call
(``encode_many`` / ``decode_many``) does every run of rows of the job, and one python-zstandard
call (``multi_compress_to_buffer`` / ``multi_decompress_to_buffer``) codes all the planes that
libzstd handles, so a job returns to Python (and takes the GIL back) about twice instead of
several times per row and plane. The per-row path (``MITHRIL_FUSED=0``) is its reference: the
same bytes (tests/test_fused.py) and the same errors (a fused run that meets anything to refuse
is decoded again by the per-row path, which raises what it always raised).
"""
from __future__ import annotations

import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import checksum, codecs, ctxdelta, delta as delta_ref, transforms
from .container import TensorEntry
from .dtypes import DType
from .errors import ChecksumMismatchError, CorruptFileError, MithrilError

try:
    if sys.byteorder != "little":
        raise ImportError("big-endian host")
    from . import _accel
except ImportError:  # not built: the numpy reference gives the same bytes, slower
    _accel = None

try:
    import zstandard as _zstd
    _MULTI = getattr(_zstd, "backend", "") == "cext" and hasattr(_zstd.ZstdCompressor, "multi_compress_to_buffer") \
        and hasattr(_zstd.ZstdDecompressor, "multi_decompress_to_buffer")     # (the cffi backend lacks them)
except ImportError:  # pragma: no cover
    _zstd, _MULTI = None, False

# The fused path: per job, one C call per tensor run (digests, deltas, planes, entropy gate,
# Huffman literal frames; GIL released) and one python-zstandard call for all the planes that
# libzstd still codes (or decodes), instead of a return to Python per row and plane. Same bytes,
# same checks. MITHRIL_FUSED=0 (or FUSED = False) keeps the per-row path, the reference.
FUSED = os.environ.get("MITHRIL_FUSED", "1") != "0"


def fused() -> bool:
    return FUSED and _MULTI and _accel is not None and hasattr(_accel, "encode_units")


_KIND = {"raw": 0, "bytegroup": 1, "fieldsplit": 2, "masked": 3}

JOB_BYTES = 2 << 20          # input bytes per job: big enough to amortise Python, small enough to balance
                             # (and to bound memory: 4 MiB jobs took MiniLM bf16 saves from 1.0-1.1x to 1.3x peak)
PREFETCH_BYTES = 256 << 20   # delta items resolved ahead of the encoder (their coding chosen, sorted)
PREFETCH_ITEMS = 4
HELPER_MIN_BYTES = 64 << 20  # delta items are resolved on a helper thread only when they hold this much: below it,
                             # resolving them inline was as fast or faster (a 52 MB model's delta 5-45%, 3.3 MB 0-12%)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------- kernels (accel or reference)

def split_planes(dt: DType, transform: str, src: np.ndarray, planes: list) -> None:
    if _accel is not None and transform != "raw":
        e, m = (dt.exp_bits, dt.man_bits) if transform == "fieldsplit" else (0, 0)
        _accel.split(src, dt.itemsize, e, m, tuple(planes))
    else:
        transforms.split(dt, transform, src, planes)


def merge_planes(dt: DType, transform: str, planes: list, out: np.ndarray) -> None:
    if _accel is not None and transform != "raw":
        e, m = (dt.exp_bits, dt.man_bits) if transform == "fieldsplit" else (0, 0)
        _accel.merge(tuple(planes), dt.itemsize, e, m, out)
    else:
        transforms.merge(dt, transform, [np.frombuffer(p, np.uint8) for p in planes], out)


def split_masked(dt: DType, src: np.ndarray, alloc=None) -> tuple[int, list]:
    """The masked planes of ``src``: (nnz, [mask, byte planes trimmed to nnz])."""
    if _accel is None:
        return transforms.split_masked(dt, src)
    count = src.size // dt.itemsize
    alloc = alloc or (lambda size: np.empty(size, np.uint8))
    mask = alloc((count + 7) // 8)
    vals = [alloc(count) for _ in range(dt.itemsize)]
    nnz = _accel.masked_split(src, dt.itemsize, mask, tuple(vals))
    return nnz, [mask] + [v[:nnz] for v in vals]


def merge_masked(dt: DType, planes: list, out: np.ndarray) -> None:
    if _accel is None:
        return transforms.merge_masked(dt, [np.frombuffer(p, np.uint8) for p in planes], out)
    nnz = len(planes[1])
    if _accel.masked_merge(planes[0], tuple(planes[1:]), nnz, dt.itemsize, out) != 0:
        raise CorruptFileError("masked chunk: the bitmap does not match the number of stored elements")


def delta_apply(op: str, dt: DType, x: np.ndarray, base: np.ndarray, out: np.ndarray, inverse: bool) -> None:
    if _accel is not None:
        _accel.delta(x, base, out, dt.itemsize, delta_ref.OPS.index(op), int(delta_ref.is_float(dt)), int(inverse))
    elif inverse:
        delta_ref.decode(op, dt, x, base, out)
    else:
        delta_ref.encode(op, dt, x, base, out)


CTX_PARALLEL_BYTES = 8 << 20     # a context sort of a larger tensor is split across threads


def ctx_apply(op: str, dt: DType, x: np.ndarray, base: np.ndarray, out: np.ndarray, s: int, w: int,
              inverse: bool, counts: np.ndarray | None = None, threads: int = 1,
              row_bytes: int = 0, keep: np.ndarray | None = None) -> np.ndarray | None:
    """Context-sorted delta (ctxdelta.py): ``out`` = the sorted stream of ``x``'s deltas, or with
    ``inverse`` the original elements from the sorted stream ``x``. ``counts`` (uint64[2^w]) gets
    the elements per context. With ``threads`` > 1 a large tensor is cut into parts sorted in
    parallel (a histogram per part, then each part moves its elements from its own offsets: the
    same counting sort, the same bytes). Encoding with ``row_bytes``, returns the row digests of
    ``x`` (uint64 per row of that many bytes) taken from the very bytes sorted (the C helper
    hashes each block as it copies it; the numpy path sorts and hashes one copy); else None.
    Encoding with ``keep`` (uint8, x's size; it may be ``base`` itself), a copy of those very bytes
    goes there too (the C helper only: where it is absent, or decoding, ``keep`` is refused); if
    this raises, ``keep`` may hold some of them."""
    if _accel is not None and hasattr(_accel, "ctx_hist"):
        isz, opi, fl = dt.itemsize, delta_ref.OPS.index(op), int(delta_ref.is_float(dt))
        rb = row_bytes if not inverse else 0
        digs = np.empty(-(-base.size // rb) if rb else 0, np.uint64)
        if _ctx_nparts(base.size, threads, rb) <= 1:
            _accel.ctx(x, base, out, isz, opi, fl, int(inverse), s, w, counts, None, rb, digs if rb else None, keep)
            return digs if rb else None

        def move(a, b, offs, hist):
            if inverse:
                _accel.ctx(x, base[a:b], out[a:b], isz, opi, fl, 1, s, w, None, offs.copy(), 0, None, keep)
            else:
                _accel.ctx(x[a:b], base[a:b], out, isz, opi, fl, 0, s, w, None, offs.copy(),
                           rb, digs[a // rb:-(-b // rb)] if rb else None, None if keep is None else keep[a:b])
        _, total, _ = _ctx_parts(base, isz, s, w, threads, move, rb)
        if counts is not None:
            counts[...] = total
        return digs if rb else None
    if keep is not None:
        raise ValueError("keep needs the C helper, and an encoding")
    if inverse:
        ctxdelta.decode(op, dt, x, base, s, w, out)
        return None
    if row_bytes:       # one read of x: the digests and the deltas from the same copy
        x = np.array(x, copy=True)
    out[...] = ctxdelta.encode(op, dt, x, base, s, w)
    if counts is not None:
        counts[...] = ctxdelta.counts(dt, base, s, w)
    if row_bytes:
        return np.array([checksum.row_digest(x[a:a + row_bytes]) for a in range(0, x.size, row_bytes)], np.uint64)
    return None


def ctxm_available() -> bool:
    """The writer's path for context-sorted masked deltas without the sorted stream (C only)."""
    return CTXM and _accel is not None and hasattr(_accel, "ctxm") and fused()


CTXM = True                  # False: masked context-sorted deltas are sorted into a stream (the reference)


def ctxm_prepare(op: str, dt: DType, x: np.ndarray, base: np.ndarray, s: int, w: int, threads: int = 1,
                 get=None, row_bytes: int = 0, keep: np.ndarray | None = None) -> tuple:
    """The tables ``encode_units`` kind 4 cuts masked segments of the sorted stream from, without
    the stream (``_accel.ctxm``): (bitmap words, packed values, cum, block starts + [n], counts,
    row digests of ``x`` or None). ``get(nbytes)`` gives uint8 buffers (a pool's); parts of a
    large tensor move in parallel. With ``row_bytes``, the row digests are taken from the very
    bytes moved; with ``keep`` (uint8, x's size; it may be ``base`` itself), so is a copy of them.
    If this raises, ``keep`` may hold some of them."""
    isz = dt.itemsize
    n = base.size // isz
    bitmap, vals, cum = ctxm_tables(dt, n, get)
    opi, fl = delta_ref.OPS.index(op), int(delta_ref.is_float(dt))
    rb = row_bytes
    digs = np.empty(-(-base.size // rb) if rb else 0, np.uint64)

    def move(a, b, offs, hist):
        _accel.ctxm(x[a:b], base[a:b], bitmap, vals, isz, opi, fl, s, w, n, offs, hist,
                    rb, digs[a // rb:-(-b // rb)] if rb else None, None if keep is None else keep[a:b])

    hists, total, offs = _ctx_parts(base, isz, s, w, threads, move, rb)
    _accel.ctxm_cum(bitmap, n, cum)
    starts = offs.T[hists.T > 0]            # (context, part) order: ascending sorted positions
    blocks = np.concatenate([starts, np.array([n], np.uint64)]).astype(np.uint64)
    return bitmap, vals, cum, blocks, total, digs if rb else None


def ctxm_tables(dt: DType, n: int, get=None) -> tuple:
    """Buffers for ctxm's tables of ``n`` elements: the bitmap (zeroed), the values, cum."""
    get = get or (lambda size: np.empty(size, np.uint8))
    bitmap = get(((n + CTXM_SLACK) // 64 + 2) * 8).view(np.uint64)
    bitmap[:] = 0
    return bitmap, get((n + CTXM_SLACK) * dt.itemsize), get((n // 64 + 2) * 8).view(np.uint64)


def ctxm_unsort(op: str, dt: DType, bitmap: np.ndarray, vals: np.ndarray, cum: np.ndarray, base: np.ndarray,
                out: np.ndarray, s: int, w: int, threads: int = 1) -> None:
    """``out`` = the tensor rebuilt from ctxm's tables (filled by decode_units kind 4) and its
    base (``_accel.ctxm_inverse``), the inverse of :func:`ctxm_prepare`."""
    isz = dt.itemsize
    n = base.size // isz
    opi, fl = delta_ref.OPS.index(op), int(delta_ref.is_float(dt))
    _accel.ctxm_cum(bitmap, n, cum)

    def move(a, b, offs, hist):
        _accel.ctxm_inverse(base[a:b], out[a:b], bitmap, vals, cum, isz, opi, fl, s, w, n, offs, hist)
    _ctx_parts(base, isz, s, w, threads, move)


def _ctx_nparts(nbytes: int, threads: int, row_bytes: int = 0) -> int:
    """Parts a context sort of ``nbytes`` is cut into: one per thread, each of CTX_PARALLEL_BYTES / 2
    or more (and, with ``row_bytes``, a whole number of rows: at most one part per row)."""
    parts = min(threads, max(1, nbytes // (CTX_PARALLEL_BYTES // 2)))
    return min(parts, max(1, -(-nbytes // row_bytes))) if row_bytes else parts


def _ctx_parts(base: np.ndarray, isz: int, s: int, w: int, threads: int, move, row_bytes: int = 0) -> tuple:
    """Cut ``base`` into parts (one per thread for a large tensor; with ``row_bytes``, at row
    boundaries, so that each row is hashed by one part), histogram each part's contexts, then
    ``move(a, b, offsets, hist)`` each part [a, b) (bytes), in parallel; returns (hists, counts
    per context, offsets per part). Where the parts are cut does not change the sorted order."""
    n = base.size // isz
    parts = _ctx_nparts(base.size, threads, row_bytes)
    if row_bytes:
        rows = -(-base.size // row_bytes)
        cuts = [min(base.size, rows * p // parts * row_bytes) for p in range(parts + 1)]
    else:
        cuts = [n * p // parts * isz for p in range(parts + 1)]
    hists = np.zeros((parts, 1 << w), np.uint64)

    def hist(p):
        _accel.ctx_hist(base[cuts[p]:cuts[p + 1]], isz, s, w, hists[p])

    def run(p):
        move(cuts[p], cuts[p + 1], offs[p], hists[p])

    if parts > 1 and pools_ok():
        with ThreadPoolExecutor(parts, thread_name_prefix="mithril-ctx") as ex:
            for f in [submit(ex, hist, p) for p in range(parts)]:
                f.result()
            total, offs = _part_offsets(hists)
            for f in [submit(ex, run, p) for p in range(parts)]:
                f.result()
    else:                                   # (one part; or no pool at interpreter exit: the same parts in turn)
        for p in range(parts):
            hist(p)
        total, offs = _part_offsets(hists)
        for p in range(parts):
            run(p)
    return hists, total, offs


def _part_offsets(hists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per context, its elements in all parts; per part, its first sorted position per context."""
    total = hists.sum(axis=0, dtype=np.uint64)
    starts = np.concatenate([[0], np.cumsum(total, dtype=np.uint64)[:-1]]).astype(np.uint64)
    offs = starts[None, :] + np.concatenate([np.zeros((1, hists.shape[1]), np.uint64),
                                             np.cumsum(hists, axis=0, dtype=np.uint64)[:-1]])
    return total, np.ascontiguousarray(offs, np.uint64)


CTXM_SLACK = 4096            # _accel's CTXM_SLACK: elements the ctxm buffers hold beyond the stream


def _prepare_ctx(item) -> None:
    """Sort a context-sorted delta item's deltas once, and cut the stream into segments (or, for a
    masked item on the fused path, build ctxm's tables instead of the stream)."""
    s, w = item.ctx
    rb = item.chunk_elems * item.dtype.itemsize
    keep = item.keep          # the caller's copy of the base, to hold what is coded (C sorts only)
    if keep is not None and not (keep.dtype == np.uint8 and keep.size == item.nbytes and keep.flags.writeable
                                 and keep.flags.c_contiguous and _accel is not None and hasattr(_accel, "ctx_hist")):
        keep = None
    if item.transform == "masked" and item.ctx_fused and ctxm_available():
        pool = item.stream_pool
        tables = ctxm_prepare(item.delta_op, item.dtype, item.data, item.base, s, w, item.ctx_threads,
                              pool.get if pool is not None else None, rb, keep=keep)
        item.ctx_m, item.ctx_digests = tables[:5], tables[5]
        item.kept = keep is not None
        item.ctx_rows = ctxdelta.segments(item.ctx_m[4], item.chunk_elems)
        item.segs = [n for row in item.ctx_rows for n in row]
        return
    t = item.stream_pool.get(item.nbytes) if item.stream_pool is not None else np.empty(item.nbytes, np.uint8)
    cnt = np.zeros(1 << w, np.uint64)
    item.ctx_digests = ctx_apply(item.delta_op, item.dtype, item.data, item.base, t, s, w, inverse=False,
                                 counts=cnt, threads=item.ctx_threads, row_bytes=rb, keep=keep)
    item.kept = keep is not None
    item.ctx_rows = ctxdelta.segments(cnt, item.chunk_elems)
    item.segs = [n for row in item.ctx_rows for n in row]
    item.ctx_stream = t


_scratch = threading.local()


def scratch(key: str, size: int) -> np.ndarray:
    """A per-thread reusable buffer (fresh pages are slow to touch; reuse beats allocate)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    b = bufs.get(key)
    if b is None or b.size < size:
        b = bufs[key] = np.empty(max(size, 1 << 16), np.uint8)
    return b[:size]


class BufferPool:
    """Plane buffers handed from encoder threads to the writer and back, so memory stays warm
    and stored planes are written without a copy. With ``limit`` (bytes), the oldest free
    buffers beyond it are let go."""

    def __init__(self, limit: int | None = None):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._limit, self._bytes = limit, 0

    def get(self, size: int) -> np.ndarray:
        with self._lock:
            for i, b in enumerate(self._free):
                if b.size >= size:
                    self._bytes -= b.size
                    return self._free.pop(i)[:size]
        return np.empty(max(size, 1 << 16), np.uint8)[:size]

    def put(self, bufs) -> None:
        with self._lock:
            for b in bufs:
                b = b.base if b.base is not None else b
                self._free.append(b)
                self._bytes += b.size
            while self._limit is not None and self._bytes > self._limit and self._free:
                self._bytes -= self._free.pop(0).size

    @property
    def free_bytes(self) -> int:
        return self._bytes


# The coders' buffers outlive a save (up to POOL_BYTES of them): on a host that takes back memory
# a process freed (a VM's balloon, or just the allocator returning it), every save used to fault
# in its buffers afresh. MiniLM saved alternately with a pool per save: fp32 0.90-0.92x the time,
# bf16 0.88x (STATUS).
# Context-sorted deltas' sorted streams and ctxm tables have a pool of their own (their sizes are
# a tensor's, not a plane's), kept the same way: a Checkpointer's deltas no longer fault them in
# at every save.
POOL_BYTES = 64 << 20
SHARE_POOL = True
_SHARED_POOL = BufferPool(POOL_BYTES)
_SHARED_STREAMS = BufferPool(POOL_BYTES)


def _new_pool_in_child() -> None:         # (a fork may have caught another thread holding its lock)
    global _SHARED_POOL, _SHARED_STREAMS
    _SHARED_POOL = BufferPool(POOL_BYTES)
    _SHARED_STREAMS = BufferPool(POOL_BYTES)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_pool_in_child)


# ---------------------------------------------------------------- encoding

@dataclass
class EncodeItem:
    """One tensor to write. ``data`` is its bytes (uint8 array) or a callable returning them."""

    name: str
    dtype: DType
    shape: tuple
    data: np.ndarray | Callable[[], np.ndarray]
    transform: str
    chunk_elems: int
    nnz: list = field(default_factory=list)  # per row, filled while encoding a masked item
    delta_op: str | None = None      # "xor" / "zigzag": coded against base
    base: np.ndarray | Callable[[], np.ndarray] | None = None
    base_name: str | None = None
    on_done: Callable[[], None] | None = None   # called once the item is written (e.g. drop mapped pages)
    device_tensor: object = None     # the torch tensor when it lives on a GPU (for the GPU backend)
    ctx: tuple | None = None         # (s, w): a context-sorted delta (feature "ctxdelta")
    segs: list | None = None         # its segment sizes, once sorted
    ctx_rows: list | None = None     # the same, per chunk_elems block of the sorted stream
    ctx_stream: np.ndarray | None = None   # the sorted stream of deltas, while encoding
    ctx_m: tuple | None = None       # or, masked on the fused path, ctxm_prepare's tables
    ctx_digests: np.ndarray | None = None   # the row digests the sort took from the bytes it sorted
    ctx_threads: int = 1             # threads for sorting it
    ctx_fused: bool = False          # it is encoded by the fused path (which can take ctx_m)
    stream_pool: object = None       # a BufferPool the sorted stream's buffer comes from (and goes back to)
    keep: np.ndarray | None = None   # the caller's copy of the base (uint8) to refresh: the sort may write the coded bytes there
    kept: bool = False               # ... and did: ``keep`` holds the very bytes coded (ctxm's ``keep``)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def resolve(self):
        if callable(self.data):
            self.data = self.data()
        if callable(self.base):
            self.base = self.base()
        if self.ctx is not None and self.ctx_rows is None and self.nbytes:
            _prepare_ctx(self)


def _encode_rows(item: EncodeItem, row0: int, row1: int, coder: codecs.ChunkCoder, pool: BufferPool):
    """Code rows [row0, row1) of one item: (row digests, [(codec, payload)], buffers to give back,
    nonzero counts per row for a masked item)."""
    dt, isz = item.dtype, item.dtype.itemsize
    rb = item.chunk_elems * isz
    widths = transforms.plane_widths(dt, item.transform)
    digests, out, held, nnzs = [], [], [], []

    def take(size: int) -> np.ndarray:      # a pool buffer, given back once the payloads are written
        buf = pool.get(size)
        held.append(buf)
        return buf

    if item.ctx is not None:           # the sort's row digests, segments of the sorted stream for chunks
        digests.extend(int(d) for d in item.ctx_digests[row0:row1])
        for r in range(row0, row1):
            pos = r * rb
            for n in item.ctx_rows[r]:
                _encode_unit(item, item.ctx_stream[pos:pos + n * isz], coder, take, out, nnzs, widths)
                pos += n * isz
        return digests, out, held, nnzs
    for r in range(row0, row1):
        a, b = r * rb, min((r + 1) * rb, item.nbytes)
        seg = take(b - a)               # one read of the row: its digest and its coding from this copy
        seg[...] = item.data[a:b]
        digests.append(checksum.row_digest(seg))
        if item.delta_op is not None:
            d = take(b - a)
            delta_apply(item.delta_op, dt, seg, item.base[a:b], d, inverse=False)
            seg = d
        _encode_unit(item, seg, coder, take, out, nnzs, widths)
    return digests, out, held, nnzs


def _encode_unit(item, seg, coder, take, out, nnzs, widths) -> None:
    """Code the planes of one unit: a row (its delta already taken), or a segment of a
    context-sorted delta's sorted stream."""
    dt = item.dtype
    ans = item.delta_op is not None                      # a delta's planes may be coded "ans" (codecs)
    if item.transform == "raw":
        out.append(coder.encode(seg, use_ans=ans))
    elif item.transform == "masked":
        nnz, planes = split_masked(dt, seg, take)
        nnzs.append(nnz)
        out.extend(coder.encode(p, use_ans=ans) for p in planes)
    else:
        planes = [take(seg.size // dt.itemsize * w) for w in widths]
        split_planes(dt, item.transform, seg, planes)
        exp_plane = item.transform == "fieldsplit"       # its exponent plane: Huffman literals (codecs)
        out.extend(coder.encode(p, literals=exp_plane and k == 0, use_ans=ans) for k, p in enumerate(planes))


def _encode_job_fused(items: list, job, coder: codecs.ChunkCoder, pool: BufferPool):
    """The fused counterpart of ``[_encode_rows(...) for each segment of job]``, with the same
    result: per segment (row digests, [(codec, payload)], buffers to give back, nonzero counts).
    The same decisions as ``codecs.ChunkCoder.encode``, the same bytes."""
    segs, held, zviews, calls = [], [], [], []
    for i, r0, r1 in job:
        it = items[i]
        dt, isz = it.dtype, it.dtype.itemsize
        rb = it.chunk_elems * isz
        kind = _KIND[it.transform]
        e, m = (dt.exp_bits, dt.man_bits) if kind == 2 else (0, 0)
        if it.ctx is not None:        # units: segments of the sorted stream; digests: rows of the original
            pos, bl = r0 * rb, [r0 * rb]
            for r in range(r0, r1):
                for n in it.ctx_rows[r]:
                    pos += n * isz
                    bl.append(pos)
            src, base, op, huff = it.ctx_stream, None, -1, 0
            if it.ctx_m is not None:
                src, kind = it.ctx_m[1], 4
        else:
            nbytes = it.nbytes          # (plain lists: numpy's small operations may release the GIL)
            bl = [min(r * rb, nbytes) for r in range(r0, r1 + 1)]
            src, base = it.data, it.base if it.delta_op is not None else None
            op = -1 if it.delta_op is None else delta_ref.OPS.index(it.delta_op)
            huff = int(coder.level is None and kind == 2)
        bounds = np.array(bl, np.int64)
        U = len(bl) - 1
        nplanes = len(transforms.plane_widths(dt, it.transform))
        total = (bl[-1] - bl[0]) // isz
        need = (sum((b - a) // isz + 7 >> 3 for a, b in zip(bl, bl[1:])) + total * isz if kind >= 3
                else total * (isz if kind == 0 else nplanes))
        arena = pool.get(need)
        held.append(arena)
        rec = np.empty((U * nplanes, 3), np.int64)
        nnz = np.zeros(U, np.int64)
        digs = np.empty(r1 - r0, np.uint64)
        d1 = r0 if it.ctx is not None else r1       # a context-sorted item's digests: its sort's
        calls.append((src, bounds, it.data, rb, r0, d1, base, isz, kind, e, m, op, int(delta_ref.is_float(dt)), huff,
                      codecs.STORE_ENTROPY_BITS, codecs._SAMPLE, arena, rec, nnz, digs)
                     + (((it.ctx_m[0], it.ctx_m[2], it.ctx_m[3]),) if kind == 4 else ()))
    _accel.encode_many(calls)          # the whole job with one release of the GIL
    aviews = []                        # planes of delta entries still to be zstd-coded: ans candidates
    for c, (i, r0, r1) in zip(calls, job):
        arena, rec, nnz, digs = c[16:20]
        mv = memoryview(arena)
        recs = rec.tolist()
        for state, off, n in recs:
            if state == 2:
                zviews.append(mv[off:off + n])
                if items[i].delta_op is not None:
                    aviews.append(mv[off:off + n])
        digs = items[i].ctx_digests[r0:r1] if items[i].ctx is not None else digs
        segs.append((digs.tolist(), recs, mv, nnz.tolist() if c[8] >= 3 else [], items[i].delta_op is not None))
    if aviews and codecs.ans_enabled():    # as ChunkCoder.encode(use_ans=True): one C call for the job's planes
        aarena = pool.get(sum(len(v) for v in aviews))
        held.append(aarena)
        arec = np.zeros((len(aviews), 2), np.int64)
        _accel.ans_encode_many(aviews, aarena, arec)
        amv, arecs = memoryview(aarena), arec.tolist()
    else:
        arecs = None
    zout = coder._cctx().multi_compress_to_buffer(zviews, threads=1) if zviews else None
    out, z, a = [], 0, 0
    for digs, recs, mv, nnzs, delta in segs:
        coded = []
        for state, off, n in recs:
            if state == 2:
                frame = zout[z]
                z += 1
                if delta and arecs is not None:
                    ao, an = arecs[a]
                    a += 1
                    if an and an < min(len(frame), n):
                        coded.append((codecs.ANS, amv[ao:ao + an]))
                        continue
                if len(frame) < n:
                    coded.append((codecs.ZSTD, frame.tobytes()))
                    continue
            elif state == 1:      # as ChunkCoder.encode: frames are bytes made here, stored planes views
                coded.append((codecs.ZSTD, bytes(mv[off:off + n])))
                continue
            coded.append((codecs.STORED, mv[off:off + n]))
        out.append((digs, coded, [], nnzs))
    out[-1][2].extend(held)           # given back to the pool once the payloads are written
    return out


def _plan_jobs(sizes: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
    """Cut work into jobs of about JOB_BYTES: lists of (item, first row, end row) segments.

    ``sizes`` gives, per item, (rows, bytes per row). Small items share a job; large ones are
    split across several.
    """
    jobs, cur, cur_bytes = [], [], 0
    for i, (rows, rb) in enumerate(sizes):
        r = 0
        while r < rows:
            take = max(1, min(rows - r, (JOB_BYTES - cur_bytes) // max(rb, 1)))
            cur.append((i, r, r + take))
            cur_bytes += take * rb
            r += take
            if cur_bytes >= JOB_BYTES:
                jobs.append(cur)
                cur, cur_bytes = [], 0
    if cur:
        jobs.append(cur)
    return jobs


def pools_ok() -> bool:
    """Whether a thread pool may take work. Once the main thread has returned, the interpreter
    begins to exit and ``concurrent.futures`` refuses new work, while a thread of the program may
    still be saving or loading: that work is then done on the calling thread (a save from a
    non-daemon thread used to fail with "cannot schedule new futures after interpreter shutdown")."""
    import concurrent.futures.thread as cft

    return not getattr(cft, "_shutdown", False)


def submit(pool, fn, *args):
    """``pool.submit(fn, *args)``; once the interpreter has begun to exit (a pool made before then
    refuses new work), ``fn`` runs on the calling thread instead and a done future is returned."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError:
        if pools_ok():
            raise
    from concurrent.futures import Future

    done = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001  (handed to whoever asks for the result, as a pool would)
        done.set_exception(e)
    return done


def _run_ordered(jobs, run, consume, threads: int, before_submit=None) -> None:
    """Run ``run(job)`` on a pool, handing results to ``consume(job, result)`` in job order."""
    if threads <= 1 or len(jobs) <= 1 or not pools_ok():
        for job in jobs:
            if before_submit:
                before_submit(job)
            consume(job, run(job))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="mithril") as pool:
        window: deque = deque()
        for job in jobs:
            if before_submit:
                before_submit(job)
            window.append((job, submit(pool, run, job)))
            if len(window) >= 2 * threads:
                jj, fut = window.popleft()
                consume(jj, fut.result())
        while window:
            jj, fut = window.popleft()
            consume(jj, fut.result())


def encode_all(items: list[EncodeItem], write: Callable[[bytes], int], coder: codecs.ChunkCoder,
               threads: int, progress: Callable[[int], None] | None = None, lend=None) -> list[tuple[int, list[int]]]:
    """Encode every item; ``write(payload)`` appends a payload and returns its file offset.
    With ``lend`` (the ``writer.AtomicFile`` behind ``write``), payloads that are views of this
    function's buffers are written from where they are (``lend.write(view, lent=True)``, no
    copy), and those buffers go back to the pool once ``lend`` has written them.

    Returns, per item, ``(checksum, flat chunk list, row digests)`` for its index entry.
    """
    sizes = []
    for it in items:
        rb = it.chunk_elems * it.dtype.itemsize
        sizes.append((-(-it.nbytes // rb) if it.nbytes else 0, rb))
    jobs = _plan_jobs(sizes)
    digests = [[] for _ in items]
    chunks = [[] for _ in items]
    last_seg = {i: (j, r1) for j, job in enumerate(jobs) for (i, _, r1) in job}
    buffers = _SHARED_POOL if SHARE_POOL else BufferPool()

    use_fused = fused()

    def run(job):
        if use_fused:
            return _encode_job_fused(items, job, coder, buffers)
        return [_encode_rows(items[i], r0, r1, coder, buffers) for i, r0, r1 in job]

    # Items stored against a base are resolved (their coding chosen, a context-sorted delta sorted)
    # on a helper thread, a few items ahead, so that this serial work overlaps the encoding of the
    # items before them; at most PREFETCH_BYTES of items are resolved ahead of the encoder.
    pending = [i for i, it in enumerate(items) if it.delta_op == "pending" and it.nbytes]
    pending_set = set(pending)
    big = sum(items[i].nbytes for i in pending) >= HELPER_MIN_BYTES
    helper = ThreadPoolExecutor(1, thread_name_prefix="mithril-plan") \
        if pending and threads > 1 and big and pools_ok() else None
    ahead: dict[int, object] = {}
    cursor = [0]                     # next position in ``pending`` to hand to the helper

    # sorted streams of context-sorted deltas and ctxm's tables: recycled (fresh pages are slow)
    streams = _SHARED_STREAMS if SHARE_POOL else BufferPool()

    def resolve_one(i):
        items[i].ctx_threads, items[i].stream_pool, items[i].ctx_fused = max(1, threads - 1), streams, use_fused
        items[i].resolve()

    def prefetch(cur: int) -> None:
        later = [j for j in ahead if j > cur]
        nbytes, count = sum(items[j].nbytes for j in later), len(later)
        while cursor[0] < len(pending):
            j = pending[cursor[0]]
            if j > cur and (nbytes >= PREFETCH_BYTES or count >= PREFETCH_ITEMS):
                break
            ahead[j] = submit(helper, resolve_one, j)
            cursor[0] += 1
            if j > cur:
                nbytes, count = nbytes + items[j].nbytes, count + 1

    def before_submit(job):
        for i, _, _ in job:
            if helper is not None and i in pending_set:
                prefetch(i)
                fut = ahead.pop(i, None)
                if fut is not None:
                    fut.result()
            items[i].ctx_threads, items[i].stream_pool, items[i].ctx_fused = threads, streams, use_fused
            items[i].resolve()

    def give_back(pool, bufs) -> None:
        """``bufs`` back to ``pool``: once written, where payloads may be views of them (lent)."""
        if lend is not None:
            lend.after_written(lambda: pool.put(bufs))
        else:
            pool.put(bufs)

    def consume(job, results):
        for (i, r0, r1), (digs, coded, held, nnzs) in zip(job, results):
            for codec, payload in coded:
                # A payload that is not bytes is a view of this save's own buffers: of ``held``, or
                # (a stored segment on the per-row path) of the item's sorted stream. Those go back
                # to their pools only once written (give_back), so it is lent, not copied.
                if lend is not None and type(payload) is not bytes:
                    chunks[i].extend((lend.write(payload, lent=True), len(payload), codec))
                else:
                    chunks[i].extend((write(payload), len(payload), codec))
            give_back(buffers, held)
            digests[i].extend(digs)
            items[i].nnz.extend(nnzs)
            if progress:
                rb = sizes[i][1]
                progress(min(r1 * rb, items[i].nbytes) - r0 * rb)
            if last_seg[i][1] == r1:     # drop references held only for this item
                if items[i].ctx_stream is not None:
                    give_back(streams, [items[i].ctx_stream])
                if items[i].ctx_m is not None:
                    give_back(streams, items[i].ctx_m[:3])
                items[i].data = items[i].base = items[i].ctx_stream = items[i].ctx_m = items[i].stream_pool = None
                items[i].ctx_digests = None
                if items[i].on_done is not None:
                    items[i].on_done()

    try:
        _run_ordered(jobs, run, consume, threads, before_submit)
    finally:
        if helper is not None:
            helper.shutdown(wait=True, cancel_futures=True)
    return [(checksum.combine(d), c, d) for d, c in zip(digests, chunks)]


# ---------------------------------------------------------------- decoding

class _Fallback(Exception):
    """The fused decoder met something to refuse: the per-row path decodes the run again and
    raises the very error it always raised."""


def _decode_prepare(buf, e: TensorEntry, u0: int, u1: int, bounds: list, out: np.ndarray,
                    base: np.ndarray | None, verify: bool, ctxm: tuple | None = None):
    """Units [u0, u1) of ``e``, to go into ``out[bounds[0]:bounds[-1]]`` (unit u at bounds[u - u0];
    ``base`` at the same offsets, for a delta): (planes, their positions that hold zstd frames, the
    sizes these decode to, the rest of the arguments of ``_accel.decode_units``). Raises _Fallback
    on anything the per-row path would refuse. (Plain lists: a run is often a row or two, where
    numpy's fixed costs would dominate.) ``ctxm``: (bitmap, values, first value index per unit) of a
    masked context-sorted delta, which its units go into (kind 4) instead of a sorted stream."""
    dt, isz = e.dtype, e.dtype.itemsize
    widths = e.widths
    P = len(widths)
    kind = _KIND[e.transform]
    U = u1 - u0
    usz = []
    if kind == 3:
        nnz = e.nnz[u0:u1]
        for u in range(U):
            usz.append((bounds[u + 1] - bounds[u]) // isz + 7 >> 3)
            usz.extend([nnz[u]] * isz)
        nnz = np.array(nnz, np.int64)
    else:
        nnz = _NO_NNZ
        for u in range(U):
            n = (bounds[u + 1] - bounds[u]) // isz
            usz.extend([n * w for w in widths])
    flat = e.chunks[3 * P * u0:3 * P * u1]
    nb = len(buf)
    planes, zi, zs = [], [], []
    for k, size in enumerate(usz):
        o, c, codec = flat[3 * k], flat[3 * k + 1], flat[3 * k + 2]
        if o < 0 or o + c > nb:
            raise _Fallback
        if (codec == codecs.ZSTD or codec == codecs.ANS) and size > 0:
            zi.append(k)
            zs.append(size if codec == codecs.ZSTD else -size)     # ans: negative, decoded by _accel
        elif codec != codecs.STORED or c != size:
            raise _Fallback
        planes.append(buf[o:o + c])
    lo, hi = bounds[0], bounds[-1]
    if ctxm is not None:
        bitmap, vals, vstart = ctxm
        rest = (np.array(bounds, np.int64), vals, None, isz, 4, 0, 0, -1, int(delta_ref.is_float(dt)), nnz,
                np.empty(0, np.uint64), (bitmap, vstart[u0:u1]))
        return planes, zi, zs, rest
    op = -1 if base is None else delta_ref.OPS.index(e.delta["op"])
    e_, m_ = (dt.exp_bits, dt.man_bits) if kind == 2 else (0, 0)
    rest = (np.array(bounds, np.int64) - lo, out[lo:hi], None if base is None else base[lo:hi], isz, kind, e_, m_, op,
            int(delta_ref.is_float(dt)), nnz, np.empty(U if verify else 0, np.uint64))
    return planes, zi, zs, rest


def _unzstd(parts) -> None:
    """One python-zstandard call for the zstd frames of every prepared run in ``parts``, and one
    C call for their ans chunks (sizes given negated by ``_decode_prepare``)."""
    frames, sizes, pairs = [], [], []
    for planes, zi, zs, _ in parts:
        for k, size in zip(zi, zs):
            if size > 0:
                frames.append(planes[k])
                sizes.append(size)
            else:
                if codecs._ans_decode_many is None or len(planes[k]) * codecs.ZSTD_MAX_EXPANSION < -size:
                    raise _Fallback
                pairs.append((planes[k], np.empty(-size, np.uint8)))
    if frames:
        try:
            zout = _dctx_multi().multi_decompress_to_buffer(frames, decompressed_sizes=np.array(sizes, np.uint64).tobytes(),
                                                             threads=1)
        except (_zstd.ZstdError, ValueError, TypeError, MemoryError):
            raise _Fallback from None
    if pairs and codecs._ans_decode_many(pairs) != -1:
        raise _Fallback
    t = a = 0
    for planes, zi, zs, _ in parts:
        for k, size in zip(zi, zs):
            if size > 0:
                planes[k] = zout[t]
                t += 1
            else:
                planes[k] = pairs[a][1]
                a += 1


_BAD_MASK = "masked chunk: the bitmap does not match the number of stored elements"


def _decode_fused(buf, e: TensorEntry, u0: int, u1: int, bounds: list, out: np.ndarray,
                  base: np.ndarray | None, verify: bool, ctxm: tuple | None = None) -> list[int]:
    """One run, fused: one python-zstandard call for its zstd chunks, one C call for merges, delta
    inverse and digests. Returns the units' digests (when ``verify``). Raises _Fallback."""
    part = _decode_prepare(buf, e, u0, u1, bounds, out, base, verify, ctxm)
    _unzstd([part])
    planes, _, _, rest = part
    if _accel.decode_units(tuple(planes), *rest) >= 0:
        raise CorruptFileError(_BAD_MASK)
    return rest[10].tolist()            # (the digests)


def _decode_job_fused(buf, work, job, verify: bool, stream, bounds_of, tables=None) -> list:
    """A job of several runs (``decode_all``'s), fused: one python-zstandard call and one C call
    for all of them. Raises _Fallback (the caller decodes the runs one by one)."""
    parts = []
    for w, r0, r1 in job:
        e, out, base = work[w]
        if w in bounds_of:
            t = tables(w) if tables is not None else None
            parts.append(_decode_prepare(buf, e, r0, r1, bounds_of[w][r0:r1 + 1].tolist(),
                                         stream(w) if t is None else None, None, False, t))
        else:
            rb, nbytes = e.chunk_elems * e.dtype.itemsize, e.nbytes
            parts.append(_decode_prepare(buf, e, r0, r1, [min(r * rb, nbytes) for r in range(r0, r1 + 1)], out,
                                         base if e.delta else None, verify))
    _unzstd(parts)
    res = _accel.decode_many([(tuple(planes), *rest) for planes, _, _, rest in parts])
    if any(r != -1 for r in res):
        raise _Fallback                  # the runs one by one raise the very error, at the very run
    return [[] if w in bounds_of else part[3][-1].tolist() for (w, _, _), part in zip(job, parts)]


_NO_NNZ = np.zeros(0, np.int64)
_ddlocal = threading.local()


def _dctx_multi():
    d = getattr(_ddlocal, "dctx", None)
    if d is None:
        d = _ddlocal.dctx = _zstd.ZstdDecompressor()
    return d


def _decode_rows(buf, e: TensorEntry, out: np.ndarray, base: np.ndarray | None, row0: int, row1: int,
                 verify: bool, origin: int = 0) -> list[int]:
    """Decode rows [row0, row1) of ``e``; ``out`` (and ``base``) hold the tensor's bytes from byte
    ``origin`` on (0: the whole tensor). Returns the rows' digests when ``verify``."""
    if fused() and row1 > row0:
        rb = e.chunk_elems * e.dtype.itemsize
        nbytes = e.nbytes
        bounds = [min(r * rb, nbytes) - origin for r in range(row0, row1 + 1)]
        try:
            return _decode_fused(buf, e, row0, row1, bounds, out, base if e.delta else None, verify)
        except _Fallback:
            pass
    return _decode_rows_ref(buf, e, out, base, row0, row1, verify, origin)


def _decode_rows_ref(buf, e: TensorEntry, out: np.ndarray, base: np.ndarray | None, row0: int, row1: int,
                     verify: bool, origin: int = 0) -> list[int]:
    """The per-row path (the reference of the fused one)."""
    dt, isz = e.dtype, e.dtype.itemsize
    rb = e.chunk_elems * isz
    op = e.delta["op"] if e.delta else None
    digests = []
    for r in range(row0, row1):
        a, b = r * rb - origin, min((r + 1) * rb, e.nbytes) - origin
        target = out[a:b] if op is None else scratch("delta", b - a)
        _decode_unit(buf, e, r, target)
        if op is not None:
            delta_apply(op, dt, target, base[a:b], out[a:b], inverse=True)
        if verify:
            digests.append(checksum.row_digest(out[a:b]))
    return digests


def _decode_units(buf, e: TensorEntry, stream: np.ndarray | None, bounds: np.ndarray, u0: int, u1: int,
                  ctxm: tuple | None = None) -> list[int]:
    """Decode segments [u0, u1) of a context-sorted delta into its sorted stream, or with ``ctxm``
    into its tables (no digests: rows are checked once the tensor is rebuilt)."""
    if fused() and u1 > u0:
        try:
            return _decode_fused(buf, e, u0, u1, bounds[u0:u1 + 1].tolist(), stream, None, False, ctxm)
        except _Fallback:
            pass
    for u in range(u0, u1):
        a, b = int(bounds[u]), int(bounds[u + 1])
        if ctxm is None:
            _decode_unit(buf, e, u, stream[a:b])
            continue
        # the per-unit path, which raises the errors; then its very planes into the tables
        planes = _decode_unit(buf, e, u, np.empty(b - a, np.uint8))
        _accel.decode_units(tuple(planes), np.array([a, b], np.int64), ctxm[1], None, e.dtype.itemsize, 4, 0, 0, -1,
                            int(delta_ref.is_float(e.dtype)), np.array([e.nnz[u]], np.int64), np.empty(0, np.uint64),
                            (ctxm[0], ctxm[2][u:u + 1]))
    return []


def _decode_unit(buf, e: TensorEntry, u: int, target: np.ndarray) -> list:
    """Decode the chunks of unit ``u`` of ``e`` (a row, or a segment of a context-sorted delta)
    and merge its planes into ``target`` (the unit's bytes, before any delta is undone). Returns
    the decoded planes (in this thread's scratch buffers: valid until its next call)."""
    planes = []
    for p, usize in enumerate(e.plane_sizes(u)):
        off, csize, codec = e.chunk(u, p)
        planes.append(codecs.decode(codec, buf[off:off + csize], usize, scratch(f"d{p}", usize)))
    if e.transform == "raw":
        target[...] = np.frombuffer(planes[0], np.uint8)
    elif e.transform == "masked":
        merge_masked(e.dtype, planes, target)
    else:
        merge_planes(e.dtype, e.transform, planes, target)
    return planes


def decode_all(buf, work: list[tuple[TensorEntry, np.ndarray, np.ndarray | None]], threads: int,
               verify: bool = True, progress: Callable[[int], None] | None = None) -> None:
    """Decode each (entry, out, base) into ``out`` (uint8 of entry.nbytes) and verify checksums.

    ``base`` is the base tensor's bytes for a delta entry ("same" entries are copied from it).
    """
    sizes = []
    # context-sorted deltas: each entry's segments are decoded into a sorted stream (a buffer
    # recycled from the entries unsorted before it: fresh pages cost more than the decoding), which
    # is unsorted into ``out`` as soon as its last segment is in, then hashed whole
    bounds_of: dict[int, np.ndarray] = {}
    streams: dict[int, np.ndarray] = {}
    # masked ones (with the C helper): into ctxm's tables (bitmap, packed values) instead, then
    # rebuilt by _accel.ctxm_inverse: the inverse of how writers code them, no stream in between
    use_ctxm = ctxm_available() and hasattr(_accel, "ctxm_inverse")
    ctxm_w: set[int] = set()
    tabs: dict[int, tuple] = {}
    left: dict[int, int] = {}
    pool, lock = BufferPool(), threading.Lock()
    whole_digest: dict[int, int] = {}
    for w, (e, out, base) in enumerate(work):
        if e.delta and e.delta["op"] == "same":
            out[...] = base
            sizes.append((0, 1))
        elif e.ctx is not None:
            isz = e.dtype.itemsize
            bounds_of[w] = np.concatenate([[0], np.cumsum(e.segs, dtype=np.int64)]) * isz
            left[w] = e.units
            if use_ctxm and e.transform == "masked" and base is not None:
                ctxm_w.add(w)
            sizes.append((e.units, e.chunk_elems * isz))
        else:
            sizes.append((e.rows, e.chunk_elems * e.dtype.itemsize))
    digests: list[list[int]] = [[] for _ in work]

    def stream(w):
        with lock:
            if w not in streams:
                streams[w] = pool.get(work[w][0].nbytes)
            return streams[w]

    def tables(w):
        if w not in ctxm_w:
            return None
        with lock:
            if w not in tabs:
                e = work[w][0]
                vstart = np.concatenate([[0], np.cumsum(e.nnz, dtype=np.int64)[:-1]]).astype(np.int64)
                tabs[w] = ctxm_tables(e.dtype, e.nbytes // e.dtype.itemsize, pool.get) + (vstart,)
            bitmap, vals, cum, vstart = tabs[w]
            return bitmap, vals, vstart

    def unsort(w):                     # rebuild the tensor from its sorted stream and its base, then hash it
        e, out, base = work[w]         # (on this thread, while the pool decodes the next entries' chunks:
        if w in ctxm_w:                # measured faster than splitting the unsort across threads too)
            with lock:
                bitmap, vals, cum, _ = tabs.pop(w)
            ctxm_unsort(e.delta["op"], e.dtype, bitmap, vals, cum, base, out, e.ctx[0], e.ctx[1])
            pool.put([bitmap, vals, cum])
        else:
            with lock:
                t = streams.pop(w)
            ctx_apply(e.delta["op"], e.dtype, t, base, out, e.ctx[0], e.ctx[1], inverse=True)
            pool.put([t])
        if verify:
            whole_digest[w] = checksum.tensor_checksum(out, e.chunk_elems * e.dtype.itemsize)

    use_fused = fused()

    def run(job):
        if use_fused and len(job) > 1:       # several runs (small tensors): one C call for all of them
            try:
                return _decode_job_fused(buf, work, job, verify, stream, bounds_of, tables)
            except _Fallback:
                pass
        return [_decode_units(buf, work[w][0], None if w in ctxm_w else stream(w), bounds_of[w], r0, r1, tables(w))
                if w in bounds_of
                else _decode_rows(buf, work[w][0], work[w][1], work[w][2], r0, r1, verify) for w, r0, r1 in job]

    def consume(job, results):
        for (w, r0, r1), digs in zip(job, results):
            digests[w].extend(digs)
            if w in bounds_of:
                if progress:
                    progress(int(bounds_of[w][r1] - bounds_of[w][r0]))
                left[w] -= r1 - r0
                if left[w] == 0:
                    unsort(w)
                continue
            if progress:
                rb = sizes[w][1]
                progress(min(r1 * rb, work[w][0].nbytes) - r0 * rb)

    try:
        _run_ordered(_plan_jobs(sizes), run, consume, threads)
    except MithrilError:
        raise
    except (ValueError, IndexError) as exc:  # a lying index that validation could not catch
        raise CorruptFileError(f"corrupt file: {exc}") from None
    if verify:
        for w, ((e, out, base), digs) in enumerate(zip(work, digests)):
            same = e.delta is not None and e.delta["op"] == "same"
            if w in whole_digest:
                got = whole_digest[w]
            else:
                got = checksum.tensor_checksum(out, e.chunk_elems * e.dtype.itemsize) if same else checksum.combine(digs)
            if got != e.checksum:
                raise ChecksumMismatchError(
                    f"tensor {e.name!r} does not match its checksum: the file is damaged"
                    + (" or its delta base is not the one it was written against" if e.delta else ""))


def decode_rows(buf, e: TensorEntry, out: np.ndarray, base: np.ndarray | None, row0: int, row1: int,
                threads: int, verify: bool = True) -> None:
    """Decode rows [row0, row1) of ``e`` into ``out``, the bytes of those rows only (``base``: the
    same bytes of the base tensor, for a delta), checking each row against the row digests the
    index stores (``e.row_digests``) when ``verify``. For partial reads (``MthFile.get_slice``)."""
    rb = e.chunk_elems * e.dtype.itemsize
    origin = row0 * rb
    jobs = [[(0, r0 + row0, r1 + row0) for _, r0, r1 in job] for job in _plan_jobs([(row1 - row0, rb)])]
    digests: list[int] = []

    def run(job):
        return [_decode_rows(buf, e, out, base, r0, r1, verify, origin) for _, r0, r1 in job]

    def consume(job, results):
        for digs in results:
            digests.extend(digs)

    try:
        _run_ordered(jobs, run, consume, threads)
    except MithrilError:
        raise
    except (ValueError, IndexError) as exc:  # a lying index that validation could not catch
        raise CorruptFileError(f"corrupt file: {exc}") from None
    if verify:
        want = e.row_digests[row0:row1]
        bad = next((row0 + i for i, (g, w) in enumerate(zip(digests, want)) if g != w), None)
        if bad is not None or len(digests) != len(want):
            raise ChecksumMismatchError(
                f"tensor {e.name!r} row {bad} does not match its digest: the file is damaged"
                + (" or its delta base is not the one it was written against" if e.delta else ""))

