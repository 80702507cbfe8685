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
    a = {"w": torch.randn(20000), "m": torch.randn(30000)}
    b = {"w": a["w"] + 1e-3, "m": a["m"].clone()}
    b["m"][::101] += 1.0
    mithril_gpu.save(a, tmp_path / "a.mth", device="cpu")
    mithril_gpu.save(b, tmp_path / "b.mth", base=tmp_path / "a.mth", device="cpu")
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        assert any(e.transform == "masked" for e in f.index.tensors)
        outs = [torch.empty(e.nbytes, dtype=torch.uint8) for e in f.index.tensors]
        gpu.decode_into_device(f, f.index.tensors, outs)
        for e, out in zip(f.index.tensors, outs):
            assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(b[e.name]).tobytes()


def test_gpu_decode_of_ans_chunks_falls_back(tmp_path, fake, monkeypatch):
    """A full tensor with an ans chunk (which mithril writes only in deltas, but a file may hold
    anywhere) is decoded on the CPU and copied over, never handed to nvCOMP."""
    from mithril_gpu import codecs, cpu

    if not codecs.ans_enabled():
        pytest.skip("C helper not built")
    real = codecs.ChunkCoder.encode
    monkeypatch.setattr(codecs.ChunkCoder, "encode", lambda self, chunk, literals=False, use_ans=False:
                        real(self, chunk, False, use_ans=True))
    monkeypatch.setattr(cpu, "FUSED", False)
    w = torch.where(torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) < 0.1, 2.0, 1.0).to(torch.bfloat16)
    mithril_gpu.save({"w": w}, tmp_path / "a.mth", chunk_elems=4096, device="cpu")
    with mithril_gpu.open(tmp_path / "a.mth") as f:
        (e,) = f.index.tensors
        assert e.delta is None and codecs.ANS in e.chunks[2::3]
        out = torch.empty(e.nbytes, dtype=torch.uint8)
        gpu.decode_into_device(f, [e], [out])
        assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(w).tobytes()


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
    with gpu.stream():
        planes = gpu.split_planes(dt, "fieldsplit", x)
    layout = gpu._chunk_layout(n, [1, 1], 4096, "fieldsplit", stride)
    assert [(r, p) for r, p, _, _ in layout] == [(r, p) for r in range(3) for p in range(2)]
    assert all(off % gpu.MIN_ALIGN == 0 for _, _, off, _ in layout)
    out = fake_gpu._dev(np.zeros(2 * n, np.uint8))
    with gpu.stream():
        gpu.merge_planes(dt, "fieldsplit", planes, out)
    assert out.tobytes() == x.tobytes()


def _odd_views():
    """1-byte tensors at odd offsets of a larger buffer (not 4- or 8-byte aligned), and others."""
    big = torch.randint(0, 16, (300007,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))  # zstd shrinks it
    return {"u8_at_3": big[3:200003], "i8_at_1": big.view(torch.int8)[1:150001],
            "bool_at_5": (big[5:90005] & 1).bool(), "f8_at_7": big.view(torch.float8_e4m3fn)[7:70007]}


def _gpu_write(path, state, chunk_elems):
    node, items = _items(state, chunk_elems)
    write_mth(path, items, tree=node, encode=gpu.encode_all, threads=2)


@pytest.mark.parametrize("chunk_elems", [4096, container.DEFAULT_CHUNK_ELEMS])
def test_gpu_save_then_gpu_load_round_trips(tmp_path, fake, chunk_elems):
    """Written by the GPU path, read by the GPU path: every dtype, odd sizes, odd offsets."""
    state = {str(d).removeprefix("torch."): random_tensor(d, (7, 1001 + i), seed=i) for i, d in enumerate(ALL_DTYPES)}
    state.update(_odd_views())
    state["w"] = (torch.randn(70001) * 0.02).to(torch.bfloat16)[1:]          # odd element offset, odd size
    _gpu_write(tmp_path / "g.mth", state, chunk_elems)
    assert fake_gpu.Codec.calls["encode"] > 0
    with mithril_gpu.open(tmp_path / "g.mth") as f:
        outs = [torch.full((e.nbytes,), 0xAB, dtype=torch.uint8) for e in f.index.tensors]
        gpu.decode_into_device(f, f.index.tensors, outs)
        assert fake_gpu.Codec.calls["decode"] > 0
        for e, out in zip(f.index.tensors, outs):
            assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(state[e.name]).tobytes(), e.name


