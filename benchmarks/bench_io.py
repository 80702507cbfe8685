"""The writer's I/O against an earlier revision's, interleaved in one run (issue 10).

    python benchmarks/bench_io.py [--mb 1024] [--runs 7] [--ref a021300] [--threads 2]

Saves the same state dict (bf16, trained-like exponents: N(0, 0.02) weights, so the coder does
real work) file to file with mithril's save, once with this tree's ``writer.AtomicFile`` and once
with the ``AtomicFile`` of git revision REF (put in place of the current one), alternating, each
save replacing the file the previous one wrote (as a checkpoint loop does), fsync included.
Prints MB/s per run and the median of the paired ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mithril_gpu  # noqa: E402
from mithril_gpu import writer  # noqa: E402


def old_atomic_file(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:mithril_gpu/writer.py"], cwd=os.path.dirname(HERE),
                         check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType("mithril_gpu._writer_ref")
    mod.__package__ = "mithril_gpu"
    exec(compile(src, f"writer.py@{rev}", "exec"), mod.__dict__)
    return mod.AtomicFile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ref", default="a021300")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder under benchmarks/out)")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n = a.mb * (1 << 20) // 2
    rows = 4096
    state = {f"layer{i}": (torch.randn(rows, n // rows // 8, generator=g) * 0.02).to(torch.bfloat16) for i in range(8)}
    nbytes = sum(t.numel() * 2 for t in state.values())
    kinds = {"this tree": writer.AtomicFile, f"writer.py@{a.ref}": old_atomic_file(a.ref)}
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    d = a.dir or tempfile.mkdtemp(prefix="bench_io-", dir=os.path.join(HERE, "out"))
    path = os.path.join(d, "ckpt.mth")
    speeds = {k: [] for k in kinds}
    mithril_gpu.save(state, path, threads=a.threads)          # warm up, and a file to replace
    try:
        for r in range(a.runs):
            order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
            for k in order:
                writer.AtomicFile = kinds[k]
                t0 = time.perf_counter()
                mithril_gpu.save(state, path, threads=a.threads)
                speeds[k].append(nbytes / (time.perf_counter() - t0) / 1e6)
            print(f"run {r}: " + ", ".join(f"{k} {speeds[k][-1]:.0f} MB/s" for k in kinds), flush=True)
    finally:
        writer.AtomicFile = kinds["this tree"]
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    names = list(kinds)
    ratios = [x / y for x, y in zip(speeds[names[0]], speeds[names[1]])]
    print(f"\n{nbytes / 1e6:.0f} MB bf16, {a.threads} threads, {a.runs} runs, file replaced each time, fsync included")
    for k in names:
        print(f"  {k}: median {statistics.median(speeds[k]):.0f} MB/s (best {max(speeds[k]):.0f})")
    print(f"  paired ratio {names[0]} / {names[1]}: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
