"""Delta checkpoints on a real training run, made here on the CPU.

    python benchmarks/bench_deltas.py [--steps 300] [--retrain]

A byte-level transformer LM (about 3.3 M parameters, fixed seed) is trained with AdamW on real
text: the Python standard library's own sources on this machine. Checkpoints (bf16 copies of the
fp32 master weights, and full fp32 weights + Adam moments) are kept at chosen steps; then the
embedding and the first layers are frozen and the rest fine-tuned on other text. The run is
cached in benchmarks/out/run/ (--retrain to redo it).

For each pair (base, next) it prints: the fraction of identical elements; mithril's ratio
storing `next` against `base` (raw bytes of next / delta file size), and the same without
context-sorted deltas (feature "ctxdelta": what the previous release wrote); plain zstd-3 and
zipnn (if installed) on `next` alone (no delta: what a user gets without one); the order-0 bound
of zigzag-delta byte planes (raw / sum of per-tensor, per-plane order-0 entropy; identical
tensors count 0); the base-conditioned bound (the same with one histogram per context, the
context being the base element's exponent field, for a nonzero bitmap and the byte planes of the
nonzero deltas or for plain byte planes, whichever is smaller per tensor; table costs ignored);
and mithril's delta save and load MB/s (saves and loads with and without ctxdelta alternate;
medians of --runs) and, as medians of paired ratios, their speed relative to those without it.

The run also keeps three checkpoints in a row (1-3, 50-52, 298-300, 280-290-300, 100-200-300) for the second-base
estimate (`--second-base`): per-context entropy with the previous change's sign or magnitude as
extra context, and of the residual after predicting the change by the previous one (momentum).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from common import HERE, entropy_bits, print_table

import mithril_gpu  # noqa: E402
from mithril_gpu import delta as mdelta, dtypes as mdtypes  # noqa: E402

RUN = os.path.join(HERE, "out", "run")
CTX, D, LAYERS, HEADS = 128, 256, 4, 4


class LM(torch.nn.Module):
    """A byte-level causal transformer LM (also used, scaled up, by bench_gpu.py)."""

    def __init__(self, d: int = D, layers: int = LAYERS, heads: int = HEADS):
        super().__init__()
        self.emb = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Embedding(CTX, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 256, bias=False)

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def corpus(kind: str) -> np.ndarray:
    """Real text: the standard library's Python sources (train) or its C headers / docs (fine-tune)."""
    root = os.path.dirname(os.__file__)
    pats = ["*.py", "*/*.py"] if kind == "train" else ["*/*.txt", "*/*.rst", "*/*.html", "*/*.cfg", "*/*.h"]
    files = sorted(f for p in pats for f in glob.glob(os.path.join(root, p)))
    if kind != "train" and not files:
        files = sorted(glob.glob(os.path.join(root, "*/*/*.py")))
    data = b"".join(open(f, "rb").read() for f in files)[: 8 << 20]
    return np.frombuffer(data, np.uint8)


def batches(data: np.ndarray, seed: int, bs: int = 16):
    g = np.random.default_rng(seed)
    while True:
        idx = g.integers(0, data.size - CTX - 1, bs)
        x = np.stack([data[i:i + CTX + 1] for i in idx]).astype(np.int64)
        yield torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


def snapshot(model, opt=None):
    sd = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    full = None
    if opt is not None:
        import copy

        full = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
    return sd, full


def train(steps: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    os.makedirs(RUN, exist_ok=True)
    model = LM()
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) + 0.05)
    keep_bf16 = set(kept_steps(steps))
    keep_full = {steps - 2, steps - 1, steps}   # three in a row: the second-base (momentum) estimate
    data = batches(corpus("train"), 0)
    t0 = time.time()
    log = []
    for step in range(1, steps + 1):
        x, y = next(data)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            log.append((step, round(loss.item(), 4)))
            print(f"  step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)", flush=True)
        if step in keep_bf16 or step in keep_full:
            sd, full = snapshot(model, opt if step in keep_full else None)
            if step in keep_bf16:
                mithril_gpu.save(sd, os.path.join(RUN, f"bf16-{step}.mth"))
            if full is not None:
                mithril_gpu.save(full, os.path.join(RUN, f"full-{step}.mth"))
    # fine-tune: freeze the embeddings and the first 3 of 4 blocks, train the rest on other text
    for name, p in model.named_parameters():
        p.requires_grad = not (name.startswith(("emb.", "pos.")) or any(f"layers.{i}." in name for i in range(3)))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    ft = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    ft_data = batches(corpus("finetune"), 1)
    for _ in range(20):
        x, y = next(ft_data)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        ft.zero_grad()
        loss.backward()
        ft.step()
    mithril_gpu.save(snapshot(model)[0], os.path.join(RUN, "bf16-finetuned.mth"))
    with open(os.path.join(RUN, "run.json"), "w") as f:
        json.dump({"steps": steps, "params": nparams, "frozen_fraction": frozen / nparams, "loss_log": log,
                   "final_loss": log[-1][1], "train_seconds": round(time.time() - t0)}, f, indent=1)


