"""Context-sorted deltas (feature "ctxdelta", FORMAT.md "Context-sorted deltas"): bit-exact round
trips for every dtype, segment edge cases, chains mixing codings, wrong bases, the C helper
against the numpy reference, index validation, the per-tensor choice and the golden file."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import mithril_gpu
from conftest import ALL_DTYPES, FIXTURES, assert_same, assert_tree_same, ctx_for, random_tensor
from mithril_gpu import container, cpu, ctxdelta, delta, deltaplan, dtypes
from mithril_gpu.errors import ChecksumMismatchError, CorruptFileError, UnsupportedVersionError


@pytest.fixture
def force(monkeypatch):
    """force(transform, op) makes every tensor with a base a context-sorted delta."""
    def set_(transform="masked", op="zigzag"):
        def choose(item, x, b):
            tr = transform if not (transform == "bytegroup" and item.dtype.itemsize == 1) else "raw"
            return op, tr, ctx_for(item.dtype)
        monkeypatch.setattr(deltaplan, "choose_ctx", choose)
        monkeypatch.setattr(deltaplan._DiskBase, "sample", lambda self: None)   # choose_ctx decides alone
    return set_


def _ctx_entries(path, base=None):
    with mithril_gpu.open(path, base=base) as f:
        return {e.name: e for e in f.index.tensors if e.ctx is not None}


def _changed(t, seed):
    """A plausible next version of ``t``: a fraction of elements changed a little."""
    g = torch.Generator().manual_seed(seed)
    if t.dtype == torch.bool:
        flip = torch.rand(t.shape, generator=g) < 0.1
        return t ^ flip
    if t.dtype.is_floating_point:
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return (t.float() * (1 + 0.05 * torch.randn(t.shape, generator=g))).to(t.dtype)
        return t + (torch.randn(t.shape, generator=g) * 1e-3).to(t.dtype) * (torch.rand(t.shape, generator=g) < 0.6)
    x = mithril_gpu.api.tensor_bytes(t).copy()      # integers: add 1 to half the elements, wrapping
    u = x.view(f"<u{t.element_size()}")
    u += (np.random.default_rng(seed).random(u.size) < 0.5).astype(u.dtype)
    return torch.from_numpy(x).view(t.dtype).reshape(t.shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("transform,op", [("masked", "zigzag"), ("bytegroup", "zigzag"), ("masked", "xor")])
def test_every_dtype_round_trips(tmp_path, force, dtype, transform, op):
    force(transform, op)
    a = {"t": random_tensor(dtype, (1001,), seed=1), "odd": random_tensor(dtype, (7, 13), seed=2)}
    b = {k: _changed(v, 5) for k, v in a.items()}
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=64)
    mithril_gpu.save(b, tmp_path / "b.mth", chunk_elems=64, base=tmp_path / "a.mth")
    ents = _ctx_entries(tmp_path / "b.mth")
    assert set(ents) == {"t", "odd"} or all(torch.equal(a[k], b[k]) for k in set(a) - set(ents))
    for e in ents.values():
        assert e.whole_only and sum(e.segs) == e.count and max(e.segs) <= 64
    assert_tree_same(mithril_gpu.load(tmp_path / "b.mth"), b)
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        assert "ctxdelta" in json.loads(f.index.to_json())["features"]


def test_buckets_of_one_element_and_one_bucket(tmp_path, force, monkeypatch):
    force("masked")
    monkeypatch.setattr(ctxdelta, "MIN_SEG", 1)
    # every element of the base in its own binade: 250 contexts of one element each
    exps = torch.arange(1, 251, dtype=torch.int32)
    base = (exps << 7).to(torch.int16).view(torch.bfloat16)
    one = torch.full((5000,), 0.75, dtype=torch.bfloat16)        # every element in one context
    a = {"many": base, "one": one}
    b = {"many": (base.float() * 1.01).to(torch.bfloat16), "one": one + torch.rand(5000).to(torch.bfloat16) * 0.01}
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=1024)
    mithril_gpu.save(b, tmp_path / "b.mth", chunk_elems=1024, base=tmp_path / "a.mth")
    ents = _ctx_entries(tmp_path / "b.mth")
    assert ents["many"].segs == [1] * 250
    assert ents["one"].segs == [1024] * 4 + [904]          # one context: cut only at chunk_elems
    assert_tree_same(mithril_gpu.load(tmp_path / "b.mth"), b)


def test_chain_mixing_old_and_new_codings(tmp_path, force, monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(3000) * 0.02
    states = [{"w": w.to(torch.bfloat16), "f": w.clone(), "step": 0}]
    for s in range(1, 5):
        w = w - 1e-3 * torch.randn(3000) * (torch.rand(3000) < 0.5)
        states.append({"w": w.to(torch.bfloat16), "f": w.clone(), "step": s})
    original = deltaplan.choose_ctx
    for s, st in enumerate(states):
        if s % 2:
            force("masked")
        else:
            monkeypatch.setattr(deltaplan, "choose_ctx", lambda item, x, b, *pre: (*(pre[0] if pre else deltaplan.choose(item, x, b)), None))
        mithril_gpu.save(st, tmp_path / f"{s}.mth", base=tmp_path / f"{s - 1}.mth" if s else None, chunk_elems=512)
        assert bool(_ctx_entries(tmp_path / f"{s}.mth")) == bool(s % 2)
    monkeypatch.setattr(deltaplan, "choose_ctx", original)
    for s, st in enumerate(states):
        assert_tree_same(mithril_gpu.load(tmp_path / f"{s}.mth"), st)


def _one_ctx_file(tmp_path, force, n=4000):
    force("masked")
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    b = (a.float() + torch.randn(n, generator=g) * 1e-4).to(torch.bfloat16)
    mithril_gpu.save({"w": a}, tmp_path / "a.mth", chunk_elems=1024)
    mithril_gpu.save({"w": b}, tmp_path / "b.mth", chunk_elems=1024, base=tmp_path / "a.mth")
    return a, b


def test_a_wrong_base_fails_the_checksum(tmp_path, force):
    a, b = _one_ctx_file(tmp_path, force)
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        e = f.entry("w")
        assert e.ctx is not None
        base = mithril_gpu.api.tensor_bytes(a).copy()
        # 1. another base with the very same contexts (so the same segments), shuffled: only the
        #    permutation differs; 2. one element's mantissa changed (same permutation)
        shuffled = base.view("<u2")[np.random.default_rng(0).permutation(a.numel())].view(np.uint8).copy()
        nudged = base.copy()
        nudged[0] ^= 1
        for wrong in (shuffled, nudged):
            out = np.empty(e.nbytes, np.uint8)
            with pytest.raises(ChecksumMismatchError, match="delta base"):
                cpu.decode_all(f._buf, [(e, out, wrong)], threads=1)
        out = np.empty(e.nbytes, np.uint8)
        cpu.decode_all(f._buf, [(e, out, base)], threads=2)
        assert out.tobytes() == mithril_gpu.api.tensor_bytes(b).tobytes()


def test_forged_base_file_is_caught(tmp_path, force):
    """A base file forged to carry the right identity record but other bytes: checksums fail."""
    a, b = _one_ctx_file(tmp_path, force)
    other = (a.float() * 1.5).to(torch.bfloat16)
    mithril_gpu.save({"w": other}, tmp_path / "other.mth", chunk_elems=1024)
    with mithril_gpu.open(tmp_path / "b.mth") as f, mithril_gpu.open(tmp_path / "other.mth") as o:
        e, ob = f.entry("w"), o.get_bytes("w")
        with pytest.raises(ChecksumMismatchError):
            cpu.decode_all(f._buf, [(e, np.empty(e.nbytes, np.uint8), ob)], threads=1)


@pytest.mark.skipif(cpu._accel is None or not hasattr(cpu._accel, "ctx"), reason="C helper not built")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_c_matches_the_numpy_reference(dtype):
    dt = dtypes.from_torch(dtype)
    isz = dt.itemsize
    rng = np.random.default_rng(7)
    for n in (0, 1, 7, 4099):
        x = rng.integers(0, 256, n * isz, dtype=np.uint8)
        b = rng.integers(0, 256, n * isz, dtype=np.uint8)
        for s, w in {ctx_for(dt), (0, 1), (8 * isz - 1, 1), (0, min(12, 8 * isz))}:
            for op in ("xor", "zigzag"):
                ref = ctxdelta.encode(op, dt, x, b, s, w)
                got, cnt = np.empty_like(x), np.zeros(1 << w, np.uint64)
                cpu._accel.ctx(x, b, got, isz, ("xor", "zigzag").index(op), int(dtype.is_floating_point), 0, s, w, cnt)
                assert got.tobytes() == ref.tobytes(), (n, s, w, op)
                assert (cnt == ctxdelta.counts(dt, b, s, w)).all()
                back_ref, back = np.empty_like(x), np.empty_like(x)
                ctxdelta.decode(op, dt, ref, b, s, w, back_ref)
                cpu._accel.ctx(ref, b, back, isz, ("xor", "zigzag").index(op), int(dtype.is_floating_point), 1, s, w, None)
                assert back_ref.tobytes() == x.tobytes() and back.tobytes() == x.tobytes()
    with pytest.raises(ValueError):
        cpu._accel.ctx(x, b, got, isz, 1, 0, 0, 0, 13, None)


def test_permutation_is_a_stable_counting_sort():
    dt = dtypes.from_name("BF16")
    y = np.array([0x3F80, 0x4000, 0x3F81, 0x0001, 0x4001, 0x3F80], "<u2")      # exps 127,128,127,0,128,127
    perm = ctxdelta.permutation(dt, y.view(np.uint8), 7, 8)
    assert perm.tolist() == [3, 0, 2, 5, 1, 4]
    assert ctxdelta.segments([0, 3, 0, 5, 2], 4, min_seg=3) == [[3, 1], [4], [2]]


def _entry_json(**over):
    t = {"name": "w", "dtype": "BF16", "shape": [10], "transform": "bytegroup", "chunk_elems": 4,
         "xxh64": "0" * 16, "chunks": [16, 1, 1] * 6, "delta": {"op": "zigzag", "base": "w"},
         "ctx": [7, 8], "segs": [4, 4, 2]}
    t.update(over)
    return t


@pytest.mark.parametrize("over,msg", [
    ({"ctx": [7, 0]}, "ctx width"), ({"ctx": [7, 13]}, "ctx width"), ({"ctx": [12, 8]}, "ctx width"),
    ({"ctx": 7}, "shift, width"), ({"segs": [4, 4, 1]}, "add up"), ({"segs": [5, 5]}, "add up"),
    ({"segs": [4, 4, 0, 2]}, "add up"), ({"segs": "x"}, "segs"), ({"delta": {"op": "same", "base": "w"}}, "xor or zigzag"),
    ({"delta": None}, "xor or zigzag"), ({"chunks": [16, 1, 1] * 4}, "chunk fields"),
])
def test_index_validation(over, msg):
    with pytest.raises(CorruptFileError, match=msg):
        container._parse_tensor(_entry_json(**over), 0, 1 << 20, True, True)
    e, _ = container._parse_tensor(_entry_json(), 0, 1 << 20, True, True)
    assert e.whole_only and e.units == 3 and e.plane_sizes(2) == [2, 2]
    with pytest.raises(CorruptFileError, match="feature"):
        container._parse_tensor(_entry_json(), 0, 1 << 20, True, False)


def test_old_reader_refuses_the_feature(tmp_path, force, monkeypatch):
    _one_ctx_file(tmp_path, force)
    monkeypatch.setattr(container, "FEATURES", frozenset({"delta", "ndarray", "torch"}))
    with pytest.raises(UnsupportedVersionError, match="ctxdelta"):
        mithril_gpu.open(tmp_path / "b.mth")


def test_choice_is_per_tensor_and_never_worse(tmp_path, monkeypatch):
    """Trained weights take the sorted form; a tensor whose base context says nothing (integers,
    identical-exponent noise) keeps today's coding; the file is no larger than without ctxdelta."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        model(torch.randn(32, 256)).pow(2).mean().backward()
        opt.step()
        return {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}

    for _ in range(3):
        step()
    a = step()
    b = step()
    a["ids"] = torch.arange(5000, dtype=torch.int64)
    b["ids"] = a["ids"] + 1
    mithril_gpu.save(a, tmp_path / "a.mth")
    mithril_gpu.save(b, tmp_path / "new.mth", base=tmp_path / "a.mth")
    ents = _ctx_entries(tmp_path / "new.mth")
    assert "0.weight" in ents and "ids" not in ents
    monkeypatch.setattr(deltaplan, "choose_ctx", lambda item, x, b, *pre: (*(pre[0] if pre else deltaplan.choose(item, x, b)), None))
    mithril_gpu.save(b, tmp_path / "old.mth", base=tmp_path / "a.mth")
    assert os.path.getsize(tmp_path / "new.mth") < os.path.getsize(tmp_path / "old.mth")
    with mithril_gpu.open(tmp_path / "new.mth") as fn, mithril_gpu.open(tmp_path / "old.mth") as fo:
        for e in fn.index.tensors:
            assert e.stored_bytes <= fo.entry(e.name).stored_bytes * 1.02 + 64, e.name
    assert_tree_same(mithril_gpu.load(tmp_path / "new.mth"), b)


