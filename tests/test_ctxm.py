"""Masked context-sorted deltas without the sorted stream. Writing (``_accel.ctxm`` and
``encode_units`` kind 4): files byte-identical to sorting the stream and masked-splitting it (the
reference path, ``cpu.CTXM = False``); reading (``decode_units`` kind 4 and ``_accel.ctxm_inverse``):
the same tensors as through the stream. For every dtype, odd sizes, sparse and dense changes, tiny
and huge segments, parallel parts, the AVX-512 moves and the scalar ones; and bad tables refused."""
import threading

import numpy as np
import pytest
import torch

import mithril_gpu
from conftest import ALL_DTYPES, assert_tree_same, ctx_for, random_tensor
from mithril_gpu import cpu, ctxdelta, deltaplan, dtypes

pytestmark = pytest.mark.skipif(cpu._accel is None or not hasattr(cpu._accel, "ctxm") or not cpu.fused(),
                                reason="C helper or the fused path not available")
SIMD = [0] + ([1] if cpu._accel is not None and hasattr(cpu._accel, "ctxm_simd") and cpu._accel.ctxm_simd(1) else [])


@pytest.fixture(autouse=True)
def _restore_simd():
    yield
    cpu._accel.ctxm_simd(1)


def _changed(t, seed, frac):
    g = torch.Generator().manual_seed(seed)
    x = mithril_gpu.api.tensor_bytes(t).copy()
    u = x.view(f"<u{t.element_size()}")
    rng = np.random.default_rng(seed)
    u ^= ((rng.random(u.size) < frac) * rng.integers(1, 4, u.size)).astype(u.dtype)
    if t.dtype == torch.bool:
        u &= 1
    return torch.from_numpy(x).view(t.dtype).reshape(t.shape)


def _both_ways(tmp_path, monkeypatch, a, b, chunk_elems, threads=2, simd=1, op="zigzag"):
    monkeypatch.setattr(deltaplan, "choose_ctx", lambda item, x, bb: (op, "masked", ctx_for(item.dtype)))
    monkeypatch.setattr(deltaplan._DiskBase, "sample", lambda self: None)   # choose_ctx decides alone
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=chunk_elems)
    cpu._accel.ctxm_simd(simd)
    out = []
    for flag in (False, True):
        monkeypatch.setattr(cpu, "CTXM", flag)
        p = tmp_path / f"b{int(flag)}.mth"
        mithril_gpu.save(b, p, chunk_elems=chunk_elems, base=tmp_path / "a.mth", threads=threads)
        out.append(p.read_bytes())
    assert out[0] == out[1]
    calls = []
    real = cpu._accel.ctxm_inverse
    monkeypatch.setattr(cpu._accel, "ctxm_inverse", lambda *a: calls.append(1) or real(*a), raising=False)
    for flag in (False, True):            # read back both ways: through the sorted stream, and through ctxm's tables
        monkeypatch.setattr(cpu, "CTXM", flag)
        assert_tree_same(mithril_gpu.load(tmp_path / "b1.mth", threads=threads), b)
    assert calls                          # (the tables' way was taken)
    return out[1]


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_same_bytes_as_the_sorted_stream(tmp_path, monkeypatch, dtype, simd):
    a = {"t": random_tensor(dtype, (5003,), seed=1), "odd": random_tensor(dtype, (7, 13), seed=2),
         "one": random_tensor(dtype, (1,), seed=3)}
    b = {"t": _changed(a["t"], 5, 0.3), "odd": _changed(a["odd"], 6, 0.9), "one": _changed(a["one"], 7, 1.0)}
    _both_ways(tmp_path, monkeypatch, a, b, chunk_elems=256, simd=simd)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("frac,chunk", [(0.0005, 64), (0.05, 1000), (0.5, 4096), (1.0, 333), (0.02, 1 << 20)])
