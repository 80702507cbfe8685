"""The CPU backend: numpy + zstandard, one thread pool, the same bytes as every other writer.

Work is cut into jobs of whole rows (a row is ``chunk_elems`` elements of one tensor and one
chunk of each of its planes). Jobs run on ``threads`` threads; their results are written in
job order, so the file is byte-identical whatever the thread count. Hot loops run in the
optional C helper ``_accel`` (GIL released) and otherwise in the numpy reference.
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

JOB_BYTES = 4 << 20          # input bytes per job: big enough to amortise Python, small enough to balance
PREFETCH_BYTES = 256 << 20   # delta items resolved ahead of the encoder (their coding chosen, sorted)
PREFETCH_ITEMS = 4


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
              inverse: bool, counts: np.ndarray | None = None, threads: int = 1) -> None:
    """Context-sorted delta (ctxdelta.py): ``out`` = the sorted stream of ``x``'s deltas, or with
    ``inverse`` the original elements from the sorted stream ``x``. ``counts`` (uint64[2^w]) gets
    the elements per context. With ``threads`` > 1 a large tensor is cut into parts sorted in
    parallel (a histogram per part, then each part moves its elements from its own offsets: the
    same counting sort, the same bytes)."""
    if _accel is not None and hasattr(_accel, "ctx_hist"):
        isz, opi, fl = dt.itemsize, delta_ref.OPS.index(op), int(delta_ref.is_float(dt))
        n = base.size // isz
        parts = min(threads, max(1, base.size // (CTX_PARALLEL_BYTES // 2)))
        if parts <= 1:
            _accel.ctx(x, base, out, isz, opi, fl, int(inverse), s, w, counts)
            return
        cuts = [n * p // parts * isz for p in range(parts + 1)]
        hists = np.zeros((parts, 1 << w), np.uint64)
        with ThreadPoolExecutor(parts, thread_name_prefix="mithril-ctx") as ex:
            list(ex.map(lambda p: _accel.ctx_hist(base[cuts[p]:cuts[p + 1]], isz, s, w, hists[p]), range(parts)))
            total = hists.sum(axis=0, dtype=np.uint64)
            starts = np.concatenate([[0], np.cumsum(total, dtype=np.uint64)[:-1]]).astype(np.uint64)
            offs = starts[None, :] + np.concatenate([np.zeros((1, 1 << w), np.uint64),
                                                     np.cumsum(hists, axis=0, dtype=np.uint64)[:-1]])

            def move(p):
                a, b = cuts[p], cuts[p + 1]
                if inverse:
                    _accel.ctx(x, base[a:b], out[a:b], isz, opi, fl, 1, s, w, None, offs[p].copy())
                else:
                    _accel.ctx(x[a:b], base[a:b], out, isz, opi, fl, 0, s, w, None, offs[p].copy())
            list(ex.map(move, range(parts)))
        if counts is not None:
            counts[...] = total
        return
    if inverse:
        ctxdelta.decode(op, dt, x, base, s, w, out)
    else:
        out[...] = ctxdelta.encode(op, dt, x, base, s, w)
    if counts is not None:
        counts[...] = ctxdelta.counts(dt, base, s, w)


def _prepare_ctx(item) -> None:
    """Sort a context-sorted delta item's deltas once, and cut the stream into segments."""
    s, w = item.ctx
    t = item.stream_pool.get(item.nbytes) if item.stream_pool is not None else np.empty(item.nbytes, np.uint8)
    cnt = np.zeros(1 << w, np.uint64)
    ctx_apply(item.delta_op, item.dtype, item.data, item.base, t, s, w, inverse=False, counts=cnt,
              threads=item.ctx_threads)
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
    and stored planes are written without a copy."""

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, size: int) -> np.ndarray:
        with self._lock:
            for i, b in enumerate(self._free):
                if b.size >= size:
                    return self._free.pop(i)[:size]
        return np.empty(max(size, 1 << 16), np.uint8)[:size]

    def put(self, bufs) -> None:
        with self._lock:
            self._free.extend(b.base if b.base is not None else b for b in bufs)


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
    ctx_threads: int = 1             # threads for sorting it
    stream_pool: object = None       # a BufferPool the sorted stream's buffer comes from (and goes back to)

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

    if item.ctx is not None:           # rows of the original for digests, segments of the sorted stream for chunks
        for r in range(row0, row1):
            a, b = r * rb, min((r + 1) * rb, item.nbytes)
            digests.append(checksum.row_digest(item.data[a:b]))
            pos = a
            for n in item.ctx_rows[r]:
                _encode_unit(item, item.ctx_stream[pos:pos + n * isz], coder, take, out, nnzs, widths)
                pos += n * isz
        return digests, out, held, nnzs
    for r in range(row0, row1):
        a, b = r * rb, min((r + 1) * rb, item.nbytes)
        seg = item.data[a:b]
        digests.append(checksum.row_digest(seg))
        if item.delta_op is not None:
            d = take(b - a)
            delta_apply(item.delta_op, dt, seg, item.base[a:b], d, inverse=False)
            seg = d
        if item.transform == "raw":
            out.append(coder.encode(seg))
        elif item.transform == "masked":
            nnz, planes = split_masked(dt, seg, take)
            nnzs.append(nnz)
            out.extend(coder.encode(p) for p in planes)
        else:
            planes = [take((b - a) // isz * w) for w in widths]
            split_planes(dt, item.transform, seg, planes)
            exp_plane = item.transform == "fieldsplit"
            out.extend(coder.encode(p, literals=exp_plane and k == 0) for k, p in enumerate(planes))
    return digests, out, held, nnzs


def _encode_unit(item, seg, coder, take, out, nnzs, widths) -> None:
    """Planes of one segment of a context-sorted delta (its deltas are already taken)."""
    dt = item.dtype
    if item.transform == "raw":
        out.append(coder.encode(seg))
    elif item.transform == "masked":
        nnz, planes = split_masked(dt, seg, take)
        nnzs.append(nnz)
        out.extend(coder.encode(p) for p in planes)
    else:
        planes = [take(seg.size // dt.itemsize * w) for w in widths]
        split_planes(dt, item.transform, seg, planes)
        out.extend(coder.encode(p) for p in planes)


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


def _run_ordered(jobs, run, consume, threads: int, before_submit=None) -> None:
    """Run ``run(job)`` on a pool, handing results to ``consume(job, result)`` in job order."""
    if threads <= 1 or len(jobs) <= 1:
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
            window.append((job, pool.submit(run, job)))
            if len(window) >= 2 * threads:
                jj, fut = window.popleft()
                consume(jj, fut.result())
        while window:
            jj, fut = window.popleft()
            consume(jj, fut.result())


def encode_all(items: list[EncodeItem], write: Callable[[bytes], int], coder: codecs.ChunkCoder,
               threads: int, progress: Callable[[int], None] | None = None) -> list[tuple[int, list[int]]]:
    """Encode every item; ``write(payload)`` appends a payload and returns its file offset.

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
    buffers = BufferPool()

    def run(job):
        return [_encode_rows(items[i], r0, r1, coder, buffers) for i, r0, r1 in job]

    # Items stored against a base are resolved (their coding chosen, a context-sorted delta sorted)
    # on a helper thread, a few items ahead, so that this serial work overlaps the encoding of the
    # items before them; at most PREFETCH_BYTES of items are resolved ahead of the encoder.
    pending = [i for i, it in enumerate(items) if it.delta_op == "pending" and it.nbytes]
    pending_set = set(pending)
    helper = ThreadPoolExecutor(1, thread_name_prefix="mithril-plan") if pending and threads > 1 else None
    ahead: dict[int, object] = {}
    cursor = [0]                     # next position in ``pending`` to hand to the helper

    streams = BufferPool()           # sorted streams of context-sorted deltas: recycled (fresh pages are slow)

    def resolve_one(i):
        items[i].ctx_threads, items[i].stream_pool = max(1, threads - 1), streams
        items[i].resolve()

    def prefetch(cur: int) -> None:
        later = [j for j in ahead if j > cur]
        nbytes, count = sum(items[j].nbytes for j in later), len(later)
        while cursor[0] < len(pending):
            j = pending[cursor[0]]
            if j > cur and (nbytes >= PREFETCH_BYTES or count >= PREFETCH_ITEMS):
                break
            ahead[j] = helper.submit(resolve_one, j)
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
            items[i].ctx_threads, items[i].stream_pool = threads, streams
            items[i].resolve()

    def consume(job, results):
        for (i, r0, r1), (digs, coded, held, nnzs) in zip(job, results):
            digests[i].extend(digs)
            items[i].nnz.extend(nnzs)
            for codec, payload in coded:
                chunks[i].extend((write(payload), len(payload), codec))
            buffers.put(held)
            if progress:
                rb = sizes[i][1]
                progress(min(r1 * rb, items[i].nbytes) - r0 * rb)
            if last_seg[i][1] == r1:     # drop references held only for this item
                if items[i].ctx_stream is not None:
                    streams.put([items[i].ctx_stream])
                items[i].data = items[i].base = items[i].ctx_stream = items[i].stream_pool = None
                if items[i].on_done is not None:
                    items[i].on_done()

    try:
        _run_ordered(jobs, run, consume, threads, before_submit)
    finally:
        if helper is not None:
            helper.shutdown(wait=True, cancel_futures=True)
    return [(checksum.combine(d), c, d) for d, c in zip(digests, chunks)]


