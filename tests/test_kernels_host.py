"""The CUDA kernels' own code, run on the CPU (tests/cuda_host.py), against the numpy reference:
every plane byte, every delta op, every row digest, aligned and unaligned, odd sizes and strides."""
import numpy as np
import pytest
import xxhash

import cuda_host
from mithril_gpu import delta, dtypes, transforms

pytestmark = pytest.mark.skipif(cuda_host.CXX is None, reason="no C++ compiler to build the kernels for the host")


@pytest.fixture(scope="module")
def planes_mod():
    return cuda_host.module("planes")


def _split(mod, name, args):
    """Launch with scalars typed as gpu.py types them (np.int64 for an i64, np.int32 for an int)."""
    sig = mod.sigs[name]
    args = tuple(a if "*" in t or not isinstance(a, int) else (np.int64 if t == "i64" else np.int32)(a)
                 for a, t in zip(args, sig))
    mod.get_function(name)(None, None, args)


@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 64, 1001, 4099])
@pytest.mark.parametrize("pad", [0, 3, 16])
def test_fieldsplit_kernels(planes_mod, name, n, pad):
    dt = dtypes.BY_NAME[name]
    src = np.random.default_rng(n + pad).integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    ref = [np.empty(n, np.uint8) for _ in transforms.plane_widths(dt, "fieldsplit")]
    transforms.split(dt, "fieldsplit", src, ref)
    stride = n + pad
    out = np.full(stride * len(ref), 0xEE, np.uint8)
    if dt.itemsize == 2:
        _split(planes_mod, "split_fieldsplit16", (src, out, n, stride, dt.exp_bits, dt.man_bits))
    else:
        _split(planes_mod, "split_fieldsplit32", (src, out, n, stride))
    for k, p in enumerate(ref):
        assert out[k * stride:k * stride + n].tobytes() == p.tobytes(), (k, stride)
    back = np.zeros_like(src)
    if dt.itemsize == 2:
        _split(planes_mod, "merge_fieldsplit16", (out, back, n, stride, dt.exp_bits, dt.man_bits))
    else:
        _split(planes_mod, "merge_fieldsplit32", (out, back, n, stride))
    assert back.tobytes() == src.tobytes()


def test_vector_path_on_unaligned_input(planes_mod):
    dt = dtypes.BY_NAME["BF16"]
    raw = np.random.default_rng(1).integers(0, 256, 2 * 1000 + 2, dtype=np.uint8)
    src = raw[2:]                                   # 2-byte aligned, not 8-byte aligned
    ref = [np.empty(1000, np.uint8) for _ in range(2)]
    transforms.split(dt, "fieldsplit", src, ref)
    out = np.empty(2 * 1008, np.uint8)
    _split(planes_mod, "split_fieldsplit16", (src, out, 1000, 1008, 8, 7))
    assert out[:1000].tobytes() == ref[0].tobytes() and out[1008:2008].tobytes() == ref[1].tobytes()


@pytest.mark.parametrize("name", list(dtypes.BY_NAME))
@pytest.mark.parametrize("op", [None, "xor", "zigzag"])
@pytest.mark.parametrize("n,pad", [(5, 0), (4099, 13), (1024, 0)])
def test_bytegroup_and_delta_kernels(planes_mod, name, op, n, pad):
    dt = dtypes.BY_NAME[name]
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    b = x.copy()
    b[::3] = rng.integers(0, 256, b[::3].size, dtype=np.uint8)
    d = x.copy()
    if op:
        delta.encode(op, dt, x, b, d)
    ref = [np.empty(n, np.uint8) for _ in range(dt.itemsize)]
    transforms.split(dt, "bytegroup", d, ref)
    stride = n + pad
    out = np.full(stride * dt.itemsize, 0xEE, np.uint8)
    ops = {None: 0, "xor": 1, "zigzag": 2}[op]
    fl = int(delta.is_float(dt))
    _split(planes_mod, f"split_bytegroup{dt.itemsize}", (x, b if op else 0, out, n, stride, ops, fl))
    for k, p in enumerate(ref):
        assert out[k * stride:k * stride + n].tobytes() == p.tobytes(), k
    back = np.zeros_like(x)
    _split(planes_mod, f"merge_bytegroup{dt.itemsize}", (out, b if op else 0, back, n, stride, ops, fl))
    assert back.tobytes() == x.tobytes()


@pytest.mark.parametrize("nbytes", [0, 1, 7, 31, 32, 33, 1000, 3 * 4096 + 17])
def test_xxh64_rows_kernel(nbytes):
    mod = cuda_host.module("checksum")
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    rb = 4096
    rows = -(-nbytes // rb)
    d = np.zeros(max(rows, 1), np.uint64)
    _split(mod, "xxh64_rows", (data, nbytes, rb, d))
    assert d[:rows].tolist() == [xxhash.xxh64_intdigest(data[i:i + rb].tobytes()) for i in range(0, nbytes, rb)]