def test_bf16_and_fp32_sparse_to_dense(tmp_path, monkeypatch, frac, chunk, simd):
    rng = np.random.default_rng(11)
    w = torch.from_numpy((rng.standard_normal(300_017) * 0.02).astype(np.float32))
    a = {"bf": w.to(torch.bfloat16), "f32": w[:100_003].clone(), "f16": w[:77_777].to(torch.float16)}
    b = {k: _changed(v, 3, frac) for k, v in a.items()}
    _both_ways(tmp_path, monkeypatch, a, b, chunk_elems=chunk, simd=simd)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_parallel_parts(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(cpu, "CTX_PARALLEL_BYTES", 4096)
    rng = np.random.default_rng(threads)
    w = torch.from_numpy((rng.standard_normal(100_003) * 0.02).astype(np.float32)).to(torch.bfloat16)
    a = {"w": w}
    b = {"w": _changed(w, 9, 0.1)}
    for simd in SIMD:
        _both_ways(tmp_path, monkeypatch, a, b, chunk_elems=4000, threads=threads, simd=simd)


def test_xor_op(tmp_path, monkeypatch):
    a = {"w": random_tensor(torch.bfloat16, (20_000,), seed=4)}
    _both_ways(tmp_path, monkeypatch, a, {"w": _changed(a["w"], 1, 0.2)}, chunk_elems=3000, op="xor")


def _tables(n=10_000, w=8):
    dt = dtypes.from_name("BF16")
    rng = np.random.default_rng(0)
    x = ((rng.standard_normal(n) * 0.02).astype(np.float32).view("<u4") >> 16).astype("<u2").view(np.uint8)
    b = x.copy()
    b[::7] ^= 1
    return dt, x, b


def test_the_tables_agree_with_the_sorted_stream():
    dt, x, b = _tables()
    bitmap, vals, cum, blocks, total, _ = cpu.ctxm_prepare("zigzag", dt, x, b, 7, 8, threads=3)
    ref = ctxdelta.encode("zigzag", dt, x, b, 7, 8).view("<u2")
    assert (total == ctxdelta.counts(dt, b, 7, 8)).all()
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:ref.size]
    assert (bits == (ref != 0)).all()
    assert int(cum[-1]) == int((ref != 0).sum())


