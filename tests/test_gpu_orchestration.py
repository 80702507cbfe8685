"""The GPU backend's Python, run on the CPU against stand-ins for CuPy and nvCOMP (fake_gpu.py):
chunk layout, plane strides, aligned staging, stored-vs-zstd, ordering and fallbacks. A file the
GPU path writes must decode bit-exact on the CPU path, and the GPU load path must read CPU files.
The kernels are the real ones, compiled for the host."""
import numpy as np
import pytest
import torch

import mithril_gpu
import fake_gpu
from conftest import ALL_DTYPES, assert_same, random_tensor
from mithril_gpu import container, dtypes, gpu, tree
from mithril_gpu.cpu import EncodeItem
from mithril_gpu.transforms import default_transform
from mithril_gpu.writer import write_mth


pytestmark = pytest.mark.skipif(fake_gpu.cuda_host.CXX is None, reason="no C++ compiler to build the kernels for the host")


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("MITHRIL_GPU_EXPERIMENTAL", "1")
    with fake_gpu.installed():
        yield


def _items(state, chunk_elems):
    node, leaves = tree.encode(state, lambda x: isinstance(x, torch.Tensor))
    items = []
    for name, t in leaves:
        dt = dtypes.from_torch(t.dtype)
        items.append(EncodeItem(name, dt, tuple(t.shape), mithril_gpu.api.tensor_bytes(t), default_transform(dt),
                                chunk_elems, device_tensor=t))
    return node, items


def test_status_with_the_stand_ins(fake):
    assert gpu.status() == (True, "")


@pytest.mark.parametrize("chunk_elems", [4096, 1000, container.DEFAULT_CHUNK_ELEMS])
def test_gpu_encode_writes_what_the_cpu_reads(tmp_path, fake, chunk_elems):
    state = {str(d).removeprefix("torch."): random_tensor(d, (3, 3001), seed=i) for i, d in enumerate(ALL_DTYPES)}
    state["zeros"] = torch.zeros(50000, dtype=torch.bfloat16)        # chunks that zstd shrinks a lot
    state["empty"] = torch.zeros(0, 7)
    state["scalar"] = torch.tensor(2.5)
    node, items = _items(state, chunk_elems)
    write_mth(tmp_path / "g.mth", items, tree=node, encode=gpu.encode_all, threads=2)
    back = mithril_gpu.load(tmp_path / "g.mth")
    for k, v in state.items():
        assert_same(back[k], v)
    mithril_gpu.save(state, tmp_path / "c.mth", chunk_elems=chunk_elems, device="cpu")
    with mithril_gpu.open(tmp_path / "g.mth") as g, mithril_gpu.open(tmp_path / "c.mth") as c:
        assert [e.checksum for e in g.index.tensors] == [e.checksum for e in c.index.tensors]
        codecs_used = {cd for e in g.index.tensors for cd in e.chunks[2::3]}
        assert codecs_used == {0, 1}                 # random planes stored, the rest zstd
    aligned = chunk_elems % gpu.MIN_ALIGN == 0       # odd chunk sizes take the CPU path by design
    assert (fake_gpu.Codec.calls["encode"] > 0) == aligned


@pytest.mark.parametrize("chunk_elems", [4096, 1001])
def test_gpu_decode_reads_what_the_cpu_writes(tmp_path, fake, chunk_elems):
    state = {str(d): random_tensor(d, (2, 5003), seed=i) for i, d in enumerate(ALL_DTYPES)}
    state["w"] = (torch.randn(70000) * 0.02).to(torch.bfloat16)
    mithril_gpu.save(state, tmp_path / "c.mth", chunk_elems=chunk_elems, device="cpu")
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        outs = [torch.full((e.nbytes,), 0xAB, dtype=torch.uint8) for e in f.index.tensors]
        gpu.decode_into_device(f, f.index.tensors, outs)
        for e, out in zip(f.index.tensors, outs):
            assert out.numpy().tobytes() == f.get_bytes(e.name).tobytes(), e.name
    assert (fake_gpu.Codec.calls["decode"] > 0) == (chunk_elems % gpu.MIN_ALIGN == 0)


def test_gpu_decode_of_deltas_and_masked_falls_back(tmp_path, fake):
    a = {"w": torch.randn(20000), "m": torch.zeros(30000)}
    b = {"w": a["w"] + 1e-3, "m": a["m"].clone()}
    b["m"][::101] = 1.0
    mithril_gpu.save(a, tmp_path / "a.mth", device="cpu")
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth", device="cpu")
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        assert any(e.transform == "masked" for e in f.index.tensors)
        outs = [torch.empty(e.nbytes, dtype=torch.uint8) for e in f.index.tensors]
        gpu.decode_into_device(f, f.index.tensors, outs)
        for e, out in zip(f.index.tensors, outs):
            assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(b[e.name]).tobytes()


def test_gpu_decode_detects_damage(tmp_path, fake):
    w = (torch.randn(300000) * 0.02).to(torch.bfloat16)
    mithril_gpu.save({"w": w}, tmp_path / "c.mth", device="cpu")
    data = bytearray((tmp_path / "c.mth").read_bytes())
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        off, csize, codec = f.entry("w").chunk(1, 1)          # a stored mantissa chunk
    assert codec == 0
    data[off + 7] ^= 0x10
    (tmp_path / "c.mth").write_bytes(bytes(data))
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        with pytest.raises(mithril_gpu.ChecksumMismatchError, match="'w'"):
            gpu.decode_into_device(f, f.index.tensors, [torch.empty(w.numel() * 2, dtype=torch.uint8)])


def test_strided_planes_and_layout_agree(fake):
    dt = dtypes.BY_NAME["BF16"]
    n = 10001
    x = fake_gpu._dev(np.random.default_rng(0).integers(0, 256, 2 * n, dtype=np.uint8))
    stride = gpu.plane_stride(n)
    assert stride % gpu.MIN_ALIGN == 0 and stride >= n
    planes = gpu.split_planes(dt, "fieldsplit", x)
    layout = gpu._chunk_layout(n, [1, 1], 4096, "fieldsplit", stride)
    assert [(r, p) for r, p, _, _ in layout] == [(r, p) for r in range(3) for p in range(2)]
    assert all(off % gpu.MIN_ALIGN == 0 for _, _, off, _ in layout)
    out = fake_gpu._dev(np.zeros(2 * n, np.uint8))
    gpu.merge_planes(dt, "fieldsplit", planes, out)
    assert out.tobytes() == x.tobytes()
