"""Choosing, per tensor, how to store it against a base checkpoint (FORMAT.md "Deltas").

* same name, dtype and shape, identical bytes   -> "same": a reference, no payload
* otherwise, of no delta / xor / zigzag, each with the plain (bytegroup) or masked layout, and
  (float dtypes) zigzag sorted by the base element's exponent ("ctxdelta", ctxdelta.py) with
  either layout, the one whose planes have the smallest estimated size (order-0 entropy of the
  planes of a sample of the tensor; for the sorted form, of each segment's planes), decided when
  the tensor's bytes are first needed, so a base is decoded once.
"""
from __future__ import annotations

import numpy as np

import math

from . import checksum, codecs, ctxdelta, transforms
from .cpu import EncodeItem, ctx_apply, delta_apply, split_masked, split_planes

try:
    from ._accel import entropy as _accel_entropy
except ImportError:
    _accel_entropy = None
try:
    from ._accel import coded_estimate as _coded_estimate
except ImportError:
    _coded_estimate = None
try:
    from ._accel import unit_hist as _unit_hist
except ImportError:
    _unit_hist = None

SAMPLE_BLOCKS = 16
BLOCK_ELEMS = 4096


# Estimated bytes a chunk costs beyond its planes' entropy (zstd frame, block and literals headers,
# a Huffman table), and the sampling bias of a histogram of few elements (Miller-Madow), so that
# cutting a sample into many small segments does not look better than it is.
CHUNK_OVERHEAD = 24


def _plane_cost(p: np.ndarray) -> float:
    """Estimated coded bytes of one plane (a chunk that would not shrink is stored)."""
    if p.size == 0:
        return 0.0
    counts = np.bincount(p, minlength=256)
    k = int((counts > 0).sum())
    c = counts[counts > 0]
    # a Huffman code spends at least one bit per symbol (zero-heavy planes are where that shows)
    bits = float((c * np.maximum(1.0, -np.log2(c / p.size))).sum()) + (k - 1) / (2 * math.log(2))
    return min(float(p.size), bits / 8 + CHUNK_OVERHEAD + k / 4)


def _ctx_estimates(item: EncodeItem, op: str, transforms_: tuple, x: np.ndarray, b: np.ndarray,
                   total_elems: int) -> dict:
    """Estimated coded bytes of sample ``x`` as a context-sorted delta, per segment transform, with
    segments cut as the writer cuts them (at the sample's scale)."""
    dt = item.dtype
    s, w = ctxdelta.default_ctx(dt)
    t = np.empty_like(x)
    cnt = np.zeros(1 << w, np.uint64)
    ctx_apply(op, dt, x, b, t, s, w, inverse=False, counts=cnt)
    n = x.size // dt.itemsize
    frac = n / max(total_elems, 1)
    segs = [m for row in ctxdelta.segments(cnt, 1 << 62, max(1, int(ctxdelta.MIN_SEG * frac))) for m in row]
    return {tr: _units_cost(dt, tr, t, segs, frac) for tr in transforms_}


def _rows_cost(hist: np.ndarray) -> np.ndarray:
    """Estimated coded bytes of each row of byte histograms ``hist`` (units x 256), as
    :func:`_plane_cost` computes for one plane: Huffman bits (at least one per symbol) plus
    sampling bias and chunk overhead, never more than stored."""
    n = hist.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = hist / np.maximum(n, 1)[:, None]
        bits = np.where(hist > 0, hist * np.maximum(1.0, -np.log2(np.where(hist > 0, p, 1.0))), 0.0).sum(axis=1)
    k = (hist > 0).sum(axis=1)
    cost = bits / 8 + (np.maximum(k, 1) - 1) / (16 * math.log(2)) + CHUNK_OVERHEAD + k / 4
    return np.where(n > 0, np.minimum(n, cost), 0.0)


