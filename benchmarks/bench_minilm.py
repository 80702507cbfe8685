"""One real checkpoint (all-MiniLM-L6-v2, fp32 as shipped, cast to bf16 and fp16): mithril side by
side with the tools users would pick instead, in the same run on the same machine.

    python benchmarks/bench_minilm.py [--runs 9] [--threads 2] [--dtypes fp32,bf16,fp16]
    python benchmarks/bench_minilm.py --paired --methods "mithril,mithril per-row,zipnn in-memory,zipnn 0.5.4"

Each method goes from an in-memory CPU state dict to a file and back, output fsynced inside the
timing (mithril's save is atomic and fsyncs; the others are given the same). Times are medians
of --runs after one warm-up; MB/s are of the uncompressed tensor bytes. Output buffers are
freshly allocated in every call for every method (on a VM that hands freed memory back to the
host, that is a real and large cost). Peak memory is measured separately, compressing a
.safetensors file to a file in a fresh process: peak RSS minus RSS after imports, as a
multiple of the checkpoint's size.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from common import HERE, fsync_path, minilm_path, order0_bound, plot, print_table, time_runs

import mithril_gpu  # noqa: E402  (common puts the repo on sys.path)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ZIPNN_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def raw_bytes(sd) -> bytes:
    return b"".join(v.contiguous().view(torch.uint8).numpy().tobytes() for v in sd.values())


def size_of(path) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


# ------------------------------------------------------------------ methods: (compress, decompress)

def method_mithril(sd, dname, path, threads):
    def comp():
        mithril_gpu.save(sd, path, threads=threads)

    def dec():
        return mithril_gpu.load(path, threads=threads)
    return comp, dec


def method_mithril_per_row(sd, dname, path, threads):
    """mithril with the per-row CPU path (cpu.FUSED = False), the reference of the fused one."""
    from mithril_gpu import cpu

    def comp():
        old, cpu.FUSED = cpu.FUSED, False
        try:
            mithril_gpu.save(sd, path, threads=threads)
        finally:
            cpu.FUSED = old

    def dec():
        old, cpu.FUSED = cpu.FUSED, False
        try:
            return mithril_gpu.load(path, threads=threads)
        finally:
            cpu.FUSED = old
    return comp, dec


def method_zstd1(sd, dname, path, threads):
    import zstandard

    cctx = zstandard.ZstdCompressor(level=1, threads=threads)

    def comp():
        with open(path, "wb") as f:
            for v in sd.values():
                frame = cctx.compress(v.contiguous().view(torch.uint8).numpy())
                f.write(len(frame).to_bytes(8, "little"))
                f.write(frame)
        fsync_path(path)

    def dec():
        out, d = {}, zstandard.ZstdDecompressor()
        with open(path, "rb") as f:
            for k, v in sd.items():
                n = int.from_bytes(f.read(8), "little")
                out[k] = torch.frombuffer(bytearray(d.decompress(f.read(n))), dtype=v.dtype).reshape(v.shape)
        return out
    return comp, dec


def method_zipnn(sd, dname, path, threads):
    import zipnn

    z = zipnn.ZipNN(bytearray_dtype=ZIPNN_NAMES[dname], threads=threads)
    raw = raw_bytes(sd)
    holder = {}

    def comp():
        buf = holder.pop("buf")           # zipnn 0.5.4 modifies its input: a fresh copy per call,
        with open(path, "wb") as f:       # made outside the timing (see prepare)
            f.write(z.compress(buf))
        fsync_path(path)

    def prepare():
        holder["buf"] = bytearray(raw)

    def dec():
        with open(path, "rb") as f:
            return z.decompress(f.read())
    comp.prepare = prepare
    return comp, dec


def method_zipnn_memory(sd, dname, path, threads):
    """zipnn 0.5.4 from a bytearray to bytes and back, no file (what zipnn's own numbers measure)."""
    import zipnn

    z = zipnn.ZipNN(bytearray_dtype=ZIPNN_NAMES[dname], threads=threads)
    raw = raw_bytes(sd)
    holder = {}

    def comp():
        holder["out"] = z.compress(holder.pop("buf"))

    def prepare():
        holder["buf"] = bytearray(raw)

    def dec():
        return z.decompress(holder["out"])

    def size():
        return len(holder["out"])
    comp.prepare = prepare
    comp.size = size
    return comp, dec


def method_torch_save(sd, dname, path, threads):
    def comp():
        torch.save(sd, path)
        fsync_path(path)

    def dec():
        return torch.load(path, weights_only=True)
    return comp, dec


def method_safetensors(sd, dname, path, threads):
    from safetensors.torch import load_file, save_file

    def comp():
        save_file(sd, path)
        fsync_path(path)

    def dec():
        return load_file(path)
    return comp, dec


def method_dcp_zstd(sd, dname, path, threads):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ExtensionRegistry, ZStandard

    warnings.filterwarnings("ignore")
    template = {k: torch.empty_like(v) for k, v in sd.items()}

    def comp():
        shutil.rmtree(path, ignore_errors=True)
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path, thread_count=threads, _extensions=[ZStandard()]))

    def dec():
        dcp.load(template, storage_reader=dcp.FileSystemReader(path, _extension_registry=ExtensionRegistry()))
        return template
    return comp, dec