# ---------------------------------------------------------------- decoding

def _decode_rows(buf, e: TensorEntry, out: np.ndarray, base: np.ndarray | None, row0: int, row1: int,
                 verify: bool, origin: int = 0) -> list[int]:
    """Decode rows [row0, row1) of ``e``; ``out`` (and ``base``) hold the tensor's bytes from byte
    ``origin`` on (0: the whole tensor). Returns the rows' digests when ``verify``."""
    dt, isz = e.dtype, e.dtype.itemsize
    rb = e.chunk_elems * isz
    op = e.delta["op"] if e.delta else None
    digests = []
    for r in range(row0, row1):
        a, b = r * rb - origin, min((r + 1) * rb, e.nbytes) - origin
        planes = []
        for p, usize in enumerate(e.plane_sizes(r)):
            off, csize, codec = e.chunk(r, p)
            planes.append(codecs.decode(codec, buf[off:off + csize], usize, scratch(f"d{p}", usize)))
        target = out[a:b] if op is None else scratch("delta", b - a)
        if e.transform == "raw":
            target[...] = np.frombuffer(planes[0], np.uint8)
        elif e.transform == "masked":
            merge_masked(dt, planes, target)
        else:
            merge_planes(dt, e.transform, planes, target)
        if op is not None:
            delta_apply(op, dt, target, base[a:b], out[a:b], inverse=True)
        if verify:
            digests.append(checksum.row_digest(out[a:b]))
    return digests


