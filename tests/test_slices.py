"""Partial reads: ``MthFile.get_slice(name)[box]`` decodes only the rows covering the box and checks
each against its row digest (index key ``row_xxh64``, FORMAT.md); files without row digests still
slice correctly (decoding whole tensors to verify them)."""
import random

import numpy as np
import pytest
import torch

import mithril_gpu
import mithril_gpu.torchio
from mithril_gpu import codecs, cpu
from mithril_gpu.errors import ChecksumMismatchError, CorruptFileError

from test_hostile_files import index_of, resign

DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn]


def _tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g).to(dtype)


def _raw(t) -> bytes:
    return mithril_gpu.torchio.tensor_u8(t).numpy().tobytes()


def _keys(shape, rng, n=25):
    """Random boxes of every kind a user writes: ints (negative too), slices with steps, ..."""
    out = [(...,), ()] + ([(slice(None),)] if shape else [])
    for _ in range(n):
        key = []
        for size in shape:
            kind = rng.random()
            if kind < 0.25 and size:
                key.append(rng.randrange(-size, size))
            else:
                a, b = sorted(rng.randrange(-size - 2, size + 3) for _ in range(2))
                key.append(slice(a if rng.random() < 0.8 else None, b if rng.random() < 0.8 else None,
                                 rng.choice([None, 1, 2, 3, 7])))
        if rng.random() < 0.3 and key:
            key = key[:rng.randrange(len(key) + 1)] + [...] if rng.random() < 0.5 else key[:1]
        out.append(tuple(key))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slices_are_bit_exact_for_every_dtype_and_kind_of_box(tmp_path, dtype):
    rng = random.Random(str(dtype))
    state = {"m": _tensor(dtype, (23, 17, 5)), "v": _tensor(dtype, (1001,), 1), "s": _tensor(dtype, (), 2),
             "e": _tensor(dtype, (0, 3), 3)}
    mithril_gpu.save(state, tmp_path / "x.mth", chunk_elems=64)
    with mithril_gpu.open(tmp_path / "x.mth") as f:
        for name, t in state.items():
            s = f.get_slice(name)
            assert s.get_shape() == list(t.shape) and s.shape == t.shape and s.dtype == t.dtype
            assert s.get_dtype() == mithril_gpu.dtypes.from_torch(dtype).name
            for key in _keys(t.shape, rng):
                got, want = s[key], t[key]
                assert got.dtype == want.dtype and got.shape == want.shape, (name, key)
                assert _raw(got) == _raw(want), (name, key)
                assert got.is_contiguous()


def test_only_the_rows_covering_the_box_are_decoded(tmp_path, monkeypatch):
    t = _tensor(torch.float32, (100, 64))          # 64 elements a row: row r of the tensor is chunk row r
    mithril_gpu.save({"w": t}, tmp_path / "x.mth", chunk_elems=64)
    calls = []
    real = cpu._decode_rows

    def spy(buf, e, out, base, r0, r1, *a, **k):
        calls.append((r0, r1))
        return real(buf, e, out, base, r0, r1, *a, **k)
    monkeypatch.setattr(cpu, "_decode_rows", spy)
    with mithril_gpu.open(tmp_path / "x.mth") as f:
        assert torch.equal(f.get_slice("w")[40:43], t[40:43])
        assert sorted(r for r0, r1 in calls for r in range(r0, r1)) == [40, 41, 42]
        calls.clear()
        assert torch.equal(f.get_slice("w")[7, 5:9], t[7, 5:9])
        assert [r for r0, r1 in calls for r in range(r0, r1)] == [7]


