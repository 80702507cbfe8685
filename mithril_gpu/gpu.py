"""The GPU backend: CuPy RawKernels (kernels/*.cu) split planes in device memory, nvCOMP's zstd
(RAW bitstreams: one standard zstd frame per chunk) compresses all chunks of a tensor in one
batch, and only compressed bytes cross PCIe. Same file format, byte for byte the same planes as
the numpy reference (tests/test_gpu.py checks both whenever a GPU is present).

Status: written and compiled (nvcc, sm_80/sm_90) but not yet run on a GPU. Until the GPU tests
have passed on a device, it is used only when MITHRIL_GPU_EXPERIMENTAL=1 is set (see STATUS.md).
Importing this module imports nothing from CUDA; :func:`status` does, when called.
"""
from __future__ import annotations

import os

from . import checksum, codecs, transforms

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
VALIDATED = False        # set True once tests/test_gpu.py has passed on a real GPU
THREADS_PER_BLOCK = 256

_modules: dict = {}


def status() -> tuple[bool, str]:
    """(usable, reason it is not)."""
    if not VALIDATED and os.environ.get("MITHRIL_GPU_EXPERIMENTAL") != "1":
        return False, ("the GPU backend has not yet been validated on a GPU "
                       "(set MITHRIL_GPU_EXPERIMENTAL=1 to try it)")
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install cupy-cuda13x)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA device is visible"
    except Exception as e:  # CUDA driver missing or broken
        return False, f"CUDA is not usable ({e})"
    try:
        from nvidia import nvcomp  # noqa: F401
    except ImportError:
        return False, "nvCOMP is not installed (pip install nvidia-nvcomp-cu13)"
    if not os.path.isfile(os.path.join(KERNEL_DIR, "planes.cu")):
        return False, f"the CUDA kernels are missing ({KERNEL_DIR})"
    return True, ""


def module(name: str):
    """The compiled RawModule of kernels/<name>.cu (compiled once per process and device)."""
    import cupy

    key = (name, cupy.cuda.runtime.getDevice())
    mod = _modules.get(key)
    if mod is None:
        with open(os.path.join(KERNEL_DIR, f"{name}.cu")) as f:
            mod = _modules[key] = cupy.RawModule(code=f.read(), options=("--std=c++14",))
    return mod


def _launch(kernel, n_threads: int, args) -> None:
    import cupy

    blocks = max(1, min(65535 * 4, (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK))
    kernel((blocks,), (THREADS_PER_BLOCK,), args)
    del cupy


_OPS = {None: 0, "xor": 1, "zigzag": 2}


def split_planes(dt, transform: str, x, base=None, op: str | None = None):
    """Planes of device array ``x`` (uint8, whole elements) back to back in one device buffer."""
    import cupy

    n = x.size // dt.itemsize
    widths = transforms.plane_widths(dt, transform)
    if transform == "raw" and op is None:
        return x
    out = cupy.empty(n * sum(widths), dtype=cupy.uint8)
    if n == 0:
        return out
    mod = module("planes")
    i64 = cupy.int64
    if transform == "fieldsplit" and op is None:
        if dt.itemsize == 2:
            _launch(mod.get_function("split_fieldsplit16"), (n + 3) // 4,
                    (x, out, i64(n), cupy.int32(dt.exp_bits), cupy.int32(dt.man_bits)))
        else:
            _launch(mod.get_function("split_fieldsplit32"), (n + 3) // 4, (x, out, i64(n)))
        return out
    if transform not in ("bytegroup", "raw"):
        raise ValueError(f"no GPU kernel for transform {transform!r}")
    from .delta import is_float

    fn = mod.get_function(f"split_bytegroup{dt.itemsize}")
    _launch(fn, (n + 3) // 4, (x, base if base is not None else 0, out, i64(n), cupy.int32(_OPS[op]),
                               cupy.int32(int(is_float(dt)))))
    return out


def merge_planes(dt, transform: str, planes, out, base=None, op: str | None = None) -> None:
    """Inverse of :func:`split_planes` into device array ``out`` (uint8)."""
    import cupy

    n = out.size // dt.itemsize
    if n == 0:
        return
    mod = module("planes")
    i64 = cupy.int64
    if transform == "fieldsplit" and op is None:
        if dt.itemsize == 2:
            _launch(mod.get_function("merge_fieldsplit16"), n,
                    (planes, out, i64(n), cupy.int32(dt.exp_bits), cupy.int32(dt.man_bits)))
        else:
            _launch(mod.get_function("merge_fieldsplit32"), n, (planes, out, i64(n)))
        return
    from .delta import is_float

    fn = mod.get_function(f"merge_bytegroup{dt.itemsize}")
    _launch(fn, n, (planes, base if base is not None else 0, out, i64(n), cupy.int32(_OPS[op]),
                    cupy.int32(int(is_float(dt)))))


def row_digests(x, row_bytes: int):
    """XXH64 of each row of device array ``x`` (uint8), as a host list of ints."""
    import cupy

    rows = -(-x.size // row_bytes) if x.size else 0
    d = cupy.empty(max(rows, 1), dtype=cupy.uint64)
    if rows:
        _launch(module("checksum").get_function("xxh64_rows"), rows, (x, cupy.int64(x.size), cupy.int64(row_bytes), d))
    return [int(v) for v in d[:rows].get()]


def _device_bytes(t):
    """A torch CUDA tensor's bytes as a CuPy uint8 array (DLPack: no copy when contiguous)."""
    import cupy

    from .api import tensor_u8

    return cupy.from_dlpack(tensor_u8(t))


def encode_all(items, write, coder, threads, progress=None):
    """GPU counterpart of :func:`mithril_gpu.cpu.encode_all` (same arguments, same result)."""
    from . import cpu

    if any(it.delta_op is not None or getattr(it, "device_tensor", None) is None for it in items):
        # deltas (and tensors not on a device) take the CPU path for now; same format either way
        return cpu.encode_all(items, write, coder, threads, progress)
    import cupy
    from nvidia import nvcomp

    codec = nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW)
    results = []
    for it in items:
        dt, n_el = it.dtype, it.nbytes // it.dtype.itemsize
        with cupy.cuda.Device(it.device_tensor.device.index):
            x = _device_bytes(it.device_tensor)
            rb = it.chunk_elems * dt.itemsize
            digests = row_digests(x, rb)
            planes = split_planes(dt, it.transform, x)
            widths = transforms.plane_widths(dt, it.transform)
            rows = -(-n_el // it.chunk_elems) if n_el else 0
            slices, sizes = [], []
            for r in range(rows):
                count = min(it.chunk_elems, n_el - r * it.chunk_elems)
                start = r * it.chunk_elems
                for p, w in enumerate(widths):
                    lo = sum(widths[:p]) * n_el + start * w
                    slices.append(planes[lo:lo + count * w])
                    sizes.append(count * w)
            chunks = []
            if slices:
                comp = codec.encode([nvcomp.as_array(s) for s in slices])
                for s, usize, c in zip(slices, sizes, comp):
                    payload = cupy.asarray(c).view(cupy.uint8).get()
                    if len(payload) >= usize:
                        codec_id, payload = codecs.STORED, s.get()
                    else:
                        codec_id = codecs.ZSTD
                    data = memoryview(payload).cast("B")
                    chunks.extend((write(data), len(data), codec_id))
        if progress:
            progress(it.nbytes)
        results.append((checksum.combine(digests), chunks))
    return results