def _decode_units(buf, e: TensorEntry, stream: np.ndarray, bounds: np.ndarray, u0: int, u1: int) -> list[int]:
    """Decode segments [u0, u1) of a context-sorted delta into its sorted stream (no digests:
    rows are checked once the stream is unsorted)."""
    dt = e.dtype
    for u in range(u0, u1):
        planes = []
        for p, usize in enumerate(e.plane_sizes(u)):
            off, csize, codec = e.chunk(u, p)
            planes.append(codecs.decode(codec, buf[off:off + csize], usize, scratch(f"d{p}", usize)))
        target = stream[int(bounds[u]):int(bounds[u + 1])]
        if e.transform == "raw":
            target[...] = np.frombuffer(planes[0], np.uint8)
        elif e.transform == "masked":
            merge_masked(dt, planes, target)
        else:
            merge_planes(dt, e.transform, planes, target)
    return []


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
            sizes.append((e.units, e.chunk_elems * isz))
        else:
            sizes.append((e.rows, e.chunk_elems * e.dtype.itemsize))
    digests: list[list[int]] = [[] for _ in work]

    def stream(w):
        with lock:
            if w not in streams:
                streams[w] = pool.get(work[w][0].nbytes)
            return streams[w]

    def unsort(w):                     # rebuild the tensor from its sorted stream and its base, then hash it
        e, out, base = work[w]         # (on this thread, while the pool decodes the next entries' chunks:
        with lock:                     # measured faster than splitting the unsort across threads too)
            t = streams.pop(w)
        ctx_apply(e.delta["op"], e.dtype, t, base, out, e.ctx[0], e.ctx[1], inverse=True)
        pool.put([t])
        if verify:
            whole_digest[w] = checksum.tensor_checksum(out, e.chunk_elems * e.dtype.itemsize)

    def run(job):
        return [_decode_units(buf, work[w][0], stream(w), bounds_of[w], r0, r1) if w in bounds_of
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
