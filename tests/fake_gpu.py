"""Stand-ins for CuPy and nvCOMP that run on the CPU, so CI exercises the GPU backend's own
Python (chunk layout, plane strides, aligned staging, stored-vs-zstd choice, ordering,
fallbacks) together with the real kernel code (compiled for the host by cuda_host.py) on every
run. They are not a GPU: device memory is host memory and nvCOMP's zstd is libzstd. What only
a GPU can show (the kernels on the device, nvCOMP itself) is in test_gpu.py, run on a device."""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import zstandard

import cuda_host


class DevArray(np.ndarray):
    """A 'device' array: a numpy array with CuPy's .get()."""

    def get(self):
        return np.array(self)


def _dev(a) -> DevArray:
    return np.asarray(a).view(DevArray)


# ------------------------------------------------------------------ kernels: the real ones, on the host

class RawModule(cuda_host.HostModule):
    """cupy.RawModule: the .cu source compiled for the host (cuda_host.py), which also checks
    every launch's argument count against the kernel's declaration."""

    def __init__(self, code, options=()):
        super().__init__(code)


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