def _units_cost(dt, transform: str, src: np.ndarray, units: list[int], frac: float) -> float:
    """Estimated coded bytes of ``src`` (a sample) cut into ``units`` of elements, each coded with
    ``transform`` as a row is. Per-chunk overheads count at the sample's scale (``frac``: the
    sample's share of the tensor), since the real tensor has as many chunks but 1/frac the bytes."""
    isz = dt.itemsize
    nunits = len(units)
    if transform == "fieldsplit" or nunits == 0:
        total, pos = 0.0, 0
        for m in units:
            seg = src[pos:pos + m * isz]
            pos += m * isz
            planes = [np.empty(m * wd, np.uint8) for wd in transforms.plane_widths(dt, transform)]
            transforms.split(dt, transform, seg, planes)
            total += sum(_plane_cost(p) for p in planes)
        return total
    n = src.size // isz
    over = (1 - frac) * CHUNK_OVERHEAD
    sizes = np.asarray(units, dtype=np.float64)
    if _unit_hist is not None:          # the same histograms, in one pass in C
        hist = np.empty((nunits, isz, 256), np.uint64)
        nnz_c = np.empty(nunits, np.int64)
        _unit_hist(src, isz, np.asarray(units, np.int64), int(transform == "masked"), hist, nnz_c)
        hist = hist.astype(np.int64)
        stored = sizes if transform != "masked" else nnz_c.astype(np.float64)
        total = _bitmap_cost(sizes, stored, over) if transform == "masked" else 0.0
        adj = np.where(stored > 0, np.minimum(stored, over), 0.0)
        return total + sum(float((_rows_cost(np.ascontiguousarray(hist[:, j, :])) - adj).sum()) for j in range(isz))
    uid = np.repeat(np.arange(nunits, dtype=np.int64), units)
    by = src.reshape(n, isz)

    def cost(ids, cols, stored):
        h = np.bincount(ids * 256 + cols, minlength=nunits * 256).reshape(nunits, 256)
        c = _rows_cost(h)
        return float((c - np.where(stored > 0, np.minimum(stored, over), 0.0)).sum())

    if transform != "masked":
        return sum(cost(uid, by[:, j], sizes) for j in range(isz))
    nz = src.view(transforms._UINT[isz]) != 0
    nnz = np.bincount(uid[nz], minlength=nunits).astype(np.float64)
    total = _bitmap_cost(sizes, nnz, over)
    ids, nzb = uid[nz], by[nz]
    return total + sum(cost(ids, nzb[:, j], nnz) for j in range(isz))


