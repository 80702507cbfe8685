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
