"""Which tensors a delta save stores against their base, and what of a base on disk it decodes.

A delta must be estimated ``deltaplan.DELTA_MIN_GAIN`` smaller than the tensor stored on its own;
with the base read from disk, the choice is made from the base's sample rows first, so a tensor
stored on its own never has its base decoded whole, and a delta's base has each row decoded once
(the choice, and so the file, is the same as with the whole base at hand)."""
import numpy as np
import pytest
import torch

import mithril_gpu
from conftest import assert_tree_same
from mithril_gpu import deltaplan
from mithril_gpu.errors import MithrilError
from mithril_gpu.reader import MthFile
from test_hostile_files import index_of, resign

N = 300_000        # elements per tensor: with chunk_elems=4096, 74 rows, of which the sample touches 16-32


def _states():
    """Two AdamW-like states one step apart: a first moment that every step changes throughout
    (a delta saves 2-4% of it) and weights that move a little (a delta saves a third or more)."""
    g = torch.Generator().manual_seed(0)
    m = 0.1 * 1e-3 * torch.randn(N, generator=g) + 3e-4 * torch.randn(N, generator=g)
    w = 0.02 * torch.randn(N, generator=g)
    a = {"m": m, "w": w}
    b = {"m": 0.9 * m + 1e-4 * torch.randn(N, generator=g), "w": w + 1e-6 * torch.randn(N, generator=g)}
    return a, b


def _ops(path, base):
    with mithril_gpu.open(path, base=base) as f:
        return {e.name: (e.delta or {}).get("op") for e in f.index.tensors}


