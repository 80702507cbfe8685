"""Choosing a small tensor's delta coding by estimated sizes (``_accel.coded_estimate``), not by
coding it three ways: the estimate follows the writer's gate, Huffman and ``ans`` costs closely,
and the choices it makes are the ones coding for real makes."""
import numpy as np
import pytest
import torch

from mithril_gpu import codecs, deltaplan, dtypes
from mithril_gpu.cpu import EncodeItem
from mithril_gpu.torchio import tensor_bytes

accel = pytest.importorskip("mithril_gpu._accel")
pytestmark = pytest.mark.skipif(not hasattr(accel, "coded_estimate") or not codecs.ans_enabled(),
                                reason="needs the C helper with ans")


def est(planes):
    return accel.coded_estimate(planes, codecs.STORE_ENTROPY_BITS, codecs._SAMPLE)


def real(p):
    return len(codecs.ChunkCoder(None).encode(p, use_ans=True)[1])


def _planes():
    rng = np.random.default_rng(7)
    out = []
    for n in (300, 4096, 65536, 200_000):
        out.append(rng.integers(0, 2, n, dtype=np.uint8) * 3)                              # two symbols
        out.append(np.clip(rng.laplace(128, 3, n), 0, 255).astype(np.uint8))              # peaked
        out.append(np.clip(rng.laplace(128, 20, n), 0, 255).astype(np.uint8))             # wide
        out.append((rng.random(n) < 0.02).astype(np.uint8) * rng.integers(1, 256, n).astype(np.uint8))  # sparse
        out.append(rng.integers(0, 40, n, dtype=np.uint8))                                 # uniform, 40 symbols
    return out


def test_fixed_cases():
    rng = np.random.default_rng(0)
    assert est([]) == 0 and est([np.zeros(0, np.uint8)]) == 0
    noise = rng.integers(0, 256, 65536, dtype=np.uint8)
    assert est([noise]) == 65536 == real(noise)                       # the gate stores it
    assert est([np.full(1000, 9, np.uint8)]) == 19                   # zstd's frame of one RLE block
    assert len(codecs.ChunkCoder(None).encode(np.full(1000, 9, np.uint8))[1]) == 19
    assert est([np.full(10, 9, np.uint8)]) == 10                     # never more than the plane
    assert est([noise, np.full(1000, 9, np.uint8)]) == 65536 + 19    # a list: the sum
    with pytest.raises(ValueError):
        accel.coded_estimate([noise], 7.8, 0)
    with pytest.raises(ValueError):
        accel.coded_estimate([noise[::2]], 7.8, 4096)               # not contiguous


@pytest.mark.parametrize("i", range(20))
def test_estimate_is_near_the_coded_size(i):
    p = _planes()[i]
    e, r = est([p]), real(p)
    assert e <= p.size
    assert abs(e - r) <= 0.04 * r + 24, (p.size, e, r)


def _item(t):
    return EncodeItem(name="w", dtype=dtypes.from_torch(t.dtype), shape=tuple(t.shape), data=tensor_bytes(t),
                      transform="bytegroup", chunk_elems=1 << 15)


@pytest.mark.parametrize("changed", [0.003, 0.03, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_the_trial_chooses_what_coding_for_real_chooses(monkeypatch, changed, dtype):
    g = torch.Generator().manual_seed(int(changed * 1000) + 3)
    base = (torch.randn(96, 512, generator=g) * 0.05).to(dtype)
    step = torch.randn(96, 512, generator=g) * 1e-3 * (torch.rand(96, 512, generator=g) < changed)
    new = (base.float() + step).to(dtype)
    x, b = tensor_bytes(new), tensor_bytes(base)
    assert x.nbytes <= deltaplan.TRIAL_BYTES
    got = deltaplan.choose_ctx(_item(new), x, b)
    monkeypatch.setattr(deltaplan, "_coded_estimate", None)            # code the candidates for real
    assert deltaplan.choose_ctx(_item(new), x, b) == got


def test_the_trial_estimates_and_codes_nothing(monkeypatch):
    """The point of the estimate: choosing a small tensor's coding codes none of its candidates."""
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(96, 512, generator=g) * 0.05).to(torch.bfloat16)
    new = (base.float() + torch.randn(96, 512, generator=g) * 1e-3).to(torch.bfloat16)
    calls = []
    real = deltaplan._coded_estimate
    monkeypatch.setattr(deltaplan, "_coded_estimate", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(deltaplan._trial_coder, "encode", lambda *a, **k: pytest.fail("a candidate was coded"))
    deltaplan.choose_ctx(_item(new), tensor_bytes(new), tensor_bytes(base))
    assert len(calls) == 3                 # today's coding, and the sorted delta masked and plain


@pytest.mark.skipif(deltaplan._unit_hist is None, reason="C helper not built")
@pytest.mark.parametrize("name", ["F32", "BF16", "F16", "I32", "U8", "F64"])
def test_unit_histograms_in_c_give_the_numpy_model_exactly(monkeypatch, name):
    """deltaplan._units_cost counts each unit's bytes with _accel.unit_hist where it can: the same
    estimate, to the last bit (the choice, and so the file, must not depend on the helper)."""
    dt = dtypes.BY_NAME[name]
    rng = np.random.default_rng(3)
    for n in (1, 9, 5000, 70000):
        src = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
        src[rng.random(src.size) < 0.5] = 0
        src.reshape(n, dt.itemsize)[rng.random(n) < 0.3] = 0           # whole zero elements too
        units = [u for u in (n // 3, n - n // 3 - n // 5, 0, n // 5) if u or n > 5]
        for tr in ("masked", "bytegroup"):
            fast = deltaplan._units_cost(dt, tr, src, units, 0.3)
            with monkeypatch.context() as m:
                m.setattr(deltaplan, "_unit_hist", None)
                assert deltaplan._units_cost(dt, tr, src, units, 0.3) == fast, (n, tr)


@pytest.mark.skipif(deltaplan._unit_hist is None, reason="C helper not built")
def test_unit_histograms_refuse_units_beyond_the_data():
    src = np.zeros(40, np.uint8)
    h, z = np.empty((2, 4, 256), np.uint64), np.empty(2, np.int64)
    deltaplan._unit_hist(src, 4, np.array([4, 6], np.int64), 1, h, z)
    assert z.tolist() == [0, 0] and h.sum() == 0
    for units in ([4, 7], [-1, 2], [11, 0]):
        with pytest.raises(ValueError):
            deltaplan._unit_hist(src, 4, np.array(units, np.int64), 0, h, z)
    with pytest.raises(ValueError):
        deltaplan._unit_hist(src, 3, np.array([1, 1], np.int64), 0, h, z)
    with pytest.raises(ValueError):
        deltaplan._unit_hist(src, 4, np.array([1, 1, 1], np.int64), 0, h, z)      # tables too small


@pytest.mark.skipif(deltaplan._unit_hist is None, reason="C helper not built")
def test_unit_histograms_check_the_units_they_use():
    """The units are copied before they are checked: an output that overlaps them (or another
    thread changing them) cannot make the C side count past the data."""
    src = np.full(40, 7, np.uint8)                      # 10 nonzero 4-byte elements
    buf = np.array([10, 0, 0], np.int64)
    h = np.empty((2, 4, 256), np.uint64)
    deltaplan._unit_hist(src, 4, buf[0:2], 0, h, buf[1:3])    # nnz_out overlaps units[1]
    assert buf.tolist() == [10, 10, 0]                  # unit 0's count written over units[1] ...
    assert int(h[0].sum()) == 40 and int(h[1].sum()) == 0     # ... but unit 1 was counted as checked: empty
