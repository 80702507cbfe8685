"""GPU checks: kernel planes are byte-identical to the numpy reference, GPU-written files decode on
the CPU bit-exact, nvCOMP's frames are standard zstd. They run wherever CuPy, nvCOMP and a CUDA
device are present, and skip (with the reason) elsewhere."""
import os

import numpy as np
import pytest

os.environ.setdefault("MITHRIL_GPU_EXPERIMENTAL", "1")   # these tests are what validates the backend

import mithril_gpu  # noqa: E402
from mithril_gpu import checksum, delta, dtypes, gpu, transforms  # noqa: E402
from conftest import ALL_DTYPES, assert_same, random_tensor  # noqa: E402

OK, WHY = gpu.status()
pytestmark = pytest.mark.skipif(not OK, reason=f"no usable GPU backend: {WHY}")

SIZES = [1, 3, 4, 5, 1000, 4099, 131072 + 7]


@pytest.fixture
def nvcomp_calls(monkeypatch):
    """Counts of nvCOMP encode and decode calls the backend makes: a test that means to run on
    the GPU checks it did (a tensor the backend quietly sends to the CPU passes everything else)."""
    calls = {"encode": 0, "decode": 0}
    real = gpu.zstd_codec

    class Counting:
        def __init__(self, codec):
            self._c = codec

        def encode(self, *a, **k):
            calls["encode"] += 1
            return self._c.encode(*a, **k)

        def decode(self, *a, **k):
            calls["decode"] += 1
            return self._c.decode(*a, **k)

        def __getattr__(self, name):
            return getattr(self._c, name)

    def counted():
        codec, align = real()
        return Counting(codec), align
    monkeypatch.setattr(gpu, "zstd_codec", counted)
    return calls