def test_unaligned_one_byte_tensors_are_staged_for_nvcomp(tmp_path, fake):
    """A view such as big[3:] is not 4-byte aligned: the GPU path must stage it, not hand it to nvCOMP."""
    state = _odd_views()
    _gpu_write(tmp_path / "g.mth", state, 4096)
    back = mithril_gpu.load(tmp_path / "g.mth")
    for k, v in state.items():
        assert_same(back[k], v)
    assert fake_gpu.Codec.calls["encode"] == len(state)


def test_decode_into_unaligned_destinations(tmp_path, fake):
    """load(into=) decodes straight into the caller's tensors: odd-offset ones must be staged."""
    state = _odd_views()
    mithril_gpu.save(state, tmp_path / "c.mth", chunk_elems=4096, device="cpu")
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        room = torch.zeros(sum(e.nbytes for e in f.index.tensors) + 64, dtype=torch.uint8)
        outs, at = [], 1
        for e in f.index.tensors:                       # every destination at an odd address
            outs.append(room[at:at + e.nbytes])
            at += e.nbytes + 3
        gpu.decode_into_device(f, f.index.tensors, outs)
        for e, out in zip(f.index.tensors, outs):
            assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(state[e.name]).tobytes(), e.name
    assert fake_gpu.Codec.calls["decode"] == len(state)


def test_stand_ins_are_as_strict_as_nvcomp(fake):
    """What the real binding refuses, the stand-in refuses too (so CI catches it)."""
    from nvidia import nvcomp

    codec, _ = gpu.zstd_codec()
    buf = fake_gpu._dev(np.zeros(4096, np.uint8))
    with gpu.stream():
        with pytest.raises(TypeError):
            codec.encode([buf])                                             # a list is not a BatchArray
        with pytest.raises(AssertionError, match="unaligned"):
            codec.encode(gpu._batch(buf, [3], [64]))                       # unaligned chunk address
        frames = codec.encode(gpu._batch(buf, [0], [4096]))
        with pytest.raises(TypeError):
            codec.decode(frames, out=[buf])
    with pytest.raises(ValueError):
        nvcomp.as_arrays(buf, [], [])
    with pytest.raises(AssertionError, match="stream 0"):
        codec.encode(gpu._batch(buf, [0], [4096]))                         # not on the backend's stream


