"""The fused CPU path (one C call and one python-zstandard call per job, cpu.FUSED) against the
per-row path it replaces: the same file bytes for every dtype, transform, delta op, context-sorted
delta, level, odd and empty size and thread count; the same decoded bytes and the same errors."""
import numpy as np
import pytest
import torch

import mithril_gpu
from mithril_gpu import codecs, cpu, ctxdelta, dtypes, transforms, tree
from mithril_gpu.cpu import EncodeItem
from mithril_gpu.errors import ChecksumMismatchError, CorruptFileError
from mithril_gpu.writer import write_mth

pytestmark = pytest.mark.skipif(not cpu._MULTI or cpu._accel is None or not hasattr(cpu._accel, "encode_units"),
                                reason="the fused path needs the C helper and python-zstandard's C backend")

CHUNK = 1000                      # elements per row: odd, so last rows are short


def _bytes(kind: str, dt, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = count * dt.itemsize
    if kind == "random":          # stored (entropy gate), exponent planes with symbols above 128
        return rng.integers(0, 256, n, dtype=np.uint8)
    if kind == "zeros":
        return np.zeros(n, np.uint8)
    if kind == "sparse":          # mostly zero elements (masked), runs for zstd
        x = rng.integers(0, 256, n, dtype=np.uint8).reshape(count, dt.itemsize)
        x[rng.random(count) < 0.8] = 0
        return x.reshape(-1)
    # "weights": trained-looking floats for float dtypes (Huffman literal frames), small ints otherwise
    w = rng.normal(0, 0.02, count).astype(np.float32)
    if dt.name == "F32":
        return w.view(np.uint8)
    if dt.name == "BF16":
        return (w.view(np.uint32) >> 16).astype("<u2").view(np.uint8)
    if dt.name == "F16":
        return w.astype("<f2").view(np.uint8)
    if dt.name == "F64":
        return w.astype("<f8").view(np.uint8)
    return rng.integers(0, 3, n, dtype=np.uint8) * (np.arange(n) % dt.itemsize == 0)


def _specs():
    """(name, dtype name, count, data kind, transform, delta op, ctx) for every combination that matters."""
    out = []
    counts = [0, 1, 7, 999, 1000, 2500, 40_000]
    for dt in dtypes._ALL:
        trs = [t for t in transforms.TRANSFORMS if transforms.valid_for(dt, t)]
        for k, tr in enumerate(trs):
            for j, kind in enumerate(("weights", "random", "zeros", "sparse")):
                count = counts[(k + 2 * j + dt.itemsize) % len(counts)]
                out.append((f"{dt.name}.{tr}.{kind}", dt.name, count, kind, tr, None, None))
            out.append((f"{dt.name}.{tr}.big", dt.name, 40_000, "weights", tr, None, None))
        for op in ("xor", "zigzag"):
            for tr in ("bytegroup" if dt.itemsize > 1 else "raw", "masked"):
                out.append((f"{dt.name}.{op}.{tr}", dt.name, 2500 + dt.itemsize, "weights", tr, op, None))
                out.append((f"{dt.name}.{op}.{tr}.ctx", dt.name, 40_000 - dt.itemsize, "weights", tr, op, "ctx"))
        out.append((f"{dt.name}.xor.empty", dt.name, 0, "weights", "masked", "xor", None))
    return out


def _ctx_of(dt):
    c = ctxdelta.default_ctx(dt)
    if c is not None:
        return c
    bits = 8 * dt.itemsize
    return (max(0, bits - 5), min(4, bits))


def _items():
    state, items = {}, []
    for i, (name, dname, count, kind, tr, op, ctx) in enumerate(_specs()):
        dt = dtypes.from_name(dname)
        data = _bytes(kind, dt, count, i)
        base = None
        if op is not None:        # a base close to the data: a fraction of elements changed
            base = data.copy().reshape(count, dt.itemsize)
            rng = np.random.default_rng(1000 + i)
            base[rng.random(count) < 0.3, 0] ^= 1
            base = base.reshape(-1)
        it = EncodeItem(name, dt, (count,), data, tr, CHUNK, delta_op=op, base=base,
                        base_name=name if op else None, ctx=_ctx_of(dt) if ctx else None)
        items.append(it)
        state[name] = torch.zeros(count, dtype=dtypes.to_torch(dt))
    node, _ = tree.encode(state, lambda x: isinstance(x, torch.Tensor))
    return node, items


def _write(path, fused_on: bool, threads: int, level=None):
    old = cpu.FUSED
    cpu.FUSED = fused_on
    try:
        node, items = _items()
        write_mth(path, items, tree=node, threads=threads, level=level)
    finally:
        cpu.FUSED = old
    return path.read_bytes()


@pytest.mark.parametrize("level", [None, 3])
def test_fused_writes_the_same_bytes_as_the_per_row_path(tmp_path, level):
    ref = _write(tmp_path / "ref.mth", False, 1, level)
    for threads in (1, 3):
        got = _write(tmp_path / f"fused{threads}.mth", True, threads, level)
        assert got == ref, f"threads={threads}: the fused path wrote other bytes"


def test_every_planes_fate_occurs(monkeypatch):
    """The files compared above hold stored, Huffman-literal and libzstd chunks, masked and ctx units."""
    fates, real = set(), cpu._accel.encode_many

    class Spy:
        def __getattr__(self, name):
            return getattr(cpu._accel_real, name)

        def encode_many(self, calls):
            res = real(calls)
            for a in calls:
                fates.update((a[8], int(s)) for s in a[17][:, 0])      # (kind, state)
                if a[0] is not a[2]:
                    fates.add("ctx")
            return res
    monkeypatch.setattr(cpu, "FUSED", True)
    monkeypatch.setattr(cpu, "_accel_real", cpu._accel, raising=False)
    monkeypatch.setattr(cpu, "_accel", Spy())
    node, items = _items()
    cpu.encode_all(items, lambda b: 0, codecs.ChunkCoder(), 1)
    assert {(k, s) for k in range(4) for s in (0, 2)} | {(2, 1), "ctx"} <= fates


def _roundtrip_files(tmp_path):
    """A plain file and a delta file against it, written with the public API."""
    g = torch.Generator().manual_seed(3)
    sd = {"bf": (torch.randn(3001, generator=g) * 0.02).bfloat16(), "f32": torch.randn(70_001, generator=g) * 0.02,
          "f16": torch.randn(5000, generator=g).half(), "i64": torch.arange(4097), "u8": torch.randint(0, 5, (333,), dtype=torch.uint8),
          "empty": torch.zeros(0), "tiny": torch.ones(3)}
    mithril_gpu.save(sd, tmp_path / "a.mth", chunk_elems=1024)
    sd2 = {k: (v + (torch.rand(v.shape, generator=g) < 0.1).to(v.dtype) if v.numel() else v) for k, v in sd.items()}
    mithril_gpu.save(sd2, tmp_path / "b.mth", chunk_elems=1024, base=tmp_path / "a.mth")
    return sd, sd2


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_matches_the_reference(tmp_path, monkeypatch, threads):
    sd, sd2 = _roundtrip_files(tmp_path)
    for fused_on in (True, False):
        monkeypatch.setattr(cpu, "FUSED", fused_on)
        for name, want in (("a.mth", sd), ("b.mth", sd2)):
            got = mithril_gpu.load(tmp_path / name, threads=threads)
            for k, v in want.items():
                assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), (fused_on, name, k)
        with mithril_gpu.open(tmp_path / "b.mth") as f:      # partial reads: rows decoded on their own
            assert torch.equal(f.get_slice("f32")[2000:5000], sd2["f32"][2000:5000])