def kept_steps(steps: int) -> list[int]:
    """The bf16 checkpoints the run keeps: pairs 1, 10 and 100 steps apart, and triples (three in
    a row at the same spacing) for the second-base estimate."""
    return sorted({1, 2, 3, 50, 51, 52, steps - 200, steps - 100, steps - 20, steps - 10, steps - 2, steps - 1, steps})


def leaves(obj):
    _, lv = mithril_gpu.tree.encode(obj, lambda t: isinstance(t, torch.Tensor))
    return dict(lv)


def raw_bytes(t) -> np.ndarray:
    return mithril_gpu.api.tensor_bytes(t)


def zigzag_bound(new: dict, old: dict) -> float:
    raw = bits = 0.0
    for k, t in new.items():
        a = raw_bytes(t)
        raw += a.size
        b = old.get(k)
        if b is None or b.dtype != t.dtype or b.shape != t.shape:
            d = a
        else:
            bb = raw_bytes(b)
            if np.array_equal(a, bb):
                continue
            d = np.empty_like(a)
            mdelta.encode("zigzag", mdtypes.from_torch(t.dtype), a, bb, d)
        isz = t.element_size()
        bits += sum(entropy_bits(np.ascontiguousarray(d.reshape(-1, isz)[:, k])) for k in range(isz)) if d.size else 0
    return raw / (bits / 8) if bits else float("inf")


def _h(counts) -> float:
    c = counts[counts > 0]
    return float(-(c * np.log2(c / c.sum())).sum()) if c.size else 0.0


def _cond_bits(d: np.ndarray, ctx: np.ndarray, isz: int, k: int) -> float:
    """Bits of deltas ``d`` (unsigned ints) with one histogram per context value (0 .. k-1):
    the smaller of plain byte planes and (nonzero bitmap + byte planes of the nonzeros)."""
    n = d.size
    b = d.view(np.uint8).reshape(n, isz)
    plain = sum(_h(r) for j in range(isz) for r in np.bincount(ctx * 256 + b[:, j], minlength=k * 256).reshape(k, 256))
    nz = d != 0
    nc, nzc = np.bincount(ctx, minlength=k), np.bincount(ctx[nz], minlength=k)
    masked = sum(_h(np.array([z, c - z], float)) for c, z in zip(nc, nzc) if c)
    cz, bz = ctx[nz], b[nz]
    masked += sum(_h(r) for j in range(isz) for r in np.bincount(cz * 256 + bz[:, j], minlength=k * 256).reshape(k, 256))
    return min(plain, masked)


def conditioned_bound(new: dict, old: dict, older: dict | None = None, extra: str = "") -> float:
    """raw / bits with per-context histograms, context = the base element's exponent field (for
    float tensors; others count at their order-0 bits). ``extra`` (with ``older``, the base's own
    base): "prevsign" / "prevmag" add the previous change's sign / log2 magnitude to the context;
    "momentum" codes the residual of predicting the change by the previous one."""
    raw = bits = 0.0
    for name, t in new.items():
        a = raw_bytes(t)
        raw += a.size
        b = old.get(name)
        dt = mdtypes.from_torch(t.dtype)
        isz = t.element_size()
        if b is None or b.dtype != t.dtype or b.shape != t.shape or not t.numel():
            bits += sum(entropy_bits(np.ascontiguousarray(a.reshape(-1, isz)[:, j])) for j in range(isz)) if a.size else 0
            continue
        bb = raw_bytes(b)
        if np.array_equal(a, bb):
            continue
        ut = mdelta._UINT[isz]
        d = np.empty_like(a)
        mdelta.encode("zigzag", dt, a, bb, d)
        d = d.view(ut)
        if not mdelta.is_float(dt):
            bits += _cond_bits(d, np.zeros(d.size, np.int64), isz, 1)
            continue
        y = bb.view(ut).astype(np.int64)
        ctx, k = (y >> dt.man_bits) & ((1 << dt.exp_bits) - 1), 1 << dt.exp_bits
        z = older.get(name) if older is not None else None
        if extra and z is not None:
            zb = raw_bytes(z)
            pd = np.empty_like(a)
            mdelta.encode("zigzag", dt, bb, zb, pd)
            pd = pd.view(ut).astype(np.int64)
            if extra == "prevsign":
                ctx, k = ctx * 3 + np.where(pd == 0, 0, np.where(pd & 1, 2, 1)), k * 3
            elif extra == "prevmag":
                ctx, k = ctx * 8 + np.minimum(np.floor(np.log2(pd + 1)).astype(np.int64), 7), k * 8
            elif extra == "momentum" and isz <= 4:
                kx, ky, kz = (mdelta._key(v.view(ut), dt).astype(np.int64) for v in (a, bb, zb))
                r = (kx - ky) - (ky - kz)
                d = ((r << 1) ^ (r >> 63)).astype(ut)
        bits += _cond_bits(d, ctx.astype(np.int64), isz, k)
    return raw / (bits / 8) if bits else float("inf")