def test_checkpointer_in_memory_base_uses_ctx_and_matches_disk_base(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(256, 300) * 0.02
    states = []
    ck = mithril_gpu.Checkpointer(tmp_path / "ck", full_every=5, keep=None)
    for s in range(3):
        w = w - 1e-4 * torch.randn_like(w).sign() * (torch.rand_like(w) < 0.5)
        states.append({"w": w.to(torch.bfloat16), "step": s})
        ck.save(states[-1], s)
    assert _ctx_entries(ck.path(2))
    mithril_gpu.save(states[2], tmp_path / "ck" / "disk.mth", base=ck.path(1))
    with mithril_gpu.open(tmp_path / "ck" / "disk.mth") as d, mithril_gpu.open(ck.path(2)) as c:
        assert [e.to_json() for e in d.index.tensors] == [e.to_json() for e in c.index.tensors]
    for s, st in enumerate(states):
        assert_tree_same(ck.load(s), st)


def test_golden_ctx_file():
    name = "golden_v1_ctx.mth"
    with open(os.path.join(FIXTURES, "golden_v1.json")) as fh:
        want = json.load(fh)[name]
    with mithril_gpu.open(os.path.join(FIXTURES, name), base=os.path.join(FIXTURES, "golden_v1.mth")) as f:
        assert any(e.ctx is not None for e in f.index.tensors)
        assert "ctxdelta" in json.loads(f.index.to_json())["features"]
        for key, digest in want.items():
            assert hashlib.sha256(f.get_bytes(key).tobytes()).hexdigest() == digest, key


def test_gpu_load_falls_back_for_ctx_entries(tmp_path, force, monkeypatch):
    fake_gpu = pytest.importorskip("fake_gpu")
    if fake_gpu.cuda_host.CXX is None:
        pytest.skip("no C++ compiler to build the kernels for the host")
    from mithril_gpu import gpu

    a, b = _one_ctx_file(tmp_path, force)
    monkeypatch.setenv("MITHRIL_GPU_EXPERIMENTAL", "1")
    with fake_gpu.installed(), mithril_gpu.open(tmp_path / "b.mth") as f:
        e = f.entry("w")
        assert e.ctx is not None
        out = torch.empty(e.nbytes, dtype=torch.uint8)
        gpu.decode_into_device(f, [e], [out])
        assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(b).tobytes()
    assert_same(mithril_gpu.load(tmp_path / "b.mth")["w"], b)


@pytest.mark.skipif(cpu._accel is None or not hasattr(cpu._accel, "ctx_hist"), reason="C helper not built")
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_parallel_sort_gives_the_same_bytes(monkeypatch, threads):
    monkeypatch.setattr(cpu, "CTX_PARALLEL_BYTES", 1024)
    dt = dtypes.from_name("BF16")
    rng = np.random.default_rng(threads)
    x = (rng.standard_normal(10007) * 0.02).astype(np.float32).view("<u4") >> 16
    x = x.astype("<u2").view(np.uint8)
    b = x.copy()
    b[::5] ^= 1
    ref = ctxdelta.encode("zigzag", dt, x, b, 7, 8)
    got, cnt = np.empty_like(x), np.zeros(256, np.uint64)
    cpu.ctx_apply("zigzag", dt, x, b, got, 7, 8, inverse=False, counts=cnt, threads=threads)
    assert got.tobytes() == ref.tobytes() and (cnt == ctxdelta.counts(dt, b, 7, 8)).all()
    back = np.empty_like(x)
    cpu.ctx_apply("zigzag", dt, got, b, back, 7, 8, inverse=True, threads=threads)
    assert back.tobytes() == x.tobytes()
    with pytest.raises(ValueError, match="beyond"):          # offsets that a part cannot hold
        cpu._accel.ctx(x[:20], b[:20], got[:10], 2, 1, 1, 0, 7, 8, None, np.full(256, 3, np.uint64))


def test_checkpointer_snapshot_copies_every_kind_of_tensor():
    """The Checkpointer's in-memory base is a copy (through numpy for plain CPU tensors): bit-exact,
    same dtype and shape, independent of the original."""
    from mithril_gpu import checkpointer

    state = {d: random_tensor(d, (3, 5), seed=4) for d in ALL_DTYPES}
    state["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    state["empty"] = torch.zeros(0, 3)
    state["strided"] = torch.arange(20.0).reshape(4, 5).t()
    state["param"] = torch.nn.Parameter(torch.ones(4))
    snap, leaves = checkpointer._snapshot(state)
    assert_tree_same(snap, {k: v.detach() for k, v in state.items()})
    assert not isinstance(snap["param"], torch.nn.Parameter)
    for k, v in state.items():
        if v.numel():
            assert snap[k].data_ptr() != v.data_ptr()
    state[torch.float32].add_(1)
    assert not torch.equal(snap[torch.float32], state[torch.float32])


def _resign(data: bytes, edit) -> bytes:
    """Edit a file's index and re-sign it (checksum of the index recomputed): only the content
    checks can catch the lie."""
    import xxhash
    import zstandard

    off, length, _, magic = container.TRAILER.unpack(data[-32:])
    d = json.loads(zstandard.ZstdDecompressor().decompress(data[off:off + length]))
    edit(d)
    raw = zstandard.ZstdCompressor().compress(json.dumps(d).encode())
    return data[:off] + raw + container.TRAILER.pack(off, len(raw), xxhash.xxh64_intdigest(raw), magic)


def _swap_segments(d):
    t = d["tensors"][0]
    t["segs"][0], t["segs"][1] = t["segs"][1], t["segs"][0]
    t["nnz"][0], t["nnz"][1] = t["nnz"][1], t["nnz"][0]


@pytest.mark.parametrize("edit", [
    _swap_segments,
    lambda d: d["tensors"][0].update(ctx=[6, 8]),                    # another permutation
    lambda d: d["tensors"][0].update(ctx=[7, 9]),
    lambda d: d["tensors"][0]["delta"].update(op="xor"),
    lambda d: d.update(features=["delta"]),
], ids=["swapped-segments", "other-shift", "other-width", "other-op", "feature-dropped"])
def test_lying_index_never_decodes_silently(tmp_path, force, edit):
    from mithril_gpu.errors import MithrilError

    force("masked")
    g = torch.Generator().manual_seed(11)
    a = (torch.randn(6000, generator=g) * 0.02).to(torch.bfloat16)
    b = (a.float() + torch.randn(6000, generator=g) * 1e-4).to(torch.bfloat16)
    mithril_gpu.save({"w": a}, tmp_path / "a.mth", chunk_elems=1024)
    mithril_gpu.save({"w": b}, tmp_path / "b.mth", chunk_elems=1024, base=tmp_path / "a.mth")
    assert len(_ctx_entries(tmp_path / "b.mth")["w"].segs) > 2
    (tmp_path / "bad.mth").write_bytes(_resign((tmp_path / "b.mth").read_bytes(), edit))
    with pytest.raises(MithrilError):
        mithril_gpu.load(tmp_path / "bad.mth", base=tmp_path / "a.mth")


@pytest.mark.skipif(not hasattr(mithril_gpu.MthFile, "get_slice"), reason="no partial reads in this tree")
def test_partial_reads_decode_a_sorted_tensor_whole(tmp_path, force):
    force("masked")
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(300, 70, generator=g) * 0.02).to(torch.bfloat16)
    b = (a.float() + torch.randn(300, 70, generator=g) * 1e-4).to(torch.bfloat16)
    mithril_gpu.save({"w": a}, tmp_path / "a.mth", chunk_elems=1024)
    mithril_gpu.save({"w": b}, tmp_path / "b.mth", chunk_elems=1024, base=tmp_path / "a.mth")
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        assert f.entry("w").whole_only
        assert_same(f.get_slice("w")[100:130, 5:9], b[100:130, 5:9])


@pytest.mark.skipif(cpu._accel is None or not hasattr(cpu._accel, "ctxm_simd") or not cpu._accel.ctxm_simd(1),
                    reason="C helper not built, or no AVX-512 (BW, VBMI2) here: no vector moves to compare")
@pytest.mark.parametrize("name", ["BF16", "F16", "I16", "U16"])
def test_the_vector_moves_of_the_sorted_stream_give_the_scalar_bytes(name):
    """With AVX-512, the context sort's moves of 2-byte elements (both directions) compress
    each context's deltas to its positions and expand them back; contexts hot enough to be compared
    with every group, and rare ones found group by group, in blocks, partial groups and parts, give
    the numpy reference's bytes, as the scalar moves do."""
    dt = dtypes.from_name(name)
    isz, fl = dt.itemsize, delta.is_float(dt)
    rng = np.random.default_rng(11)
    s, w = ctx_for(dt) if fl else (8 * isz - 8, 8)
    try:
        for n in (5, 63, 64, 65, 4 * 1024 + 3, 50_001):
            # real-looking weights: a few exponents hold most elements, many others a few each
            v = (rng.standard_normal(n) * 0.02).astype(np.float32)
            rare = rng.random(n) < 0.05
            v[rare] *= (2.0 ** rng.integers(-30, 30, int(rare.sum()))).astype(np.float32)
            v[::97] = rng.standard_normal(v[::97].size) * 1e6
            if isz == 2:
                b = (v.view("<u4") >> 16).astype("<u2").view(np.uint8) if name == "BF16" else v.astype("<f2").view(np.uint8)
            else:
                b = v.view(np.uint8).copy()
            x = b.copy()
            x.view(f"<u{isz}")[rng.random(n) < 0.6] ^= rng.integers(1, 50, dtype=f"<u{isz}")
            for op in ("xor", "zigzag"):
                ref = ctxdelta.encode(op, dt, x, b, s, w)
                outs = []
                for simd in (0, 1):
                    cpu._accel.ctxm_simd(simd)
                    got = np.empty_like(x)
                    cpu._accel.ctx(x, b, got, isz, ("xor", "zigzag").index(op), int(fl), 0, s, w, None)
                    back = np.empty_like(x)
                    cpu._accel.ctx(ref, b, back, isz, ("xor", "zigzag").index(op), int(fl), 1, s, w, None)
                    outs.append((got.tobytes(), back.tobytes()))
                    for threads in (2, 3):              # parts, each moved from its own offsets
                        got2, back2 = np.empty_like(x), np.empty_like(x)
                        with pytest.MonkeyPatch.context() as m:
                            m.setattr(cpu, "CTX_PARALLEL_BYTES", 64)
                            cpu.ctx_apply(op, dt, x, b, got2, s, w, inverse=False, threads=threads)
                            cpu.ctx_apply(op, dt, ref, b, back2, s, w, inverse=True, threads=threads)
                        assert got2.tobytes() == ref.tobytes() and back2.tobytes() == x.tobytes(), (n, op, threads)
                assert outs[0] == outs[1] == (ref.tobytes(), x.tobytes()), (n, op)
    finally:
        cpu._accel.ctxm_simd(1)