def _bitmap_cost(sizes: np.ndarray, nnz: np.ndarray, over: float) -> float:
    """Estimated bytes of the masked layout's bitmaps of units of ``sizes`` elements, ``nnz``
    nonzero: at the binary entropy of the unit's nonzero share, one bit a byte at least."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sizes > 0, nnz / sizes, 0.0)
        hb = np.where((q > 0) & (q < 1), -(q * np.log2(q) + (1 - q) * np.log2(1 - q)), 0.0)
    mbytes = np.ceil(sizes / 8)
    return float((np.minimum(mbytes, np.maximum(sizes * hb, mbytes) / 8 + CHUNK_OVERHEAD) - np.minimum(mbytes, over)).sum())


def _entropy_bytes(plane: np.ndarray) -> float:
    """Order-0 entropy of a whole plane, in bytes."""
    if _accel_entropy is not None:
        return _accel_entropy(plane, 1) * plane.size / 8
    counts = np.bincount(plane, minlength=256)
    p = counts[counts > 0] / plane.size
    return float(-(p * np.log2(p)).sum()) * plane.size / 8


def _sample_starts(n: int) -> np.ndarray:
    """First elements of the sample's blocks of a tensor of ``n`` elements (more than
    SAMPLE_BLOCKS * BLOCK_ELEMS: smaller tensors are their own sample)."""
    return np.linspace(0, n - BLOCK_ELEMS, SAMPLE_BLOCKS).astype(np.int64)


def _sample(x: np.ndarray, itemsize: int) -> np.ndarray:
    n = x.size // itemsize
    if n <= SAMPLE_BLOCKS * BLOCK_ELEMS:
        return x
    return np.concatenate([x[s * itemsize:(s + BLOCK_ELEMS) * itemsize] for s in _sample_starts(n)])


class _DiskBase:
    """A base tensor read from ``base_file``, for the choice and then the delta: :meth:`sample` is
    the sample :func:`_sample` takes, decoded from only the rows that hold it (each checked against
    its row digest), and :meth:`whole` the whole tensor, decoding only the rows the sample did not.
    The sample is None where reading it by rows is not much cheaper than decoding the whole tensor:
    a small tensor, a sample that touches more than half its rows, or an entry whose rows cannot be
    decoded on their own (a delta, whose base would be decoded too; a context-sorted delta; a file
    without row digests)."""

    def __init__(self, base_file, be):
        self.file, self.entry, self.out, self.rows = base_file, be, None, ()

    def sample(self):
        f, be = self.file, self.entry
        n, ce = be.count, be.chunk_elems
        if n <= SAMPLE_BLOCKS * BLOCK_ELEMS or not f.rows_alone(be):
            return None
        starts = _sample_starts(n)
        rows = sorted({int(r) for s in starts for r in range(s // ce, (s + BLOCK_ELEMS - 1) // ce + 1)})
        if 2 * len(rows) > be.rows:
            return None
        out = np.empty(be.nbytes, np.uint8)
        for r0, r1 in _runs(rows):
            f.decode_rows_into(be, out, r0, r1)
        self.out, self.rows = out, rows
        isz = be.dtype.itemsize
        return np.concatenate([out[s * isz:(s + BLOCK_ELEMS) * isz] for s in starts])

    def whole(self) -> np.ndarray:
        if self.out is None:
            return self.file.get_bytes(self.entry.name)
        done = set(self.rows)
        for r0, r1 in _runs([r for r in range(self.entry.rows) if r not in done]):
            self.file.decode_rows_into(self.entry, self.out, r0, r1)
        out, self.out = self.out, None
        return out


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """[r0, r1) ranges of consecutive rows of sorted ``rows``."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [(a, b) for a, b in runs]


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


# A delta must be estimated this much smaller than the tensor stored on its own, or the tensor is
# stored on its own. A delta tensor costs its base's decode on every load and keeps the base
# needed; one that saves a few percent (an AdamW first moment, which every step changes
# throughout: 2-4% on a real run) is not worth that. 0 takes any estimated gain.
DELTA_MIN_GAIN = 0.05


def choose(item: EncodeItem, x: np.ndarray, b: np.ndarray, *, sampled: bool = False) -> tuple[str | None, str]:
    """(delta op or None, transform) with the smallest estimated size on a sample of ``x`` and
    ``b`` (``sampled``: they are that sample already)."""
    isz = item.dtype.itemsize
    xs, bs = (x, b) if sampled else (_sample(x, isz), _sample(b, isz))
    costs = {c: estimate(item, c[0], c[1], xs, bs) for c in candidates(item.dtype)}
    alone = next(c for c in costs if c[0] is None)
    # ties go to no delta (no base needed to decode), then to the simpler layout
    best = min(costs, key=lambda c: (round(costs[c], 3), c[0] is not None, c[1] == "masked"))
    if best[0] is not None and costs[best] > (1 - DELTA_MIN_GAIN) * costs[alone]:
        return alone
    return best


