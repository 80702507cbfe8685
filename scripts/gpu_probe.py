"""What the GPU path depends on, measured in about a minute on a device (issue 8's probe).

    python3 scripts/gpu_probe.py [--out DIR]          # prints a report; DIR/probe.json holds it

Each question is answered on its own: one that fails records its error and the rest go on.
Questions that can break the CUDA context (corrupt frames) run in a child process.

1. versions: Python, torch, CuPy, nvCOMP, CUDA runtime and driver, the device;
2. nvCOMP zstd (RAW) alignments for compression and decompression;
3. whether one RAW buffer becomes exactly one zstd frame with Frame_Content_Size set, and
   decodes with libzstd, for 64 KiB, 128 KiB, 1 MiB and 64 MiB chunks;
4. whether nvCOMP decodes the frames the CPU path writes (literal-only Huffman frames for
   exponent planes, libzstd frames for the rest), byte for byte;
5. whether decode(out=) reports decoded sizes or the out buffers' capacities;
6. what a corrupt or truncated frame does: raises, or only reports a size;
7. what the binding refuses: a list instead of a BatchArray, unaligned chunk addresses;
8. a 1 GB split -> encode -> decode -> merge round trip on one explicit stream, and the same
   with nvCOMP's own stream and no synchronisation at the hand-offs (to see a race);
9. nvCOMP's ratio on real-looking exponent planes against the CPU path's frames.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REPORT: dict = {}
REPORT_PATH = None       # probe.json, written again after every question (a later hang or crash loses nothing)
STREAM = None            # one explicit stream for every kernel, copy and codec call (as the backend does)


def question(name):
    def wrap(fn):
        def run(*a):
            t = time.perf_counter()
            try:
                REPORT[name] = fn(*a)
            except Exception as e:  # noqa: BLE001  (the probe records every failure and goes on)
                REPORT[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
            print(f"== {name} ({time.perf_counter() - t:.2f} s)\n{json.dumps(REPORT[name], indent=1, default=str)}",
                  flush=True)
            if REPORT_PATH:
                with open(REPORT_PATH, "w") as f:
                    json.dump(REPORT, f, indent=1, default=str)
        return run
    return wrap


def codec(stream=None):
    from nvidia import nvcomp

    stream = stream if stream is not None else STREAM
    kw = {"cuda_stream": stream.ptr} if stream is not None else {}
    return nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW, **kw)


def weights_like(n: int, seed=0):
    """bf16 values shaped like trained weights (normal, std 0.02), as a CuPy uint8 array."""
    import cupy
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    t = (torch.randn(n, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    return cupy.from_dlpack(t.view(torch.uint8)), t


def exp_plane(n: int, seed=0):
    from mithril_gpu import dtypes, gpu

    x, _ = weights_like(n, seed)
    return gpu.split_planes(dtypes.BY_NAME["BF16"], "fieldsplit", x, stride=n)[:n]


def host_frames(batch) -> list[bytes]:
    import numpy as np

    host = batch.cpu()
    return [np.asarray(host[k]).view(np.uint8).reshape(-1)[:s].tobytes() for k, s in enumerate(batch.buffer_sizes)]


@question("versions")
def versions():
    import cupy
    import numpy
    import torch

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cupy": cupy.__version__,
           "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(), "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
           "device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}
    try:
        from nvidia import nvcomp

        out["nvcomp"], out["nvcomp_cuda"] = nvcomp.__version__, getattr(nvcomp, "__cuda_version__", "?")
    except Exception as e:  # noqa: BLE001
        out["nvcomp"] = f"not importable: {e}"
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError as e:
        out["nvidia_smi"] = str(e)
    try:
        from mithril_gpu import cpu

        out["accel_built"] = cpu._accel is not None
    except Exception as e:  # noqa: BLE001
        out["accel_built"] = str(e)
    return out


@question("alignment")
def alignment():
    c = codec()
    return {"compress": c.get_required_compression_alignment(), "decompress": c.get_required_decompression_alignment()}


@question("one_frame_per_buffer")
def one_frame_per_buffer():
    import zstandard

    from mithril_gpu import codecs

    out = {}
    # (nvCOMP documents chunks of at most 16 MB for compression; each size on its own, so one
    # refusal does not lose the others)
    for label, size in (("64KiB", 64 << 10), ("128KiB", 128 << 10), ("1MiB", 1 << 20), ("16MiB", 16 << 20)):
        try:
            plane = exp_plane(size, seed=size)
            from nvidia import nvcomp

            comp = codec().encode(nvcomp.as_arrays(plane, [0], [size]))
            frame = host_frames(comp)[0]
            params = zstandard.get_frame_parameters(frame)
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        try:
            back = codecs.decode(codecs.ZSTD, frame, size)      # refuses a second frame or trailing bytes
            exact = bytes(back) == plane.get().tobytes()
            err = None
        except Exception as e:  # noqa: BLE001
            exact, err = False, str(e)
        out[label] = {"bytes": len(frame), "ratio": round(size / len(frame), 4),
                      "content_size": params.content_size, "content_size_ok": params.content_size == size,
                      "one_frame_decodes_exactly": exact, "libzstd_error": err}
    return out


@question("frames_without_content_size")
def frames_without_content_size():
    """FORMAT.md lets a writer leave the content size out; the backend sends such tensors to the
    CPU (gpu._decode_one). Whether nvCOMP reads them decides if that detour can go."""
    import cupy
    import zstandard
    from nvidia import nvcomp

    host = exp_plane(1 << 17, seed=4).get().tobytes()
    frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(host)
    src = cupy.zeros(len(frame) + 16, cupy.uint8)
    src[:len(frame)] = cupy.asarray(bytearray(frame))
    dst = cupy.zeros(len(host), cupy.uint8)
    try:
        got = codec().decode(nvcomp.as_arrays(src, [0], [len(frame)]), out=nvcomp.as_arrays(dst, [0], [len(host)]))
        return {"decoded": True, "sizes": list(got.buffer_sizes), "exact": dst.get().tobytes() == host}
    except Exception as e:  # noqa: BLE001
        return {"decoded": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}


@question("nvcomp_reads_cpu_frames")
def nvcomp_reads_cpu_frames():
    import cupy
    import numpy as np
    from nvidia import nvcomp

    from mithril_gpu import codecs

    c = codec()
    align = max(16, c.get_required_decompression_alignment())
    chunk = 131072
    plane = exp_plane(chunk * 8, seed=7).get()
    rest = (np.random.default_rng(1).integers(0, 16, chunk * 8) * 3).astype(np.uint8)   # low-entropy, LZ-friendly
    out = {}
    for label, data, literals, level in (("literal-only Huffman (exponent planes)", plane, True, None),
                                         ("libzstd fast strategy (mithril default)", rest, False, None),
                                         ("libzstd level 19", plane, False, 19)):
        coder = codecs.ChunkCoder(level)
        frames = [coder.encode(data[i:i + chunk], literals=literals) for i in range(0, data.size, chunk)]
        kinds = sorted({cid for cid, _ in frames})
        frames = [bytes(p) for _, p in frames]
        offs, at = [], 0
        for f in frames:
            offs.append(at)
            at = (at + len(f) + align - 1) // align * align
        staging = np.zeros(at, np.uint8)
        for o, f in zip(offs, frames):
            staging[o:o + len(f)] = np.frombuffer(f, np.uint8)
        src = cupy.asarray(staging)
        dst = cupy.zeros(data.size, cupy.uint8)
        dec = c.decode(nvcomp.as_arrays(src, offs, [len(f) for f in frames]),
                       out=nvcomp.as_arrays(dst, list(range(0, data.size, chunk)), [chunk] * (data.size // chunk)))
        sizes = dec.buffer_sizes
        out[label] = {"codec_ids": kinds, "frame_bytes": sum(len(f) for f in frames),
                      "decoded_sizes": sorted(set(sizes)), "byte_identical": dst.get().tobytes() == data.tobytes()}
    return out


@question("decode_reports")
def decode_reports():
    """decode(out=) into buffers larger than the frames hold: sizes or capacities?"""
    import cupy
    from nvidia import nvcomp

    c = codec()
    n = 100000
    plane = exp_plane(n, seed=3)
    comp = c.encode(nvcomp.as_arrays(plane, [0], [n]))
    frame = cupy.asarray(bytearray(host_frames(comp)[0]))
    src = cupy.zeros(1 << 20, cupy.uint8)
    src[:frame.size] = frame
    dst = cupy.zeros(2 * n + 4096, cupy.uint8)
    dec = c.decode(nvcomp.as_arrays(src, [0], [frame.size]), out=nvcomp.as_arrays(dst, [0], [n + 4096]))
    got = dec.buffer_sizes
    return {"decoded": n, "capacity": n + 4096, "buffer_sizes": got, "reports": "decoded size" if got == [n] else
            ("capacity" if got == [n + 4096] else "other"), "bytes_ok": dst[:n].get().tobytes() == plane.get().tobytes()}


CORRUPT_CHILD = r"""
import json, sys
sys.path.insert(0, %(root)r)
sys.argv = ['probe']
import cupy, numpy as np
from nvidia import nvcomp
sys.path.insert(0, %(scripts)r)
import gpu_probe as P
c = P.codec()
n = 131072
plane = P.exp_plane(n, seed=11)
frame = np.frombuffer(P.host_frames(c.encode(nvcomp.as_arrays(plane, [0], [n])))[0], np.uint8).copy()
case = %(case)r
if case == 'flip':
    frame[len(frame) // 2] ^= 0x5A
elif case == 'truncate':
    frame = frame[:len(frame) // 2]
elif case == 'garbage':
    frame = np.random.default_rng(0).integers(0, 256, len(frame), dtype=np.uint8)
elif case == 'header_lies':
    frame[5] ^= 0x01   # a Frame_Content_Size byte (single-segment frames put it at offset 5 for 4-byte sizes)
src = cupy.zeros(len(frame) + 64, cupy.uint8); src[:len(frame)] = cupy.asarray(frame)
dst = cupy.zeros(n, cupy.uint8)
res = {}
try:
    dec = c.decode(nvcomp.as_arrays(src, [0], [len(frame)]), out=nvcomp.as_arrays(dst, [0], [n]))
    res['raised'] = None
    res['buffer_sizes'] = dec.buffer_sizes
except Exception as e:
    res['raised'] = type(e).__name__ + ': ' + str(e)[:300]
try:
    cupy.cuda.runtime.deviceSynchronize()
    res['context_ok_after'] = int((cupy.arange(10) * 2).sum().get()) == 90
except Exception as e:
    res['context_ok_after'] = 'broken: ' + str(e)[:200]
res['output_matches'] = dst.get().tobytes() == plane.get().tobytes()
print('RESULT ' + json.dumps(res))
"""


@question("corrupt_frames")
def corrupt_frames():
    out = {}
    for case in ("flip", "truncate", "garbage", "header_lies"):
        code = CORRUPT_CHILD % {"root": ROOT, "scripts": os.path.dirname(os.path.abspath(__file__)), "case": case}
        try:
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            out[case] = json.loads(line[0][7:]) if line else {"rc": p.returncode, "stderr": p.stderr[-800:]}
        except subprocess.TimeoutExpired:
            out[case] = "HUNG (killed after 20 s)"
    return out


@question("binding_strictness")
def binding_strictness():
    import cupy
    from nvidia import nvcomp

    c = codec()
    plane = exp_plane(4 * 65536, seed=5)
    out = {}

    def attempt(label, fn):
        try:
            r = fn()
            out[label] = {"accepted": True, "sizes": getattr(r, "buffer_sizes", None)}
        except Exception as e:  # noqa: BLE001
            out[label] = {"accepted": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}

    attempt("encode(list of Arrays)", lambda: c.encode([nvcomp.as_array(plane[:65536])]))
    attempt("encode(as_arrays, offsets 0/65536)", lambda: c.encode(nvcomp.as_arrays(plane, [0, 65536], [65536, 65536])))
    for off in (1, 2, 3, 4, 8):
        attempt(f"encode(chunk at offset {off})", lambda off=off: c.encode(nvcomp.as_arrays(plane, [off], [65536])))
    # an unaligned chunk that encodes anyway: does it round-trip?
    ok = {}
    for off in (1, 3, 4):
        try:
            frame = host_frames(c.encode(nvcomp.as_arrays(plane, [off], [65536])))[0]
            import zstandard

            ok[off] = zstandard.ZstdDecompressor().decompress(frame) == plane[off:off + 65536].get().tobytes()
        except Exception as e:  # noqa: BLE001
            ok[off] = f"{type(e).__name__}: {str(e)[:120]}"
    out["unaligned encode round trips (libzstd)"] = ok
    frame = host_frames(c.encode(nvcomp.as_arrays(plane, [0], [65536])))[0]
    src = cupy.zeros(len(frame) + 64, cupy.uint8)
    dec_ok = {}
    for off in (0, 1, 4, 8):
        src[:] = 0
        src[off:off + len(frame)] = cupy.asarray(bytearray(frame))
        for doff in (0, 1, 4):
            dst = cupy.zeros(65536 + 16, cupy.uint8)
            try:
                c.decode(nvcomp.as_arrays(src, [off], [len(frame)]), out=nvcomp.as_arrays(dst, [doff], [65536]))
                dec_ok[f"src+{off} dst+{doff}"] = dst[doff:doff + 65536].get().tobytes() == plane[:65536].get().tobytes()
            except Exception as e:  # noqa: BLE001
                dec_ok[f"src+{off} dst+{doff}"] = f"{type(e).__name__}: {str(e)[:120]}"
    out["decode at offsets (byte-identical?)"] = dec_ok
    return out


def _roundtrip(nbytes: int, one_stream: bool) -> dict:
    import cupy
    import torch
    from nvidia import nvcomp

    from mithril_gpu import dtypes, gpu

    dt = dtypes.BY_NAME["BF16"]
    n = nbytes // 2
    chunk = 131072
    stream = cupy.cuda.Stream(non_blocking=True) if one_stream else None
    c = codec(stream) if one_stream else nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW)   # nvCOMP's own stream
    t0 = time.perf_counter()
    with (stream if stream is not None else cupy.cuda.Stream.null):
        x, t = weights_like(n, seed=42)
        torch.cuda.synchronize()
        stride = gpu.plane_stride(n)
        t1 = time.perf_counter()
        planes = gpu.split_planes(dt, "fieldsplit", x, stride=stride)
        layout = gpu._chunk_layout(n, [1, 1], chunk, "fieldsplit", stride)
        kw = {"cuda_stream": stream.ptr} if stream is not None else {}
        batch = nvcomp.as_arrays(planes, [c_[2] for c_ in layout], [c_[3] for c_ in layout], **kw)
        comp = c.encode(batch)
        sizes = comp.buffer_sizes
        t2 = time.perf_counter()
        out_planes = cupy.zeros_like(planes)
        dec = c.decode(comp, out=nvcomp.as_arrays(out_planes, [c_[2] for c_ in layout], [c_[3] for c_ in layout], **kw))
        dsizes = dec.buffer_sizes
        y = cupy.empty_like(x)
        gpu.merge_planes(dt, "fieldsplit", out_planes, y, stride=stride)
        same = bool((x == y).all().get())
        t3 = time.perf_counter()
    return {"bytes": nbytes, "chunks": len(layout), "identical": same, "planes_identical": bool((planes == out_planes).all().get()),
            "decoded_sizes_ok": list(dsizes) == [c_[3] for c_ in layout],
            "ratio": round(2 * n / sum(sizes), 4), "split+encode s": round(t2 - t1, 3), "decode+merge s": round(t3 - t2, 3),
            "encode GB/s (incl. split)": round(nbytes / (t2 - t1) / 1e9, 2), "decode GB/s (incl. merge)": round(nbytes / (t3 - t2) / 1e9, 2),
            "total s": round(t3 - t0, 2)}


@question("roundtrip_1GB_one_stream")
def roundtrip_one_stream():
    _roundtrip(64 << 20, True)          # warm-up: compile kernels, codec scratch
    return _roundtrip(1 << 30, True)


@question("roundtrip_1GB_default_streams")
def roundtrip_default_streams():
    return _roundtrip(1 << 30, False)


@question("ratio_exponent_planes")
def ratio_exponent_planes():
    """nvCOMP against the CPU path's frames on the exponent plane of 64 M weight-like bf16 values."""
    from nvidia import nvcomp

    from mithril_gpu import codecs

    n, chunk = 64 << 20, 131072
    plane = exp_plane(n, seed=9)
    comp = codec().encode(nvcomp.as_arrays(plane, list(range(0, n, chunk)), [chunk] * (n // chunk)))
    gpu_bytes = sum(comp.buffer_sizes)
    host = plane.get()
    coder = codecs.ChunkCoder()
    cpu_bytes = sum(len(coder.encode(host[i:i + chunk], literals=True)[1]) for i in range(0, n, chunk))
    return {"plane bytes": n, "nvcomp ratio": round(n / gpu_bytes, 4), "cpu path ratio": round(n / cpu_bytes, 4),
            "nvcomp larger by": f"{100 * (gpu_bytes / cpu_bytes - 1):.2f}%"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="skip the 1 GB round trips")
    a = ap.parse_args()
    global REPORT_PATH, STREAM
    os.environ.setdefault("MITHRIL_GPU_EXPERIMENTAL", "1")
    os.makedirs(a.out, exist_ok=True)
    REPORT_PATH = os.path.join(a.out, "probe.json")
    versions()
    try:
        import cupy

        STREAM = cupy.cuda.Stream(non_blocking=True)
    except Exception:  # noqa: BLE001  (versions() has said why)
        STREAM = None
    with STREAM if STREAM is not None else contextlib.nullcontext():
        alignment()
        one_frame_per_buffer()
        frames_without_content_size()
        nvcomp_reads_cpu_frames()
        decode_reports()
        corrupt_frames()
        ratio_exponent_planes()
        if not a.quick:
            roundtrip_one_stream()
            roundtrip_default_streams()
        # last: it hands nvCOMP unaligned addresses on purpose, and a misaligned-address fault
        # would leave this process's CUDA context unusable for anything after it
        binding_strictness()


if __name__ == "__main__":
    main()
