"""A save (and a load) on a background thread while the main thread runs pure Python, as a training
loop dispatching kernels does (``dcp.async_save`` in thread mode): every time the saver's thread
returns from C to Python it must take the GIL back, and waits up to the switch interval (5 ms) for
the busy main thread to hand it over. Measures the fused CPU path (cpu.FUSED, the default) against
the per-row path, interleaved, idle and with the main thread spinning.

    python benchmarks/bench_gil.py [--mb 200] [--threads 1,2] [--runs 3] [--dtype bf16] [--data minilm] [--load]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import mithril_gpu  # noqa: E402
from mithril_gpu import cpu  # noqa: E402


def timed_in_thread(fn, spin: bool) -> float:
    """Seconds ``fn`` takes on a background thread, the main thread spinning in Python if ``spin``."""
    done = threading.Event()
    took = []

    def work():
        t = time.perf_counter()
        try:
            fn()
        finally:
            took.append(time.perf_counter() - t)
            done.set()
    th = threading.Thread(target=work)
    th.start()
    if spin:
        while not done.is_set():
            x = sum(range(1000))    # noqa: F841  (pure Python, never releases the GIL on its own)
    th.join()
    return took[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="checkpoint size in MB (default 200)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    ap.add_argument("--load", action="store_true", help="time loads as well")
    ap.add_argument("--data", default="randn", choices=["randn", "minilm"],
                    help="randn: N(0, 0.02) tensors of 4 M elements; minilm: all-MiniLM-L6-v2's real "
                         "weights, repeated up to the size (its many small tensors included)")
    a = ap.parse_args()
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    n = a.mb * 1_000_000 // torch.tensor([], dtype=dt).element_size()
    g = torch.Generator().manual_seed(0)
    if a.data == "minilm":
        from safetensors.torch import load_file

        sys.path.insert(0, HERE)
        from common import minilm_path
        src = load_file(minilm_path())
        sd, k = {}, 0
        while sum(v.numel() for v in sd.values()) < n:
            sd.update({f"{k}.{name}": v.to(dt).contiguous() for name, v in src.items()})
            k += 1
    else:
        per = 4_000_000                 # tensors of ~8-16 MB, like a transformer's layers
        sd = {f"layer{i}.weight": (torch.randn(min(per, n - i * per), generator=g) * 0.02).to(dt)
              for i in range(-(-n // per))}
    tmp = tempfile.mkdtemp(prefix="mithril-gil-")
    path = os.path.join(tmp, "x.mth")
    print(f"{a.mb} MB {a.dtype} ({a.data}), {len(sd)} tensors, {os.cpu_count()} cores; seconds, median of {a.runs} "
          f"(switch interval {sys.getswitchinterval() * 1e3:.0f} ms)")
    print(f"{'threads':>7} {'op':>4} {'main thread':>12} {'per-row':>9} {'fused':>9} {'speed-up':>9}")
    try:
        for th in [int(x) for x in a.threads.split(",")]:
            ops = [("save", lambda: mithril_gpu.save(sd, path, threads=th))]
            if a.load:
                ops.append(("load", lambda: mithril_gpu.load(path, threads=th)))
            for op, fn in ops:
                for spin in (False, True):
                    times = {False: [], True: []}
                    for _ in range(a.runs):          # interleaved: per-row, fused, per-row, ...
                        for fused in (False, True):
                            cpu.FUSED = fused
                            times[fused].append(timed_in_thread(fn, spin))
                    cpu.FUSED = True
                    old, new = statistics.median(times[False]), statistics.median(times[True])
                    print(f"{th:>7} {op:>4} {'spinning' if spin else 'idle':>12} {old:>9.3f} {new:>9.3f} "
                          f"{old / new:>8.2f}x", flush=True)
    finally:
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
