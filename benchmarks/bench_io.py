"""The writer's I/O against an earlier revision's, interleaved in one run (issue 10).

    python benchmarks/bench_io.py [--mb 1024] [--runs 7] [--ref a021300] [--threads 2] [--gap 0]
    python benchmarks/bench_io.py --release [--keep K] [--gap 3] ...
    python benchmarks/bench_io.py --prune --keep K [--gap 3] ...

Saves the same state dict (bf16, trained-like exponents: N(0, 0.02) weights, so the coder does
real work) file to file with mithril's save, once with this tree's ``writer.AtomicFile`` and once
with the ``AtomicFile`` of git revision REF (put in place of the current one), alternating, each
save replacing the file the previous one wrote (as a checkpoint loop does), fsync included.
With ``--release``, the two contenders are this tree with and without releasing the page cache
of the files a save replaces (``writer.RELEASE_REPLACED``), each replacing its own file, or with
``--keep K`` each saving through its own ``Checkpointer(keep=K, full_every=1)``. With ``--prune
--keep K``, the contenders are the Checkpointer deleting its pruned files on a thread
(``checkpointer.PRUNE_THREAD_BYTES``) and inline.
Prints MB/s per run and the median of the paired ratios. ``--gap S`` waits S seconds (after
``os.sync``) before each save, as a training loop does between checkpoints: memory freed long
before a save is not what a save right after another one gets (see STATUS.md, page cache).
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
from mithril_gpu import checkpointer, writer  # noqa: E402


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
    ap.add_argument("--gap", type=float, default=0.0,
                    help="seconds to wait (after os.sync) before each save, as training does between checkpoints "
                         "(default 0: back to back)")
    ap.add_argument("--release", action="store_true",
                    help="instead of --ref: this tree with and without releasing the page cache of the files a "
                         "save replaces (writer.RELEASE_REPLACED)")
    ap.add_argument("--keep", type=int, default=None,
                    help="with --release: save through Checkpointer(keep=K, full_every=1), whose saves make older "
                         "files prunable, instead of replacing one file")
    ap.add_argument("--prune", action="store_true",
                    help="with --keep, instead of --release: the Checkpointer's pruned files deleted on a thread "
                         "against inline (checkpointer.PRUNE_THREAD_BYTES)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder under benchmarks/out)")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n = a.mb * (1 << 20) // 2
    rows = 4096
    state = {f"layer{i}": (torch.randn(rows, n // rows // 8, generator=g) * 0.02).to(torch.bfloat16) for i in range(8)}
    nbytes = sum(t.numel() * 2 for t in state.values())
    if a.keep is not None and not (a.release or a.prune):
        ap.error("--keep goes with --release or --prune")
    if a.prune and a.keep is None:
        ap.error("--prune needs --keep")
    toggle = a.release or a.prune
    if a.prune:
        kinds = {"prune on a thread": checkpointer.PRUNE_THREAD_BYTES, "prune inline": 1 << 62}
    elif a.release:
        kinds = {"release": True, "no release": False}
    else:
        kinds = {"this tree": writer.AtomicFile, f"writer.py@{a.ref}": old_atomic_file(a.ref)}
    here_atomic, here_prune = writer.AtomicFile, checkpointer.PRUNE_THREAD_BYTES
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    d = a.dir or tempfile.mkdtemp(prefix="bench_io-", dir=os.path.join(HERE, "out"))
    path = os.path.join(d, "ckpt.mth")
    cks = {k: mithril_gpu.Checkpointer(os.path.join(d, k.replace(" ", "-")), keep=a.keep, full_every=1,
                                       threads=a.threads) for k in kinds} if a.keep is not None else None
    speeds = {k: [] for k in kinds}
    mithril_gpu.save(state, path, threads=a.threads)          # warm up, and a file to replace
    for k in (kinds if toggle else ()):                    # (each kind replaces its own files)
        if cks is not None:
            cks[k].save(state, 0)
        else:
            mithril_gpu.save(state, os.path.join(d, k.replace(" ", "-") + ".mth"), threads=a.threads)
    try:
        for r in range(a.runs):
            order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
            for k in order:
                if a.prune:
                    checkpointer.PRUNE_THREAD_BYTES = kinds[k]
                    cks[k].wait()     # (the other kind's pruning, on a thread, is not timed into this save)
                elif a.release:
                    writer.RELEASE_REPLACED = kinds[k]
                else:
                    writer.AtomicFile = kinds[k]
                if a.gap:             # between checkpoints: training runs, the previous file is written back
                    os.sync()
                    time.sleep(a.gap)
                t0 = time.perf_counter()
                if cks is not None:
                    cks[k].save(state, r + 1)
                elif toggle:
                    mithril_gpu.save(state, os.path.join(d, k.replace(" ", "-") + ".mth"), threads=a.threads)
                else:
                    mithril_gpu.save(state, path, threads=a.threads)
                speeds[k].append(nbytes / (time.perf_counter() - t0) / 1e6)
            print(f"run {r}: " + ", ".join(f"{k} {speeds[k][-1]:.0f} MB/s" for k in kinds), flush=True)
    finally:
        writer.AtomicFile, writer.RELEASE_REPLACED = here_atomic, True
        checkpointer.PRUNE_THREAD_BYTES = here_prune
        for c in (cks or {}).values():
            c.close()
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    names = list(kinds)
    ratios = [x / y for x, y in zip(speeds[names[0]], speeds[names[1]])]
    how = f"Checkpointer(keep={a.keep}, full_every=1)" if cks is not None else "file replaced each time"
    print(f"\n{nbytes / 1e6:.0f} MB bf16, {a.threads} threads, {a.runs} runs, {how}, fsync included"
          + (f", {a.gap:g} s between saves" if a.gap else ""))
    for k in names:
        print(f"  {k}: median {statistics.median(speeds[k]):.0f} MB/s (best {max(speeds[k]):.0f})")
    print(f"  paired ratio {names[0]} / {names[1]}: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