def _weights(dtype, n: int, seed: int):
    """Values shaped like trained weights (their exponent planes compress: zstd chunks, not stored)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


def _cupy(a: np.ndarray):
    import cupy

    return cupy.asarray(a)


def _planes(buf, n: int, nplanes: int, stride: int) -> list[bytes]:
    host = buf.get()
    return [host[k * stride:k * stride + n].tobytes() for k in range(nplanes)]


@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", SIZES)
def test_fieldsplit_kernels_match_reference(name, n):
    dt = dtypes.BY_NAME[name]
    src = np.random.default_rng(n).integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    ref = [np.empty(n * w, np.uint8) for w in transforms.plane_widths(dt, "fieldsplit")]
    transforms.split(dt, "fieldsplit", src, ref)
    import cupy

    for stride in (gpu.plane_stride(n), n):                    # aligned (vector path) and packed
        got = gpu.split_planes(dt, "fieldsplit", _cupy(src), stride=stride)
        assert _planes(got, n, len(ref), stride) == [p.tobytes() for p in ref]
        out = cupy.zeros(src.size, dtype=cupy.uint8)
        gpu.merge_planes(dt, "fieldsplit", got, out, stride=stride)
        assert out.get().tobytes() == src.tobytes()


@pytest.mark.parametrize("name", [d for d in dtypes.BY_NAME])
@pytest.mark.parametrize("op", [None, "xor", "zigzag"])
@pytest.mark.parametrize("n", [5, 4099])
def test_bytegroup_and_delta_kernels_match_reference(name, op, n):
    import cupy

    dt = dtypes.BY_NAME[name]
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    b = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    d = x.copy()
    if op is not None:
        delta.encode(op, dt, x, b, d)
    ref = [np.empty(n, np.uint8) for _ in range(dt.itemsize)]
    transforms.split(dt, "bytegroup", d, ref)
    for stride in (gpu.plane_stride(n), n):
        got = gpu.split_planes(dt, "bytegroup", _cupy(x), _cupy(b) if op else None, op, stride=stride)
        assert _planes(got, n, dt.itemsize, stride) == [p.tobytes() for p in ref]
        out = cupy.zeros(x.size, dtype=cupy.uint8)
        gpu.merge_planes(dt, "bytegroup", got, out, _cupy(b) if op else None, op, stride=stride)
        assert out.get().tobytes() == x.tobytes()


def test_unaligned_views_use_the_scalar_path():
    dt = dtypes.BY_NAME["BF16"]
    src = np.random.default_rng(0).integers(0, 256, 2 * 1001 + 2, dtype=np.uint8)
    dev = _cupy(src)[2:]                       # element-aligned, not vector-aligned
    ref = [np.empty(1001, np.uint8) for _ in range(2)]
    transforms.split(dt, "fieldsplit", src[2:], ref)
    got = gpu.split_planes(dt, "fieldsplit", dev)
    assert _planes(got, 1001, 2, gpu.plane_stride(1001)) == [p.tobytes() for p in ref]


@pytest.mark.parametrize("nbytes", [0, 1, 31, 32, 33, 1000, 262144 * 3 + 17])
def test_row_digests_match_cpu(nbytes):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    rb = 262144
    cpu_rows = [checksum.row_digest(data[i:i + rb]) for i in range(0, nbytes, rb)]
    assert gpu.row_digests(_cupy(data), rb) == cpu_rows


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_gpu_save_decodes_on_cpu_bit_exact(tmp_path, dtype):
    t = random_tensor(dtype, (3, 70001), seed=1)
    mithril_gpu.save({"t": t.cuda(), "s": t[0, :5].cuda()}, tmp_path / "g.mth", device="cuda")
    mithril_gpu.save({"t": t, "s": t[0, :5]}, tmp_path / "c.mth", device="cpu")
    back = mithril_gpu.load(tmp_path / "g.mth")
    assert_same(back["t"], t)
    with mithril_gpu.open(tmp_path / "g.mth") as g, mithril_gpu.open(tmp_path / "c.mth") as c:
        assert [e.checksum for e in g.index.tensors] == [e.checksum for e in c.index.tensors]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_gpu_frames_of_weights_decode_on_cpu_bit_exact(tmp_path, dtype, nvcomp_calls):
    """nvCOMP's own zstd frames (weight-like planes compress; random ones are stored) read by the
    CPU path, and read back by the GPU path through nvCOMP."""
    import torch

    t = _weights(getattr(torch, dtype), 3 * 131072 + 5, seed=3)
    mithril_gpu.save({"t": t.cuda()}, tmp_path / "g.mth", device="cuda")
    assert nvcomp_calls["encode"] > 0
    with mithril_gpu.open(tmp_path / "g.mth") as f:
        assert 1 in f.entry("t").chunks[2::3]                  # zstd chunks written by nvCOMP
    assert_same(mithril_gpu.load(tmp_path / "g.mth")["t"], t)
    assert_same(mithril_gpu.load(tmp_path / "g.mth", device="cuda")["t"].cpu(), t)
    assert nvcomp_calls["decode"] > 0


def test_gpu_save_of_real_weights_matches_cpu_ratio(tmp_path, minilm_bf16, nvcomp_calls):
    sd = {k: v.cuda() for k, v in minilm_bf16.items()}
    mithril_gpu.save(sd, tmp_path / "g.mth", device="cuda")
    assert nvcomp_calls["encode"] > 0
    mithril_gpu.save(minilm_bf16, tmp_path / "c.mth", device="cpu")
    back = mithril_gpu.load(tmp_path / "g.mth")             # bit-exact first: the ratio check may fail alone
    for k, v in minilm_bf16.items():
        assert_same(back[k], v)
    g, c = os.path.getsize(tmp_path / "g.mth"), os.path.getsize(tmp_path / "c.mth")
    assert g <= c * 1.01, f"the GPU file is {100 * (g / c - 1):.2f}% larger than the CPU path's (issue 14's known gap)"


def test_cpu_file_loads_onto_the_gpu(tmp_path, minilm_bf16, nvcomp_calls):
    mithril_gpu.save(minilm_bf16, tmp_path / "c.mth", device="cpu")
    back = mithril_gpu.load(tmp_path / "c.mth", device="cuda")
    assert nvcomp_calls["decode"] > 0
    for k, v in minilm_bf16.items():
        assert back[k].is_cuda
        assert_same(back[k].cpu(), v)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_gpu_load_of_cpu_file_is_bit_exact(tmp_path, dtype):
    t = random_tensor(dtype, (5, 30011), seed=2)
    mithril_gpu.save({"t": t, "e": t[:0]}, tmp_path / "c.mth", device="cpu", chunk_elems=4096)
    back = mithril_gpu.load(tmp_path / "c.mth", device="cuda")
    assert back["t"].is_cuda
    assert_same(back["t"].cpu(), t)
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        assert_same(f.get_tensor("t", device="cuda").cpu(), t)


def test_gpu_load_of_a_delta_chain(tmp_path, minilm_bf16):
    mithril_gpu.save(minilm_bf16, tmp_path / "a.mth", device="cpu")
    nxt = {k: v.clone() for k, v in minilm_bf16.items()}
    for v in nxt.values():
        v.view(-1)[::13] += 1
    mithril_gpu.save(nxt, tmp_path / "b.mth", base=tmp_path / "a.mth", device="cpu")
    back = mithril_gpu.load(tmp_path / "b.mth", device="cuda")
    for k, v in nxt.items():
        assert_same(back[k].cpu(), v)


def test_corrupted_chunk_gives_the_same_error_on_gpu(tmp_path, minilm_bf16):
    path = tmp_path / "c.mth"
    mithril_gpu.save(minilm_bf16, path, device="cpu")
    data = bytearray(path.read_bytes())
    with mithril_gpu.open(path) as f:
        e = f.index.tensors[0]
        off, csize, _ = e.chunk(0, 1)                        # a stored mantissa chunk: decodes, wrong bytes
    data[off + csize // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(mithril_gpu.ChecksumMismatchError, match=e.name):
        mithril_gpu.load(path, device="cpu")
    with pytest.raises(mithril_gpu.ChecksumMismatchError, match=e.name):
        mithril_gpu.load(path, device="cuda")


def test_load_into_cuda_tensors_without_a_second_copy(tmp_path, minilm_bf16):
    import torch

    mithril_gpu.save(minilm_bf16, tmp_path / "c.mth", device="cpu")
    target = {k: torch.empty_like(v, device="cuda") for k, v in minilm_bf16.items()}
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    back = mithril_gpu.load(tmp_path / "c.mth", device="cuda", into=target)
    for k, v in minilm_bf16.items():
        assert back[k].data_ptr() == ptrs[k]
        assert_same(target[k].cpu(), v)


ODD_SIZES = [1, 3, 4097, 131072 * 2 + 5]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n", ODD_SIZES)
def test_gpu_save_then_gpu_load(tmp_path, dtype, n):
    """Written by the GPU path, read back by the GPU path: every dtype, odd sizes, odd offsets."""
    import torch

    big = random_tensor(dtype, (n + 3,), seed=n).cuda()
    state = {"t": big[:n], "odd": big[3:], "fresh": big[1:].clone()}
    mithril_gpu.save(state, tmp_path / "g.mth", device="cuda")
    back = mithril_gpu.load(tmp_path / "g.mth", device="cuda")
    for k, v in state.items():
        assert back[k].is_cuda
        assert_same(back[k].cpu(), v.cpu())
    target = torch.zeros(2 * n + 16, dtype=dtype, device="cuda")
    into = {"t": target[1:n + 1], "odd": target[n + 3:2 * n + 3], "fresh": torch.empty_like(big[1:])}
    mithril_gpu.load(tmp_path / "g.mth", device="cuda", into=into)
    for k, v in state.items():
        assert_same(into[k].cpu(), v.cpu())


def test_big_tensors_survive_stream_hand_offs(tmp_path):
    """Large tensors produced by torch right before the save and consumed right after the load:
    a missing wait between torch's stream and the backend's shows up as a checksum error here."""
    import torch

    for i in range(3):
        t = torch.randn(96 << 20, device="cuda", dtype=torch.float32).mul_(0.02).to(torch.bfloat16)   # 192 MB
        torch.cuda._sleep(int(5e8))                            # (the GPU busy for a while on torch's stream:
        t.add_(i)                                              # this is still queued when the save starts)
        mithril_gpu.save({"t": t}, tmp_path / "big.mth", device="cuda")
        back = mithril_gpu.load(tmp_path / "big.mth", device="cuda")["t"]
        assert torch.equal(back.view(torch.int16), t.view(torch.int16))
        out = torch.empty_like(t)
        mithril_gpu.load(tmp_path / "big.mth", device="cuda", into={"t": out})
        assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_saves_and_loads_on_a_side_stream(tmp_path):
    """Work made on a non-default torch stream (as DDP and prefetchers do): the backend waits for
    the stream that is current, and hands results back to it."""
    import torch

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        t = _weights(torch.bfloat16, 8 << 20, seed=5).cuda()
        torch.cuda._sleep(int(5e8))
        t.mul_(2)
        mithril_gpu.save({"t": t}, tmp_path / "s.mth", device="cuda")
        back = mithril_gpu.load(tmp_path / "s.mth", device="cuda")["t"]
        assert torch.equal(back.view(torch.int16), t.view(torch.int16))
    side.synchronize()
    assert_same(mithril_gpu.load(tmp_path / "s.mth")["t"], t.cpu())


def test_a_tensor_over_2_gib(tmp_path, nvcomp_calls):
    """64-bit offsets everywhere: a 2.2 GB bf16 tensor saved and loaded on the GPU."""
    import torch

    n = (1 << 30) + (1 << 26) + 7
    t = (torch.randn(n, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16)
    mithril_gpu.save({"t": t}, tmp_path / "big.mth", device="cuda")
    back = mithril_gpu.load(tmp_path / "big.mth", device="cuda")["t"]
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))
    assert nvcomp_calls["encode"] > 0 and nvcomp_calls["decode"] > 0


def test_zz_damaged_zstd_frame_is_refused_on_gpu(tmp_path):
    """Last in the file: nvCOMP calls a damaged frame undefined behaviour. The frame's header
    stays sound (the body is flipped), so nvCOMP gets it; whatever it does, the load must end in
    the CPU path's CorruptFileError, never wrong bytes."""
    import torch

    t = _weights(torch.bfloat16, 2 * 131072, seed=9)
    path = tmp_path / "z.mth"
    mithril_gpu.save({"t": t}, path, device="cpu")
    data = bytearray(path.read_bytes())
    with mithril_gpu.open(path) as f:
        off, csize, codec_id = f.entry("t").chunk(0, 0)          # the exponent plane: a zstd frame
    assert codec_id == 1
    data[off + csize // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mithril_gpu.CorruptFileError):
        mithril_gpu.load(path, device="cpu")
    with pytest.raises(mithril_gpu.CorruptFileError):
        mithril_gpu.load(path, device="cuda")
