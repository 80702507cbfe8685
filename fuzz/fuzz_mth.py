#!/usr/bin/env python
"""Fuzzer for the .mth reader: hostile and damaged files must give a typed, one-line error or
decode to exactly the right tensors. Never a crash, a hang, an out-of-memory, an untyped error
or silently wrong data.

    python fuzz/fuzz_mth.py --seconds 60          # or --inputs 100000; --workers N; --seed S
    python fuzz/fuzz_mth.py --replay fuzz-failures/<one>   # run one saved failure again, in-process

Seeds are real files, written at start into a temp dir: every dtype, a nested training state, a
delta chain (xor/zigzag, masked, "same" entries), numpy arrays in the tree, the MiniLM fixture
compressed and the golden files. Each input is one seed mutated:

* raw: bit flips, byte sets, flips inside a chunk's payload or in the preamble/trailer,
  truncations, extensions, splices from the same or another seed, insertions, deletions;
* structure-aware: the index is decoded and a field changed (sizes, offsets, counts, chunk
  tables, shapes, dtypes, transforms, tree refs, the base record...), then re-signed, so that
  only validation can catch the lie; also the index's compressed bytes or JSON text damaged and
  re-signed;
* base: a delta loaded against a damaged copy of its base.

Inputs run in child processes (``--workers``) under a memory limit (RLIMIT_AS, ``--mem-mb``)
and a time limit per input (``--timeout``). A child runs many inputs in a loop and reports each
outcome; the parent restarts a child that dies and classifies the input it was running. Each
input is opened, then info() of every tensor, get_tensor() of two, load() and check().
Outcomes:

    decoded       every step succeeded, and the tensors are right (below)
    typed         a MithrilError with a one-line message
    untyped       any other exception                                   (failure)
    bad_message   a MithrilError whose message is not one line (of at most 2000 characters) (failure)
    inconsistent  load() or get_tensor() fails where check() passes     (failure)
    silent        decoded, with verification on, to wrong bytes         (failure)
    over_budget   decoded more tensor bytes than FORMAT.md's bound for the file's size (failure)
    crash         the child died (a signal, or an exit)                 (failure)
    hang          an input ran past --timeout                           (failure)
    oom           MemoryError, or the child died of the memory limit    (failure)
    harness       the fuzzer itself failed on an input                  (failure)

"Right" tensors. Raw mutations cannot change the index without breaking its checksum, so a file
that decodes must decode to its seed's exact tensors and tree (or to another seed's: a splice
may rebuild a whole valid file). A re-signed index may lie about anything, and checksums catch
accidents, not attackers (SECURITY.md); so for those, every decoded tensor must match the checksum
its entry records (checked again here, independently), and an entry whose name, dtype, shape,
chunk size and checksum are the seed's must have the seed's bytes. For every decoded input,
load()'s tensors must be the bytes that get_bytes() gives. A mutation of unused bits (a zstd
header's reserved bit, an unused tail of a chunk) may decode exactly: that is "decoded".

Every failing input is saved under ``--out`` (default ``fuzz-failures/``) with the seed files it
needs and an ``info.json``, and the run exits with status 1.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OUTCOMES = ("decoded", "typed", "untyped", "bad_message", "inconsistent", "silent", "over_budget", "crash",
            "hang", "oom", "harness")
FAILURES = frozenset(OUTCOMES[2:])
KINDS = ("raw", "struct", "index", "base")

IN_NAME = "_in.mth"          # where a child writes the input (next to the seeds: base paths resolve)
BASE_NAME = "_base.mth"      # a damaged base, for "base" inputs
FIFO_NAME = "fifo"           # a FIFO among the seeds: a base record may point at it

MINILM = os.path.join(ROOT, "fixtures", "minilm_l0_bf16.safetensors")
GOLDEN = [os.path.join(ROOT, "fixtures", n) for n in ("golden_v1.mth", "golden_v1_delta.mth", "golden_v1_ctx.mth",
                                                    "golden_ans_base.mth", "golden_v1_ans.mth")]

# ---------------------------------------------------------------------------------------- seeds

DTYPES = ("bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
          "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")


def _random_tensor(torch, dtype, shape, g):
    """Random bit patterns (NaNs, infinities, -0.0 and subnormals included) of any dtype."""
    n = 1
    for s in shape:
        n *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def _same(torch, a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            _tensor_digest(a) == _tensor_digest(b)
    if type(a).__module__ == "numpy" and hasattr(a, "dtype"):
        return type(b) is type(a) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(torch, a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(torch, x, y) for x, y in zip(a, b))
    return type(a) is type(b) and repr(a) == repr(b)


def make_seeds(d: str) -> list[str]:
    """Write the seed files into ``d``; return their names. Each is checked to round trip."""
    import torch

    import mithril_gpu

    g = torch.Generator().manual_seed(20261123)
    names, states = [], {}

    def save(name, state, **kw):
        mithril_gpu.save(state, os.path.join(d, name), threads=1, **kw)
        names.append(name)
        states[name] = state

    # every dtype, several rows each (odd sizes), a 0-dim and an empty tensor
    every = {dt: _random_tensor(torch, getattr(torch, dt), (37, 5), g) for dt in DTYPES}
    every["scalar"] = torch.tensor(2.5)
    every["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    save("dtypes.mth", every, chunk_elems=64)

    # a nested training state, and a delta chain against it
    w = torch.randn(48, 40, generator=g) * 0.02
    model = {"fc.weight": w.to(torch.bfloat16), "fc.bias": torch.randn(48, generator=g).to(torch.bfloat16),
             "head.weight": w.t().contiguous(), "ids": torch.arange(-300, 700, dtype=torch.int64),
             "mask": torch.rand(100, generator=g) > 0.5, "frozen": torch.randn(700, generator=g).half()}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(48, 40, generator=g) * 1e-3,
                         "exp_avg_sq": torch.rand(48, 40, generator=g) * 1e-6}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}]}
    full = {"model": model, "optimizer": opt, "step": 3, "name": "run", "blob": b"\x00\x01mth",
            "flags": [True, None, 2.5, float("nan"), -0.0, 2 ** 70]}
    save("full.mth", full, chunk_elems=256)

    def step(state, k):
        new = copy.deepcopy(state)
        m = new["model"]
        m["fc.weight"] = (m["fc.weight"].float() * (1 + 1e-2 * k)).to(torch.bfloat16)   # zigzag/xor
        m["head.weight"] = m["head.weight"] + 1e-4 * k
        m["ids"] = m["ids"].clone()
        m["ids"][::97] += k                                                              # masked
        new["optimizer"]["state"][0]["exp_avg"] = new["optimizer"]["state"][0]["exp_avg"] * 0.9
        new["step"] = state["step"] + 1
        return new

    d1 = step(full, 1)
    save("delta.mth", d1, chunk_elems=256, base=os.path.join(d, "full.mth"))
    save("delta2.mth", step(d1, 2), chunk_elems=256, base=os.path.join(d, "delta.mth"))

    import numpy as np

    from mithril_gpu import tree as tree_mod

    if hasattr(tree_mod, "to_ndarray"):          # numpy arrays in the tree ("ndarray" nodes)
        save("arrays.mth", {"f4": np.arange(300, dtype="<f4"), "u2be": np.arange(50, dtype=">u2"),
                            "b": np.array([True, False, True]), "nested": [np.eye(3), torch.ones(2)]},
             chunk_elems=128)
    save("tiny.mth", {"x": torch.tensor([1, 2, 3], dtype=torch.int16)})
    save("empty.mth", {})

    from safetensors.torch import load_file

    save("minilm.mth", load_file(MINILM))
    for p in GOLDEN:                     # the delta records "golden_v1.mth" next to it
        shutil.copy(p, os.path.join(d, os.path.basename(p)))
        names.append(os.path.basename(p))

    for name, state in states.items():
        back = mithril_gpu.load(os.path.join(d, name), threads=1)
        if not _same(torch, back, state):
            raise RuntimeError(f"seed {name} does not round trip")
    with mithril_gpu.open(os.path.join(d, "delta2.mth")) as f:
        ops = {(e.delta or {}).get("op") for e in f.index.tensors} | {e.transform for e in f.index.tensors}
    if not {"same", "masked"} <= ops or not {"xor", "zigzag"} & ops:
        raise RuntimeError(f"the delta seed lacks a kind of entry: {sorted(map(str, ops))}")
    return names


def prepare_dir(d: str) -> None:
    """A FIFO next to the seeds: a base record may point at it (opening it would block forever)."""
    if hasattr(os, "mkfifo") and not os.path.exists(os.path.join(d, FIFO_NAME)):
        os.mkfifo(os.path.join(d, FIFO_NAME))


class Seed:
    """A seed file's bytes and what mutations need from its index."""

    def __init__(self, d: str, name: str):
        from mithril_gpu import container

        self.name = name
        with open(os.path.join(d, name), "rb") as fh:
            self.data = fh.read()
        off, length, digest, _ = container.TRAILER.unpack(self.data[-32:])
        self.index_off, self.index_len = off, length
        self.identity = f"{digest:016x}"
        self.index = container.decode_index_json(self.data[off:off + length], digest)
        self.text = json.dumps(self.index)
        self.base = None                 # the seed name of its base, filled in by load_seeds
        self.spans = [(t["chunks"][i], t["chunks"][i + 1]) for t in self.index["tensors"]
                      for i in range(0, len(t["chunks"]), 3) if t["chunks"][i + 1] > 0]


