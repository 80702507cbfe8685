"""The fuzzing campaign's short run (fuzz/fuzz_mth.py), part of the suite: about 30-60 s on two
cores. Deselect with ``-m "not fuzz"``; MITHRIL_FUZZ_INPUTS and MITHRIL_FUZZ_SEED change the
run (the inputs are a function of the seed, so a failure here replays anywhere)."""
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "fuzz"))
import fuzz_mth  # noqa: E402

pytestmark = pytest.mark.fuzz         # registered in pyproject.toml


def test_short_fuzz_run_finds_nothing(tmp_path):
    n = int(os.environ.get("MITHRIL_FUZZ_INPUTS", "20000"))
    seed = os.environ.get("MITHRIL_FUZZ_SEED", "ci-1")
    out = os.environ.get("MITHRIL_FUZZ_OUT", str(tmp_path / "failures"))
    s = fuzz_mth.run(inputs=n, run_seed=seed, out=out, verbose=False)
    table = fuzz_mth.format_summary(s)
    print(table)
    assert s["inputs"] == n, table
    assert s["failures"] == 0, table + "\nreplay with: " + "; ".join(
        f"python fuzz/fuzz_mth.py --replay {d}" for d in s["saved"][:5])
    # the run reached both sides: inputs that decode and inputs that are refused, of every kind
    assert s["counts"]["decoded"] > 0 and s["counts"]["typed"] > 0, table
    assert set(s["by_kind"]) >= set(fuzz_mth.KINDS), table


def test_seeds_cover_every_kind_of_file(tmp_path):
    names = fuzz_mth.make_seeds(str(tmp_path))
    assert {"dtypes.mth", "full.mth", "delta.mth", "delta2.mth", "minilm.mth", "golden_v1.mth",
            "golden_v1_delta.mth", "empty.mth", "arrays.mth"} <= set(names)
    import mithril_gpu

    kinds = set()
    for n in names:
        with mithril_gpu.open(tmp_path / n) as f:
            for e in f.index.tensors:
                kinds |= {e.dtype.name, e.transform, (e.delta or {}).get("op")}
    assert {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
            "F8_E4M3", "F8_E5M2"} <= kinds
    assert {"raw", "bytegroup", "fieldsplit", "masked", "same", "xor", "zigzag"} <= kinds
    state = mithril_gpu.load(tmp_path / "full.mth")
    assert set(state) >= {"model", "optimizer", "step"} and state["step"] == 3


def test_mutations_that_once_broke_the_mutator(tmp_path):
    """Run long-2 input 87828 stacked two chunk mutations: a list put in a chunk field, then an
    offset shifted by adding to it (a "harness" failure, and its saving crashed the parent)."""
    names = fuzz_mth.make_seeds(str(tmp_path))
    seeds = fuzz_mth.load_seeds(str(tmp_path), names)
    for i in (87828,) + tuple(range(200)):
        assert isinstance(fuzz_mth.mutate(seeds, "long-2", i).data, bytes)


def test_the_oracle_sees_wrong_bytes_and_untyped_errors(tmp_path, monkeypatch):
    """A file that decodes to other tensors than its seed's, with no index change, is "silent";
    an exception that is not a MithrilError is "untyped"; the intact seed is "decoded"."""
    import torch

    import mithril_gpu

    names = fuzz_mth.make_seeds(str(tmp_path))
    fuzz_mth.prepare_dir(str(tmp_path))
    judge = fuzz_mth.Judge(str(tmp_path), names)
    tiny = next(s for s in judge.seeds if s.name == "tiny.mth")
    assert judge.run(fuzz_mth.Input(tiny, "raw", tiny.data, "none"))[0] == "decoded"
    mithril_gpu.save({"x": torch.tensor([1, 2, 4], dtype=torch.int16)}, tmp_path / "other.mth")
    other = (tmp_path / "other.mth").read_bytes()
    assert judge.run(fuzz_mth.Input(tiny, "raw", other, "other tensors"))[0] == "silent"
    assert judge.run(fuzz_mth.Input(tiny, "struct", other, "re-signed"))[0] == "decoded"

    def boom(*a, **k):
        raise KeyError("x")

    monkeypatch.setattr(mithril_gpu.MthFile, "check", boom)
    outcome, info = judge.run(fuzz_mth.Input(tiny, "raw", tiny.data, "none"))
    assert outcome == "untyped" and info["error"] == "KeyError"


def test_the_harness_classifies_crashes_hangs_and_oom_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MTHFUZZ_SELFTEST", "crash:3,hang:5,oom:8")
    s = fuzz_mth.run(inputs=12, run_seed="selftest", out=str(tmp_path / "f"), workers=1, timeout=5, block=4,
                     verbose=False)
    c = s["counts"]
    assert s["inputs"] == 12 and (c["crash"], c["hang"], c["oom"]) == (1, 1, 1), fuzz_mth.format_summary(s)
    assert len(s["saved"]) == 3 and all(os.path.exists(os.path.join(d, "info.json")) for d in s["saved"])