@pytest.mark.parametrize("name", ["U8", "BF16", "F32", "F64"])
@pytest.mark.parametrize("threads", [1, 3])
def test_keep_gets_the_bytes_moved_even_over_the_base(monkeypatch, name, threads):
    # ctxm's and ctx's keep (the Checkpointer's copy of the base): the same tables (or stream) with
    # or without it, and keep ends up holding x, also when keep is the base itself (each block
    # written once its base elements are read)
    monkeypatch.setattr(cpu, "CTX_PARALLEL_BYTES", 4096)
    dt = dtypes.from_name(name)
    rng = np.random.default_rng(3)
    n = 30_011
    b = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    if dt.itemsize > 1:                       # a few contexts, as weights have
        b.view(f"<u{dt.itemsize}")[:] &= np.array((1 << 8 * dt.itemsize) - 1 - (0b1111 << (8 * dt.itemsize - 5)),
                                                  f"<u{dt.itemsize}")
    x = b.copy()
    x[rng.random(x.size) < 0.1] ^= 3
    s, w = ctx_for(dt) if dt.itemsize > 1 else (4, 4)
    for simd in SIMD:
        cpu._accel.ctxm_simd(simd)
        ref = cpu.ctxm_prepare("zigzag", dt, x, b, s, w, threads=threads, row_bytes=1024 * dt.itemsize)
        sep = np.zeros_like(x)
        got = cpu.ctxm_prepare("zigzag", dt, x, b, s, w, threads=threads, row_bytes=1024 * dt.itemsize, keep=sep)
        assert (sep == x).all()
        over = b.copy()
        got2 = cpu.ctxm_prepare("zigzag", dt, x, over, s, w, threads=threads, row_bytes=1024 * dt.itemsize, keep=over)
        assert (over == x).all()
        nw = n // 64 + 1
        for g in (got, got2):
            assert (g[0][:nw] == ref[0][:nw]).all() and (g[2] == ref[2]).all() and (g[3] == ref[3]).all()
            assert (g[4] == ref[4]).all() and (g[5] == ref[5]).all()
            k = int(ref[2][-1])
            assert k and g[2][-1] == k
    with pytest.raises(ValueError, match="bad arguments"):                  # keep of another length
        cpu.ctxm_prepare("zigzag", dt, x, b, s, w, keep=np.zeros(x.size - dt.itemsize, np.uint8))
    # the sorted stream's sort (_accel.ctx, bytegroup and raw deltas) likewise
    for simd in SIMD:
        cpu._accel.ctxm_simd(simd)
        ref, cnt = np.empty_like(x), np.zeros(1 << w, np.uint64)
        dref = cpu.ctx_apply("zigzag", dt, x, b, ref, s, w, False, cnt, threads, 1024 * dt.itemsize)
        over = b.copy()
        for keep, base in ((np.zeros_like(x), b), (over, over)):        # apart, and over the base
            out, cnt2 = np.empty_like(x), np.zeros(1 << w, np.uint64)
            d = cpu.ctx_apply("zigzag", dt, x, base, out, s, w, False, cnt2, threads, 1024 * dt.itemsize, keep=keep)
            assert (keep == x).all() and (out == ref).all() and (cnt2 == cnt).all() and (d == dref).all()
    with pytest.raises(ValueError, match="bad arguments"):
        cpu.ctx_apply("zigzag", dt, x, b, np.empty_like(x), s, w, False, keep=np.zeros(x.size - dt.itemsize, np.uint8))