def load_seeds(d: str, names: list[str]) -> list[Seed]:
    seeds = [Seed(d, n) for n in names]
    by_identity = {s.identity: s.name for s in seeds}
    for s in seeds:
        if s.index.get("base"):
            s.base = by_identity[s.index["base"]["xxh64"]]
    return seeds


# ------------------------------------------------------------------------------------ mutations

INTERESTING = (0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 48, 63, 64, 127, 128, 255, 256, 4095, 4096, 65535, 65536,
               1 << 20, (1 << 26) - 1, 1 << 26, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40,
               (1 << 50) + 1, (1 << 62) - 1, 1 << 62, (1 << 63) - 1, 1 << 63, 1 << 64, 1 << 70, -1, -16, -(1 << 63))
ODD_VALUES = (None, True, False, "", "0", "x", 1.5, -0.0, 1e308, [], {}, [0], {"a": 1}, "\udcff", "a\nb")
DTYPE_NAMES = ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
               "F8_E4M3", "F8_E5M2", "C64", "bf16", "", None, 4)
TRANSFORM_NAMES = ("raw", "bytegroup", "fieldsplit", "masked", "xor", "RAW", None, 0)
DELTA_OPS = ("xor", "zigzag", "same", "add", None)


def odd(rng: random.Random):
    """One of ODD_VALUES, a fresh copy (mutations edit what they insert: the constants must stay)."""
    return copy.deepcopy(rng.choice(ODD_VALUES))


class Input:
    def __init__(self, seed: Seed, kind: str, data: bytes, desc: str):
        self.seed, self.kind, self.data, self.desc = seed, kind, data, desc

    @property
    def resigned(self) -> bool:
        return self.kind in ("struct", "index")


def _num(v) -> int:
    """``v`` if it is an int (an earlier mutation may have put anything there), else 0."""
    return v if type(v) is int else 0


