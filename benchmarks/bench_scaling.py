"""How the CPU path scales with threads (issue 10): save and load of one state dict, file to
file, at each thread count, interleaved, with the serial fraction that the speed-ups imply.

    python benchmarks/bench_scaling.py [--mb 1024] [--threads 1,2] [--runs 5] [--dtypes bf16,fp32]

The state is --mb of weights drawn from N(0, 0.02) (bf16 and fp32, so the coder does the work a
trained checkpoint gives it; the compression ratio is not the point here), in 8 tensors. Each
round saves it (fsync included, replacing the previous file, as a checkpoint loop does) and loads
it back (into fresh tensors, checksums verified) once per thread count, the thread counts in turn.
Prints, per thread count: median MB/s of the uncompressed bytes, CPU seconds per GB, the median
over rounds of the speed-up against 1 thread in the same round, and Amdahl's serial fraction f
from that speed-up (S = 1 / (f + (1 - f) / n), so f = (n / S - 1) / (n - 1)); then f fitted over
all thread counts, and the thread count at which that model reaches 2.5 GiB/s (or its ceiling,
1-thread speed / f). The fit is a model: measure on a host with the cores (the device host has
16) before relying on it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mithril_gpu  # noqa: E402

TARGET = 2.5 * (1 << 30)          # bytes per second: the original target per checkpoint


def amdahl_fit(points: list[tuple[int, float]]) -> float:
    """Least-squares f in 1/S = f + (1 - f)/n over (n, S) with n > 1, clipped to [0, 1]."""
    num = den = 0.0
    for n, s in points:
        if n <= 1:
            continue
        a = 1.0 - 1.0 / n              # 1/S - 1/n = f * (1 - 1/n)
        num += a * (1.0 / s - 1.0 / n)
        den += a * a
    return min(1.0, max(0.0, num / den)) if den else float("nan")


def threads_for(target: float, one: float, f: float) -> str:
    """Threads at which B(n) = one / (f + (1 - f)/n) reaches target, under Amdahl's model."""
    if one >= target:
        return "1"
    if f != f:
        return "unknown"
    r = one / target                   # need f + (1 - f)/n <= r
    if r <= f:
        return f"never (ceiling {one / max(f, 1e-12) / (1 << 30):.2f} GiB/s)"
    n = (1 - f) / (r - f)
    return f"{n:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (1 is always included)")
    ap.add_argument("--runs", type=int, default=5, help="rounds (default 5); the first is a warm-up and not counted")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    a = ap.parse_args()
    counts = sorted({1, *(int(t) for t in a.threads.split(","))})
    tmp = tempfile.mkdtemp(dir=a.dir)
    try:
        for dname in a.dtypes.split(","):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dname]
            g = torch.Generator().manual_seed(0)
            n = a.mb * (1 << 20) // torch.finfo(dtype).bits * 8
            state = {f"layer{i}": (torch.randn(4096, n // 4096 // 8, generator=g) * 0.02).to(dtype) for i in range(8)}
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            path = os.path.join(tmp, "s.mth")
            res = {(op, c): [] for op in ("save", "load") for c in counts}
            cpu = {(op, c): [] for op in ("save", "load") for c in counts}
            for r in range(a.runs):
                for c in counts:
                    t, p = time.perf_counter(), time.process_time()
                    mithril_gpu.save(state, path, threads=c)
                    if r:
                        res["save", c].append(time.perf_counter() - t)
                        cpu["save", c].append(time.process_time() - p)
                    t, p = time.perf_counter(), time.process_time()
                    out = mithril_gpu.load(path, threads=c)
                    if r:
                        res["load", c].append(time.perf_counter() - t)
                        cpu["load", c].append(time.process_time() - p)
                    del out
            ratio = nbytes / os.path.getsize(path)
            print(f"{dname}: {nbytes / 1e6:.0f} MB in 8 tensors, ratio {ratio:.2f}, {a.runs - 1} rounds, "
                  f"{os.cpu_count()} CPUs", flush=True)
            for op in ("save", "load"):
                pts = []
                for c in counts:
                    med = statistics.median(res[op, c])
                    cps = statistics.median(cpu[op, c]) / (nbytes / 1e9)
                    sp = statistics.median([one / x for one, x in zip(res[op, 1], res[op, c])])
                    f = (c / sp - 1) / (c - 1) if c > 1 else float("nan")
                    pts.append((c, sp))
                    print(f"  {op} {c:>2} threads: {nbytes / med / 1e6:7.0f} MB/s, {cps:.2f} CPU-s/GB, "
                          f"speed-up {sp:.2f}" + (f", serial fraction {f:.2f}" if c > 1 else ""), flush=True)
                f = amdahl_fit(pts)
                one = nbytes / statistics.median(res[op, 1])
                print(f"  {op}: fitted serial fraction {f:.2f}; 2.5 GiB/s at {threads_for(TARGET, one, f)} threads "
                      f"(Amdahl's model from {', '.join(str(c) for c in counts)} threads)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