def _flip(path, at: int):
    b = bytearray(path.read_bytes())
    b[at] ^= 0x40
    path.write_bytes(bytes(b))


def _first_chunk(path, name, codec):
    with mithril_gpu.open(path, base=path.parent) as f:
        e = f.entry(name)
        for i in range(0, len(e.chunks), 3):
            if e.chunks[i + 2] == codec and e.chunks[i + 1] > 16:
                return e.chunks[i], e.chunks[i + 1]
    raise AssertionError("no such chunk")


@pytest.mark.parametrize("codec,where", [(codecs.ZSTD, 0.5), (codecs.ZSTD, 0.0), (codecs.STORED, 0.5)])
def test_damage_gives_the_same_error_either_way(tmp_path, monkeypatch, codec, where):
    _roundtrip_files(tmp_path)
    off, size = _first_chunk(tmp_path / "a.mth", "f32", codec)
    _flip(tmp_path / "a.mth", off + int(size * where) + (4 if where == 0.0 else 0))
    errors = []
    for fused_on in (True, False):
        monkeypatch.setattr(cpu, "FUSED", fused_on)
        with pytest.raises((CorruptFileError, ChecksumMismatchError)) as exc:
            mithril_gpu.load(tmp_path / "a.mth", threads=2)
        errors.append((type(exc.value), str(exc.value)))
    assert errors[0] == errors[1]


