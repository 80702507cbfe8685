"""A tensor changed by another thread while it is being saved never makes a damaged file.

A row's digest and its coded bytes are taken from one read of the row (a copy, or the bytes a
context sort moved as it read them), so a file always decodes and checks, holding for each row
either its old or its new values, as ``torch.save`` would. A ``Checkpointer`` then sees that its
copy disagrees with the file and saves again from a snapshot. Before this, a row read twice (once
for its digest, once for its coding) could disagree with itself, and the save reported success
for a file that every load refused."""
import threading

import numpy as np
import pytest
import torch
import xxhash

import mithril_gpu
from mithril_gpu import checkpointer, checksum, cpu
from mithril_gpu.dtypes import BY_NAME

from conftest import assert_tree_same

needs_c = pytest.mark.skipif(cpu._accel is None or not hasattr(cpu._accel, "ctxm"), reason="needs the C helper")


def _pair(n=1 << 18, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    b = (a.float() + torch.randn(n, generator=g) * 1e-4).to(torch.bfloat16)
    return {"w": a}, {"w": b}


def _ctx_entries(path):
    with mithril_gpu.open(path) as f:
        return [e.name for e in f.index.tensors if e.ctx is not None]


@pytest.fixture(params=["ctxm", "stream", "per-row"])
def sort_path(request, monkeypatch):
    """The three ways a context-sorted delta is sorted: ctxm's tables (C, fused), the sorted stream
    (C), and the per-row reference path."""
    if request.param != "per-row" and (cpu._accel is None or not hasattr(cpu._accel, "ctxm")):
        pytest.skip("needs the C helper")
    if request.param == "stream":
        monkeypatch.setattr(cpu, "CTXM", False)
    if request.param == "per-row":
        monkeypatch.setattr(cpu, "FUSED", False)
    return request.param


def _change_after_sort(monkeypatch, tensor):
    """Another thread's update landing right after ``tensor``'s context sort read it (once)."""
    real, done = cpu._prepare_ctx, []

    def prepare(item):
        real(item)
        if not done:
            done.append(item.name)
            tensor.view(-1)[::3] += 1e-2
    monkeypatch.setattr(cpu, "_prepare_ctx", prepare)
    return done


def test_a_change_after_the_sort_still_makes_a_file_that_loads(tmp_path, monkeypatch, sort_path):
    a, b = _pair()
    mithril_gpu.save(a, tmp_path / "a.mth")
    before = b["w"].clone()
    done = _change_after_sort(monkeypatch, b["w"])
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth")
    assert done == ["w"] and _ctx_entries(tmp_path / "b.mth") == ["w"]
    got = mithril_gpu.load(tmp_path / "b.mth")             # no ChecksumMismatchError
    assert torch.equal(got["w"], before)                   # the values the sort read, all of them


@pytest.mark.parametrize("in_place", [False, True])
def test_a_checkpointer_saves_again_when_a_tensor_changes_after_its_sort(tmp_path, monkeypatch, sort_path, in_place):
    """The copy a Checkpointer keeps for its next delta always holds what the file holds. Where
    the sort wrote the bytes it coded over that copy (the C sorts, ``REFRESH_IN_PLACE``), it does by
    construction, and the file keeps the values the sort read; elsewhere the copy is taken after
    the write, disagrees with the file, and the save is done again from a snapshot."""
    monkeypatch.setattr(checkpointer, "REFRESH_IN_PLACE", in_place)
    a, b = _pair(seed=1)
    ck = mithril_gpu.Checkpointer(tmp_path / "ck", full_every=10, keep=None)
    state = {"w": a["w"].clone()}
    ck.save(state, 0)
    state["w"].copy_(b["w"])
    before = state["w"].clone()
    snaps = []
    real_snapshot = checkpointer._snapshot
    monkeypatch.setattr(checkpointer, "_snapshot", lambda s: snaps.append(1) or real_snapshot(s))
    done = _change_after_sort(monkeypatch, state["w"])
    ck.save(state, 1)
    assert done == ["w"]
    if in_place and cpu._accel is not None:                # (every sort path of the C helper keeps)
        assert snaps == []                                 # the copy is what was coded: nothing to redo
        assert_tree_same(ck.load(1), {"w": before})        # the values the sort read
        assert_tree_same(ck._base_tensors, {"w": before})
    else:
        assert snaps == [1]                                # the kept copy disagreed: saved again
        assert_tree_same(ck.load(1), state)
    monkeypatch.undo()
    state["w"].add_(torch.full((), 1e-3, dtype=torch.bfloat16))
    ck.save(state, 2)                                      # a delta on the kept copy
    assert_tree_same(ck.load(2), state)


def test_a_row_changed_after_its_digest_is_coded_as_digested(tmp_path, monkeypatch):
    """The per-row path digests and codes one copy of each row."""
    monkeypatch.setattr(cpu, "FUSED", False)
    t = torch.randn(3 * 4096 + 5)
    real, seen = checksum.row_digest, []

    def digest_then_change(row):
        d = real(row)
        if not seen:
            seen.append(1)
            t[:100] += 1.0                             # lands between the row's digest and its coding
        return d
    monkeypatch.setattr(checksum, "row_digest", digest_then_change)
    before = t.clone()
    mithril_gpu.save({"t": t}, tmp_path / "t.mth", chunk_elems=4096, threads=1)
    assert seen
    assert torch.equal(mithril_gpu.load(tmp_path / "t.mth")["t"], before)


@pytest.mark.skipif(cpu._accel is None, reason="needs the C helper")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_of_a_state_another_thread_keeps_changing_always_load(tmp_path, dtype):
    """The fused C path, with a thread scaling every tensor in place all along: each row is read
    once, so every file loads (without that, most of these files failed their checksums)."""
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(1 << 19).to(dtype) for i in range(8)}
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            for t in state.values():
                t.mul_(-1.0)                           # exact, and changes every element
    th = threading.Thread(target=churn)
    th.start()
    try:
        for k in range(4):
            mithril_gpu.save(state, tmp_path / f"s{k}.mth", threads=2)
    finally:
        stop.set()
        th.join()
    for k in range(4):
        got = mithril_gpu.load(tmp_path / f"s{k}.mth")
        for n, t in got.items():                       # each element old or new: only signs differ
            assert torch.equal(t.abs(), state[n].abs())