def identical_fraction(new: dict, old: dict) -> float:
    same = total = 0
    for k, t in new.items():
        total += t.numel()
        b = old.get(k)
        if b is not None and b.shape == t.shape and b.dtype == t.dtype:
            same += int((raw_bytes(t).reshape(t.numel(), -1) == raw_bytes(b).reshape(t.numel(), -1)).all(1).sum()) \
                if t.numel() else 0
    return same / total


def plain_ratios(new: dict, dname: str) -> tuple[float, float | None]:
    import zstandard

    raw = b"".join(raw_bytes(t).tobytes() for t in new.values())
    z = len(zstandard.ZstdCompressor(level=3).compress(raw))
    try:
        import zipnn
    except ImportError:
        return len(raw) / z, None
    zn = len(zipnn.ZipNN(bytearray_dtype=dname, threads=2).compress(bytearray(raw)))
    return len(raw) / z, len(raw) / zn


def _without_ctx(ctx: bool = False):
    """A context manager: deltas written without the ans codec, and (unless ``ctx``) as before
    context-sorted deltas existed."""
    import contextlib

    from mithril_gpu import codecs, deltaplan

    @contextlib.contextmanager
    def cm():
        saved, saved_ans = deltaplan.choose_ctx, codecs.ANS_ENABLED
        if not ctx:
            deltaplan.choose_ctx = lambda item, x, b, *pre: (*(pre[0] if pre else deltaplan.choose(item, x, b)), None)
        codecs.ANS_ENABLED = False
        try:
            yield
        finally:
            deltaplan.choose_ctx, codecs.ANS_ENABLED = saved, saved_ans
    return cm()


def measure(kind: str, base_file: str, next_file: str, runs: int) -> dict:
    old, new = mithril_gpu.load(base_file), mithril_gpu.load(next_file)
    lo, ln = leaves(old), leaves(new)
    raw = sum(t.numel() * t.element_size() for t in ln.values())
    tmp = tempfile.mkdtemp()
    out, out_na, out_old = (os.path.join(tmp, n) for n in ("delta.mth", "delta_noans.mth", "delta_old.mth"))
    import contextlib
    layouts = [(out, contextlib.nullcontext), (out_na, lambda: _without_ctx(ctx=True)), (out_old, _without_ctx)]
    times = {path: ([], []) for path, _ in layouts}          # per layout: save times, load times
    for _ in range(runs):      # saves and loads of the three layouts alternate: all see the same machine load
        for path, mode in layouts:
            with mode():
                t = time.perf_counter()
                mithril_gpu.save(new, path, base=base_file)
                times[path][0].append(time.perf_counter() - t)
            t = time.perf_counter()
            got = mithril_gpu.load(path, base=base_file)
            times[path][1].append(time.perf_counter() - t)
            if path == out:
                back = got
    (tc, td), (tcn, tdn), (tco, tdo) = times[out], times[out_na], times[out_old]
    assert all(np.array_equal(raw_bytes(a), raw_bytes(b)) for a, b in zip(leaves(back).values(), ln.values()))
    with mithril_gpu.open(out, base=base_file) as f:
        sorted_share = sum(e.nbytes for e in f.index.tensors if e.ctx is not None) / raw
    ours = raw / os.path.getsize(out)
    zstd3, zipnn_r = plain_ratios(ln, "bfloat16" if "bf16" in kind else "float32")
    bound = zigzag_bound(ln, lo)
    cond = conditioned_bound(ln, lo)
    return {"pair": kind, "identical": f"{100 * identical_fraction(ln, lo):.0f}%", "ours": round(ours, 2),
            "no_ans": round(raw / os.path.getsize(out_na), 2),
            "before": round(raw / os.path.getsize(out_old), 2), "sorted": f"{100 * sorted_share:.0f}%",
            "zstd3": round(zstd3, 2), "zipnn": "-" if zipnn_r is None else round(zipnn_r, 2),
            "bound": round(bound, 2), "cond": round(cond, 2),
            "of_bound": f"{100 * ours / bound:.0f}%", "of_cond": f"{100 * ours / cond:.0f}%",
            "comp_mbs": round(raw / statistics.median(tc) / 1e6), "dec_mbs": round(raw / statistics.median(td) / 1e6),
            "comp_vs": f"{statistics.median([a / b for a, b in zip(tco, tc)]):.2f}",
            "dec_vs": f"{statistics.median([a / b for a, b in zip(tdo, td)]):.2f}",
            "comp_vs_ans": f"{statistics.median([a / b for a, b in zip(tcn, tc)]):.2f}",
            "dec_vs_ans": f"{statistics.median([a / b for a, b in zip(tdn, td)]):.2f}"}


