"""Peak memory and time of consecutive blocking Checkpointer saves (a full save, then deltas) on
the 670 MB bf16 state of bench_ckpt_speed.py (tensors tiled from the real run's steps 299/300),
with the in-memory copy refreshed in place after each write (how a blocking save of CPU tensors
works now) against a snapshot taken before each write (how it worked before, and how it still
works for CUDA tensors and non-blocking saves).

    python benchmarks/bench_ckpt_memory.py [--saves 4] [--layers 24] [--rounds 2]

Each mode runs in its own process (peak RSS only grows within a process), the two alternating
--rounds times. Prints, per save, its seconds and the process's peak resident memory above what
it held once both input state dicts were built.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(mode: str, saves: int, layers: int) -> None:
    sys.path.insert(0, HERE)
    import bench_ckpt_speed

    import mithril_gpu
    from mithril_gpu import checkpointer

    a, b = bench_ckpt_speed.tiled_pair(299, 300, layers)
    if mode == "snapshot first":
        checkpointer._on_cpu = lambda state: False       # the path CUDA states take
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = tempfile.mkdtemp(dir=os.environ.get("BENCH_TMP"))
    ck = mithril_gpu.Checkpointer(d, full_every=10, keep=2)
    out = []
    try:
        for i in range(saves):
            t = time.perf_counter()
            ck.save(a if i % 2 == 0 else b, i)
            out.append((time.perf_counter() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1e3))
    finally:
        ck.close()
        shutil.rmtree(d)
    print(json.dumps({"raw_mb": sum(t.numel() * t.element_size() for t in a.values()) / 1e6, "saves": out}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.saves, args.layers)
    for r in range(args.rounds):
        for mode in ("refreshed in place", "snapshot first"):
            res = subprocess.run([sys.executable, __file__, "--child", mode, "--saves", str(args.saves),
                                  "--layers", str(args.layers)], capture_output=True, text=True, check=True)
            rep = json.loads(res.stdout.strip().splitlines()[-1])
            cells = ", ".join(f"{s:.2f} s / {m:,.0f} MB" for s, m in rep["saves"])
            print(f"round {r}, {mode:>18} ({rep['raw_mb']:.0f} MB state): save 0 full, then deltas: {cells}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