def _int_near(rng: random.Random, v: int, file_size: int) -> int:
    r = rng.random()
    if r < 0.35:
        return rng.choice(INTERESTING)
    if r < 0.55:
        return rng.choice((file_size, file_size - 1, file_size - 32, file_size - 33, 16, 15))
    if r < 0.85:
        return v + rng.choice((-1, 1, -2, 2, -8, 8, -16, 16, -256, 256))
    return rng.choice((v * 2, v // 2, v * 3 + 1, -v, v ^ (1 << rng.randrange(64))))


def raw_mutation(seed: Seed, seeds: list[Seed], rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(seed.data)
    steps = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        n = len(b)
        op = rng.choice(("flip", "flip", "set", "chunk", "chunk", "chunk", "ends", "truncate", "extend",
                         "splice", "insert", "delete"))
        if n == 0:
            op = "extend"
        if op == "flip":
            k = rng.choice((1, 1, 2, 4, 8))
            for _ in range(k):
                p = rng.randrange(n)
                b[p] ^= 1 << rng.randrange(8)
            steps.append(f"flip {k} bits")
        elif op == "set":
            p = rng.randrange(n)
            b[p] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))
            steps.append(f"set byte {p}")
        elif op == "chunk" and seed.spans:
            off, csize = rng.choice(seed.spans)
            if off + csize <= n:
                p = off + rng.randrange(csize)
                b[p] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
                steps.append(f"chunk byte {p}")
        elif op == "ends":
            p = rng.randrange(16) if rng.random() < 0.5 else n - 1 - rng.randrange(min(32, n))
            if 0 <= p < n:
                b[p] ^= 1 << rng.randrange(8)
            steps.append(f"end byte {p}")
        elif op == "truncate":
            cut = rng.randrange(n) if rng.random() < 0.5 else max(0, n - rng.randrange(1, 200))
            del b[cut:]
            steps.append(f"truncate at {cut}")
        elif op == "extend":
            k = rng.choice((1, 7, 32, 100, 1000))
            b += bytes(k) if rng.random() < 0.5 else rng.randbytes(k)
            steps.append(f"extend by {k}")
        elif op == "splice":
            src = rng.choice(seeds).data if rng.random() < 0.4 else bytes(b)
            k = rng.choice((1, 4, 8, 16, 32, 100, 1000, 10000))
            a = rng.randrange(max(1, len(src) - k))
            p = rng.randrange(n)
            block = src[a:a + k]
            b[p:p + len(block)] = block
            steps.append(f"splice {len(block)} bytes from {a} to {p}")
        elif op == "insert":
            p = rng.randrange(n + 1)
            k = rng.choice((1, 3, 8, 64))
            b[p:p] = rng.randbytes(k)
            steps.append(f"insert {k} at {p}")
        elif op == "delete":
            p = rng.randrange(n)
            k = rng.choice((1, 3, 8, 64, 1000))
            del b[p:p + k]
            steps.append(f"delete {k} at {p}")
    return bytes(b), "; ".join(steps) or "none"


def _nodes(node, out, depth=0):
    """Every (container, key) in a tree where a node sits, for replacing it."""
    if depth > 120 or not isinstance(node, dict):
        return
    for kind, v in node.items():
        if kind == "dict" and isinstance(v, list):
            for pair in v:
                if isinstance(pair, list):
                    for i, x in enumerate(pair):
                        out.append((pair, i))
                        _nodes(x, out, depth + 1)
        elif kind in ("list", "tuple") and isinstance(v, list):
            for i, x in enumerate(v):
                out.append((v, i))
                _nodes(x, out, depth + 1)


def _odd_node(rng: random.Random, ntensors: int):
    return rng.choice((
        lambda: {"tensor": rng.choice(INTERESTING)},
        lambda: {"tensor": rng.randrange(-1, ntensors + 2)},
        lambda: {"tensor": odd(rng)},
        lambda: {"ndarray": [rng.randrange(max(1, ntensors)), rng.choice(("<f4", ">f4", "<u2", "|b1", "<c8", 5))]},
        lambda: {"ndarray": rng.choice(([0], [], "x", [0, "<f4", 1]))},
        lambda: {"list": [{"tensor": i} for i in range(ntensors)]},
        lambda: json.loads('{"list":[' * (d := rng.choice((50, 99, 100, 101, 150))) + "]}" * d),
        lambda: {"dict": [[{"list": []}, {"int": "1"}]]},
        lambda: {"dict": [[{"str": "k"}]]},
        lambda: {"dict": [[{"tensor": 0}, {"none": None}]]},
        lambda: {"int": rng.choice(("9" * 5000, "12", "-0", "0x10", "1e3", 12))},
        lambda: {"float": rng.choice(("nan", "-inf", "x", "1e999", 1.5))},
        lambda: {"bytes": rng.choice(("!!", "AAAA", "A", 5))},
        lambda: {"str": rng.choice((5, None, "s"))},
        lambda: {"bool": rng.choice((1, "true", True))},
        lambda: {"none": 0},
        lambda: {"weird": 1},
        lambda: {"list": [], "tuple": []},
        lambda: odd(rng),
    ))()


def _mutate_tensor(t: dict, d: dict, rng: random.Random, file_size: int) -> str:
    field = rng.choice(("shape", "dtype", "transform", "chunk_elems", "xxh64", "name", "nnz", "delta",
                        "chunks", "chunks", "chunks", "chunks", "drop", "extra"))
    others = [x.get("name") for x in d["tensors"] if isinstance(x, dict)]
    if field == "shape":
        s = t.get("shape")
        s = list(s) if isinstance(s, list) else []
        op = rng.randrange(7)
        if op == 0 and s:
            i = rng.randrange(len(s))
            s[i] = _int_near(rng, s[i] if isinstance(s[i], int) else 0, file_size)
        elif op == 1:
            s.insert(rng.randrange(len(s) + 1), rng.choice((0, 1, 2, 1 << 40)))
        elif op == 2 and s:
            s.pop(rng.randrange(len(s)))
        elif op == 3:
            s.reverse()
        elif op == 4:
            s = [] if rng.random() < 0.5 else [1] * rng.choice((64, 65))
        elif op == 5 and s:
            s[rng.randrange(len(s))] = odd(rng)
        else:
            t["shape"] = odd(rng)
            return "shape odd"
        t["shape"] = s
        return f"shape {str(s)[:60]}"
    if field == "dtype":
        t["dtype"] = rng.choice(DTYPE_NAMES)
        return f"dtype {t['dtype']}"
    if field == "transform":
        t["transform"] = rng.choice(TRANSFORM_NAMES)
        return f"transform {t['transform']}"
    if field == "chunk_elems":
        v = t.get("chunk_elems")
        t["chunk_elems"] = _int_near(rng, v if isinstance(v, int) else 1, file_size) if rng.random() < 0.9 \
            else odd(rng)
        return f"chunk_elems {t['chunk_elems']!r}"
    if field == "xxh64":
        t["xxh64"] = rng.choice((f"{rng.getrandbits(64):016x}", "0" * 16, "F" * 16, "123", 5))
        return "xxh64"
    if field == "name":
        t["name"] = rng.choice(others + ["", "x" * 5000, "a\nb", "\udcff", 5, None])
        return "name"
    if field == "nnz":
        v = t.get("nnz")
        if isinstance(v, list) and v and rng.random() < 0.7:
            i = rng.randrange(len(v))
            op = rng.randrange(4)
            if op == 0:
                v[i] = _int_near(rng, v[i] if isinstance(v[i], int) else 0, file_size)
            elif op == 1:
                v.pop(i)
            elif op == 2:
                v.append(0)
            else:
                v[i] = odd(rng)
        else:
            t["nnz"] = rng.choice(([0], [], None, [1 << 40], "x"))
        return "nnz"
    if field == "delta":
        op = rng.randrange(4)
        if op == 0:
            t.pop("delta", None)
        elif op == 1:
            t["delta"] = {"op": rng.choice(DELTA_OPS), "base": rng.choice(others + ["nope", 5])}
        elif op == 2 and isinstance(t.get("delta"), dict):
            t["delta"]["op"] = rng.choice(DELTA_OPS)
        else:
            t["delta"] = odd(rng)
        return f"delta {str(t.get('delta'))[:60]}"
    if field == "chunks":
        c = t.get("chunks")
        if not isinstance(c, list) or len(c) < 3:
            t["chunks"] = rng.choice(([16, 1, 1], [], [0] * 6, "x"))
            return "chunks replaced"
        n = len(c) // 3
        i, j = rng.randrange(n), rng.randrange(n)
        op = rng.randrange(11)
        if op == 0:
            k = 3 * i + rng.randrange(3)
            c[k] = _int_near(rng, c[k] if isinstance(c[k], int) else 0, file_size)
            return f"chunk field {k} = {c[k]}"
        if op == 1:
            c[3 * i] = _num(c[3 * i]) + rng.choice((-1, 1, -4, 4, -16, 16))
            return f"chunk {i} offset shifted"
        if op == 2:
            c[3 * i + 1] = _num(c[3 * i + 1]) + rng.choice((-1, 1, -4, 4))
            return f"chunk {i} size changed"
        if op == 3:
            c[3 * i + 2] = rng.choice((0, 1, 2, 255, -1))
            return f"chunk {i} codec {c[3 * i + 2]}"
        if op == 4:
            c[3 * i:3 * i + 3], c[3 * j:3 * j + 3] = c[3 * j:3 * j + 3], c[3 * i:3 * i + 3]
            return f"chunks {i},{j} swapped"
        if op == 5:
            c[3 * i:3 * i + 3] = c[3 * j:3 * j + 3]
            return f"chunk {j} copied over {i} (shared payload)"
        if op == 6:
            del c[-3:]
            return "last chunk dropped"
        if op == 7:
            c += c[-3:]
            return "last chunk repeated"
        if op == 8:
            k = rng.choice((-16, -1, 1, 16))
            t["chunks"] = [_num(v) + k if idx % 3 == 0 else v for idx, v in enumerate(c)]
            return f"every offset shifted by {k}"
        if op == 9:
            k = 3 * i + rng.randrange(3)
            c[k] = odd(rng)
            return f"chunk field {k} odd"
        # point a chunk at another tensor's chunk (cross-tensor sharing)
        other = rng.choice(d["tensors"])
        oc = other.get("chunks") if isinstance(other, dict) else None
        if isinstance(oc, list) and len(oc) >= 3:
            m = rng.randrange(len(oc) // 3)
            c[3 * i:3 * i + 3] = oc[3 * m:3 * m + 3]
        return "chunk shared with another tensor"
    if field == "drop":
        key = rng.choice(list(t)) if t else "name"
        t.pop(key, None)
        return f"tensor field {key} dropped"
    t[rng.choice(("unknown", "future"))] = odd(rng)
    return "unknown tensor field added"


def struct_mutation(seed: Seed, seeds: list[Seed], rng: random.Random) -> tuple[dict, str]:
    d = json.loads(seed.text)
    size = len(seed.data)
    steps = []
    for _ in range(rng.choice((1, 1, 1, 2))):
        tensors = d.get("tensors") if isinstance(d.get("tensors"), list) else []
        r = rng.random()
        if r < 0.55 and tensors:
            t = rng.choice(tensors)
            if isinstance(t, dict):
                steps.append(_mutate_tensor(t, d, rng, size))
        elif r < 0.65 and tensors:
            op = rng.randrange(4)
            i = rng.randrange(len(tensors))
            if op == 0:
                tensors.pop(i)
                steps.append(f"tensor {i} removed")
            elif op == 1:
                tensors.append(copy.deepcopy(tensors[i]))
                steps.append(f"tensor {i} duplicated")
            elif op == 2:
                j = rng.randrange(len(tensors))
                tensors[i], tensors[j] = tensors[j], tensors[i]
                steps.append(f"tensors {i},{j} swapped")
            else:
                tensors.insert(i, odd(rng))
                steps.append("odd tensor entry")
        elif r < 0.82:
            spots = []
            _nodes(d.get("tree"), spots)
            if spots and rng.random() < 0.85:
                cont, k = rng.choice(spots)
                if rng.random() < 0.2:
                    cont2, k2 = rng.choice(spots)
                    cont[k], cont2[k2] = cont2[k2], cont[k]
                    steps.append("tree nodes swapped")
                else:
                    cont[k] = _odd_node(rng, len(tensors))
                    steps.append(f"tree node {str(cont[k])[:50]}")
            else:
                d["tree"] = _odd_node(rng, len(tensors))
                steps.append("tree replaced")
        elif r < 0.92:
            base = d.get("base")
            op = rng.randrange(6)
            other = rng.choice(seeds)
            if op == 0 or not isinstance(base, dict):
                d["base"] = {"xxh64": other.identity, "path": other.name}
                d["features"] = ["delta"]
                steps.append(f"base set to {other.name}")
            elif op == 1:
                base["path"] = rng.choice(("/proc/self/mem", "/dev/zero", "/dev/stdin", FIFO_NAME, ".", "..", "",
                                           "/etc/passwd", "x\x00y", "\udcff", IN_NAME, "/" * 5000, 5, None,
                                           "../" * 40 + "etc/hostname", other.name))
                steps.append(f"base path {str(base['path'])[:40]!r}")
            elif op == 2:
                base["xxh64"] = rng.choice((other.identity, f"{rng.getrandbits(64):016x}", "x", 5))
                steps.append("base identity")
            elif op == 3:
                d["base"] = odd(rng)
                steps.append("base odd")
            elif op == 4:
                d["features"] = rng.choice(([], ["delta", "delta"], "delta", [5]))
                steps.append(f"features {d['features']!r}")
            else:
                d.pop("base", None)
                steps.append("base removed")
        else:
            op = rng.randrange(7)
            if op == 0:
                d["mithril"] = rng.choice((0, 2, "1", 1.0, True, None))
            elif op == 1:
                d["features"] = rng.choice((["hyperdrive"], ["ndarray"], "x", [None]))
            elif op == 2:
                d["metadata"] = rng.choice(({"a": 1}, ["x"], "m", {"k": "v" * 10000}, {5: "x"}))
            elif op == 3:
                d["source"] = rng.choice(("x", [1], {"format": "safetensors", "header": "!!"}, {}))
            elif op == 4:
                d["writer"] = rng.choice((5, None, "w" * 10000, "\udcff"))
            elif op == 5:
                d["tensors"] = rng.choice(("x", None, {}, [[]]))
            else:
                d.pop(rng.choice(("tree", "tensors", "mithril")), None)
            steps.append(f"top-level op {op}")
    return d, "; ".join(steps) or "re-signed unchanged"


def resign(seed: Seed, raw: bytes, rng: random.Random | None = None, lie: bool = False) -> bytes:
    """The seed's payloads, then ``raw`` as the index, with a trailer that signs it."""
    import xxhash

    from mithril_gpu import container

    off = seed.index_off
    if lie and rng is not None:
        off = _int_near(rng, off, len(seed.data)) & ((1 << 64) - 1)
    return seed.data[:seed.index_off] + raw + container.TRAILER.pack(
        off, len(raw), xxhash.xxh64_intdigest(raw), container.TRAILER_MAGIC)


def _compress(text: bytes, rng: random.Random) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=rng.choice((1, 3, 9)),
                                    write_content_size=rng.random() > 0.03).compress(text)


def mutate(seeds: list[Seed], run_seed, i: int) -> Input:
    """Input ``i`` of run ``run_seed``: deterministic, so the parent can rebuild any input."""
    rng = random.Random(f"{run_seed}:{i}")
    weights = [0.25 if s.name == "minilm.mth" else 1.0 for s in seeds]
    seed = rng.choices(seeds, weights)[0]
    r = rng.random()
    if seed.base is not None and r < 0.08:
        base = next(s for s in seeds if s.name == seed.base)
        data, desc = raw_mutation(base, seeds, rng)
        return Input(seed, "base", data, f"base {base.name}: {desc}")
    if r < 0.5:
        data, desc = raw_mutation(seed, seeds, rng)
        return Input(seed, "raw", data, desc)
    if r < 0.9:
        d, desc = struct_mutation(seed, seeds, rng)
        ascii_only = rng.random() < 0.5
        try:
            text = json.dumps(d, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        except (ValueError, RecursionError):       # a swap put a node inside itself
            text, desc = seed.text.encode(), desc + " (made a cycle: index left as it was)"
        lie = rng.random() < 0.03
        return Input(seed, "struct", resign(seed, _compress(text, rng), rng, lie), desc + ("; trailer lies" if lie else ""))
    stored = seed.data[seed.index_off:seed.index_off + seed.index_len]
    if rng.random() < 0.5:          # the compressed index damaged, then re-signed
        b = bytearray(stored)
        for _ in range(rng.choice((1, 2, 8))):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.2:
            del b[rng.randrange(len(b)):]
        return Input(seed, "index", resign(seed, bytes(b)), "index bytes damaged, re-signed")
    text = bytearray(seed.text.encode())   # the JSON text damaged, recompressed, re-signed
    for _ in range(rng.choice((1, 1, 2, 4))):
        p = rng.randrange(len(text))
        c = text[p]
        if 48 <= c <= 57 and rng.random() < 0.7:
            text[p] = 48 + rng.randrange(10)
        else:
            text[p] = rng.choice(b'{}[],:"0123456789-e.x \\')
    return Input(seed, "index", resign(seed, _compress(bytes(text), rng)), "index JSON damaged, re-signed")


# --------------------------------------------------------------------------------- judging (child)

def _digest(b) -> str:
    return hashlib.blake2b(memoryview(b).cast("B"), digest_size=16).hexdigest()


def _tensor_digest(t) -> str:
    from mithril_gpu.api import tensor_bytes

    return _digest(tensor_bytes(t.detach().cpu()))


def signature(obj, depth=0):
    """A comparable form of a loaded object: tensors and arrays by dtype, shape and byte digest."""
    import numpy as np
    import torch

    if depth > 200:
        return ("deep",)
    if isinstance(obj, torch.Tensor):
        return ("T", str(obj.dtype), tuple(obj.shape), _tensor_digest(obj))
    if isinstance(obj, np.ndarray):
        le = obj.astype(obj.dtype.newbyteorder("<"), copy=False) if obj.dtype.byteorder == ">" else obj
        return ("N", obj.dtype.str, obj.shape, _digest(np.ascontiguousarray(le).view(np.uint8).reshape(-1)))
    if isinstance(obj, dict):
        return ("D", tuple((signature(k, depth + 1), signature(v, depth + 1)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return ("L" if isinstance(obj, list) else "U", tuple(signature(x, depth + 1) for x in obj))
    return (type(obj).__name__, repr(obj))


def expectation(path: str) -> dict:
    """What a seed decodes to: the signature of load(), and each entry's fields and bytes."""
    from mithril_gpu.reader import MthFile

    with MthFile(path, threads=1) as f:
        entries = {e.name: (e.dtype.name, e.shape, e.chunk_elems, e.checksum, _digest(f.get_bytes(e.name)))
                   for e in f.index.tensors}
        return {"sig": signature(f.load()), "entries": entries}


class Judge:
    """Runs inputs in this process (a child): one outcome per input."""

    def __init__(self, d: str, names: list[str]):
        import torch

        torch.set_num_threads(1)
        self.d = d
        self.seeds = load_seeds(d, names)
        self.expect = {s.name: expectation(os.path.join(d, s.name)) for s in self.seeds}

    def run(self, inp: Input) -> tuple[str, dict]:
        path = os.path.join(self.d, IN_NAME)
        base = None
        if inp.kind == "base":
            base = os.path.join(self.d, BASE_NAME)
            with open(base, "wb") as fh:
                fh.write(inp.data)
            path = os.path.join(self.d, inp.seed.name)     # the intact delta, against the damaged base
        else:
            with open(path, "wb") as fh:
                fh.write(inp.data)
        return judge_file(path, base, inp, self.expect)


def _typed(e) -> tuple[str, dict]:
    msg = str(e)
    info = {"error": type(e).__name__, "message": msg[:2000]}
    if "\n" in msg or len(msg) > 2000 or not msg:
        return "bad_message", info
    return "typed", info


def judge_file(path: str, base, inp: Input, expect: dict) -> tuple[str, dict]:
    from mithril_gpu.errors import MithrilError
    from mithril_gpu.reader import MthFile

    try:
        try:
            f = MthFile(path, base=base, threads=1)
        except MithrilError as e:
            return _typed(e)
        with f:
            keys = f.keys()
            for k in keys:
                f.info(k)
            errors = {}
            rng = random.Random(len(inp.data))
            for k in rng.sample(keys, min(2, len(keys))):
                try:
                    f.get_tensor(k)
                except MithrilError as e:
                    errors["get_tensor"] = e
            try:
                obj = f.load()
            except MithrilError as e:
                errors["load"] = e
            try:
                f.check()
            except MithrilError as e:
                errors["check"] = e
            if errors:
                # check() decodes every tensor and the tree, load() the tensors the tree uses,
                # get_tensor() one: what fails in load() or get_tensor() must fail in check()
                first = next(iter(errors.values()))
                outcome, info = _typed(first)
                for e in errors.values():
                    if _typed(e)[0] != "typed":
                        outcome, info = _typed(e)
                if outcome == "typed" and "check" not in errors:
                    return "inconsistent", {**info, "steps": {k: f"{type(v).__name__}: {v}"[:300]
                                                              for k, v in errors.items()}}
                return outcome, info
            try:                            # decoded: judge the bytes (a failure here is the fuzzer's)
                return _judge_decoded(f, obj, inp, expect)
            except Exception:  # noqa: BLE001
                return "harness", {"traceback": traceback.format_exc()[-3000:]}
    except MemoryError:
        return "oom", {"error": "MemoryError", "traceback": traceback.format_exc()[-3000:]}
    except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
        return "untyped", {"error": type(e).__name__, "message": str(e)[:500],
                           "traceback": traceback.format_exc()[-3000:]}


def _judge_decoded(f, obj, inp: Input, expect: dict) -> tuple[str, dict]:
    """An input decoded: are its tensors right? (see the module docstring)"""
    import torch

    from mithril_gpu import checksum, dtypes, tree as tree_mod

    from mithril_gpu import codecs, container

    own = sum(e.nbytes for e in f.index.tensors if (e.delta or {}).get("op") != "same")
    bound = codecs.ZSTD_MAX_EXPANSION * container.MAX_TENSOR_PER_PLANE_BYTE * f.size
    if own > bound:
        return "over_budget", {"why": f"{own} tensor bytes from a {f.size}-byte file (bound {bound})"}
    got = {}
    for e in f.index.tensors:
        b = f.get_bytes(e.name)
        if checksum.tensor_checksum(b, e.chunk_elems * e.dtype.itemsize) != e.checksum:
            return "silent", {"why": f"tensor {e.name!r} decoded to bytes that do not match its checksum"}
        got[e.name] = (e.dtype.name, e.shape, e.chunk_elems, e.checksum, _digest(b))

    def from_bytes(i):
        e = f.index.tensors[i]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtypes.to_torch(e.dtype))
        b = torch.from_numpy(f.get_bytes(e.name))
        return b.view(dtypes.to_torch(e.dtype)).reshape(e.shape)

    sig = signature(obj)
    if sig != signature(tree_mod.decode(f.index.tree, from_bytes)):
        return "silent", {"why": "load() gave other bytes than get_bytes()"}
    want = expect[inp.seed.name]
    if not inp.resigned:
        if sig == want["sig"] and got == want["entries"]:
            return "decoded", {}
        if any(sig == x["sig"] and got == x["entries"] for x in expect.values()):
            return "decoded", {"note": "decodes as another seed"}
        return "silent", {"why": "decoded to other tensors than the seed's, with no index change"}
    for name, fields in got.items():
        w = want["entries"].get(name)
        if w is not None and w[:4] == fields[:4] and w[4] != fields[4]:
            return "silent", {"why": f"tensor {name!r}: the seed's entry, other bytes"}
    return "decoded", {}


def _misbehave(how: str) -> None:
    if how == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif how == "hang":
        time.sleep(1e6)
    elif how == "oom":                 # dies of an uncaught MemoryError, as a child past its limit does
        bytearray(1 << 62)


def child_main(d: str, names: list[str], run_seed: str, mem_mb: int) -> None:
    """The child loop: read "RUN a b" lines, report "B i" and "E i outcome info" lines."""
    import resource

    if mem_mb:
        lim = mem_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                 # stray prints go to stderr, not the protocol
    # MTHFUZZ_SELFTEST="crash:3,hang:5,oom:7": misbehave on those inputs (tests of the harness)
    selftest = {int(v): k for k, v in (x.split(":") for x in os.environ.get("MTHFUZZ_SELFTEST", "").split(",") if x)}
    judge = Judge(d, names)
    proto.write("READY\n")
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "RUN":
            break
        a, b = int(parts[1]), int(parts[2])
        for i in range(a, b):
            proto.write(f"B {i}\n")
            try:
                inp = mutate(judge.seeds, run_seed, i)
            except Exception:  # noqa: BLE001
                proto.write(f"E {i} harness {json.dumps({'traceback': traceback.format_exc()[-2000:]})}\n")
                continue
            if i in selftest:
                _misbehave(selftest[i])
            outcome, info = judge.run(inp)
            info.update(kind=inp.kind, seed=inp.seed.name, desc=inp.desc[:300])
            proto.write(f"E {i} {outcome} {json.dumps(info, default=str)}\n")
        proto.write("DONE\n")


# ----------------------------------------------------------------------------------------- parent

class Child:
    def __init__(self, d, names, run_seed, mem_mb, log_dir, k):
        self.log_path = os.path.join(log_dir, f"child{k}.log")
        self.log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", d, "--names", ",".join(names),
             "--seed", str(run_seed), "--mem-mb", str(mem_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.buf = b""
        self.ready = False
        self.block = None          # [next expected index, end]
        self.inflight = None
        self.since = 0.0
        self.started = time.monotonic()

    def send(self, a, b):
        self.block = [a, b]
        self.proc.stdin.write(f"RUN {a} {b}\n".encode())
        self.proc.stdin.flush()

    def kill(self):
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        self.log.close()

    def stderr_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - 3000))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""


def run(seconds=None, inputs=None, workers=None, run_seed=None, out="fuzz-failures", mem_mb=2048,
        timeout=20.0, block=25, verbose=True, seed_dir=None, progress_every=60.0) -> dict:
    """Fuzz for ``seconds`` or ``inputs``; returns the summary (counts by outcome and kind)."""
    if seconds is None and inputs is None:
        seconds = 60
    run_seed = str(run_seed if run_seed is not None else random.SystemRandom().getrandbits(32))
    workers = workers or min(2, os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="mthfuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    children: list[Child] = []
    counts = {o: 0 for o in OUTCOMES}
    by_kind = {k: {o: 0 for o in OUTCOMES} for k in KINDS + ("?",)}
    saved = []
    t_start = time.monotonic()
    try:
        seeds_src = seed_dir or os.path.join(tmp, "seeds")
        if seed_dir is None:
            os.makedirs(seeds_src)
            names = make_seeds(seeds_src)
        else:
            names = [n for n in sorted(os.listdir(seed_dir)) if n.endswith(".mth") and not n.startswith("_")]
        seeds = load_seeds(seeds_src, names)
        t_seeds = time.monotonic()

        def child_dir(k):
            cd = os.path.join(tmp, f"w{k}")
            if not os.path.isdir(cd):
                os.makedirs(cd)
                for n in names:
                    shutil.copy(os.path.join(seeds_src, n), os.path.join(cd, n))
                prepare_dir(cd)
            return cd

        def spawn(k):
            return Child(child_dir(k), names, run_seed, mem_mb, tmp, k)

        children = [spawn(k) for k in range(workers)]
        next_i, done = 0, 0
        deadline = None if seconds is None else time.monotonic() + seconds
        pending: list[list[int]] = []       # blocks handed back by a dead child
        last_note = time.monotonic()

        def budget_left():
            if inputs is not None and next_i >= inputs:
                return False
            return deadline is None or time.monotonic() < deadline

        def record(i, outcome, info, child=None):
            nonlocal done
            done += 1
            counts[outcome] += 1
            by_kind[info.get("kind", "?") if info.get("kind") in by_kind else "?"][outcome] += 1
            if outcome in FAILURES:
                saved.append(save_failure(out, seeds, seeds_src, run_seed, i, outcome, info))
                if verbose:
                    print(f"FAIL input {i}: {outcome} {info.get('seed', '')} {info.get('desc', '')[:100]} "
                          f"{info.get('error', '')}: {str(info.get('message', info.get('why', '')))[:200]}",
                          file=sys.stderr)

        def give_work(c):
            nonlocal next_i
            if pending:
                a, b = pending.pop()
                c.send(a, b)
                return
            if not budget_left():
                c.block = None
                return
            end = next_i + block if inputs is None else min(inputs, next_i + block)
            c.send(next_i, end)
            next_i = end

        def died(k, c, why):
            """Child k is gone (or killed): classify what it was running, restart it."""
            tail = c.stderr_tail()
            if c.inflight is not None:
                if why == "hang":
                    outcome = "hang"
                elif "MemoryError" in tail or "std::bad_alloc" in tail or "out of memory" in tail.lower():
                    outcome = "oom"
                else:
                    outcome = "crash"
                info = {"returncode": c.proc.returncode, "stderr": tail[-1500:]}
                try:
                    inp = mutate(seeds, run_seed, c.inflight)
                    info.update(kind=inp.kind, seed=inp.seed.name, desc=inp.desc[:300])
                except Exception:  # noqa: BLE001
                    pass
                record(c.inflight, outcome, info)
                rest = [c.inflight + 1, c.block[1]] if c.block else None
                c.inflight = None
            else:
                rest = c.block
                if not c.ready:
                    raise RuntimeError(f"fuzz child failed to start:\n{tail}")
            if rest and rest[0] < rest[1]:
                pending.append(rest)
            c.kill()
            children[k] = spawn(k)

        while True:
            busy = [c for c in children if c.block is not None or not c.ready]
            if not busy and not pending and not budget_left():
                break
            fds = {c.proc.stdout.fileno(): (k, c) for k, c in enumerate(children)}
            r, _, _ = select.select(list(fds), [], [], 0.5)
            for fd in r:
                k, c = fds[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    c.proc.wait()
                    died(k, c, "exit")
                    continue
                c.buf += chunk
                while b"\n" in c.buf:
                    line, c.buf = c.buf.split(b"\n", 1)
                    text = line.decode("utf-8", "replace")
                    if text == "READY":
                        c.ready = True
                        give_work(c)
                    elif text.startswith("B "):
                        c.inflight, c.since = int(text.split()[1]), time.monotonic()
                    elif text.startswith("E "):
                        _, i, outcome, info = text.split(" ", 3)
                        c.inflight = None
                        if c.block is not None:
                            c.block[0] = int(i) + 1
                        record(int(i), outcome, json.loads(info))
                    elif text == "DONE":
                        give_work(c)
            now = time.monotonic()
            if verbose and now - last_note >= progress_every:
                last_note = now
                print(f"... {done} inputs in {now - t_seeds:.0f} s ({done / max(now - t_seeds, 1e-9):.0f}/s), "
                      f"{sum(counts[o] for o in FAILURES)} failures", file=sys.stderr, flush=True)
            for k, c in enumerate(children):
                if c.inflight is not None and now - c.since > timeout:
                    c.proc.kill()
                    c.proc.wait()
                    died(k, c, "hang")
                elif not c.ready and now - c.started > 300:
                    raise RuntimeError("fuzz child did not start in 300 s:\n" + c.stderr_tail())
        elapsed = time.monotonic() - t_seeds
    finally:
        for c in children:
            try:
                c.proc.stdin.close()
            except OSError:
                pass
            c.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"run_seed": run_seed, "inputs": done, "seconds": round(elapsed, 1),
               "per_second": round(done / max(elapsed, 1e-9), 1), "setup_seconds": round(t_seeds - t_start, 1),
               "workers": workers, "counts": counts, "by_kind": {k: v for k, v in by_kind.items() if any(v.values())},
               "failures": sum(counts[o] for o in FAILURES), "saved": saved, "seeds": names}
    if verbose:
        print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    kinds = list(s["by_kind"])
    head = ["outcome"] + kinds + ["total"]
    rows = [[o] + [str(s["by_kind"][k][o]) for k in kinds] + [str(s["counts"][o])] for o in OUTCOMES]
    rows.append(["all"] + [str(sum(s["by_kind"][k].values())) for k in kinds] + [str(s["inputs"])])
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = [f"mithril fuzz: {s['inputs']} inputs in {s['seconds']} s ({s['per_second']}/s, {s['workers']} workers, "
             f"seed {s['run_seed']}; {len(s['seeds'])} seed files made in {s['setup_seconds']} s)"]
    for r in [head] + rows:
        lines.append("  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
    lines.append("failures: " + (f"{s['failures']} (saved under {os.path.dirname(s['saved'][0])})" if s["saved"]
                                 else "none"))
    return "\n".join(lines)


def save_failure(out, seeds, seeds_src, run_seed, i, outcome, info) -> str:
    """Save failing input ``i`` with the seed files it needs, for --replay."""
    d = os.path.join(out, f"{outcome}-{run_seed}-{i}")
    os.makedirs(d, exist_ok=True)
    try:
        inp = mutate(seeds, run_seed, i)
    except Exception:  # noqa: BLE001 - the mutation itself failed (a "harness" outcome): keep its story
        with open(os.path.join(d, "info.json"), "w") as fh:
            json.dump({"outcome": outcome, "run_seed": run_seed, "input": i, "info": info,
                       "mutate_error": traceback.format_exc()[-3000:]}, fh, indent=1, default=str)
        return d
    for s in seeds:                               # bases (and bases' bases) resolve next to the input
        shutil.copy(os.path.join(seeds_src, s.name), os.path.join(d, s.name))
    with open(os.path.join(d, BASE_NAME if inp.kind == "base" else IN_NAME), "wb") as fh:
        fh.write(inp.data)
    with open(os.path.join(d, "info.json"), "w") as fh:
        json.dump({"outcome": outcome, "run_seed": run_seed, "input": i, "seed": inp.seed.name, "kind": inp.kind,
                   "desc": inp.desc, "info": info,
                   "replay": f"python fuzz/fuzz_mth.py --replay {d}"}, fh, indent=1, default=str)
    return d


def replay(d: str) -> int:
    """Run a saved failure again, in this process (no limits), and print its outcome."""
    with open(os.path.join(d, "info.json")) as fh:
        meta = json.load(fh)
    names = [n for n in sorted(os.listdir(d)) if n.endswith(".mth") and not n.startswith("_")]
    prepare_dir(d)
    judge = Judge(d, names)
    seed = next(s for s in judge.seeds if s.name == meta["seed"])
    name = BASE_NAME if meta["kind"] == "base" else IN_NAME
    with open(os.path.join(d, name), "rb") as fh:
        inp = Input(seed, meta["kind"], fh.read(), meta["desc"])
    outcome, info = judge.run(inp)
    print(f"{outcome}: {json.dumps(info, default=str, indent=1)}")
    return 0 if outcome not in FAILURES else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=None, help="fuzz for this long (default 60, if no --inputs)")
    p.add_argument("--inputs", type=int, default=None, help="fuzz this many inputs")
    p.add_argument("--workers", type=int, default=None, help="child processes (default: min(2, cores))")
    p.add_argument("--seed", default=None, help="run seed (default random); inputs are a function of it")
    p.add_argument("--out", default="fuzz-failures", help="where failing inputs are saved")
    p.add_argument("--mem-mb", type=int, default=2048, help="address-space limit of a child (RLIMIT_AS)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds an input may take")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--replay", default=None, metavar="DIR", help="run one saved failure again")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--names", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child_main(a.child, a.names.split(","), a.seed, a.mem_mb)
        return 0
    if a.replay:
        return replay(a.replay)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    s = run(seconds=a.seconds, inputs=a.inputs, workers=a.workers, run_seed=a.seed, out=a.out, mem_mb=a.mem_mb,
            timeout=a.timeout)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(s, fh, indent=1)
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
