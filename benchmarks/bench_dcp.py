"""DCP storage writers side by side: FileSystemWriter, FileSystemWriter + its ZStandard extension,
MithrilWriter (full) and MithrilWriter (delta against the full one, one optimizer step later; and,
with --methods ...,ma, the same delta taken wherever it is estimated smaller at all).

    python benchmarks/bench_dcp.py [--mb 560] [--out DIR] [--threads 1] [--runs 5] [--methods fs,zs,mf,md] [--cold]

Two ranks (torch.multiprocessing.spawn, gloo, CPU), each holding half of a training state as
Shard(0) DTensors: bf16 weights and fp32 AdamW moments (exp_avg, exp_avg_sq), plus step counters.
The values are synthetic (Gaussian weights of std 0.02, moments of a running AdamW; the second
state is one AdamW step later with lr 1e-4), not a trained model: byte-level statistics are those
of real bf16/fp32 training states, but no benchmark on synthetic data settles real-model ratios.

Reported, per writer: bytes on disk, ratio against FileSystemWriter, save and load wall time
(slowest rank, after a barrier; outputs fsynced; loads read what the page cache holds, see --cold) and peak
extra anonymous resident memory (RssAnon) of a rank during save and load, sampled every 5 ms.
With --cold, loads read from the disk instead: every file of the checkpoint (and of a delta's base)
is evicted from the page cache before the load, as after a restart.
Every load is checked bit-exact against the state saved. Each save starts with no writeback of
earlier files pending (os.sync() first: between the saves of a training run there is time for
it; without it, a save pays for its predecessor's writeback). The methods run in turn, --runs times,
so that all see the same machine; times are medians, and each method's speed relative to
FileSystemWriter is the median of the runs' paired ratios (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

def rss() -> int:
    """Anonymous resident memory (RssAnon): what a process allocates. Pages of memory-mapped files
    (mithril maps the file it reads) are page cache, as the pages FileSystemReader reads are, so
    they are left out of the comparison."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak resident memory above the level at entry, sampled on a thread."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.start
        return False


def shapes(total_bytes: int):
    """Parameter shapes of a transformer-like model whose state is about ``total_bytes``
    (10 bytes per parameter: bf16 weight + two fp32 moments)."""
    d, ff = 2048, 5632
    per_layer = [("attn.qkv", (3 * d, d)), ("attn.out", (d, d)), ("mlp.up", (ff, d)), ("mlp.gate", (ff, d)),
                 ("mlp.down", (d, ff)), ("norm1", (d,)), ("norm2", (d,))]
    params, out, i = total_bytes // 10, [], 0
    out.append(("embed", (8192, d)))
    n = 8192 * d
    while n < params:
        for name, shp in per_layer:
            out.append((f"layers.{i}.{name}", shp))
            k = 1
            for s in shp:
                k *= s
            n += k
        i += 1
    return out


def local_state(rank: int, world: int, mb: int, mesh):
    """(state at step 1, state at step 2) for this rank: Shard(0) DTensors."""
    from torch.distributed.tensor import DTensor, Shard

    g = torch.Generator().manual_seed(1234 + rank)
    s1, s2 = {"model": {}, "optim": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}}, None
    s2 = {"model": {}, "optim": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}}
    for name, shp in shapes(mb * 1_000_000):
        rows = shp[0]
        lo, hi = rows * rank // world, rows * (rank + 1) // world
        lshape = (hi - lo,) + tuple(shp[1:])
        if len(shp) == 1:
            w = 1.0 + 0.05 * torch.randn(lshape, generator=g)
        else:
            w = 0.02 * torch.randn(lshape, generator=g)
        grad = 1e-3 * torch.randn(lshape, generator=g)
        m = 0.1 * grad + 3e-4 * torch.randn(lshape, generator=g)
        v = 0.001 * grad * grad + 1e-7 * torch.rand(lshape, generator=g)
        grad2 = 1e-3 * torch.randn(lshape, generator=g)
        m2 = 0.9 * m + 0.1 * grad2
        v2 = 0.999 * v + 0.001 * grad2 * grad2
        w2 = w - 1e-4 * (m2 / (v2.sqrt() + 1e-8) + 0.01 * w)
        for st, (ww, mm, vv, step) in ((s1, (w, m, v, 100.0)), (s2, (w2, m2, v2, 101.0))):
            def dt(t):
                return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=torch.Size(shp),
                                          stride=torch.empty(shp, device="meta").stride())

            st["model"][name] = dt(ww.to(torch.bfloat16))
            st["optim"]["state"][name] = {"exp_avg": dt(mm.float()), "exp_avg_sq": dt(vv.float()),
                                          "step": torch.tensor(step)}
    return s1, s2


