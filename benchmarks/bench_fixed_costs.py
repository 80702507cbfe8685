"""Fixed costs that dominate small checkpoints (issue 10): opening a file of many tensors, and a
Checkpointer delta save of a small model.

    python benchmarks/bench_fixed_costs.py [--tree DIR]

``--tree`` measures another checkout of mithril-gpu instead of this one (to compare with an earlier
revision: ``git worktree add /tmp/pre REV``, copy this tree's built ``mithril_gpu/_accel*.so`` into
it, then pass ``--tree /tmp/pre``; run the two one after the other, a few times).

* open: ``mithril_gpu.open`` of a 400-tensor bf16 file (100 layers of 4 tensors), median of 20;
* delta save: a 3.3 MB bf16 model of 50 tensors, 30 saves with ``Checkpointer(full_every=10,
  keep=3, threads=2)``, each after a small change to every weight: median, mean and best of the
  deltas, and the median of those that choose each tensor's coding afresh (a chain's first delta
  and every fourth after it, ``checkpointer.RECHOOSE_EVERY``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=os.path.dirname(HERE))
    a = ap.parse_args()
    sys.path.insert(0, a.tree)
    import torch

    import mithril_gpu

    d = tempfile.mkdtemp(prefix="bench_fixed-")
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.{k}": torch.randn(s, generator=g).to(torch.bfloat16)
             for i in range(100) for k, s in (("w", (64, 64)), ("b", (64,)), ("n", (64,)), ("big", (600, 512)))}
    p = os.path.join(d, "m.mth")
    mithril_gpu.save(state, p)
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        mithril_gpu.open(p).close()
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    print(f"open, {len(state)} tensors: median {med * 1e3:.2f} ms ({med * 1e6 / len(state):.1f} us per tensor)")

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(25)]).to(torch.bfloat16)
    sd = model.state_dict()
    ck = mithril_gpu.Checkpointer(os.path.join(d, "ck"), full_every=10, keep=3, threads=2)
    deltas, choosing = [], []
    for step in range(30):
        with torch.no_grad():
            for t in sd.values():
                t.add_(torch.randn_like(t) * 1e-3)
        t0 = time.perf_counter()
        ck.save({"model": sd, "step": step}, step)
        if step % 10:
            deltas.append(time.perf_counter() - t0)
            if (step % 10 - 1) % 4 == 0:       # the chain's deltas that choose each tensor's coding afresh
                choosing.append(deltas[-1])
    mb = sum(t.numel() * t.element_size() for t in sd.values()) / 1e6
    print(f"Checkpointer delta save, {mb:.1f} MB, {len(sd)} tensors: median {statistics.median(deltas) * 1e3:.1f} ms, "
          f"mean {statistics.mean(deltas) * 1e3:.1f} ms, best {min(deltas) * 1e3:.1f} ms; "
          f"the saves that choose codings: median {statistics.median(choosing) * 1e3:.1f} ms")
    import shutil

    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