@needs_c
@pytest.mark.parametrize("isz", [1, 2, 4, 8])
def test_the_sorts_row_digests_are_xxh64_of_the_rows(isz, monkeypatch):
    """ctx and ctxm hash what they read: the same digests as XXH64 of each row, any row length
    (rows that are not a multiple of 32 bytes or of a block), any part cut at a row, both stripe
    loops; and the sorted bytes are the same with or without the digests."""
    monkeypatch.setattr(cpu, "CTX_PARALLEL_BYTES", 512)      # parts of 256 bytes or more: cut at rows
    rng = np.random.default_rng(isz)
    u = np.dtype(f"u{isz}")
    s, w = (0, 4) if isz == 1 else (8 * isz - 9, 8)
    for trial in range(40):
        n = int(rng.integers(0, 9000))
        relem = int(rng.choice([1, 3, 31, 1024, 1500, 4099, 20000]))
        y = rng.integers(0, 1 << 62, n, dtype=np.uint64).astype(u).view(np.uint8)
        x = (y.view(u) ^ rng.integers(0, 3, n).astype(u)).view(np.uint8)
        rb = relem * isz
        rows = -(-x.size // rb)
        want = [xxhash.xxh64(x[r * rb:(r + 1) * rb].tobytes()).intdigest() for r in range(rows)]
        dt = BY_NAME[{1: "U8", 2: "BF16", 4: "F32", 8: "U64"}[isz]]
        ref_stream = np.empty_like(x)
        cpu.ctx_apply("zigzag", dt, x, y, ref_stream, s, w, inverse=False)      # one part, no digests
        ref_tables = cpu.ctxm_prepare("zigzag", dt, x, y, s, w)
        for simd in (0, 1):             # (1 is the vector stripe loop where the CPU has AVX-512 DQ/VL)
            cpu._accel.xxh64_simd(simd)
            try:
                plain, out = np.empty_like(x), np.empty_like(x)
                cnt = np.zeros(1 << w, np.uint64)
                cpu._accel.ctx(x, y, plain, isz, 1, 0, 0, s, w)
                dg = np.zeros(rows, np.uint64)
                cpu._accel.ctx(x, y, out, isz, 1, 0, 0, s, w, cnt, None, rb, dg)
                assert dg.tolist() == want and np.array_equal(out, plain)
                for threads in (1, 3):      # 3: parts cut at rows (CTX_PARALLEL_BYTES is small here)
                    tables = cpu.ctxm_prepare("zigzag", dt, x, y, s, w, threads=threads, row_bytes=rb)
                    assert tables[5].tolist() == want
                    words = -(-n // 64)                              # the same bits over sorted positions
                    assert np.array_equal(tables[0][:words], ref_tables[0][:words])
                    assert np.array_equal(tables[2], ref_tables[2]) and np.array_equal(tables[4], ref_tables[4])
                    out2 = np.empty_like(x)
                    assert cpu.ctx_apply("zigzag", dt, x, y, out2, s, w, inverse=False, threads=threads,
                                         row_bytes=rb).tolist() == want
                    assert np.array_equal(out2, ref_stream)
            finally:
                cpu._accel.xxh64_simd(1)


@needs_c
def test_the_sorts_refuse_digests_they_cannot_fill():
    x = np.zeros(4000, np.uint8)
    out, bm = np.empty_like(x), np.zeros(100, np.uint64)
    cpu._accel.ctx(x, x, out, 2, 1, 1, 0, 7, 8, None, None, 2000, np.zeros(2, np.uint64))   # (room for both rows)
    with pytest.raises(ValueError):                    # room for 1 row of 2 (2000 elements of 2 bytes, rows of 1000)
        cpu._accel.ctx(x, x, out, 2, 1, 1, 0, 7, 8, None, None, 2000, np.zeros(1, np.uint64))
    with pytest.raises(ValueError):                    # rows so long that counting them overflowed
        cpu._accel.ctx(x, x, out, 2, 1, 1, 0, 7, 8, None, None, 2 ** 63 - 2, np.zeros(0, np.uint64))
    with pytest.raises(ValueError):                    # a row of a byte and a half
        cpu._accel.ctx(x, x, out, 2, 1, 1, 0, 7, 8, None, None, 3, np.zeros(4000, np.uint64))
    with pytest.raises(ValueError):                    # decoding hashes nothing
        cpu._accel.ctx(x, x, out, 2, 1, 1, 1, 7, 8, None, None, 2000, np.zeros(2, np.uint64))
    cnt = np.zeros(256, np.uint64)
    cnt[0] = 2000
    with pytest.raises(ValueError):
        cpu._accel.ctxm(x, x, bm, np.zeros(20000, np.uint8), 2, 1, 1, 7, 8, 2000, np.zeros(256, np.uint64), cnt,
                        2000, np.zeros(1, np.uint64))