def test_a_delta_that_saves_little_is_not_taken(tmp_path, monkeypatch):
    a, b = _states()
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    ops = _ops(tmp_path / "b.mth", tmp_path / "a.mth")
    assert ops["m"] is None and ops["w"] in ("xor", "zigzag")
    assert_tree_same(mithril_gpu.load(tmp_path / "b.mth"), b)
    monkeypatch.setattr(deltaplan, "DELTA_MIN_GAIN", 0.0)           # any gain: the moment too
    mithril_gpu.save(b, tmp_path / "any.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    assert _ops(tmp_path / "any.mth", tmp_path / "a.mth")["m"] in ("xor", "zigzag")
    assert_tree_same(mithril_gpu.load(tmp_path / "any.mth"), b)
    with mithril_gpu.open(tmp_path / "b.mth") as on_own, mithril_gpu.open(tmp_path / "any.mth") as delta:
        own, d = on_own.entry("m").stored_bytes, delta.entry("m").stored_bytes
    assert 0.9 * own < d < own                                     # it did save something, but little


def test_a_tensor_stored_on_its_own_never_decodes_its_base_whole(tmp_path, monkeypatch):
    a, b = _states()
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    whole, rows = [], {"m": [], "w": []}
    real_bytes, real_rows = MthFile.get_bytes, MthFile.decode_rows_into
    monkeypatch.setattr(MthFile, "get_bytes", lambda self, name: whole.append(name) or real_bytes(self, name))
    monkeypatch.setattr(MthFile, "decode_rows_into", lambda self, e, out, r0, r1: rows[e.name].extend(range(r0, r1))
                        or real_rows(self, e, out, r0, r1))
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    nrows = -(-N // 4096)
    assert whole == []
    assert 16 <= len(rows["m"]) <= nrows // 2 and len(set(rows["m"])) == len(rows["m"])   # the sample's rows only
    assert sorted(rows["w"]) == list(range(nrows))          # the delta's base: every row, each once
    # the same file as a choice made with the whole base at hand
    monkeypatch.setattr(deltaplan._DiskBase, "sample", lambda self: None)
    mithril_gpu.save(b, tmp_path / "whole.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    assert sorted(whole) == ["m", "w"]
    assert (tmp_path / "b.mth").read_bytes() == (tmp_path / "whole.mth").read_bytes()


def test_the_base_rows_of_the_sample_are_verified(tmp_path):
    a, b = _states()
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    data = bytearray((tmp_path / "a.mth").read_bytes())
    e = next(t for t in index_of(bytes(data))["tensors"] if t["name"] == "m")
    off, csize, _codec = e["chunks"][0:3]                   # row 0, first plane: the sample's first block
    data[off + csize // 2] ^= 0x10
    (tmp_path / "bad.mth").write_bytes(bytes(data))
    with pytest.raises(MithrilError):
        mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "bad.mth", chunk_elems=4096)
    assert not (tmp_path / "b.mth").exists()


def test_a_base_without_row_digests_is_decoded_whole_and_chooses_alike(tmp_path):
    a, b = _states()
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)

    def strip(d):
        for t in d["tensors"]:
            del t["row_xxh64"]
    (tmp_path / "old.mth").write_bytes(resign((tmp_path / "a.mth").read_bytes(), strip))
    with mithril_gpu.open(tmp_path / "old.mth") as f:
        assert deltaplan._DiskBase(f, f.entry("m")).sample() is None
    with mithril_gpu.open(tmp_path / "a.mth") as f:
        disk = deltaplan._DiskBase(f, f.entry("m"))
        got, full = disk.sample(), f.get_bytes("m")
        assert got is not None and got.tobytes() == deltaplan._sample(full, 4).tobytes()
        assert disk.whole().tobytes() == full.tobytes()
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "old.mth", chunk_elems=4096)
    assert _ops(tmp_path / "b.mth", tmp_path / "old.mth")["m"] is None
    assert_tree_same(mithril_gpu.load(tmp_path / "b.mth"), b)


@pytest.mark.parametrize("chunk_elems, sampled", [(4096, True), (1 << 17, False), (N, False)])
def test_the_sample_is_read_from_rows_only_where_that_is_much_cheaper(tmp_path, chunk_elems, sampled):
    a, _ = _states()
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=chunk_elems)
    mithril_gpu.save({"small": a["m"][:60_000]}, tmp_path / "s.mth", chunk_elems=1024)
    with mithril_gpu.open(tmp_path / "a.mth") as f:
        assert (deltaplan._DiskBase(f, f.entry("m")).sample() is not None) == sampled
    with mithril_gpu.open(tmp_path / "s.mth") as f:          # a small tensor is its own sample
        assert deltaplan._DiskBase(f, f.entry("small")).sample() is None
    np.testing.assert_array_equal(deltaplan._sample_starts(N)[[0, -1]], [0, N - deltaplan.BLOCK_ELEMS])


def test_decode_rows_into_refuses_what_it_cannot_check(tmp_path):
    a, b = _states()
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        e = f.entry("w")                                     # a delta: its base would be needed
        with pytest.raises(ValueError, match="row by row"):
            f.decode_rows_into(e, np.empty(e.nbytes, np.uint8), 0, 1)
        e = f.entry("m")
        for out, r0, r1 in ((np.empty(e.nbytes - 1, np.uint8), 0, 1), (np.empty(e.nbytes, np.uint8), 3, 2),
                            (np.empty(e.nbytes, np.uint8), 0, e.rows + 1)):
            with pytest.raises(ValueError, match="rows"):
                f.decode_rows_into(e, out, r0, r1)
        out = np.zeros(e.nbytes, np.uint8)
        f.decode_rows_into(e, out, 2, 4)                     # only those rows' bytes are written
        rb = 4096 * 4
        assert out[:2 * rb].sum() == 0 and out[4 * rb:].sum() == 0
        assert out[2 * rb:4 * rb].tobytes() == mithril_gpu.api.tensor_bytes(b["m"]).tobytes()[2 * rb:4 * rb]