def test_benchmark_drives_nvcomp_through_the_real_api(fake):
    """bench_gpu's nvCOMP comparison uses the binding as the device will (a BatchArray, the
    backend's stream): run against the strict stand-ins on a small state."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_gpu

    sd = {"a": torch.randn(300000) * 0.02, "b": torch.randn(1000, 77) * 0.1}
    rows = bench_gpu.nvcomp_vs_zstandard(sd)
    assert [r["plane"].split(" (")[0] for r in rows] == ["bf16 plane 0", "bf16 plane 1", "fp32 plane 0", "fp32 plane 1",
                                                         "fp32 plane 2", "fp32 plane 3"]
    assert all(r["cpu"] > 1.0 if "plane 0" in r["plane"] else r["cpu"] >= 1.0 for r in rows)


def test_an_environment_switch_forces_the_cpu_path(fake, monkeypatch):
    monkeypatch.setenv("MITHRIL_GPU", "0")
    assert gpu.status() == (False, "the GPU backend is turned off (MITHRIL_GPU=0)")
    from mithril_gpu import backends

    with pytest.raises(mithril_gpu.BackendUnavailableError, match="MITHRIL_GPU=0"):
        backends.choose_encoder("cuda", [])


def test_a_tensor_changed_between_its_digests_and_its_planes_fails_the_save(tmp_path, fake, monkeypatch):
    """The GPU path hashes a CUDA tensor, then splits it: another stream writing to it in between
    would give a file that fails its checksums. The tensor is hashed again after the coding; a
    change makes the save fail with a typed error and write nothing (the file stays as it was)."""
    state = {"w": random_tensor(torch.bfloat16, (64, 4096), seed=1)}
    mithril_gpu.save({"old": torch.ones(3)}, tmp_path / "g.mth", device="cpu")
    real = gpu.split_planes

    def change_then_split(dt, transform, x, *a, **k):
        state["w"].view(-1)[:100] += 1                 # another stream's kernel lands here
        return real(dt, transform, x, *a, **k)
    monkeypatch.setattr(gpu, "split_planes", change_then_split)
    node, items = _items(state, 4096)
    with pytest.raises(mithril_gpu.MithrilError, match="changed on the GPU while it was being saved"):
        write_mth(tmp_path / "g.mth", items, tree=node, encode=gpu.encode_all, threads=2)
    assert list(mithril_gpu.load(tmp_path / "g.mth")) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.mth"]
    monkeypatch.setattr(gpu, "split_planes", real)
    node, items = _items(state, 4096)
    write_mth(tmp_path / "g.mth", items, tree=node, encode=gpu.encode_all, threads=2)     # unchanged: written
    assert_same(mithril_gpu.load(tmp_path / "g.mth")["w"], state["w"])


def test_frames_without_a_declared_size_are_decoded_on_the_cpu(tmp_path, fake, monkeypatch):
    """FORMAT.md lets a writer leave a zstd frame's content size out; nvCOMP's RAW decoder needs
    it. Such a tensor is decoded by the CPU path (no note: nothing went wrong), never refused."""
    import warnings

    import zstandard
    from mithril_gpu import codecs, cpu

    monkeypatch.setattr(codecs, "zstd_parameters", lambda level: zstandard.ZstdCompressionParameters(
        strategy=zstandard.STRATEGY_FAST, window_log=17, write_content_size=False, write_checksum=False, threads=0))
    monkeypatch.setattr(codecs, "_huff_frame", None)
    monkeypatch.setattr(cpu, "FUSED", False)
    w = (torch.randn(300000) * 0.02).to(torch.bfloat16)
    mithril_gpu.save({"w": w}, tmp_path / "c.mth", device="cpu", chunk_elems=4096)
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        e = f.entry("w")
        off, csize, cid = e.chunk(0, 0)
        assert cid == 1 and zstandard.frame_content_size(bytes(f._buf[off:off + csize])) == -1
        out = torch.empty(e.nbytes, dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gpu.decode_into_device(f, [e], [out])
    assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(w).tobytes()
    assert fake_gpu.Codec.calls["decode"] == 0


def test_a_wrong_gpu_decode_is_caught_and_the_cpu_gives_the_right_bytes(tmp_path, fake, monkeypatch):
    """A GPU decode that fails the checksum is decoded again on the CPU: a damaged file then gets
    the CPU's ChecksumMismatchError (test_gpu_decode_detects_damage); a sound file gets the right
    bytes and a note that the GPU was wrong."""
    w = (torch.randn(300000) * 0.02).to(torch.bfloat16)
    mithril_gpu.save({"w": w}, tmp_path / "c.mth", device="cpu", chunk_elems=4096)
    real = gpu.merge_planes

    def wrong(dt, transform, planes, out, *a, **k):
        real(dt, transform, planes, out, *a, **k)
        out[5] ^= 1                                     # a kernel bug
    monkeypatch.setattr(gpu, "merge_planes", wrong)
    with mithril_gpu.open(tmp_path / "c.mth") as f:
        out = torch.empty(f.entry("w").nbytes, dtype=torch.uint8)
        with pytest.warns(mithril_gpu.backends.BackendNote, match="failed its checksum, the CPU's did not"):
            gpu.decode_into_device(f, f.index.tensors, [out])
    assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(w).tobytes()


def test_gpu_failures_are_typed_and_out_of_memory_falls_back(tmp_path, fake, monkeypatch):
    """A CUDA error while saving raises GpuError and writes nothing; running out of device memory
    codes that tensor on the CPU (with a note); loads alike. CuPy's pools are given back after
    every call, failed or not."""
    state = {"w": (torch.randn(64, 4096) * 0.02).to(torch.bfloat16)}
    mithril_gpu.save({"old": torch.ones(3)}, tmp_path / "g.mth", device="cpu")
    real = gpu.split_planes
    import cupy

    def broken(*a, **k):
        raise cupy.cuda.runtime.CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")
    monkeypatch.setattr(gpu, "split_planes", broken)
    node, items = _items(state, 4096)
    with pytest.raises(mithril_gpu.GpuError, match="saving tensor 'w'.*illegal memory access.*MITHRIL_GPU=0"):
        write_mth(tmp_path / "g.mth", items, tree=node, encode=gpu.encode_all, threads=2)
    assert list(mithril_gpu.load(tmp_path / "g.mth")) == ["old"]
    assert cupy.get_default_memory_pool().freed >= 1

    def oom(*a, **k):
        raise cupy.cuda.memory.OutOfMemoryError("out of memory allocating 1073741824 bytes")
    monkeypatch.setattr(gpu, "split_planes", oom)
    node, items = _items(state, 4096)
    with pytest.warns(mithril_gpu.backends.BackendNote, match="'w' coded on the CPU: the GPU is out of memory"):
        write_mth(tmp_path / "g.mth", items, tree=node, encode=gpu.encode_all, threads=2)
    assert_same(mithril_gpu.load(tmp_path / "g.mth")["w"], state["w"])
    monkeypatch.setattr(gpu, "split_planes", real)

    monkeypatch.setattr(gpu, "merge_planes", broken)
    with mithril_gpu.open(tmp_path / "g.mth") as f:
        out = torch.empty(f.entry("w").nbytes, dtype=torch.uint8)
        with pytest.raises(mithril_gpu.GpuError, match="loading tensor 'w'"):
            gpu.decode_into_device(f, f.index.tensors, [out])
        monkeypatch.setattr(gpu, "merge_planes", oom)
        with pytest.warns(mithril_gpu.backends.BackendNote, match="'w' decoded on the CPU: the GPU is out of memory"):
            gpu.decode_into_device(f, f.index.tensors, [out])
    assert out.numpy().tobytes() == mithril_gpu.api.tensor_bytes(state["w"]).tobytes()


def test_each_thread_has_its_own_codec_and_stream(tmp_path, fake):
    """nvCOMP's codecs are thread-local (the stand-in fails a codec used from another thread): a
    save on a Checkpointer's background thread and one on the caller's do not share one."""
    import threading

    state = {"w": (torch.randn(64, 4096) * 0.02).to(torch.bfloat16)}
    node, items = _items(state, 4096)
    write_mth(tmp_path / "a.mth", items, tree=node, encode=gpu.encode_all, threads=1)
    errors = []

    def other():
        try:
            n2, it2 = _items(state, 4096)
            write_mth(tmp_path / "b.mth", it2, tree=n2, encode=gpu.encode_all, threads=1)
        except BaseException as e:          # (reported on the main thread)
            errors.append(e)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert not errors, errors
    assert len({k[0] for k in gpu._codecs}) == 2 and len({k[0] for k in gpu._streams}) == 2
    for p in ("a.mth", "b.mth"):
        assert_same(mithril_gpu.load(tmp_path / p)["w"], state["w"])


def test_a_zstd_level_keeps_the_save_on_the_cpu(tmp_path, fake):
    """nvCOMP's zstd has no level: with device='auto' a level keeps the save on the CPU (a note
    says why), and device='cuda' with a level is refused rather than the level ignored."""
    from mithril_gpu import backends

    class Cuda:                                                          # (what choose_encoder looks at)
        is_cuda = True
    with pytest.warns(backends.BackendNote, match="level=19 applies to the CPU path only"):
        assert backends.choose_encoder("auto", [Cuda()], 19) is None
    assert backends.choose_encoder("auto", [Cuda()]) is gpu.encode_all
    with pytest.raises(ValueError, match="give device='cuda' or level, not both"):
        backends.choose_encoder("cuda", [Cuda()], 3)
