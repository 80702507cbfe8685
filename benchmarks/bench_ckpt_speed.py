"""Checkpointer delta save against a full save of the same state dict (issue 11), on a state dict
of a real model's shape (a 24-layer, d=1024 transformer in bf16: ~335 M parameters, 670 MB)
whose tensors are tiled from two consecutive checkpoints of benchmarks/bench_deltas.py's real run,
so the changes are real ones (each tile with its own random signs, so no tile repeats another).

    python benchmarks/bench_ckpt_speed.py [--pair 299,300] [--runs 3] [--layers 24] [--threads 1,2,4]

With --compare-ans, each run also times the same delta saves written without the ans codec.
Prints the median seconds and MB/s of a full save, a Checkpointer full save and a Checkpointer
delta save (previous tensors held in memory), run alternately, their paired ratios, CPU seconds
and file sizes. With --profile, also where the delta save's CPU time goes (one thread, cProfile).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from common import HERE

import mithril_gpu  # noqa: E402
from mithril_gpu import codecs, cpu, deltaplan  # noqa: E402

RUN = os.path.join(HERE, "out", "run")


def model_shapes(layers: int, d: int = 1024, vocab: int = 32000) -> dict:
    shapes = {"emb.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {p + "attn.in_proj.weight": (3 * d, d), p + "attn.out_proj.weight": (d, d),
                   p + "mlp.up.weight": (4 * d, d), p + "mlp.down.weight": (d, 4 * d),
                   p + "norm1.weight": (d,), p + "norm2.weight": (d,), p + "mlp.up.bias": (4 * d,)}
    shapes["norm.weight"] = (d,)
    return shapes


def tiled_pair(step_a: int, step_b: int, layers: int):
    """Two state dicts of the model's shapes, each tensor tiled from a tensor of the run with the
    same role (matrices from matrices, vectors from vectors), base from step_a, next from step_b."""
    a = mithril_gpu.load(os.path.join(RUN, f"bf16-{step_a}.mth"))
    b = mithril_gpu.load(os.path.join(RUN, f"bf16-{step_b}.mth"))
    mats = [k for k, v in a.items() if v.dim() == 2 and v.numel() >= 65536]
    vecs = [k for k, v in a.items() if v.dim() == 1]
    out_a, out_b = {}, {}
    for i, (name, shape) in enumerate(model_shapes(layers).items()):
        src = (mats if len(shape) == 2 else vecs)[i % (len(mats) if len(shape) == 2 else len(vecs))]
        n = int(np.prod(shape))
        reps = -(-n // a[src].numel())
        # each tile is shifted by a different offset and has its own random signs (the same in both
        # checkpoints: magnitudes, exponents and changes stay the run's), so that no tile repeats
        # another's bytes (zstd would find the repeats, which real weights do not have)
        g = torch.Generator().manual_seed(i)
        signs = [torch.where(torch.rand(a[src].numel(), generator=g) < 0.5, -1.0, 1.0).to(a[src].dtype)
                 for _ in range(reps)]
        fa = torch.cat([a[src].flatten().roll(r * 977) * signs[r] for r in range(reps)])[:n]
        fb = torch.cat([b[src].flatten().roll(r * 977) * signs[r] for r in range(reps)])[:n]
        out_a[name], out_b[name] = fa.reshape(shape).clone(), fb.reshape(shape).clone()
    return out_a, out_b


def profile_breakdown(a: dict, b: dict, tmp: str) -> None:
    """CPU seconds of each part of a full save and of a Checkpointer delta save, on one thread."""
    import cProfile
    import pstats

    cats = {"snapshot copy": ["method 'copy' of 'numpy.ndarray'", "clone", "copyto"], "context sort (C)": ["_accel.ctx"],
            "coding choice": ["deltaplan.py"], "masked split (C)": ["masked_split"], "zstd": ["ZstdCompressor"],
            "huffman literals (C)": ["huff_frame"], "ans (C)": ["ans_encode"], "plane split (C)": ["_accel.split"], "xxh64 (C)": ["_accel.xxh64"],
            "entropy sampling (C)": ["_accel.entropy"], "file write": ["BufferedWriter", "posix.write", "fsync"],
            "delta op (C)": ["_accel.delta"], "fused coding (C)": ["encode_many"],
            "waiting on threads": ["method 'acquire' of '_thread.lock'", "method 'acquire' of '_thread.RLock'"]}

    def run(label, fn):
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        st = pstats.Stats(pr)
        out = dict.fromkeys(cats, 0.0)
        for (f, _, name), (_, _, tt, _, _) in st.stats.items():
            for k, pats in cats.items():
                if any(p in f"{f}:{name}" for p in pats):
                    out[k] += tt
                    break
        print(f"{label}: {st.total_tt:.2f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items() if v >= 0.005)
              + f", other {st.total_tt - sum(out.values()):.2f}", flush=True)

    run("full save, 1 thread", lambda: mithril_gpu.save(b, os.path.join(tmp, "p.mth"), threads=1))
    ck = mithril_gpu.Checkpointer(os.path.join(tmp, "prof"), full_every=10, keep=None, threads=1)
    ck.save(a, 0)
    run("Checkpointer delta save, 1 thread", lambda: ck.save(b, 1))
    ck.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default="299,300")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--chain", type=int, default=3, help="later delta saves timed after the first (default 3)")
    ap.add_argument("--no-ctx", action="store_true", help="delta saves without context-sorted deltas")
    ap.add_argument("--threads", default="", help="thread counts to measure in turn, e.g. 1,2,4,8,16 (default: all cores)")
    ap.add_argument("--profile", action="store_true", help="also profile one save of each kind on one thread")
    ap.add_argument("--compare-ans", action="store_true",
                    help="also time, in each run, the same delta saves written without the ans codec")
    args = ap.parse_args()
    if args.no_ctx:
        deltaplan.choose_ctx = lambda item, x, b, *pre: (*(pre[0] if pre else deltaplan.choose(item, x, b)), None)
    sa, sb = (int(v) for v in args.pair.split(","))
    a, b = tiled_pair(sa, sb, args.layers)
    raw = sum(t.numel() * t.element_size() for t in b.values())
    counts = [int(v) for v in args.threads.split(",")] if args.threads else [None]
    for threads in counts:
        print(f"state dict: {len(b)} tensors, {raw / 1e6:.0f} MB bf16, pair {sa}->{sb}, "
              f"threads {threads or cpu.default_threads()}", flush=True)
        measure(args, a, b, raw, threads)


def measure(args, a: dict, b: dict, raw: int, threads: int | None) -> None:
    tmp = tempfile.mkdtemp(dir=os.environ.get("BENCH_TMP"))
    full_t, delta_t, full_cpu, delta_cpu, ckfull_t, chain_t = [], [], [], [], [], []
    noans_t, noans_cpu, noans_chain_t, load_t, noans_load_t = [], [], [], [], []
    sizes = {}
    for r in range(args.runs):
        path = os.path.join(tmp, "full.mth")
        t, c = time.perf_counter(), time.process_time()
        mithril_gpu.save(b, path, threads=threads)
        full_t.append(time.perf_counter() - t)
        full_cpu.append(time.process_time() - c)
        sizes["full"] = os.path.getsize(path)
        os.unlink(path)
        d2 = os.path.join(tmp, f"full{r}")
        t = time.perf_counter()
        mithril_gpu.Checkpointer(d2, full_every=10, keep=None, threads=threads).save(b, 0)
        ckfull_t.append(time.perf_counter() - t)
        shutil.rmtree(d2)
        saved_ans = codecs.ANS_ENABLED
        for variant in (("ans", "no ans") if args.compare_ans else ("ans",)):
            codecs.ANS_ENABLED = saved_ans and variant == "ans"
            d = os.path.join(tmp, f"ck{r}")
            ck = mithril_gpu.Checkpointer(d, full_every=10, keep=None, threads=threads)
            ck.save(a, 0)
            t, c = time.perf_counter(), time.process_time()
            ck.save(b, 1)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            (delta_t if variant == "ans" else noans_t).append(dt)
            (delta_cpu if variant == "ans" else noans_cpu).append(dc)
            key = "" if variant == "ans" else " no ans"
            sizes["delta" + key] = os.path.getsize(ck.path(1))
            if args.compare_ans:                 # loading that delta (its base decoded from disk too)
                t = time.perf_counter()
                mithril_gpu.load(ck.path(1))
                (load_t if variant == "ans" else noans_load_t).append(time.perf_counter() - t)
            with mithril_gpu.open(ck.path(1)) as f:
                sizes["ctx share"] = sum(e.nbytes for e in f.index.tensors if e.ctx is not None) / raw
            later = []
            for k in range(args.chain):          # later deltas of the chain (each tensor's coding choice reused)
                t = time.perf_counter()
                ck.save(a if k % 2 == 0 else b, 2 + k)
                later.append(time.perf_counter() - t)
                sizes["later" + key] = os.path.getsize(ck.path(2 + k))
            if later:
                (chain_t if variant == "ans" else noans_chain_t).append(statistics.median(later))
            ck.close()
            shutil.rmtree(d)
            print(f"  run {r}{key}: full {full_t[-1]:.2f} s ({full_cpu[-1]:.2f} CPU), Checkpointer full {ckfull_t[-1]:.2f} s, "
                  f"Checkpointer delta {dt:.2f} s ({dc:.2f} CPU)"
                  + (f", later deltas {' '.join(f'{v:.2f}' for v in later)} s" if later else ""), flush=True)
        codecs.ANS_ENABLED = saved_ans
    fm, dm = statistics.median(full_t), statistics.median(delta_t)
    ratio = statistics.median([d / f for d, f in zip(delta_t, full_t)])
    print(f"full save: {fm:.2f} s ({raw / fm / 1e6:.0f} MB/s), ratio {raw / sizes['full']:.2f}")
    print(f"Checkpointer delta save: {dm:.2f} s ({raw / dm / 1e6:.0f} MB/s), ratio {raw / sizes['delta']:.2f}, "
          f"{100 * sizes['ctx share']:.0f}% of bytes context-sorted")
    ckf = statistics.median(ckfull_t)
    print(f"Checkpointer full save (a first save: its in-memory copy made into fresh memory): {ckf:.2f} s ({raw / ckf / 1e6:.0f} MB/s); delta / that, "
          f"median of paired runs: {statistics.median([d / f for d, f in zip(delta_t, ckfull_t)]):.2f}")
    if chain_t:
        cm = statistics.median(chain_t)
        print(f"Checkpointer later deltas of a chain (choices reused; alternately back to the base): {cm:.2f} s "
              f"({raw / cm / 1e6:.0f} MB/s), ratio {raw / sizes['later']:.2f}; / full save, median of paired runs: "
              f"{statistics.median([d / f for d, f in zip(chain_t, full_t)]):.2f}")
    print(f"delta / full time, median of paired runs: {ratio:.2f}; CPU seconds (all threads): full "
          f"{statistics.median(full_cpu):.2f}, delta {statistics.median(delta_cpu):.2f}")
    if noans_t:
        print(f"without the ans codec: first delta {statistics.median(noans_t):.2f} s ({statistics.median(noans_cpu):.2f} CPU), "
              f"ratio {raw / sizes['delta no ans']:.2f}; with / without, median of paired runs: "
              f"{statistics.median([x / y for x, y in zip(delta_t, noans_t)]):.2f}"
              + (f"; later deltas {statistics.median(noans_chain_t):.2f} s, ratio {raw / sizes['later no ans']:.2f}, "
                 f"with / without {statistics.median([x / y for x, y in zip(chain_t, noans_chain_t)]):.2f}"
                 if noans_chain_t else ""))
        print(f"loading the first delta (and its base): {statistics.median(load_t):.2f} s with ans, "
              f"{statistics.median(noans_load_t):.2f} s without; with / without, median of paired runs: "
              f"{statistics.median([x / y for x, y in zip(load_t, noans_load_t)]):.2f}")
    if args.profile:
        profile_breakdown(a, b, tmp)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
