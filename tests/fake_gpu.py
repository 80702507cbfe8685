"""Stand-ins for CuPy and nvCOMP that run on the CPU, so CI exercises the GPU backend's own
Python (chunk layout, plane strides, aligned staging, stored-vs-zstd choice, ordering,
fallbacks) on every run. They are not a GPU: kernels are replaced by the numpy reference with
the kernels' signatures, and nvCOMP's zstd by libzstd. What only a GPU can show (the CUDA
kernels themselves, nvCOMP's real behaviour) is in test_gpu.py, which runs on a device."""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import xxhash
import zstandard

from mithril_gpu import delta, dtypes, transforms


class DevArray(np.ndarray):
    """A 'device' array: a numpy array with CuPy's .get()."""

    def get(self):
        return np.array(self)


def _dev(a) -> DevArray:
    return np.asarray(a).view(DevArray)


# ------------------------------------------------------------------ kernels, as the .cu files define them

def _by_itemsize(n):
    return {1: "U8", 2: "U16", 4: "U32", 8: "U64"}[n]


def _split_into(dt, transform, src, out, n, stride):
    planes = [out[k * stride:k * stride + n] for k in range(len(transforms.plane_widths(dt, transform)))]
    transforms.split(dt, transform, np.asarray(src[:n * dt.itemsize]), planes)


def _merge_from(dt, transform, planes_buf, out, n, stride):
    planes = [np.asarray(planes_buf[k * stride:k * stride + n]) for k in range(len(transforms.plane_widths(dt, transform)))]
    transforms.merge(dt, transform, planes, out[:n * dt.itemsize])


_FLOAT_OF = {(2, 8, 7): "BF16", (2, 5, 10): "F16"}
_OPS = {1: "xor", 2: "zigzag"}


def _kernel(name):
    def split_fs16(x, out, n, stride, e, m):
        _split_into(dtypes.BY_NAME[_FLOAT_OF[(2, e, m)]], "fieldsplit", x, out, int(n), int(stride))

    def merge_fs16(planes, out, n, stride, e, m):
        _merge_from(dtypes.BY_NAME[_FLOAT_OF[(2, e, m)]], "fieldsplit", planes, out, int(n), int(stride))

    def split_fs32(x, out, n, stride):
        _split_into(dtypes.BY_NAME["F32"], "fieldsplit", x, out, int(n), int(stride))

    def merge_fs32(planes, out, n, stride):
        _merge_from(dtypes.BY_NAME["F32"], "fieldsplit", planes, out, int(n), int(stride))

    def split_bg(size):
        def run(x, base, out, n, stride, op, fl):
            n, stride = int(n), int(stride)
            dt = dtypes.BY_NAME[_by_itemsize(size)]
            src = np.asarray(x[:n * size])
            if int(op):
                d = np.empty_like(src)
                delta.encode(_OPS[int(op)], _float_dt(size) if fl else dt, src, np.asarray(base[:n * size]), d)
                src = d
            _split_into(dtypes.BY_NAME[_by_itemsize(size)], "bytegroup", src, out, n, stride)
        return run

    def merge_bg(size):
        def run(planes, base, out, n, stride, op, fl):
            n, stride = int(n), int(stride)
            u = dtypes.BY_NAME[_by_itemsize(size)]
            if int(op):
                tmp = np.empty(n * size, np.uint8)
                _merge_from(u, "bytegroup", planes, tmp, n, stride)
                delta.decode(_OPS[int(op)], _float_dt(size) if fl else u, tmp, np.asarray(base[:n * size]), out[:n * size])
            else:
                _merge_from(u, "bytegroup", planes, out, n, stride)
        return run

    def rows(x, nbytes, row_bytes, d):
        nbytes, row_bytes = int(nbytes), int(row_bytes)
        for r, a in enumerate(range(0, nbytes, row_bytes)):
            d[r] = xxhash.xxh64_intdigest(np.asarray(x[a:min(a + row_bytes, nbytes)]).tobytes())

    table = {"split_fieldsplit16": split_fs16, "merge_fieldsplit16": merge_fs16, "split_fieldsplit32": split_fs32,
             "merge_fieldsplit32": merge_fs32, "xxh64_rows": rows}
    for s in (1, 2, 4, 8):
        table[f"split_bytegroup{s}"] = split_bg(s)
        table[f"merge_bytegroup{s}"] = merge_bg(s)
    fn = table[name]
    return lambda grid, block, args: fn(*args)


def _float_dt(size):
    # the kernels get is_float only; any float dtype of that width has the same key function
    return dtypes.BY_NAME[{1: "F8_E4M3", 2: "F16", 4: "F32", 8: "F64"}[size]]