METHODS = {
    "mithril": method_mithril,
    "mithril per-row": method_mithril_per_row,
    "zstd-1 raw": method_zstd1,
    "zipnn 0.5.4": method_zipnn,
    "zipnn in-memory": method_zipnn_memory,
    "torch.save": method_torch_save,
    "safetensors": method_safetensors,
    "DCP+zstd": method_dcp_zstd,
}


def timed(fn, runs):
    prep = getattr(fn, "prepare", None)
    if prep is None:
        return time_runs(fn, runs)[0]
    import statistics
    import time

    times = []
    for _ in range(runs + 1):
        prep()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


# ------------------------------------------------------------------ peak memory (in a child process)

def peak_child(method: str, src: str, dst: str, dname: str, threads: int) -> None:
    import gc

    from safetensors.torch import load_file
    import zipnn  # (imported before the baseline is taken)
    import zstandard
    from mithril_gpu import cli

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = _status_kb("VmRSS")
    if method in ("mithril", "mithril per-row"):        # both from the file, as the CLI does
        from mithril_gpu import cpu

        cpu.FUSED = cpu.FUSED and method == "mithril"
        cli.main(["compress", src, dst, "-q", "-f", "--threads", str(threads)])
    elif method == "zipnn 0.5.4":
        data = bytearray(open(src, "rb").read())
        open(dst, "wb").write(zipnn.ZipNN(bytearray_dtype=ZIPNN_NAMES[dname], threads=threads).compress(data))
    elif method == "zstd-1 raw":
        open(dst, "wb").write(zstandard.ZstdCompressor(level=1, threads=threads).compress(open(src, "rb").read()))
    else:
        sd = load_file(src)
        comp, _ = METHODS[method](sd, dname, dst, threads)
        if hasattr(comp, "prepare"):
            comp.prepare()
        comp()
    print(json.dumps({"peak_kb": _status_kb("VmHWM") - base}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_ratio(method, src, dst, dname, threads) -> str:
    p = subprocess.run([sys.executable, __file__, "--peak-child", method, src, dst, dname, str(threads)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return "error"
    kb = json.loads(p.stdout.strip().splitlines()[-1])["peak_kb"]
    return f"{kb * 1024 / os.path.getsize(src):.2f}x"


# ------------------------------------------------------------------ main

def paired(sd, dname, names, tmp, threads, runs):
    """Every method's save, then every method's load, round-robin, ``runs`` times (after a warm-up):
    per method the median time, and per pair the median and best of the per-round ratios, which
    cancel the machine's drift."""
    import statistics
    import time

    fns = {}
    for name in names:
        fns[name] = METHODS[name](sd, dname, os.path.join(tmp, f"p-{dname}-{name.replace(' ', '_')}"), threads)
    times = {(n, w): [] for n in names for w in ("save", "load")}
    for r in range(runs + 1):
        for w, k in (("save", 0), ("load", 1)):
            for n in names:
                fn = fns[n][k]
                if k == 0 and hasattr(fn, "prepare"):
                    fn.prepare()
                t = time.perf_counter()
                fn()
                if r:
                    times[(n, w)].append(time.perf_counter() - t)
    raw = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"\n{dname}, {threads} threads, {runs} rounds: median MB/s")
    for n in names:
        print(f"  {n:18s} save {raw / statistics.median(times[(n, 'save')]) / 1e6:7.0f}"
              f"   load {raw / statistics.median(times[(n, 'load')]) / 1e6:7.0f}")
    print("  paired speed ratios (A faster than B by): median, best")
    for i, a_ in enumerate(names):
        for b_ in names[i + 1:]:
            for w in ("save", "load"):
                q = [tb / ta for ta, tb in zip(times[(a_, w)], times[(b_, w)])]
                print(f"    {w} {a_} / {b_}: x{statistics.median(q):.2f}, x{max(q):.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median); default 5")
    ap.add_argument("--threads", type=int, default=2, help="threads for every method that takes them")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="where the table (.md/.json) and plot go")
    ap.add_argument("--paired", action="store_true",
                    help="instead of the table: all methods round-robin in each run, with paired ratios")
    ap.add_argument("--peak-child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peak_child:
        m, src, dst, dname, th = a.peak_child
        return peak_child(m, src, dst, dname, int(th))

    from safetensors.torch import load_file, save_file

    src = load_file(minilm_path())
    rows = []
    dnames, names = a.dtypes.split(","), a.methods.split(",")
    total, step = len(dnames) * len(names), 0
    print(f"measuring {len(names)} methods x {len(dnames)} dtypes, {a.runs} runs each"
          f"{'' if a.no_peak else ' and peak memory'}; the table follows", flush=True)
    tmp = tempfile.mkdtemp(prefix="mithril-bench-")
    if a.paired:
        try:
            for dname in dnames:
                sd = {k: v.to(DTYPES[dname]).contiguous() for k, v in src.items()}
                paired(sd, dname, names, tmp, a.threads, a.runs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        for dname in dnames:
            sd = {k: v.to(DTYPES[dname]).contiguous() for k, v in src.items()}
            raw = sum(v.numel() * v.element_size() for v in sd.values())
            st_path = os.path.join(tmp, f"in-{dname}.safetensors")
            save_file(sd, st_path)
            bound = order0_bound({k: v.view(torch.uint8).numpy().reshape(-1) for k, v in sd.items()},
                                 {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[dname])
            for name in names:
                path = os.path.join(tmp, f"out-{dname}-{name.replace(' ', '_')}")
                comp, dec = METHODS[name](sd, dname, path, a.threads)
                tc = timed(comp, a.runs)
                size = comp.size() if hasattr(comp, "size") else size_of(path)
                td = timed(dec, a.runs)
                row = {"dtype": dname, "method": name, "ratio": round(raw / size, 4),
                       "comp_mbs": round(raw / tc / 1e6), "dec_mbs": round(raw / td / 1e6),
                       "bound": round(bound, 3)}
                if not a.no_peak:
                    row["peak"] = peak_ratio(name, st_path, path + ".peak", dname, a.threads)
                rows.append(row)
                step += 1
                print(f"  [{step}/{total}] {dname} {name}: done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = [("dtype", "dtype"), ("method", "method"), ("ratio", "ratio"), ("comp_mbs", "compress MB/s"),
            ("dec_mbs", "decompress MB/s"), ("peak", "peak memory / checkpoint"), ("bound", "order-0 bound of our planes")]
    title = (f"all-MiniLM-L6-v2 (real weights), {a.threads} threads, median of {a.runs} runs, "
             f"{os.cpu_count()} cores")
    text = print_table(rows, cols, title)      # the one place the table is printed
    os.makedirs(a.out, exist_ok=True)
    paths = {what: os.path.join(a.out, "minilm." + ext) for what, ext in
             (("table", "md"), ("JSON", "json"), ("plot", "png"))}
    with open(paths["table"], "w") as f:
        f.write(text + "\n")
    with open(paths["JSON"], "w") as f:
        json.dump(rows, f, indent=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):     # (plot() names its file; all three are named below)
            plot(rows, paths["plot"], "all-MiniLM-L6-v2: ratio vs throughput (file to file, fsynced)")
    except ImportError:                                     # matplotlib is optional
        del paths["plot"]
    print()
    for what, path in paths.items():
        rel = os.path.relpath(path)
        print(f"{what + ':':7s}{os.path.abspath(path) if rel.startswith('..') else rel}")


if __name__ == "__main__":
    main()