def test_counts_that_do_not_match_the_base_are_refused():
    dt, x, b = _tables()
    n = b.size // 2
    hist = np.zeros(256, np.uint64)
    cpu._accel.ctx_hist(b, 2, 7, 8, hist)
    offs = np.concatenate([[0], np.cumsum(hist)[:-1]]).astype(np.uint64)
    bitmap = np.zeros((n + cpu.CTXM_SLACK) // 64 + 2, np.uint64)
    vals = np.empty((n + cpu.CTXM_SLACK) * 2, np.uint8)
    cpu._accel.ctxm(x, b, bitmap, vals, 2, 1, 1, 7, 8, n, offs, hist)        # as they are: fine
    for simd in SIMD:
        cpu._accel.ctxm_simd(simd)
        lie = hist.copy()                       # same total, one context short, another long
        big = np.argsort(hist)[-2:]
        lie[big[0]] += 5
        lie[big[1]] -= 5
        offs2 = np.concatenate([[0], np.cumsum(lie)[:-1]]).astype(np.uint64)
        bitmap[:] = 0
        with pytest.raises(ValueError, match="did the base change"):
            cpu._accel.ctxm(x, b, bitmap, vals, 2, 1, 1, 7, 8, n, offs2, lie)
    with pytest.raises(ValueError, match="bad arguments"):                  # counts that do not add up
        cpu._accel.ctxm(x, b, bitmap, vals, 2, 1, 1, 7, 8, n, offs, hist * 2)
    with pytest.raises(ValueError, match="bad arguments"):                  # buffers without the slack
        cpu._accel.ctxm(x, b, bitmap, vals[:n * 2], 2, 1, 1, 7, 8, n, offs, hist)


def test_bad_kind4_tables_are_refused():
    dt, x, b = _tables(1000)
    bitmap, vals, cum, blocks, total, _ = cpu.ctxm_prepare("zigzag", dt, x, b, 7, 8)
    n = b.size // 2

    def call(bounds, blk, wmap=bitmap):
        arena = np.empty(4 * n, np.uint8)
        rec = np.empty((3 * (len(bounds) - 1), 3), np.int64)
        return cpu._accel.encode_units(vals, np.array(bounds, np.int64), x, 2000, 0, 1, None, 2, 4, 0, 0, -1, 1, 0,
                                       7.5, 64, arena, rec, np.zeros(len(bounds), np.int64), np.empty(1, np.uint64),
                                       (wmap, cum, blk))
    call([0, 2 * n], blocks)                                                  # fine
    for blk in (blocks[::-1].copy(), np.concatenate([blocks[:-1], [n + cpu.CTXM_SLACK + 1]]).astype(np.uint64), blocks[1:].copy()):
        with pytest.raises(ValueError, match="sorted-stream tables"):
            call([0, 2 * n], blk)
    with pytest.raises(ValueError, match="sorted-stream tables"):
        call([0, 2 * n], blocks, bitmap[:2])
    with pytest.raises(ValueError, match="unit bounds"):                      # beyond the stream, into the slack
        call([0, 2 * n + 2], blocks)


def test_reading_falls_back_unit_by_unit_into_the_tables(tmp_path, monkeypatch):
    """A run the fused reader refuses is decoded unit by unit (the path that raises the errors),
    then put into the tables: the same tensor."""
    rng = np.random.default_rng(5)
    w = torch.from_numpy((rng.standard_normal(50_001) * 0.02).astype(np.float32)).to(torch.bfloat16)
    a, b = {"w": w}, {"w": _changed(w, 2, 0.2)}
    _both_ways(tmp_path, monkeypatch, a, b, chunk_elems=3000)

    def refuse(*args, **kw):
        raise cpu._Fallback
    monkeypatch.setattr(cpu, "_decode_fused", refuse)
    monkeypatch.setattr(cpu, "_decode_job_fused", refuse)
    assert_tree_same(mithril_gpu.load(tmp_path / "b1.mth"), b)


def test_inverse_rebuilds_the_tensor_and_refuses_counts_that_do_not_match(monkeypatch):
    monkeypatch.setattr(cpu, "CTX_PARALLEL_BYTES", 4096)          # (three parts)
    dt, x, b = _tables()
    n = b.size // 2
    stream = ctxdelta.encode("zigzag", dt, x, b, 7, 8)          # the reader's tables: the stream's one segment
    nnz, planes = cpu.split_masked(dt, stream)
    bitmap, vals, cum = cpu.ctxm_tables(dt, n)
    assert cpu._accel.decode_units(tuple(planes), np.array([0, 2 * n], np.int64), vals, None, 2, 4, 0, 0, -1, 1,
                                   np.array([nnz], np.int64), np.empty(0, np.uint64),
                                   (bitmap, np.zeros(1, np.int64))) == -1
    total = ctxdelta.counts(dt, b, 7, 8).astype(np.uint64)
    offs = np.concatenate([[0], np.cumsum(total)[:-1]]).astype(np.uint64)
    for simd in SIMD:
        cpu._accel.ctxm_simd(simd)
        out = np.zeros_like(x)
        cpu.ctxm_unsort("zigzag", dt, bitmap, vals, cum, b, out, 7, 8, threads=3)
        assert out.tobytes() == x.tobytes()
    out = np.empty_like(x)
    wrong = nnz - 1                                                # a bitmap that does not count nnz: the bad unit
    assert cpu._accel.decode_units(tuple(planes), np.array([0, 2 * n], np.int64), vals, None, 2, 4, 0, 0, -1, 1,
                                   np.array([wrong], np.int64), np.empty(0, np.uint64),
                                   (bitmap, np.zeros(1, np.int64))) == 0
    for simd in SIMD:
        cpu._accel.ctxm_simd(simd)
        lie = total.copy()
        big = np.argsort(total)[-2:]
        lie[big[0]] += 5
        lie[big[1]] -= 5
        offs2 = np.concatenate([[0], np.cumsum(lie)[:-1]]).astype(np.uint64)
        with pytest.raises(ValueError, match="did the base change"):
            cpu._accel.ctxm_inverse(b, out, bitmap, vals, cum, 2, 1, 1, 7, 8, n, offs2, lie)
    with pytest.raises(ValueError, match="bad arguments"):
        cpu._accel.ctxm_inverse(b, out, bitmap, vals[:n * 2], cum, 2, 1, 1, 7, 8, n, offs, total)


@pytest.mark.parametrize("frac", [0.01, 0.5, 1.0])
def test_one_dominant_context(tmp_path, monkeypatch, frac):
    """Almost every base element in one binade: whole groups of 64 of one context (the vector
    moves' full-word windows), a few elements of others among them."""
    rng = np.random.default_rng(3)
    v = (1 + rng.random(70_001)).astype(np.float32)
    v[rng.random(v.size) < 0.02] *= 64
    w = torch.from_numpy(v).to(torch.bfloat16)
    _both_ways(tmp_path, monkeypatch, {"w": w}, {"w": _changed(w, 4, frac)}, chunk_elems=5000)


@pytest.mark.parametrize("helper", [False, True])
def test_resolving_on_a_helper_thread_writes_the_same_bytes(tmp_path, monkeypatch, helper):
    """Delta items are chosen and sorted on a helper thread ahead of the coders when they are
    large (cpu.HELPER_MIN_BYTES), inline otherwise: the same file either way, threads or not."""
    rng = np.random.default_rng(8)
    a = {f"w{i}": torch.from_numpy((rng.standard_normal(20_000 + i) * 0.02).astype(np.float32)).to(torch.bfloat16)
         for i in range(6)}
    b = {k: _changed(v, 3, 0.1) for k, v in a.items()}
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    monkeypatch.setattr(cpu, "PREFETCH_ITEMS", 2)
    where = set()
    real = cpu.EncodeItem.resolve
    monkeypatch.setattr(cpu.EncodeItem, "resolve",
                        lambda self: where.add(threading.current_thread().name.split("_")[0]) or real(self))
    outs = []
    for threads, min_bytes in ((1, 1 << 62), (3, 0 if helper else 1 << 62)):
        monkeypatch.setattr(cpu, "HELPER_MIN_BYTES", min_bytes)
        p = tmp_path / f"b{threads}.mth"
        mithril_gpu.save(b, p, chunk_elems=4096, base=tmp_path / "a.mth", threads=threads)
        outs.append(p.read_bytes())
    assert outs[0] == outs[1]
    assert ("mithril-plan" in where) == helper
    assert_tree_same(mithril_gpu.load(tmp_path / "b3.mth"), b)


def test_hostile_tables_are_refused_not_followed():
    """Arguments no caller of this package passes, but a C entry point must refuse: a stream
    length that would overflow the size checks, and cum tables that do not count the bitmap."""
    dt, x, b = _tables(1000)
    n = b.size // 2
    with pytest.raises(ValueError, match="bad arguments"):
        cpu._accel.ctxm(x[:8], b[:8], np.zeros(4, np.uint64), np.zeros(32, np.uint8), 2, 0, 0, 0, 4, 2 ** 63 - 1,
                        np.full(16, 2 ** 40, np.uint64), np.array([4] + [0] * 15, np.uint64))
    bitmap, vals, cum, blocks, total, _ = cpu.ctxm_prepare("zigzag", dt, x, b, 7, 8)
    lying = np.full_like(cum, 10 ** 6)
    lying[0] = 0
    arena = np.empty(4 * n, np.uint8)
    rec = np.empty((3, 3), np.int64)
    with pytest.raises(ValueError, match="sorted-stream tables"):
        cpu._accel.encode_units(vals, np.array([0, 2 * n], np.int64), x, 2000, 0, 1, None, 2, 4, 0, 0, -1, 1, 0,
                                7.5, 64, arena, rec, np.zeros(2, np.int64), np.empty(1, np.uint64), (bitmap, lying, blocks))
    offs = np.concatenate([[0], np.cumsum(total)[:-1]]).astype(np.uint64)
    for simd in SIMD:
        cpu._accel.ctxm_simd(simd)
        with pytest.raises(ValueError):
            cpu._accel.ctxm_inverse(b, np.empty_like(b), bitmap, vals, np.full_like(cum, 10 ** 7), 2, 1, 1, 7, 8, n,
                                    offs, total)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("n", [0, 1, 63, 64, 4095, 4096, 4097, 4096 + 64 * 7 + 5, 50_001])
def test_context_histogram_counts_every_element(simd, n):
    """ctx_hist (the vector count of 16-bit elements: hot contexts from the first 4096, the rest one
    by one) gives np.bincount's counts: contexts hot in the sample and absent later, absent in the
    sample and frequent later, many rare ones, every width and shift of a 16-bit float's exponent."""
    cpu._accel.ctxm_simd(simd)
    rng = np.random.default_rng(n)
    head = ((rng.standard_normal(min(n, 4096)) * 0.02).astype(np.float32).view("<u4") >> 16).astype("<u2")
    tail = rng.integers(0, 1 << 16, max(0, n - 4096)).astype("<u2")      # every exponent, none of the sample's mix
    tail[: len(tail) // 2] = 0x3f80                                      # 1.0: absent from the sample
    u = np.concatenate([head, tail])
    for s, w in ((7, 8), (10, 5), (0, 8), (8, 8), (3, 4), (7, 9)):
        hist = np.full(1 << w, 7, np.uint64)                             # (zeroed by ctx_hist)
        cpu._accel.ctx_hist(u.view(np.uint8), 2, s, w, hist)
        ref = np.bincount((u >> s) & ((1 << w) - 1), minlength=1 << w)
        assert (hist == ref).all(), (s, w)


@pytest.mark.parametrize("transform", ["masked", "bytegroup"])
def test_sorted_streams_outlive_a_save(tmp_path, monkeypatch, transform):
    """ctxm's tables (masked) and the sorted streams (bytegroup) come from a pool shared by saves,
    as the coders' buffers do (cpu._SHARED_STREAMS, at most cpu.POOL_BYTES kept): a buffer used
    again, with another tensor's bytes in it, changes no byte of the next file."""
    monkeypatch.setattr(deltaplan, "choose_ctx", lambda item, x, bb: ("zigzag", transform, ctx_for(item.dtype)))
    monkeypatch.setattr(deltaplan._DiskBase, "sample", lambda self: None)
    monkeypatch.setattr(cpu, "_SHARED_STREAMS", cpu.BufferPool(8 << 20))
    rng = np.random.default_rng(3)
    w = torch.from_numpy((rng.standard_normal(200_003) * 0.02).astype(np.float32)).to(torch.bfloat16)
    a = {"w": w, "v": w[:70_001].clone()}
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    outs = []
    for k, (frac, share) in enumerate([(0.9, True), (0.05, True), (0.05, True), (0.05, False)]):
        monkeypatch.setattr(cpu, "SHARE_POOL", share)
        b = {n: _changed(t, 11 if frac < 0.5 else 12, frac) for n, t in a.items()}
        mithril_gpu.save(b, tmp_path / f"b{k}.mth", chunk_elems=4096, base=tmp_path / "a.mth", threads=2)
        outs.append((tmp_path / f"b{k}.mth").read_bytes())
        if k == 0:
            assert 0 < cpu._SHARED_STREAMS.free_bytes <= 8 << 20          # kept, within the limit
        assert_tree_same(mithril_gpu.load(tmp_path / f"b{k}.mth"), b)
    with mithril_gpu.open(tmp_path / "b1.mth") as f:
        assert all(e.ctx is not None for e in f.index.tensors)
    assert outs[1] == outs[2] == outs[3]          # after dense deltas in the buffers, and without the pool