def test_masked_bitmap_mismatch_is_refused(tmp_path, monkeypatch):
    """A masked row whose bitmap counts other than its stored nonzero count (the C merge's check)."""
    dt = dtypes.from_name("I32")
    x = np.zeros(4000, "<i4")
    x[::7] = np.arange(len(x[::7])) + 1
    data = x.view(np.uint8)
    planes = transforms.split_masked(dt, data[:4000])[1]
    bad_mask = planes[0].copy()
    bad_mask[0] ^= 0x02          # one more bit than the planes hold
    out = np.empty(4000, np.uint8)
    bounds = np.array([0, 4000], np.int64)
    r = cpu._accel.decode_units((bad_mask, *planes[1:]), bounds, out, None, 4, 3, 0, 0, -1, 0,
                                np.array([len(planes[1])], np.int64), np.empty(1, np.uint64))
    assert r == 0
    r = cpu._accel.decode_units(tuple(planes), bounds, out, None, 4, 3, 0, 0, -1, 0,
                                np.array([len(planes[1])], np.int64), np.empty(1, np.uint64))
    assert r == -1 and bytes(out) == bytes(data[:4000])
    args = lambda mask: ((mask, *planes[1:]), bounds, out, None, 4, 3, 0, 0, -1, 0,      # noqa: E731
                         np.array([len(planes[1])], np.int64), np.empty(1, np.uint64))
    assert cpu._accel.decode_many([args(planes[0]), args(bad_mask), args(planes[0])]) == [-1, 0, -2]


def test_many_calls_refuse_a_bad_one_and_hold_nothing():
    src = np.zeros(100, np.uint8)
    good = (src, np.array([0, 100], np.int64), src, 100, 0, 1, None, 1, 0, 0, 0, -1, 0, 0, 7.8, 4096,
            np.empty(100, np.uint8), np.empty((1, 3), np.int64), np.empty(1, np.int64), np.empty(1, np.uint64))
    assert cpu._accel.encode_many([good, good]) == [100, 100]
    bad = good[:1] + (np.array([0, 200], np.int64),) + good[2:]
    with pytest.raises(ValueError):
        cpu._accel.encode_many([good, bad])
    arena = good[16]
    arena.resize(10, refcheck=False)     # no buffer of the refused call is still exported


def test_c_units_refuse_bad_arguments():
    src = np.zeros(100, np.uint8)
    with pytest.raises(ValueError):          # a unit beyond the source
        cpu._accel.encode_units(src, np.array([0, 200], np.int64), src, 100, 0, 1, None, 1, 0, 0, 0, -1, 0, 0,
                                7.8, 4096, np.empty(300, np.uint8), np.empty((1, 3), np.int64),
                                np.empty(1, np.int64), np.empty(1, np.uint64))
    with pytest.raises(ValueError):          # an arena too small
        cpu._accel.encode_units(src, np.array([0, 100], np.int64), src, 100, 0, 1, None, 1, 0, 0, 0, -1, 0, 0,
                                7.8, 4096, np.empty(10, np.uint8), np.empty((1, 3), np.int64),
                                np.empty(1, np.int64), np.empty(1, np.uint64))
    with pytest.raises(ValueError):          # a plane shorter than its size
        cpu._accel.decode_units((np.zeros(10, np.uint8),), np.array([0, 100], np.int64), src, None, 1, 0, 0, 0, -1, 0,
                                np.empty(0, np.int64), np.empty(0, np.uint64))