def choose_ctx(item: EncodeItem, x: np.ndarray, b: np.ndarray, chosen: tuple | None = None) -> tuple[str | None, str, tuple | None]:
    """(op, transform, ctx): :func:`choose` (or ``chosen``, its result already at hand), then, for
    floats, whether sorting the zigzag deltas by the base's exponent pays. Both forms are
    estimated on the same sample with the same chunk cost model (planes' entropy, per-chunk
    overhead), so a tensor is sorted only when its sorted segments are estimated smaller than its
    rows; otherwise today's choice stands. A tensor that :func:`choose` stores on its own (its
    plain delta gains less than ``DELTA_MIN_GAIN``) is still sorted where the sorted form gains
    that much against the tensor on its own (:func:`_sorted_alone`): the gate applies to the best
    of both forms."""
    op, transform = chosen if chosen is not None else choose(item, x, b)
    dt = item.dtype
    if ctxdelta.default_ctx(dt) is None or item.nbytes == 0:
        return op, transform, None
    isz = dt.itemsize
    plain = "raw" if isz == 1 else "bytegroup"
    if op is None:
        return _sorted_alone(item, transform, x, b)
    if item.nbytes <= TRIAL_BYTES:           # small: both ways' coded sizes (the entropy model is rough there)
        return _trial(item, op, transform, plain, x, b)
    xs, bs, rows, frac, est = _sampled_sort(item, x, b, plain)
    d = np.empty_like(xs)
    delta_apply(op, dt, xs, bs, d, inverse=False)
    today = _units_cost(dt, transform, d, rows, frac)
    tr = min(est, key=est.get)
    if est[tr] < 0.98 * today:
        return "zigzag", tr, ctxdelta.default_ctx(dt)
    return op, transform, None