def declared_kernels(code: str) -> dict[str, int]:
    """{kernel name: parameter count} as the .cu source declares them (BYTEGROUP macro expanded)."""
    import re

    out = {}
    for name, paste, params in re.findall(r'extern "C" __global__ void (\w+?)(##SUF)?\(([^)]*)\)', code):
        count = len([p for p in params.split(",") if p.strip()])
        if paste:
            for suf in re.findall(r"^BYTEGROUP\(\w+, (\d+)\)", code, re.M):
                out[name + suf] = count
        else:
            out[name] = count
    return out


class RawModule:
    """Checks that every kernel the backend asks for exists in the real .cu source, and that it
    is called with as many arguments as it declares."""

    def __init__(self, code, options=()):
        self.kernels = declared_kernels(code)
        assert self.kernels, "no kernels found in the source"

    def get_function(self, name):
        assert name in self.kernels, f"kernel {name} is not declared in the .cu source"
        fn = _kernel(name)

        def launch(grid, block, args):
            assert len(args) == self.kernels[name], f"{name} takes {self.kernels[name]} arguments, got {len(args)}"
            fn(grid, block, args)
        return launch


# ------------------------------------------------------------------ nvCOMP

class FakeBatch(list):
    def __init__(self, items, sizes=None):
        super().__init__(items)
        self.buffer_sizes = list(sizes if sizes is not None else (len(a) for a in items))

    def cpu(self):
        return FakeBatch([np.array(a) for a in self], self.buffer_sizes)


class Codec:
    ALIGN = 8
    calls = {"encode": 0, "decode": 0}      # lets tests see which branch ran

    def __init__(self, algorithm=None, bitstream_kind=None, device_id=0):
        assert algorithm == "Zstd" and bitstream_kind == "RAW"

    def get_required_compression_alignment(self):
        return self.ALIGN

    def get_required_decompression_alignment(self):
        return self.ALIGN

    def encode(self, batch):
        Codec.calls["encode"] += 1
        for a in batch:   # nvCOMP requires aligned chunk addresses: check what the backend hands in
            assert a.__array_interface__["data"][0] % self.ALIGN == 0, "unaligned chunk given to nvCOMP"
        frames = [_dev(np.frombuffer(zstandard.ZstdCompressor(level=1).compress(np.asarray(a).tobytes()), np.uint8))
                  for a in batch]
        return FakeBatch(frames)

    def decode(self, src, out=None):
        Codec.calls["decode"] += 1
        sizes = []
        for s, o in zip(src, out):
            try:
                data = zstandard.ZstdDecompressor().decompress(np.asarray(s).tobytes(), max_output_size=len(o))
            except zstandard.ZstdError as e:
                raise RuntimeError(str(e)) from None
            o[:len(data)] = np.frombuffer(data, np.uint8)
            sizes.append(len(data))
        out.buffer_sizes = sizes
        return out


def as_arrays(buffer, offsets, sizes):
    return FakeBatch([buffer[o:o + s] for o, s in zip(offsets, sizes)])


@contextlib.contextmanager
def installed():
    """Put the stand-ins in sys.modules (as cupy and nvidia.nvcomp) for the duration."""
    cupy = types.ModuleType("cupy")
    cupy.uint8, cupy.uint64, cupy.int64, cupy.int32 = np.uint8, np.uint64, np.int64, np.int32
    cupy.empty = lambda n, dtype=np.uint8: _dev(np.empty(n, dtype))
    cupy.zeros = lambda n, dtype=np.uint8: _dev(np.zeros(n, dtype))
    cupy.asarray = lambda a: _dev(np.array(a))
    cupy.from_dlpack = lambda t: _dev(np.from_dlpack(t))
    cupy.RawModule = RawModule
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1),
        Device=lambda idx=None: contextlib.nullcontext(),
        alloc_pinned_memory=lambda n: bytearray(n))
    cupy.cuda = cuda
    nvcomp = types.ModuleType("nvidia.nvcomp")
    nvcomp.Codec, nvcomp.as_arrays = Codec, as_arrays
    nvcomp.BitstreamKind = types.SimpleNamespace(RAW="RAW")
    nvidia = types.ModuleType("nvidia")
    nvidia.nvcomp = nvcomp
    saved = {k: sys.modules.get(k) for k in ("cupy", "nvidia", "nvidia.nvcomp")}
    sys.modules.update({"cupy": cupy, "nvidia": nvidia, "nvidia.nvcomp": nvcomp})
    from mithril_gpu import gpu

    gpu._modules.clear()
    gpu._codecs.clear()
    Codec.calls.update(encode=0, decode=0)
    try:
        yield
    finally:
        gpu._modules.clear()
        gpu._codecs.clear()
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
