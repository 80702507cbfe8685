"""The GPU backend: CuPy RawKernels (kernels/*.cu) split planes in device memory, nvCOMP's zstd
(RAW bitstreams: one standard zstd frame per chunk) compresses all chunks of a tensor in one
batch, and only compressed bytes cross PCIe. Loading is the mirror image. Same file format, and
byte for byte the same planes as the numpy reference (tests/test_gpu.py checks both whenever a
GPU is present).

Status: written against nvCOMP 6.0's Python API (read from the wheel) and compiled with nvcc
(sm_80/sm_90), but not yet run on a GPU. Until tests/test_gpu.py has passed on a device, it is
used only when MITHRIL_GPU_EXPERIMENTAL=1 is set (see STATUS.md). Importing this module imports
nothing from CUDA; :func:`status` does, when called.
"""
from __future__ import annotations

import os
import threading
import warnings

from . import checksum, codecs, transforms
from .backends import BackendNote
from .errors import GpuError, MithrilError, short

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
VALIDATED = False        # set True once tests/test_gpu.py has passed on a real GPU
THREADS_PER_BLOCK = 256
MIN_ALIGN = 16           # chunk addresses handed to nvCOMP are aligned to at least this

_modules: dict = {}
_codecs: dict = {}        # (thread, device) -> (codec, alignment): nvCOMP codecs are thread-local
_streams: dict = {}       # (thread, device) -> the backend's stream for that thread
peak_pool_bytes = 0       # the most CuPy's memory pool held at the end of a save or load (bench_gpu.py)


def status() -> tuple[bool, str]:
    """(usable, reason it is not). ``MITHRIL_GPU=0`` in the environment turns the backend off
    (every tensor is then coded on the CPU, in the same format)."""
    if os.environ.get("MITHRIL_GPU") == "0":
        return False, "the GPU backend is turned off (MITHRIL_GPU=0)"
    try:                         # (what stops it here first; then whether it may run at all)
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install cupy-cuda13x)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA device is visible"
    except Exception as e:  # CUDA driver missing or broken
        return False, f"CUDA is not usable ({e})"
    try:
        from nvidia import nvcomp  # noqa: F401  (import check only)
    except ImportError:
        return False, "nvCOMP is not installed (pip install nvidia-nvcomp-cu13)"
    if not os.path.isfile(os.path.join(KERNEL_DIR, "planes.cu")):
        return False, f"the CUDA kernels are missing ({KERNEL_DIR})"
    if not VALIDATED and os.environ.get("MITHRIL_GPU_EXPERIMENTAL") != "1":
        return False, ("the GPU backend has not yet been validated on a GPU "
                       "(set MITHRIL_GPU_EXPERIMENTAL=1 to try it)")
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


def stream():
    """The backend's CUDA stream for this thread on the current device (a CuPy stream, never
    stream 0).

    Every kernel, copy and nvCOMP call of this backend is queued on it, so each step sees the
    previous one's results by stream order alone. Hand-offs with torch are explicit: work on
    this stream first waits for the tensors' producer (:func:`_after_torch`), and results are
    handed back only after this stream is synchronised. Each thread has its own (a
    ``Checkpointer(blocking=False)`` saves on its thread while the caller may load).
    """
    import cupy

    key = (threading.get_ident(), cupy.cuda.runtime.getDevice())
    s = _streams.get(key)
    if s is None:
        s = _streams[key] = cupy.cuda.Stream(non_blocking=True)
    return s


def zstd_codec():
    """(nvCOMP zstd RAW codec on :func:`stream`, alignment) for this thread and the current
    device: nvCOMP's codecs are thread-local (their scratch buffers), never shared by threads."""
    import cupy
    from nvidia import nvcomp

    dev = cupy.cuda.runtime.getDevice()
    key = (threading.get_ident(), dev)
    c = _codecs.get(key)
    if c is None:
        alive = {t.ident for t in threading.enumerate()}
        for k in [k for k in _codecs if k[0] not in alive]:        # (threads gone: their codecs' scratch too)
            _codecs.pop(k, None)
            _streams.pop(k, None)
        codec = nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW, device_id=dev,
                             cuda_stream=stream().ptr)
        align = max(MIN_ALIGN, codec.get_required_compression_alignment(), codec.get_required_decompression_alignment())
        c = _codecs[key] = (codec, align)
    return c


