"""Committed .mth v1 files decode to known bytes: an accidental format change fails here."""
import hashlib
import json
import os
import shutil

import pytest
import torch

import mithril_gpu
from conftest import FIXTURES, assert_same


def _expected():
    with open(os.path.join(FIXTURES, "golden_v1.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["golden_v1.mth", "golden_v1_delta.mth", "golden_v1_ctx.mth", "golden_v1_torch.mth"])
def test_golden_tensors_decode_to_known_bytes(name):
    want = _expected()[name]
    with mithril_gpu.open(os.path.join(FIXTURES, name)) as f:
        assert sorted(f.keys()) == sorted(want)
        for key, digest in want.items():
            assert hashlib.sha256(f.get_bytes(key).tobytes()).hexdigest() == digest, key


def test_golden_torch_values_and_row_digests():
    """feature "torch" (torch.Size, dtype, device, OrderedDict._metadata), an ndarray node, and the
    row digests a partial read checks, as the first writer of them wrote them."""
    import collections

    import numpy as np

    path = os.path.join(FIXTURES, "golden_v1_torch.mth")
    state = mithril_gpu.load(path)
    assert state["shape"] == torch.Size([37, 64]) and type(state["shape"]) is torch.Size
    assert state["dtype"] is torch.bfloat16 and state["device"] == torch.device("cuda", 1)
    assert state[torch.float16] == "dtype key"
    m = state["model"]
    assert type(m) is collections.OrderedDict and list(m) == ["fc.weight", "fc.bias", "norm.running_mean"]
    assert m._metadata == {"": {"version": 1}, "fc": {"version": 1}, "norm": {"version": 2}}
    assert state["rng"].dtype == np.dtype(">u4") and state["rng"].tolist() == list(range(10))
    with mithril_gpu.open(path) as f:
        e = f.entry("model/fc.weight")
        assert e.rows == 10 and len(e.row_digests) == 10
        assert torch.equal(f.get_slice("model/fc.weight")[20:24], m["fc.weight"][20:24])


def test_golden_tree_and_values():
    state = mithril_gpu.load(os.path.join(FIXTURES, "golden_v1.mth"))
    assert state["step"] == 1200 and state["lr"] == 3e-4 and state["name"] == "golden"
    assert state["flags"] == [True, None, (1, 2.5)] and state["blob"] == b"\x00\x01mithril"
    m = state["model"]
    assert m["tied"] is m["w_f32"]
    assert m["scalar"].shape == () and m["scalar"].item() == 3.5
    assert m["empty"].shape == (0, 4) and m["u64"].dtype == torch.uint64
    assert m["f8a"].dtype == torch.float8_e4m3fn and m["mask"].dtype == torch.bool


def test_golden_delta_uses_every_op_and_matches_full():
    ops = _expected()["delta_ops"]
    assert {"same", "xor", "zigzag"} <= set(ops.values())
    d = mithril_gpu.load(os.path.join(FIXTURES, "golden_v1_delta.mth"))
    assert d["step"] == 1201
    base = mithril_gpu.load(os.path.join(FIXTURES, "golden_v1.mth"))
    assert_same(d["model"]["u8"], base["model"]["u8"])
    assert not torch.equal(d["model"]["w_f32"], base["model"]["w_f32"])


def test_golden_delta_needs_its_base(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "golden_v1_delta.mth"), tmp_path)
    with pytest.raises(mithril_gpu.MissingBaseError, match="--base"):
        mithril_gpu.load(tmp_path / "golden_v1_delta.mth")
    state = mithril_gpu.load(tmp_path / "golden_v1_delta.mth", base=os.path.join(FIXTURES, "golden_v1.mth"))
    assert state["step"] == 1201


def test_golden_file_is_what_the_writer_writes_today(tmp_path):
    """Same input, same bytes: the layout (offsets, codecs, index) has not drifted."""
    import sys

    sys.path.insert(0, FIXTURES)
    from make_fixtures import golden_state

    out = tmp_path / "g.mth"
    mithril_gpu.save(golden_state(), out, chunk_elems=4096, threads=1)
    with mithril_gpu.open(out) as new, mithril_gpu.open(os.path.join(FIXTURES, "golden_v1.mth")) as old:
        def layout(f):  # everything but offsets and compressed sizes, which follow the zstd release
            # (and the row digests, an optional key added after this file was made: checked below)
            return [({k: v for k, v in e.to_json().items() if k not in ("chunks", "row_xxh64")}, e.chunks[2::3])
                    for e in f.index.tensors]

        for e in new.index.tensors:          # today's writer stores every row's digest
            assert e.row_digests is not None or (e.delta or {}).get("op") == "same", e.name

        assert layout(new) == layout(old)
        assert new.index.tree == old.index.tree


def _gpu_manifest():
    path = os.path.join(FIXTURES, "gpu_v1.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if k.endswith(".mth")}


GPU_FILES = _gpu_manifest()


@pytest.mark.skipif(not GPU_FILES, reason="no GPU-written fixtures yet: scripts/make_gpu_fixtures.py on a device makes them")
@pytest.mark.parametrize("name", sorted(GPU_FILES) or ["none"])
def test_gpu_written_files_decode_on_the_cpu(name):
    """Files written by the GPU path (nvCOMP frames, GPU kernels' planes) decode bit-exact here."""
    want = GPU_FILES[name]
    with mithril_gpu.open(os.path.join(FIXTURES, name)) as f:
        assert sorted(f.keys()) == sorted(want)
        for key, digest in want.items():
            assert hashlib.sha256(f.get_bytes(key).tobytes()).hexdigest() == digest, key
        assert 1 in {c for e in f.index.tensors for c in e.chunks[2::3]}     # zstd frames from nvCOMP are in it
