"""Stand-ins for CuPy and nvCOMP that run on the CPU, so CI exercises the GPU backend's own
Python (chunk layout, plane strides, aligned staging, stored-vs-zstd choice, ordering,
fallbacks) together with the real kernel code (compiled for the host by cuda_host.py) on every
run. They are not a GPU: device memory is host memory and nvCOMP's zstd is libzstd.

They are at least as strict as the real libraries where a mistake would pass here and fail
there (read from the nvCOMP 6.0.0.12 wheel's docstrings and its error strings):

* ``Codec.encode``/``decode`` take an ``nvcomp.BatchArray`` (from ``as_arrays``), never a
  Python list; ``decode``'s ``out=`` must be a BatchArray of as many buffers, each large enough.
* Chunk addresses: 4-byte aligned to compress, 8-byte aligned to decompress (input and output),
  checked on the address of every chunk, not only its offset.
* ``as_arrays`` refuses a non-contiguous buffer, mismatched tables, an empty batch and entries
  outside the buffer.
* Streams (the backend's own rule, see gpu.stream): a codec must be made on an explicit
  stream, never stream 0; batches must be tied to the codec's stream; kernels, host<->device
  copies and codec calls must all be issued while that stream is current. Each thread has its
  own current stream, as in CUDA.
* Devices: a codec is made for the current device and used only while that device is current
  (the binding's "Codec CUDA stream and device id mismatched"); ``cupy.cuda.Device(i)`` sets the
  current device of this thread.
* Threads: a codec is thread-local in nvCOMP's Python API; using one from two threads fails.
* RAW zstd decode needs the frame to declare its content size (nvCOMP reads it from the header).
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import types

import numpy as np
import zstandard

import cuda_host

COMPRESS_ALIGN, DECOMPRESS_ALIGN = 4, 8     # what nvCOMP 6's zstd reports


# ------------------------------------------------------------------ streams

_tls = threading.local()


def _stack() -> list:
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    return _tls.stack


def current_device() -> int:
    return getattr(_tls, "device", 0)


class Device:
    count = 1

    def __init__(self, idx=None):
        self.idx = current_device() if idx is None else int(idx)

    def __enter__(self):
        assert 0 <= self.idx < Device.count, f"device {self.idx} does not exist"
        self.saved = current_device()
        _tls.device = self.idx
        return self

    def __exit__(self, *exc):
        _tls.device = self.saved
        return False


class Stream:
    _ids = itertools.count(0x1000, 0x10)

    def __init__(self, non_blocking=False, ptr=None):
        self.ptr = next(Stream._ids) if ptr is None else ptr
        self.waited: list = []

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, *exc):
        _stack().pop()
        return False

    def synchronize(self):
        pass

    def wait_event(self, ev):
        assert isinstance(ev, Event) and ev.recorded is not None, "wait_event needs a recorded cupy Event"
        self.waited.append(ev)


NULL = Stream(ptr=0)


def current_stream() -> Stream:
    return _stack()[-1] if _stack() else NULL


def require_stream(what: str) -> Stream:
    s = current_stream()
    assert s.ptr != 0, f"{what} issued on stream 0: the backend must use its own stream (gpu.stream())"
    return s


class Event:
    def __init__(self, disable_timing=False, **kw):
        self.recorded = None

    def record(self, stream=None):
        self.recorded = stream if stream is not None else current_stream()


class OutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError"""


class CUDARuntimeError(RuntimeError):
    """cupy.cuda.runtime.CUDARuntimeError"""


class MemoryPool:
    """CuPy's default (and pinned) memory pool: what the backend gives back after each call."""

    def __init__(self):
        self.freed = 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        self.freed += 1


# ------------------------------------------------------------------ device arrays

class DevArray(np.ndarray):
    """A 'device' array: a numpy array with CuPy's get/set and __cuda_array_interface__."""

    @property
    def __cuda_array_interface__(self):
        return self.__array_interface__

    def get(self):
        require_stream("a device-to-host copy")
        return np.array(self)

    def set(self, host):
        require_stream("a host-to-device copy")
        self[...] = np.asarray(host).reshape(self.shape)


def _dev(a) -> DevArray:
    return np.asarray(a).view(DevArray)


def _address(a) -> int:
    return np.asarray(a).__array_interface__["data"][0]


# ------------------------------------------------------------------ kernels: the real ones, on the host

class RawModule(cuda_host.HostModule):
    """cupy.RawModule: the .cu source compiled for the host (cuda_host.py), which also checks
    every launch's argument count against the kernel's declaration."""

    def __init__(self, code, options=()):
        super().__init__(code)

    def get_function(self, name):
        launch = super().get_function(name)

        def checked(grid, block, args):
            require_stream(f"kernel {name}")
            return launch(grid, block, args)
        return checked


# ------------------------------------------------------------------ nvCOMP

class BatchArray:
    """nvcomp.BatchArray: a batch of buffers with ``buffer_sizes``, ``len``, indexing and ``cpu()``."""

    def __init__(self, items, sizes=None, stream=None):
        self._items = list(items)
        self.buffer_sizes = list(sizes if sizes is not None else (len(a) for a in self._items))
        self.stream = stream

    def __len__(self):
        return len(self._items)

    def __getitem__(self, k):
        return self._items[k]

    def __iter__(self):
        return iter(self._items)

    def cpu(self):
        return BatchArray([np.array(a) for a in self._items], self.buffer_sizes, self.stream)