def test_each_decoded_row_is_checked_against_its_digest(tmp_path):
    t = torch.randint(0, 256, (50, 1000), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    mithril_gpu.save({"w": t}, tmp_path / "x.mth", chunk_elems=1000)     # random bytes: stored chunks
    data = bytearray((tmp_path / "x.mth").read_bytes())
    e = index_of(bytes(data))["tensors"][0]
    off, csize, codec = e["chunks"][3 * 30:3 * 30 + 3]
    assert codec == codecs.STORED
    data[off + 17] ^= 0x40                          # damage row 30 only
    (tmp_path / "bad.mth").write_bytes(bytes(data))
    with mithril_gpu.open(tmp_path / "bad.mth") as f:
        s = f.get_slice("w")
        assert torch.equal(s[:30], t[:30]) and torch.equal(s[31:], t[31:])     # other rows read fine
        with pytest.raises(ChecksumMismatchError, match="row 30"):
            s[29:31]
        with pytest.raises(ChecksumMismatchError):
            s[:]
    with mithril_gpu.open(tmp_path / "bad.mth", verify=False) as f:
        assert not torch.equal(f.get_slice("w")[30], t[30])                   # no check asked: no error


@pytest.mark.parametrize("edit, match", [
    (lambda r: r[:-1], "row_xxh64 must be"),
    (lambda r: r + "00" * 8, "row_xxh64 must be"),
    (lambda r: r.upper(), "row_xxh64 must be"),
    (lambda r: 7, "row_xxh64 must be"),
    (lambda r: ("0" * 16) + r[16:], "do not combine"),
    (lambda r: r[16:32] + r[:16] + r[32:], "do not combine"),      # the right digests in the wrong order
])
def test_the_index_refuses_row_digests_that_lie(tmp_path, edit, match):
    mithril_gpu.save({"w": torch.arange(1000.0)}, tmp_path / "x.mth", chunk_elems=100)
    data = (tmp_path / "x.mth").read_bytes()

    def change(d):
        d["tensors"][0]["row_xxh64"] = edit(d["tensors"][0]["row_xxh64"])
    (tmp_path / "bad.mth").write_bytes(resign(data, change))
    with pytest.raises(CorruptFileError, match=match):
        mithril_gpu.open(tmp_path / "bad.mth")


def test_files_without_row_digests_slice_by_decoding_whole_tensors(tmp_path, monkeypatch):
    t = _tensor(torch.bfloat16, (64, 32))
    mithril_gpu.save({"w": t}, tmp_path / "x.mth", chunk_elems=32)

    def strip(d):
        del d["tensors"][0]["row_xxh64"]
    (tmp_path / "old.mth").write_bytes(resign((tmp_path / "x.mth").read_bytes(), strip))
    rows = []
    real = cpu._decode_rows
    monkeypatch.setattr(cpu, "_decode_rows", lambda buf, e, out, base, r0, r1, *a, **k:
                        rows.extend(range(r0, r1)) or real(buf, e, out, base, r0, r1, *a, **k))
    with mithril_gpu.open(tmp_path / "old.mth") as f:
        assert f.index.tensors[0].row_digests is None
        assert torch.equal(f.get_slice("w")[10:12], t[10:12])
        assert sorted(rows) == list(range(64))         # verified through the tensor's checksum
    rows.clear()
    with mithril_gpu.open(tmp_path / "old.mth", verify=False) as f:
        assert torch.equal(f.get_slice("w")[10:12], t[10:12])
        assert rows == [10, 11]                         # nothing to verify: only those rows


def test_slices_of_delta_tensors_follow_the_base_chain(tmp_path):
    g = torch.Generator().manual_seed(1)
    a = {"w": torch.randn(300, 40, generator=g).to(torch.bfloat16), "same": torch.arange(999, dtype=torch.int32),
         "m": torch.zeros(5000, dtype=torch.float32)}
    b = {"w": a["w"] + (torch.rand(300, 40, generator=g) < 0.1).to(torch.bfloat16) * 0.01,
         "same": a["same"].clone(), "m": a["m"].clone()}
    b["m"][1234] = 1.0
    c = {"w": b["w"] * 1.001, "same": b["same"].clone(), "m": b["m"].clone()}
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=1000)
    mithril_gpu.save(b, tmp_path / "b.mth", chunk_elems=256, base=tmp_path / "a.mth")
    mithril_gpu.save(c, tmp_path / "c.mth", chunk_elems=77, base=tmp_path / "b.mth")
    rng = random.Random(0)
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        ops = {k: f.info(k)["delta"] for k in f.keys()}
        assert ops["same"] == "same"
        for name, t in c.items():
            for key in _keys(t.shape, rng, 10):
                assert torch.equal(f.get_slice(name)[key], t[key]), (name, key)
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        assert {f.info(k)["delta"] for k in f.keys()} >= {"same"}
        assert torch.equal(f.get_slice("m")[1200:1300], b["m"][1200:1300])


def test_read_into_decodes_a_whole_box_straight_into_the_destination(tmp_path, monkeypatch):
    t = _tensor(torch.float32, (64, 16))
    mithril_gpu.save({"w": t}, tmp_path / "x.mth", chunk_elems=128)
    out = torch.empty(64, 16)
    ptr = out.data_ptr()
    seen = []
    with mithril_gpu.open(tmp_path / "x.mth") as f:
        real = f.decode_into
        monkeypatch.setattr(f, "decode_into", lambda entries, outs, *a, **k:
                            seen.append(outs[0].ctypes.data) or real(entries, outs, *a, **k))
        f.get_slice("w").read_into(..., out)
        assert torch.equal(out, t) and seen == [ptr]
        part = torch.zeros(3, 16)
        f.get_slice("w").read_into(slice(5, 8), part)
        assert torch.equal(part, t[5:8])
        with pytest.raises(ValueError, match="read_into"):
            f.get_slice("w").read_into(slice(5, 8), torch.zeros(4, 16))
        with pytest.raises(ValueError, match="read_into"):
            f.get_slice("w").read_into(..., torch.zeros(64, 16, dtype=torch.float64))


def test_bad_keys_are_refused_like_torch_would(tmp_path):
    mithril_gpu.save({"w": torch.zeros(4, 5)}, tmp_path / "x.mth")
    f = mithril_gpu.open(tmp_path / "x.mth")
    s = f.get_slice("w")
    with pytest.raises(IndexError):
        s[4]
    with pytest.raises(IndexError):
        s[0, 0, 0]
    with pytest.raises(IndexError):
        s[..., ...]
    with pytest.raises(ValueError, match="negative"):
        s[::-1]
    with pytest.raises(TypeError):
        s["a"]
    with pytest.raises(KeyError):
        f.get_slice("nope")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        s[0]
    with pytest.raises(ValueError, match="closed"):
        f.get_slice("w")


def test_every_row_digest_is_written_and_equals_the_rows_bytes(tmp_path):
    t = _tensor(torch.bfloat16, (1000,))
    mithril_gpu.save({"w": t}, tmp_path / "x.mth", chunk_elems=300)
    raw = t.view(torch.uint8).numpy()
    from mithril_gpu import checksum
    want = "".join(f"{checksum.row_digest(raw[i:i + 600]):016x}" for i in range(0, raw.size, 600))
    assert index_of((tmp_path / "x.mth").read_bytes())["tensors"][0]["row_xxh64"] == want