def zeros_like_state(state):
    from torch.distributed.tensor import DTensor

    def z(x):
        if isinstance(x, dict):
            return {k: z(v) for k, v in x.items()}
        if isinstance(x, list):
            return [z(v) for v in x]
        if isinstance(x, DTensor):
            return DTensor.from_local(torch.zeros_like(x.to_local()), x.device_mesh, x.placements, run_check=False,
                                      shape=x.shape, stride=x.stride())
        if isinstance(x, torch.Tensor):
            return torch.zeros_like(x)
        return x
    return z(state)


def same(a, b) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, DTensor):
        a, b = a.to_local(), b.to_local()
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a,
                                                                          b.view(torch.uint8) if b.dim() else b)
    return a == b


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def drop_cache(path) -> None:
    """Evict the (clean) files directly in ``path`` from the page cache."""
    for n in os.listdir(path):
        p = os.path.join(path, n)
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(rank, world, args, root):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.device_mesh import init_device_mesh

    from mithril_gpu import deltaplan
    from mithril_gpu.dcp import MithrilReader, MithrilWriter

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(root, 'pg')}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    s1, s2 = local_state(rank, world, args.mb, mesh)
    d = lambda n: os.path.join(root, n)  # noqa: E731
    methods = [
        ("FileSystemWriter", s1, lambda: FileSystemWriter(d("fs")), lambda: FileSystemReader(d("fs")), "fs"),
        ("FileSystemWriter + ZStandard", s1, lambda: FileSystemWriter(d("zs"), _extensions=[ZStandard()]),
         lambda: FileSystemReader(d("zs")), "zs"),
        ("MithrilWriter (full)", s1, lambda: MithrilWriter(d("mf"), threads=args.threads),
         lambda: MithrilReader(d("mf"), threads=args.threads), "mf"),
        ("MithrilWriter (delta, next step)", s2, lambda: MithrilWriter(d("md"), base=d("mf"), threads=args.threads),
         lambda: MithrilReader(d("md"), threads=args.threads), "md"),
        ("MithrilWriter (delta, any gain)", s2, lambda: MithrilWriter(d("ma"), base=d("mf"), threads=args.threads),
         lambda: MithrilReader(d("ma"), threads=args.threads), "ma"),
    ]
    min_gain = {"ma": 0.0}          # deltaplan.DELTA_MIN_GAIN per method (default otherwise)
    default_gain = deltaplan.DELTA_MIN_GAIN
    keep = args.methods.split(",")
    methods = [m for m in methods if m[4] in keep]
    rows = {}
    for run in range(args.runs):          # the methods in turn, run after run: all see the same machine
        for label, state, writer, reader, name in methods:
            deltaplan.DELTA_MIN_GAIN = min_gain.get(name, default_gain)
            os.sync()          # no writeback of the previous method's files pending (as between the saves of a run)
            dist.barrier()
            with Peak() as pk_save:
                t = time.perf_counter()
                dcp.save(state, storage_writer=writer())
                t_save = time.perf_counter() - t
            dist.barrier()
            target = zeros_like_state(state)
            if args.cold and rank == 0:          # the checkpoint (and a delta's base) read from the disk
                os.sync()
                for sub in (name, "mf") if name in ("md", "ma") else (name,):
                    drop_cache(d(sub))
            dist.barrier()
            with Peak() as pk_load:
                t = time.perf_counter()
                dcp.load(target, storage_reader=reader())
                t_load = time.perf_counter() - t
            ok = same(target, state)
            del target
            res = torch.tensor([t_save, t_load, pk_save.extra / 1e6, pk_load.extra / 1e6, float(not ok)])
            dist.all_reduce(res, op=dist.ReduceOp.MAX)
            if rank == 0:
                row = rows.setdefault(label, {"method": label, "save_s": [], "load_s": [], "save_peak_mb": 0.0,
                                              "load_peak_mb": 0.0, "bit_exact": True})
                row["bytes"] = dir_bytes(d(name))
                row["save_s"].append(res[0].item())
                row["load_s"].append(res[1].item())
                row["save_peak_mb"] = max(row["save_peak_mb"], res[2].item())
                row["load_peak_mb"] = max(row["load_peak_mb"], res[3].item())
                row["bit_exact"] = row["bit_exact"] and res[4].item() == 0
                print(f"  run {run}: {label}: save {t_save:.2f} s, load {t_load:.2f} s", flush=True)
    rows = list(rows.values())
    if rank == 0:
        state_bytes = 0
        for part in (s1["model"], s1["optim"]["state"]):
            for v in part.values():
                for t in ([v] if not isinstance(v, dict) else v.values()):
                    state_bytes += t.numel() * t.element_size()     # DTensor: the global tensor
        with open(os.path.join(root, "result.json"), "w") as fh:
            json.dump({"rows": rows, "state_bytes": state_bytes}, fh)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=560, help="state size in MB over both ranks (default 560)")
    ap.add_argument("--threads", type=int, default=1, help="mithril threads per rank (default 1: 2 ranks, 2 cores)")
    ap.add_argument("--out", default=None, help="where the checkpoints go (default: a temporary folder, removed)")
    ap.add_argument("--runs", type=int, default=5, help="runs of every method, in turn (default 5)")
    ap.add_argument("--methods", default="fs,zs,mf,md",
                    help="which, of fs (FileSystemWriter, always first: the reference), zs (+ ZStandard), "
                         "mf (MithrilWriter full), md (MithrilWriter delta: needs mf), ma (the delta with "
                         "deltaplan.DELTA_MIN_GAIN = 0: every tensor a delta wherever that is estimated smaller)")
    ap.add_argument("--cold", action="store_true",
                    help="loads read from the disk: the checkpoint's files (and a delta's base's) are evicted from "
                         "the page cache first (os.sync, then posix_fadvise DONTNEED), as for a resume after a restart")
    args = ap.parse_args()
    picked = args.methods.split(",")
    if picked[0] != "fs" or not set(picked) <= {"fs", "zs", "mf", "md", "ma"} or \
            ({"md", "ma"} & set(picked) and "mf" not in picked):
        ap.error("--methods: fs first, then any of zs, mf, md, ma (md and ma need mf)")
    root = args.out or tempfile.mkdtemp(prefix="bench_dcp_")
    os.makedirs(root, exist_ok=True)
    try:
        t0 = time.perf_counter()
        mp.spawn(worker, args=(2, args, root), nprocs=2)
        with open(os.path.join(root, "result.json")) as fh:
            res = json.load(fh)
        base = res["rows"][0]["bytes"]
        print(f"\nstate: {res['state_bytes'] / 1e6:,.0f} MB over 2 ranks (bf16 weights, fp32 AdamW moments); "
              f"torch {torch.__version__}; mithril threads per rank: {args.threads}; "
              f"loads from {'the disk (--cold)' if args.cold else 'the page cache'}; "
              f"{time.perf_counter() - t0:.0f} s in all\n")
        fs = res["rows"][0]
        print(f"{args.runs} runs, methods in turn; times are medians (range), 'vs FS' the median of the runs' "
              "paired ratios (time / FileSystemWriter's time in the same run: below 1 is faster)\n")
        print("| writer | on disk (MB) | ratio vs FileSystemWriter | save (s) | save vs FS | load (s) | load vs FS | "
              "peak extra RssAnon per rank, save / load (MB) | bit-exact |")
        print("|---|---|---|---|---|---|---|---|---|")

        def span(v):
            return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}"

        def vs(v, ref):
            return f"{statistics.median([a / b for a, b in zip(v, ref)]):.2f}"
        for r in res["rows"]:
            print(f"| {r['method']} | {r['bytes'] / 1e6:,.1f} | {base / r['bytes']:.3f} | {span(r['save_s'])} | "
                  f"{vs(r['save_s'], fs['save_s'])} | {span(r['load_s'])} | {vs(r['load_s'], fs['load_s'])} | "
                  f"{r['save_peak_mb']:,.0f} / {r['load_peak_mb']:,.0f} | {'yes' if r['bit_exact'] else 'NO'} |")
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