def _sampled_sort(item: EncodeItem, x: np.ndarray, b: np.ndarray, plain: str):
    """The sample of ``x`` and ``b`` (either may be that sample already), its rows (the sample cut
    as the tensor's rows are, at the sample's scale), the sample's share of the tensor, and the
    estimated sizes of its context-sorted zigzag delta, masked and ``plain``."""
    isz = item.dtype.itemsize
    xs, bs = _sample(x, isz), _sample(b, isz)
    n, total = xs.size // isz, item.nbytes // isz
    frac = n / total
    nrows = max(1, -(-n // max(1, int(item.chunk_elems * frac))))
    per = -(-n // nrows)
    rows = [min(per, n - k * per) for k in range(nrows) if n - k * per > 0]
    return xs, bs, rows, frac, _ctx_estimates(item, "zigzag", ("masked", plain), xs, bs, total)


def _sorted_alone(item: EncodeItem, transform: str, x: np.ndarray, b: np.ndarray):
    """For a float tensor whose plain delta does not gain ``DELTA_MIN_GAIN``: the context-sorted
    zigzag delta, masked or plain, where it is estimated that much smaller than the tensor stored
    on its own with ``transform``, else the tensor on its own. Small tensors compare coded sizes
    (as :func:`_trial`), larger ones the entropy model on the sample, which is all a large tensor
    needs: ``x`` and ``b`` may be that sample already."""
    dt, isz = item.dtype, item.dtype.itemsize
    plain = "raw" if isz == 1 else "bytegroup"
    s, w = ctxdelta.default_ctx(dt)
    alone = (None, transform, None)
    if DELTA_MIN_GAIN <= 0:
        return alone                      # choose took any gain: its "no delta" stands
    if item.nbytes <= TRIAL_BYTES:
        own = _coded_size(dt, transform, x, _rows_of(item))
        sizes = _sorted_coded(item, x, b, plain)
    else:
        xs, _, rows, frac, sizes = _sampled_sort(item, x, b, plain)
        own = _units_cost(dt, transform, xs, rows, frac)
    tr = min(sizes, key=sizes.get)
    if sizes[tr] <= (1 - DELTA_MIN_GAIN) * own:
        return "zigzag", tr, (s, w)
    return alone


TRIAL_BYTES = 256 << 10      # tensors up to this size choose by the coded sizes of both ways (_trial), not the entropy model
_trial_coder = codecs.ChunkCoder(None)


def _coded_size(dt, transform: str, src: np.ndarray, units) -> int:
    """Bytes of ``src`` cut into ``units`` of elements, each coded as a row with ``transform``
    by mithril's default coder: estimated from each plane's histogram by the C helper (the
    writer's gate, Huffman and ``ans`` costs: ``_accel.coded_estimate``), or, without the
    helper, coded for real."""
    planes, pos, isz = [], 0, dt.itemsize
    for m in units:
        seg = src[pos:pos + m * isz]
        pos += m * isz
        if transform == "masked":
            ps = split_masked(dt, seg)[1]
        elif transform == "raw":
            ps = [seg]
        else:
            ps = [np.empty(m * wd, np.uint8) for wd in transforms.plane_widths(dt, transform)]
            split_planes(dt, transform, seg, ps)
        planes.extend(np.ascontiguousarray(p) for p in ps if p.size)
    if _estimating():
        return _coded_estimate(planes, codecs.STORE_ENTROPY_BITS, codecs._SAMPLE)
    return sum(len(_trial_coder.encode(p, use_ans=True)[1]) for p in planes)


def _estimating() -> bool:
    return _coded_estimate is not None and codecs.ans_enabled()


TRIAL_MARGIN, TRIAL_SLACK = 0.01, 64      # what the estimated context sort must gain: a share, and bytes


def _trial(item: EncodeItem, op: str, transform: str, plain: str, x: np.ndarray, b: np.ndarray):
    """Today's coding (``op``, ``transform``, rows) against the context-sorted zigzag delta, masked
    or ``plain``, by coded size: estimated by the C helper, where the sort must gain more than
    ``TRIAL_MARGIN`` of today's size and ``TRIAL_SLACK`` bytes (the estimate misses by a few
    percent on planes of a few hundred bytes, and does not see zstd's matches; a sorted tensor
    costs more to write and to read); coded for real without the helper."""
    dt = item.dtype
    d = np.empty_like(x)
    delta_apply(op, dt, x, b, d, inverse=False)
    today = _coded_size(dt, transform, d, _rows_of(item))
    sizes = _sorted_coded(item, x, b, plain)
    tr = min(sizes, key=sizes.get)
    need = max(TRIAL_MARGIN * today, TRIAL_SLACK) if _estimating() else 0
    if sizes[tr] < today - need:
        return "zigzag", tr, ctxdelta.default_ctx(dt)
    return op, transform, None


def _rows_of(item: EncodeItem) -> list[int]:
    """Elements of each row of ``item`` (the units a tensor that is not sorted is coded in)."""
    n, ce = item.nbytes // item.dtype.itemsize, item.chunk_elems
    return [min(ce, n - r) for r in range(0, n, ce)]


def _sorted_coded(item: EncodeItem, x: np.ndarray, b: np.ndarray, plain: str) -> dict:
    """Coded sizes (:func:`_coded_size`) of the context-sorted zigzag delta of ``x`` against
    ``b``, masked and ``plain``, in the segments a writer cuts it into."""
    dt = item.dtype
    s, w = ctxdelta.default_ctx(dt)
    t, cnt = np.empty_like(x), np.zeros(1 << w, np.uint64)
    ctx_apply("zigzag", dt, x, b, t, s, w, inverse=False, counts=cnt)
    segs = [m for row in ctxdelta.segments(cnt, item.chunk_elems) for m in row]
    return {tr: _coded_size(dt, tr, t, segs) for tr in ("masked", plain)}


class _Planned:
    """Defers the op choice to when an item's bytes and its base's bytes are first fetched.
    ``choices`` ((name, dtype name, shape) -> (op, transform, ctx)), when given, is consulted first and records what
    is chosen: the Checkpointer keeps it between the saves of a chain, so that a tensor's coding
    is chosen once per few saves, not at every one."""

    def __init__(self, item: EncodeItem, fetch_data, fetch_base, choices: dict | None = None,
                 fetch_base_sample=None):
        self.item, self.fetch_data, self.fetch_base, self.choices = item, fetch_data, fetch_base, choices
        self.fetch_base_sample = fetch_base_sample

    def data(self):
        x = self.fetch_data() if callable(self.fetch_data) else self.fetch_data
        # a choice holds for the same name, dtype and shape only (a tensor of the same name may
        # change dtype between saves: bf16 one time, fp32 the next)
        key = (self.item.name, self.item.dtype.name, tuple(self.item.shape))
        hit = self.choices.get(key) if self.choices is not None else None
        pre = None
        if hit is None and self.fetch_base_sample is not None:
            # a base read from disk: choose from its sample first, so that a tensor stored on its
            # own never has its base decoded whole
            bs = self.fetch_base_sample()
            if bs is not None:
                it = self.item
                xs = _sample(x, it.dtype.itemsize)
                pre = choose(it, xs, bs, sampled=True)
                if pre[0] is None:
                    # the plain delta does not pay; a large tensor's sorted form is judged on
                    # the sample too, so the base is decoded whole only for a tensor that pays
                    hit = (None, pre[1], None)
                    if ctxdelta.default_ctx(it.dtype) is not None:
                        # large: the sample is all choose_ctx reads (the same bytes as the whole
                        # base's sample); small: it judges the tensor on the whole base
                        hit = choose_ctx(it, xs, bs, pre) if it.nbytes > TRIAL_BYTES else None
        if hit is not None and hit[0] is None:          # no delta: the base is not needed
            op, transform, ctx = hit
            b = None
        else:
            b = self.fetch_base()
            if hit is not None:
                op, transform, ctx = hit
            else:
                op, transform, ctx = choose_ctx(self.item, x, b, pre) if pre is not None else choose_ctx(self.item, x, b)
        if self.choices is not None:
            self.choices[key] = (op, transform, ctx)
        it = self.item
        it.transform = transform
        if op is None:
            it.delta_op, it.base, it.base_name = None, None, None
        else:
            it.delta_op, it.base, it.ctx = op, b, ctx
        return x


SAME_PROBE_BYTES = 4096


def plan_deltas(items: list[EncodeItem], base_file, base_tensors: dict | None = None,
                choices: dict | None = None, keep: dict | None = None) -> dict[int, tuple[str, int]]:
    """Mark items that can be stored against ``base_file``; return, for the items identical to a
    base tensor ("same"), {item position: (base name, checksum)}.

    ``base_tensors`` (name -> CPU uint8 bytes or callable) spares decoding the base from disk.
    ``choices``: earlier choices to reuse, and where new ones are recorded (see :class:`_Planned`).
    ``keep`` (name -> writable uint8 array): the memory of ``base_tensors``, the caller's copy, to
    become a copy of what is written: an item whose base is such bytes gets its array as ``keep``
    (its sort may write the coded bytes there).
    """
    same = {}
    for i, it in enumerate(items):
        if it.name not in base_file:
            continue
        be = base_file.entry(it.name)
        if be.dtype != it.dtype or be.shape != tuple(it.shape) or it.nbytes == 0:
            continue
        it.resolve()
        src = (base_tensors or {}).get(it.name)
        # the same bytes as the base ("same")? With the base's bytes at hand, a differing first
        # few KB says no at once (a trained tensor differs there), without hashing the whole tensor
        head = min(it.nbytes, SAME_PROBE_BYTES)
        if src is None or callable(src) or np.array_equal(it.data[:head], src[:head]):
            digest = checksum.tensor_checksum(it.data, be.chunk_elems * be.dtype.itemsize)
            if digest == be.checksum:
                same[i] = (it.name, digest)
                it.chunk_elems = be.chunk_elems
                continue
        fetch_sample = None
        if src is not None:
            fetch_base = src if callable(src) else (lambda s=src: s)
        else:
            disk = _DiskBase(base_file, be)
            fetch_base, fetch_sample = disk.whole, disk.sample
        planned = _Planned(it, it.data, fetch_base, choices, fetch_sample)
        it.delta_op, it.base_name, it.base = "pending", it.name, None
        it.keep = (keep or {}).get(it.name) if src is not None and not callable(src) else None
        it.data = planned.data
    return same