def second_base(kind: str, files: list[str]) -> dict:
    """Conditioned bounds of the newest of three consecutive checkpoints, with what the change
    before it adds as context or prediction."""
    z, o, n = (leaves(mithril_gpu.load(f)) for f in files)
    row = {"pair": kind, "bound": round(zigzag_bound(n, o), 2), "cond": round(conditioned_bound(n, o), 2)}
    for extra in ("prevsign", "prevmag", "momentum"):
        row[extra] = round(conditioned_bound(n, o, z, extra), 2)
    row.update(coded_with_prevsign(n, o, z))
    return row


def coded_with_prevsign(new: dict, old: dict, older: dict) -> dict:
    """What the previous change's sign gains once coded (not a bound): the changed float tensors
    of ``new`` coded by mithril's own coder as zigzag deltas, each tensor the best of plain rows,
    sorted by the base exponent (ctxdelta today) and sorted by (base exponent, sign class of the
    change base - older: none, down, up), with the writer's segment cuts; ratios of those tensors'
    raw bytes to their coded bytes."""
    from mithril_gpu import ctxdelta, deltaplan

    raw = today = with_sign = 0
    for name, t in new.items():
        b, z = old.get(name), older.get(name)
        dt = mdtypes.from_torch(t.dtype)
        if b is None or z is None or not mdelta.is_float(dt) or t.numel() < 1024 \
                or any(v.dtype != t.dtype or v.shape != t.shape for v in (b, z)):
            continue
        x, y, y2 = raw_bytes(t), raw_bytes(b), raw_bytes(z)
        if np.array_equal(x, y):
            continue
        ut, ce, n = np.dtype(mdelta._UINT[t.element_size()]).type, 1 << 17, t.numel()
        d, p = np.empty_like(x), np.empty_like(x)
        mdelta.encode("zigzag", dt, x, y, d)
        mdelta.encode("zigzag", dt, y, y2, p)
        pv = p.view(ut)
        e = ((y.view(ut) >> ut(dt.man_bits)) & ut((1 << dt.exp_bits) - 1)).astype(np.int64)
        sizes = [min(deltaplan._coded_size(dt, tr, d, [min(ce, n - r) for r in range(0, n, ce)])
                     for tr in ("masked", "bytegroup"))]
        for c in (e, e * 3 + np.where(pv == 0, 0, np.where(pv & ut(1), 1, 2))):
            srt = d.view(ut)[np.argsort(c, kind="stable")].view(np.uint8)
            segs = [m for row in ctxdelta.segments(np.bincount(c), ce) for m in row]
            sizes.append(min(deltaplan._coded_size(dt, tr, srt, segs) for tr in ("masked", "bytegroup")))
        raw += x.size
        today += min(sizes[:2])
        with_sign += min(sizes)
    if not raw:
        return {"coded": "-", "coded_sign": "-", "coded_gain": "-"}
    return {"coded": round(raw / today, 2), "coded_sign": round(raw / with_sign, 2),
            "coded_gain": f"{today / with_sign - 1:+.1%}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--second-base", action="store_true", help="also estimate what a second base would add")
    ap.add_argument("--pairs", default="", help="comma-separated pair numbers to run (default: all)")
    a = ap.parse_args()
    meta = os.path.join(RUN, "run.json")
    if a.retrain or not os.path.exists(meta) or json.load(open(meta))["steps"] != a.steps \
            or not all(os.path.exists(os.path.join(RUN, f"bf16-{k}.mth")) for k in kept_steps(a.steps)):
        print(f"training the LM for {a.steps} steps on the CPU (cached in {RUN})", flush=True)
        train(a.steps)
    info = json.load(open(meta))
    s = info["steps"]
    f = lambda name: os.path.join(RUN, name)  # noqa: E731
    pairs = [("bf16, 1 step, early (1->2)", "bf16-1.mth", "bf16-2.mth"),
             ("bf16, 1 step (50->51)", "bf16-50.mth", "bf16-51.mth"),
             (f"bf16, 1 step, late ({s - 1}->{s})", f"bf16-{s - 1}.mth", f"bf16-{s}.mth"),
             (f"bf16, 10 steps ({s - 10}->{s})", f"bf16-{s - 10}.mth", f"bf16-{s}.mth"),
             (f"bf16, 100 steps ({s - 100}->{s})", f"bf16-{s - 100}.mth", f"bf16-{s}.mth"),
             (f"fp32 weights + Adam, 1 step ({s - 1}->{s})", f"full-{s - 1}.mth", f"full-{s}.mth"),
             (f"bf16 fine-tune, {100 * info['frozen_fraction']:.0f}% frozen", f"bf16-{s}.mth", "bf16-finetuned.mth")]
    if a.pairs:
        pairs = [pairs[int(i)] for i in a.pairs.split(",")]
    rows = []
    for kind, b, n in pairs:
        rows.append(measure(kind, f(b), f(n), a.runs))
        print("  ", rows[-1], flush=True)
    cols = [("pair", "pair"), ("identical", "identical elements"), ("ours", "mithril delta"),
            ("no_ans", "without ans"), ("before", "without ctxdelta and ans"), ("sorted", "bytes context-sorted"),
            ("zstd3", "zstd-3, no delta"), ("zipnn", "zipnn, no delta"), ("bound", "order-0 bound (zigzag planes)"),
            ("cond", "base-conditioned bound"), ("of_bound", "mithril / order-0"), ("of_cond", "mithril / conditioned"),
            ("comp_mbs", "delta save MB/s"), ("dec_mbs", "delta load MB/s"),
            ("comp_vs_ans", "save speed vs without ans"), ("dec_vs_ans", "load speed vs without ans"),
            ("comp_vs", "save speed vs without ctxdelta and ans"), ("dec_vs", "load speed vs without ctxdelta and ans")]
    title = (f"Real training run: {info['params'] / 1e6:.1f} M-parameter byte-level LM, {s} AdamW steps on the "
             f"standard library's sources (final loss {info['final_loss']}, {info['train_seconds']} s to train)")
    text = print_table(rows, cols, title)
    with open(os.path.join(HERE, "out", "deltas.md"), "w") as fh:
        fh.write(text + "\n")
    second = []
    if a.second_base:
        triples = [("bf16, 1 step, early (2->3, previous 1->2)", ["bf16-1.mth", "bf16-2.mth", "bf16-3.mth"]),
                   ("bf16, 1 step (51->52, previous 50->51)", ["bf16-50.mth", "bf16-51.mth", "bf16-52.mth"]),
                   (f"bf16, 1 step, late ({s - 1}->{s}, previous {s - 2}->{s - 1})",
                    [f"bf16-{s - 2}.mth", f"bf16-{s - 1}.mth", f"bf16-{s}.mth"]),
                   (f"bf16, 10 steps ({s - 10}->{s}, previous {s - 20}->{s - 10})",
                    [f"bf16-{s - 20}.mth", f"bf16-{s - 10}.mth", f"bf16-{s}.mth"]),
                   (f"bf16, 100 steps ({s - 100}->{s}, previous {s - 200}->{s - 100})",
                    [f"bf16-{s - 200}.mth", f"bf16-{s - 100}.mth", f"bf16-{s}.mth"]),
                   (f"fp32 weights + Adam, 1 step ({s - 1}->{s})", [f"full-{s - 2}.mth", f"full-{s - 1}.mth", f"full-{s}.mth"])]
        for kind, files in triples:
            second.append(second_base(kind, [f(x) for x in files]))
            print("  ", second[-1], flush=True)
        text += "\n\n" + print_table(second, [
            ("pair", "pair"), ("bound", "order-0 bound"), ("cond", "conditioned on base exponent"),
            ("prevsign", "+ sign of the previous change"), ("prevmag", "+ log2 size of the previous change"),
            ("momentum", "residual of predicting the previous change"),
            ("coded", "coded today (changed float tensors)"), ("coded_sign", "coded, + sign of the previous change"),
            ("coded_gain", "coded gain")],
            "What a second base would add (per-context entropy bounds, table costs ignored; then coded sizes)")
        with open(os.path.join(HERE, "out", "deltas.md"), "w") as fh:
            fh.write(text + "\n")
    with open(os.path.join(HERE, "out", "deltas.json"), "w") as fh:
        json.dump({"run": info, "rows": rows, "second_base": second}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