def test_a_base_entry_that_is_itself_a_delta_is_decoded_whole_with_its_own_base(tmp_path, monkeypatch):
    """A chain: the middle file stores "w" as a plain (row-by-row) delta; the third save takes that
    file on disk as its base, so its "w" must come through the chain, never by rows on its own."""
    from mithril_gpu import ctxdelta
    g = torch.Generator().manual_seed(3)
    w0 = 0.02 * torch.randn(N, generator=g)
    w1, w2 = w0 + 1e-6 * torch.randn(N, generator=g), None
    w2 = w1 + 1e-6 * torch.randn(N, generator=g)
    monkeypatch.setattr(ctxdelta, "default_ctx", lambda dt: None)      # plain deltas, rows on their own
    mithril_gpu.save({"w": w0}, tmp_path / "0.mth", chunk_elems=4096)
    mithril_gpu.save({"w": w1}, tmp_path / "1.mth", base=tmp_path / "0.mth", chunk_elems=4096)
    with mithril_gpu.open(tmp_path / "1.mth") as f:
        e = f.entry("w")
        assert e.delta is not None and not e.whole_only
        assert deltaplan._DiskBase(f, e).sample() is None
    mithril_gpu.save({"w": w2}, tmp_path / "2.mth", base=tmp_path / "1.mth", chunk_elems=4096)
    assert_tree_same(mithril_gpu.load(tmp_path / "2.mth"), {"w": w2})


def _sign_steps(n):
    """Weights that each moved by a fixed step up or down (sign-based updates, large ones): in
    units of a weight's last place the step depends on its exponent, so the plain delta saves
    under 5% while the delta sorted by the base's exponent saves about 10%."""
    g = torch.Generator().manual_seed(1)
    w = 0.02 * torch.randn(n, generator=g)
    return {"s": w}, {"s": w + 0.02 * torch.sign(torch.randn(n, generator=g))}


def _entry(path, name, base=None):
    with mithril_gpu.open(path, base=base) as f:
        return f.entry(name)


@pytest.mark.parametrize("n", [300_000, 50_000], ids=["sampled", "small-trial"])
def test_the_gain_rule_weighs_the_context_sorted_form_too(tmp_path, monkeypatch, n):
    """The 5% rule compares the better of the plain and the context-sorted delta with the tensor
    on its own: a tensor whose plain delta gains too little is still stored sorted when that gains
    enough, and the choice is the same whether the base's sample rows or its whole tensor were read."""
    a, b = _sign_steps(n)
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    mithril_gpu.save(b, tmp_path / "own.mth", chunk_elems=4096)
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    e, own = _entry(tmp_path / "b.mth", "s", tmp_path / "a.mth"), _entry(tmp_path / "own.mth", "s")
    assert e.delta is not None and e.ctx is not None
    assert e.stored_bytes <= (1 - deltaplan.DELTA_MIN_GAIN) * own.stored_bytes
    assert_tree_same(mithril_gpu.load(tmp_path / "b.mth"), b)
    # the same file when the whole base is read for the choice
    monkeypatch.setattr(deltaplan._DiskBase, "sample", lambda self: None)
    mithril_gpu.save(b, tmp_path / "whole.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    assert (tmp_path / "b.mth").read_bytes() == (tmp_path / "whole.mth").read_bytes()
    # without the sorted form, the plain delta alone does not pass the rule: stored on its own
    monkeypatch.setattr(deltaplan, "choose_ctx", lambda item, x, b, *pre: (*(pre[0] if pre else deltaplan.choose(item, x, b)), None))
    mithril_gpu.save(b, tmp_path / "plain.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    assert _entry(tmp_path / "plain.mth", "s").delta is None


def test_a_sorted_form_that_gains_little_does_not_take_the_base(tmp_path):
    """The first moment of _states: neither form gains 5%, so it stays on its own (and its base is
    not decoded whole: test_a_tensor_stored_on_its_own_never_decodes_its_base_whole)."""
    a, b = _states()
    mithril_gpu.save(a, tmp_path / "a.mth", chunk_elems=4096)
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth", chunk_elems=4096)
    assert _entry(tmp_path / "b.mth", "m").delta is None