def as_arrays(buffer, offsets, sizes, cuda_stream=None):
    buf = np.asarray(buffer)
    if not buf.flags.c_contiguous:
        raise ValueError("Cannot carve a BatchArray out of a non-contiguous buffer")
    if len(offsets) != len(sizes):
        raise ValueError(f"offsets and sizes must have the same length, got {len(offsets)} and {len(sizes)}")
    if not sizes:
        raise ValueError("Cannot create a BatchArray from an empty sizes table")
    flat = buf.reshape(-1).view(np.uint8)
    for o, s in zip(offsets, sizes):
        if o < 0 or s < 0 or o + s > flat.size:
            raise ValueError(f"entry [{o}, {o + s}) lies outside the {flat.size}-byte buffer it is carved from")
    return BatchArray([flat[o:o + s] for o, s in zip(offsets, sizes)], stream=cuda_stream)


class Codec:
    calls = {"encode": 0, "decode": 0}      # lets tests see which branch ran

    def __init__(self, algorithm=None, bitstream_kind=None, device_id=0, cuda_stream=None, **kw):
        assert algorithm == "Zstd" and bitstream_kind == "RAW"
        assert cuda_stream, "the codec must run on the backend's explicit stream, not nvCOMP's own or stream 0"
        assert device_id == current_device(), "Codec CUDA stream and device id mismatched"
        self.stream, self.device, self.thread = cuda_stream, device_id, threading.get_ident()

    def get_required_compression_alignment(self):
        return COMPRESS_ALIGN

    def get_required_decompression_alignment(self):
        return DECOMPRESS_ALIGN

    def _check(self, batch, what):
        if not isinstance(batch, BatchArray):
            raise TypeError(f"{what}(): incompatible function arguments: expected nvcomp.BatchArray or nvcomp.Array, "
                            f"got {type(batch).__name__}")
        assert batch.stream == self.stream, f"{what}: batch tied to stream {batch.stream}, codec runs on {self.stream}"
        assert require_stream(what).ptr == self.stream, f"{what} while another stream than the codec's is current"
        assert current_device() == self.device, "Codec CUDA stream and device id mismatched"
        assert threading.get_ident() == self.thread, "an nvCOMP codec used from another thread than its own"

    def encode(self, batch):
        self._check(batch, "encode")
        Codec.calls["encode"] += 1
        for a in batch:
            assert _address(a) % COMPRESS_ALIGN == 0, "unaligned chunk given to nvCOMP to compress"
        frames = [_dev(np.frombuffer(zstandard.ZstdCompressor(level=1).compress(np.asarray(a).tobytes()), np.uint8))
                  for a in batch]
        return BatchArray(frames, stream=self.stream)

    def decode(self, src, out=None):
        self._check(src, "decode")
        if not isinstance(out, BatchArray):
            raise TypeError("out= parameter of the batch overload must be an nvcomp.BatchArray")
        if len(out) != len(src):
            raise ValueError(f"out= batch size ({len(out)}) does not match input buffer count ({len(src)})")
        Codec.calls["decode"] += 1
        sizes = []
        for s, o in zip(src, out):
            assert _address(s) % DECOMPRESS_ALIGN == 0, "unaligned compressed chunk given to nvCOMP"
            assert _address(o) % DECOMPRESS_ALIGN == 0, "unaligned output chunk given to nvCOMP"
            try:
                if zstandard.frame_content_size(np.asarray(s).tobytes()) < 0:
                    raise RuntimeError("could not determine content size")
                data = zstandard.ZstdDecompressor().decompress(np.asarray(s).tobytes())
            except zstandard.ZstdError as e:
                raise RuntimeError(str(e)) from None
            if len(data) > len(o):
                raise ValueError(f"Output buffer of {len(o)} bytes is too small to hold the data, {len(data)} bytes")
            o[:len(data)] = np.frombuffer(data, np.uint8)
            sizes.append(len(data))
        out.buffer_sizes = sizes
        return out


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
    pools = (MemoryPool(), MemoryPool())
    cupy.get_default_memory_pool = lambda: pools[0]
    cupy.get_default_pinned_memory_pool = lambda: pools[1]
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=current_device, getDeviceCount=lambda: Device.count,
                                      CUDARuntimeError=CUDARuntimeError),
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
        Device=Device, Stream=Stream, Event=Event, get_current_stream=current_stream,
        alloc_pinned_memory=lambda n: bytearray(n))
    cupy.cuda = cuda
    nvcomp = types.ModuleType("nvidia.nvcomp")
    nvcomp.Codec, nvcomp.as_arrays, nvcomp.BatchArray = Codec, as_arrays, BatchArray
    nvcomp.BitstreamKind = types.SimpleNamespace(RAW="RAW")
    nvidia = types.ModuleType("nvidia")
    nvidia.nvcomp = nvcomp
    saved = {k: sys.modules.get(k) for k in ("cupy", "nvidia", "nvidia.nvcomp")}
    sys.modules.update({"cupy": cupy, "nvidia": nvidia, "nvidia.nvcomp": nvcomp})
    from mithril_gpu import gpu

    def reset():
        gpu._modules.clear()
        gpu._codecs.clear()
        gpu._streams.clear()
        _stack().clear()
        _tls.device = 0
        Device.count = 1

    reset()
    Codec.calls.update(encode=0, decode=0)
    try:
        yield
    finally:
        reset()
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