def _release_pools() -> None:
    """Give back what CuPy's pools cached during a save or load (plane buffers, the compressed
    staging, pinned staging): memory the caller's training would otherwise not get back.
    (nvCOMP's own scratch belongs to the thread's codec.)"""
    global peak_pool_bytes
    import cupy

    pool = cupy.get_default_memory_pool()
    peak_pool_bytes = max(peak_pool_bytes, pool.total_bytes())
    pool.free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def _is_oom(exc: BaseException) -> bool:
    """Out of device memory: CuPy's error, or nvCOMP's (its own allocations: a RuntimeError
    carrying CUDA's "out of memory")."""
    import cupy

    return isinstance(exc, cupy.cuda.memory.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _gpu_failed(exc: BaseException, what: str) -> GpuError:
    return GpuError(f"{what}: the GPU backend failed ({type(exc).__name__}: {short(str(exc))}); "
                    f"MITHRIL_GPU=0 codes on the CPU instead")


def _codec_here():
    """:func:`zstd_codec` for the current device, a failure to start nvCOMP a :class:`GpuError`."""
    try:
        return zstd_codec()
    except Exception as exc:
        raise _gpu_failed(exc, "starting nvCOMP") from exc


def _oom_note(exc: BaseException, what: str) -> str:
    """For an exception out of a tensor's GPU work: the note to give when it is the device's
    memory (that tensor then goes to the CPU); raised again as it is when it is mithril's own
    (typed already), as a :class:`GpuError` otherwise."""
    if isinstance(exc, MithrilError):
        raise exc
    if not _is_oom(exc):
        raise _gpu_failed(exc, what) from exc
    return f"the GPU is out of memory ({short(str(exc))})"


def _is_cuda_error(exc: BaseException) -> bool:
    """A CUDA error (the device, not the data): CuPy's runtime and driver errors, and nvCOMP's
    report of an earlier asynchronous launch's failure."""
    import cupy

    kinds = tuple(k for k in (getattr(cupy.cuda.runtime, "CUDARuntimeError", None),
                              getattr(getattr(cupy.cuda, "driver", None), "CUDADriverError", None)) if k)
    return isinstance(exc, kinds) or "cuda error" in str(exc).lower()


def _batch(buffer, offsets, sizes):
    """nvCOMP's view of chunks of one device buffer (offsets and sizes in bytes), tied to :func:`stream`."""
    from nvidia import nvcomp

    return nvcomp.as_arrays(buffer, offsets, sizes, cuda_stream=stream().ptr)


def _address(a) -> int:
    """Device address of a CuPy array's first byte."""
    return a.__cuda_array_interface__["data"][0]


def _after_torch(t) -> None:
    """Make :func:`stream` wait for the work torch has queued on its current stream of ``t``'s
    device (the work that produced ``t``, or allocated it), without blocking the host."""
    import cupy

    if not getattr(t, "is_cuda", False):
        return
    import torch

    # (torch's own API: an event recorded on torch's stream, waited for by ours; CuPy 14
    # deprecates its ExternalStream)
    torch.cuda.ExternalStream(stream().ptr, device=t.device).wait_stream(torch.cuda.current_stream(t.device))


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _launch(kernel, n_threads: int, args) -> None:
    blocks = max(1, min(65535 * 4, (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK))
    kernel((blocks,), (THREADS_PER_BLOCK,), args)


_OPS = {None: 0, "xor": 1, "zigzag": 2}


def plane_stride(n: int) -> int:
    """Bytes between planes in device buffers: n rounded up so every chunk stays aligned."""
    return _round_up(max(n, 1), MIN_ALIGN)


def split_planes(dt, transform: str, x, base=None, op: str | None = None, stride: int | None = None):
    """Planes of device array ``x`` (uint8, whole elements) in one device buffer, plane k at
    k * stride (default :func:`plane_stride`). ``raw`` without a delta returns ``x`` itself when
    its address is aligned for nvCOMP, else an aligned copy. Queued on the current stream."""
    import cupy

    n = x.size // dt.itemsize
    if transform == "raw" and op is None:
        if _address(x) % MIN_ALIGN == 0:
            return x
        staged = cupy.empty(max(x.size, 1), dtype=cupy.uint8)[:x.size]
        staged[...] = x
        return staged
    stride = plane_stride(n) if stride is None else stride
    nplanes = len(transforms.plane_widths(dt, transform))
    out = cupy.empty(stride * nplanes, dtype=cupy.uint8)
    if n == 0:
        return out
    mod, i64, i32 = module("planes"), cupy.int64, cupy.int32
    if transform == "fieldsplit" and op is None:
        if dt.itemsize == 2:
            _launch(mod.get_function("split_fieldsplit16"), (n + 3) // 4,
                    (x, out, i64(n), i64(stride), i32(dt.exp_bits), i32(dt.man_bits)))
        else:
            _launch(mod.get_function("split_fieldsplit32"), (n + 3) // 4, (x, out, i64(n), i64(stride)))
        return out
    if transform not in ("bytegroup", "raw"):
        raise ValueError(f"no GPU kernel for transform {transform!r}")
    from .delta import is_float

    _launch(mod.get_function(f"split_bytegroup{dt.itemsize}"), (n + 3) // 4,
            (x, base if base is not None else 0, out, i64(n), i64(stride), i32(_OPS[op]), i32(int(is_float(dt)))))
    return out


def merge_planes(dt, transform: str, planes, out, base=None, op: str | None = None, stride: int | None = None) -> None:
    """Inverse of :func:`split_planes` into device array ``out`` (uint8)."""
    import cupy

    n = out.size // dt.itemsize
    if n == 0:
        return
    stride = plane_stride(n) if stride is None else stride
    mod, i64, i32 = module("planes"), cupy.int64, cupy.int32
    if transform == "fieldsplit" and op is None:
        if dt.itemsize == 2:
            _launch(mod.get_function("merge_fieldsplit16"), n,
                    (planes, out, i64(n), i64(stride), i32(dt.exp_bits), i32(dt.man_bits)))
        else:
            _launch(mod.get_function("merge_fieldsplit32"), n, (planes, out, i64(n), i64(stride)))
        return
    from .delta import is_float

    _launch(mod.get_function(f"merge_bytegroup{dt.itemsize}"), n,
            (planes, base if base is not None else 0, out, i64(n), i64(stride), i32(_OPS[op]), i32(int(is_float(dt)))))


def row_digests(x, row_bytes: int) -> list[int]:
    """XXH64 of each row of device array ``x`` (uint8), as a host list of ints."""
    import cupy

    rows = -(-x.size // row_bytes) if x.size else 0
    d = cupy.empty(max(rows, 1), dtype=cupy.uint64)
    if rows:
        _launch(module("checksum").get_function("xxh64_rows"), rows,
                (x, cupy.int64(x.size), cupy.int64(row_bytes), d))
    return [int(v) for v in d[:rows].get()]


def _device_bytes(t):
    """A torch CUDA tensor's bytes as a CuPy uint8 array (DLPack: no copy when contiguous)."""
    import cupy

    from .torchio import tensor_u8

    return cupy.from_dlpack(tensor_u8(t))


def _chunk_layout(e_count: int, widths: list[int], chunk_elems: int, transform: str, stride: int):
    """(row, plane, device offset, uncompressed size) of every chunk, in file order; ``widths``
    are the transform's plane widths (transforms.plane_widths)."""
    rows = -(-e_count // chunk_elems) if e_count else 0
    out = []
    for r in range(rows):
        count = min(chunk_elems, e_count - r * chunk_elems)
        for p, w in enumerate(widths):
            base = 0 if transform == "raw" else p * stride
            out.append((r, p, base + r * chunk_elems * w, count * w))
    return out


def gpu_handles(dtype, transform: str, delta, chunk_elems: int, align: int) -> bool:
    """Whether the GPU kernels code a tensor of this layout (in either direction): no delta, not
    masked, and chunk offsets that are multiples of nvCOMP's alignment. (Base addresses are the
    backend's own buffers, or the caller's memory where it is aligned: unaligned caller memory is
    staged through an aligned copy.)"""
    step = chunk_elems * (dtype.itemsize if transform == "raw" else 1)
    return delta is None and transform != "masked" and step % align == 0


def encode_all(items, write, coder, threads, progress=None):
    """GPU counterpart of :func:`mithril_gpu.cpu.encode_all` (same arguments, same result).

    Tensors the GPU path does not handle yet (deltas, masked, host tensors, odd chunk sizes)
    go through the CPU path; the file is the same either way. A tensor whose GPU work runs out
    of device memory is coded on the CPU instead (with a one-line note); any other CUDA or
    nvCOMP failure raises :class:`GpuError` (the file being replaced stays as it was).
    """
    import cupy

    from . import cpu

    results: list = [None] * len(items)
    try:
        for i, it in enumerate(items):
            if it.device_tensor is None:
                results[i] = cpu.encode_all([it], write, coder, threads, progress)[0]
                continue
            with cupy.cuda.Device(it.device_tensor.device.index):     # the tensor's device, its codec and stream
                codec, align = _codec_here()
                coded = None
                if gpu_handles(it.dtype, it.transform, it.delta_op, it.chunk_elems, align):
                    try:
                        coded = _encode_on_device(it, codec)
                    except Exception as exc:
                        note = _oom_note(exc, f"saving tensor {short(it.name)!r}")
                        warnings.warn(f"mithril: tensor {short(it.name)!r} coded on the CPU: {note}", BackendNote,
                                      stacklevel=4)
                if coded is None:
                    results[i] = cpu.encode_all([it], write, coder, threads, progress)[0]
                    continue
            digests, planned = coded
            chunks = []
            for payload, codec_id in planned:          # written only once all of the tensor's GPU work succeeded
                data = memoryview(payload).cast("B")
                chunks.extend((write(data), len(data), codec_id))
            if progress:
                progress(it.nbytes)
            results[i] = (checksum.combine(digests), chunks, digests)
    finally:
        _release_pools()
    return results


def _encode_on_device(it, codec):
    """One tensor's GPU work: (row digests, [(payload as host bytes, codec id)] in file order).
    Nothing is written here, so a failure leaves the file's payloads as they were."""
    import cupy
    import numpy as np

    dt, n = it.dtype, it.nbytes // it.dtype.itemsize
    x = _device_bytes(it.device_tensor)        # torch's work (a contiguous copy at most) comes first
    s = stream()
    _after_torch(it.device_tensor)
    with s:
        digests = row_digests(x, it.chunk_elems * dt.itemsize)
        stride = plane_stride(n)
        planes = split_planes(dt, it.transform, x, stride=stride)
        layout = _chunk_layout(n, transforms.plane_widths(dt, it.transform), it.chunk_elems, it.transform, stride)
        planned = []
        if layout:
            comp = codec.encode(_batch(planes, [c[2] for c in layout], [c[3] for c in layout]))
            host = comp.cpu()                  # waits for the batch; sizes come with it
            for (r, p, off, usize), csize, k in zip(layout, comp.buffer_sizes, range(len(layout))):
                if csize >= usize:
                    payload, codec_id = planes[off:off + usize].get(), codecs.STORED
                else:
                    payload, codec_id = np.asarray(host[k]).view(np.uint8).reshape(-1)[:csize], codecs.ZSTD
                planned.append((np.ascontiguousarray(payload), codec_id))
        # The digests and the planes are two reads of the caller's memory: a kernel on
        # another stream changing the tensor in between would make a file that fails its
        # checksums. Hashing it again after the coding catches that (a third read; the
        # save then fails and the file it replaces stays as it was) without a copy of the
        # tensor on a device that training keeps full.
        if row_digests(x, it.chunk_elems * dt.itemsize) != digests:
            raise MithrilError(f"tensor {short(it.name)} changed on the GPU while it was being saved (another "
                               f"stream or thread wrote to it): nothing was written; save a copy, or "
                               f"synchronize first")
        s.synchronize()                        # nothing of the caller's tensor is read after this
    return digests, planned


# ---------------------------------------------------------------- decoding (issue 4)

class _OnCpu(Exception):
    """Decode this entry on the CPU path instead (args[0]: a note to give, or "" for none)."""


def _decode_on_cpu(f, e, out) -> None:
    import numpy as np
    import torch

    host = np.empty(e.nbytes, np.uint8)
    f.decode_into([e], [host])
    out.copy_(torch.from_numpy(host))


def decode_into_device(f, entries, outs, verify: bool = True) -> None:
    """Decode ``entries`` of MthFile ``f`` into CUDA uint8 tensors ``outs`` (torch, nbytes each).

    Only compressed bytes cross PCIe: a tensor's zstd chunks are staged at aligned offsets in one
    pinned host buffer, copied once, and decompressed by one nvCOMP batch straight into the
    plane buffer; the merge kernel writes the tensor and the checksum kernel verifies it.
    Deltas, masked tensors, ``ans`` chunks and odd chunk sizes are decoded on the CPU and copied
    over; so are tensors whose zstd frames do not declare their size (nvCOMP needs it), and any
    tensor nvCOMP fails to decode or decodes to bytes that fail the checksum: the CPU path then
    says whether the file is damaged (its error) or the GPU was wrong (a note, and the right bytes).
    """
    import cupy

    try:
        for e, out in zip(entries, outs):
            with cupy.cuda.Device(out.device.index):
                codec, align = _codec_here()
                if not gpu_handles(e.dtype, e.transform, e.delta, e.chunk_elems, align) or codecs.ANS in e.chunks[2::3]:
                    _decode_on_cpu(f, e, out)
                    continue
                if e.nbytes == 0:
                    continue
                try:
                    _after_torch(out)                  # out was allocated (or last used) on torch's stream
                    with stream():
                        _decode_one(f, e, cupy.from_dlpack(out), codec, align, verify)
                    continue
                except _OnCpu as why:
                    note = why.args[0] if why.args else ""
                except Exception as exc:
                    note = _oom_note(exc, f"loading tensor {short(e.name)!r}")
                try:
                    _decode_on_cpu(f, e, out)
                except MithrilError:
                    raise
                except Exception as exc:
                    raise _gpu_failed(exc, f"loading tensor {short(e.name)!r}") from exc
                if note:
                    warnings.warn(f"mithril: tensor {short(e.name)!r} decoded on the CPU: {note}", BackendNote, stacklevel=4)
    finally:
        _release_pools()


def _decode_one(f, e, dev_out, codec, align: int, verify: bool) -> None:
    """Decode entry ``e`` into CuPy uint8 array ``dev_out`` on the current stream. Raises
    CorruptFileError for what the index itself shows wrong, _OnCpu where the CPU path must decide."""
    import cupy
    import numpy as np
    import zstandard

    from .errors import CorruptFileError

    n = e.count
    stride = plane_stride(n)
    layout = _chunk_layout(n, e.widths, e.chunk_elems, e.transform, stride)
    staged, total = [], 0
    for (r, p, dst, usize) in layout:
        off, csize, codec_id = e.chunk(r, p)
        if codec_id not in (codecs.STORED, codecs.ZSTD):
            raise CorruptFileError(f"tensor {short(e.name)!r}: unknown codec id {codec_id}")
        if codec_id == codecs.STORED and csize != usize:
            raise CorruptFileError(f"tensor {short(e.name)!r}: a stored chunk holds {csize} bytes, expected {usize}")
        if codec_id == codecs.ZSTD:
            # nvCOMP reads a frame's size from its header and calls a damaged frame undefined
            # behaviour: frames that do not declare exactly their chunk's size go to the CPU,
            # which decodes frames without a declared size and refuses bad ones with its errors
            try:
                declared = zstandard.frame_content_size(f._buf[off:off + csize])
            except zstandard.ZstdError:
                declared = None
            if declared != usize:
                raise _OnCpu("")
        staged.append((off, csize, codec_id, dst, usize, total))
        total = _round_up(total + csize, align)
    if e.transform != "raw":
        target = cupy.empty(stride * len(e.widths), dtype=cupy.uint8)
    elif _address(dev_out) % align == 0:
        target = dev_out                               # raw chunks decode straight into the tensor
    else:
        target = cupy.empty(max(e.nbytes, 1), dtype=cupy.uint8)     # the caller's memory is unaligned: stage
    pinned = cupy.cuda.alloc_pinned_memory(max(total, 1))
    try:
        staging = np.frombuffer(pinned, np.uint8, max(total, 1))
        for off, csize, _, _, _, at in staged:
            staging[at:at + csize] = np.frombuffer(f._buf[off:off + csize], np.uint8)
        comp = cupy.empty(max(total, 1), dtype=cupy.uint8)
        comp.set(staging)                              # the one H2D copy, on the current stream
        zstd = [st for st in staged if st[2] == codecs.ZSTD]
        for off, csize, codec_id, dst, usize, at in staged:
            if codec_id == codecs.STORED:
                target[dst:dst + usize] = comp[at:at + csize]
        if zstd:
            try:
                decoded = codec.decode(_batch(comp, [st[5] for st in zstd], [st[1] for st in zstd]),
                                       out=_batch(target, [st[3] for st in zstd], [st[4] for st in zstd]))
                got = decoded.buffer_sizes
            except Exception as exc:
                if _is_cuda_error(exc) or _is_oom(exc):
                    raise
                raise _OnCpu(f"nvCOMP could not decode one of its zstd chunks ({short(str(exc))})") from None
            if any(g != st[4] for st, g in zip(zstd, got)):
                raise _OnCpu("nvCOMP decoded a zstd chunk to another size than the chunk's")
        if e.transform != "raw":
            merge_planes(e.dtype, e.transform, target, dev_out, stride=stride)
        elif target is not dev_out:
            dev_out[...] = target[:e.nbytes]
        ok = not verify or checksum.combine(row_digests(dev_out, e.chunk_elems * e.dtype.itemsize)) == e.checksum
    finally:
        stream().synchronize()     # the pinned staging buffer and the output are settled before either is let go
    if not ok:
        # damaged file, or a wrong GPU decode: the CPU path tells which (its ChecksumMismatchError,
        # or the right bytes and a note that the GPU was wrong)
        raise _OnCpu("the GPU's decode failed its checksum, the CPU's did not: please report this")


def new_device_tensors(f, entries, device) -> list:
    """Decode ``entries`` of open file ``f`` straight into fresh CUDA tensors on ``device``
    (compressed bytes cross PCIe)."""
    from . import torchio

    bufs = [torchio.empty_u8(e.nbytes, f"tensor {short(e.name)!r}", device) for e in entries]
    decode_into_device(f, entries, bufs, verify=f.verify)
    return [torchio.as_tensor(b, e.dtype, e.shape) for e, b in zip(entries, bufs)]
