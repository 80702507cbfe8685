"""Delta checkpoints: chains restore bit-exact, bases are checked, the Checkpointer keeps what it needs."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import mithril_gpu
import mithril_gpu.writer
from conftest import FIXTURES, assert_same, assert_tree_same, subprocess_env
from mithril_gpu import Checkpointer

CONST = torch.arange(100.0)      # a tensor that never changes: stored as "same", so every delta uses its base


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, model[0].in_features, generator=g)).pow(2).mean().backward()
        opt.step()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


def _state(model, opt, step):
    """A snapshot (state_dict() returns live tensors that training keeps changing)."""
    import copy

    return copy.deepcopy({"model": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
                          "master": model.state_dict(), "optimizer": opt.state_dict(), "step": step})


def test_long_chain_restores_every_step_bit_exact(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = Checkpointer(tmp_path, full_every=12, keep=None)
    states = {}
    for step in range(12):
        _train(model, opt, 1, step)
        states[step] = _state(model, opt, step)
        ck.save(states[step], step)
    assert ck.chain(11) == list(range(11, -1, -1))
    for step, want in states.items():
        assert_tree_same(ck.load(step), want)
    with mithril_gpu.open(ck.path(11)) as f:
        ops = {(e.delta or {}).get("op") for e in f.index.tensors}
    assert {"zigzag", "xor"} & ops or "same" in ops
    full = sum(os.path.getsize(ck.path(s)) for s in [0])
    deltas = [os.path.getsize(ck.path(s)) for s in range(1, 12)]
    assert max(deltas) < full            # a delta of one step is smaller than a full checkpoint


def test_in_memory_base_and_disk_base_write_identical_files(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    a = Checkpointer(tmp_path / "a", full_every=5, keep=None, keep_base_in_memory=True, threads=1)
    b = Checkpointer(tmp_path / "b", full_every=5, keep=None, keep_base_in_memory=False, threads=1)
    for step in range(3):
        _train(model, opt, 2, step)
        st = _state(model, opt, step)
        a.save(st, step)
        b.save(st, step)
    for step in range(3):
        assert open(a.path(step), "rb").read()[:-32] != b"" and \
            open(a.path(step), "rb").read() == open(b.path(step), "rb").read()


def test_added_removed_and_changed_tensors(tmp_path):
    base = {"keep": torch.randn(1000), "gone": torch.randn(10), "reshaped": torch.randn(6, 4),
            "retyped": torch.randn(50), "same": torch.arange(100), "sparse_change": torch.randn(5000)}
    mithril_gpu.save(base, tmp_path / "0.mth")
    nxt = {"keep": base["keep"] + 1e-3, "new": torch.ones(7), "reshaped": base["reshaped"].reshape(4, 6),
           "retyped": base["retyped"].double(), "same": base["same"].clone(),
           "sparse_change": base["sparse_change"].clone()}
    nxt["sparse_change"][::97] += 1.0
    mithril_gpu.save(nxt, tmp_path / "1.mth", base=tmp_path / "0.mth")
    back = mithril_gpu.load(tmp_path / "1.mth")
    assert_tree_same(back, nxt)
    with mithril_gpu.open(tmp_path / "1.mth") as f:
        ops = {e.name: (e.delta or {}).get("op") for e in f.index.tensors}
        transforms = {e.name: e.transform for e in f.index.tensors}
        assert f.entry("same").stored_bytes == 0
        sparse_bytes = f.entry("sparse_change").stored_bytes
    assert ops["same"] == "same" and ops["new"] is None and ops["reshaped"] is None and ops["retyped"] is None
    # 52 changed elements of 5000: masked rows, or (chosen by coding both ways) sorted segments
    assert ops["sparse_change"] in ("xor", "zigzag") and transforms["sparse_change"] in ("masked", "bytegroup")
    assert sparse_bytes < 600, sparse_bytes


def test_wrong_modified_and_missing_base(tmp_path):
    a = {"w": torch.randn(2000)}
    mithril_gpu.save(a, tmp_path / "base.mth")
    mithril_gpu.save({"w": a["w"] * 1.0001}, tmp_path / "delta.mth", base=tmp_path / "base.mth")
    mithril_gpu.save({"w": torch.randn(2000)}, tmp_path / "other.mth")
    with pytest.raises(mithril_gpu.BaseMismatchError, match="not the base"):
        mithril_gpu.load(tmp_path / "delta.mth", base=tmp_path / "other.mth")
    shutil.copy(tmp_path / "base.mth", tmp_path / "base.bak")
    mithril_gpu.save({"w": a["w"] + 1}, tmp_path / "base.mth")           # base overwritten in place
    with pytest.raises(mithril_gpu.BaseMismatchError):
        mithril_gpu.load(tmp_path / "delta.mth")
    os.unlink(tmp_path / "base.mth")
    with pytest.raises(mithril_gpu.MissingBaseError, match="base=PATH"):
        mithril_gpu.load(tmp_path / "delta.mth")
    back = mithril_gpu.load(tmp_path / "delta.mth", base=tmp_path / "base.bak")
    assert_same(back["w"], a["w"] * 1.0001)
    os.mkdir(tmp_path / "elsewhere")
    shutil.move(tmp_path / "base.bak", tmp_path / "elsewhere" / "base.mth")
    assert_same(mithril_gpu.load(tmp_path / "delta.mth", base=tmp_path / "elsewhere")["w"], a["w"] * 1.0001)


def test_forged_base_identity_is_caught_by_checksums(tmp_path):
    """A base with the right identity but different bytes (its data changed, its index kept) still
    fails loudly: the checksum is over the original bytes, not the stored ones."""
    a = torch.randn(3000)
    mithril_gpu.save({"w": a}, tmp_path / "base.mth")
    mithril_gpu.save({"w": a + 1e-4}, tmp_path / "d.mth", base=tmp_path / "base.mth")
    data = bytearray((tmp_path / "base.mth").read_bytes())
    with mithril_gpu.open(tmp_path / "base.mth") as f:
        off, csize, _ = f.entry("w").chunk(0, 1)
    data[off + 5] ^= 0xFF                       # change the base's data, keep its index (identity)
    (tmp_path / "base.mth").write_bytes(bytes(data))
    with pytest.raises(mithril_gpu.ChecksumMismatchError):
        mithril_gpu.load(tmp_path / "d.mth")


def test_interrupted_checkpointer_save_keeps_older_ones(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    ck = Checkpointer(tmp_path, full_every=4, keep=2)
    for step in range(3):
        _train(model, opt, 1, step)
        ck.save(_state(model, opt, step), step)
    saved = {s: ck.load(s) for s in ck.steps()}

    def boom(_n):
        raise KeyboardInterrupt

    ck_bad = Checkpointer(tmp_path, full_every=4, keep=2, progress=boom)
    _train(model, opt, 1, 99)
    with pytest.raises(KeyboardInterrupt):
        ck_bad.save(_state(model, opt, 3), 3)
    assert ck.steps() == sorted(saved) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    for s, st in saved.items():
        assert_tree_same(ck.load(s), st)


def test_retention_never_deletes_a_needed_base(tmp_path):
    ck = Checkpointer(tmp_path, full_every=4, keep=2)
    for step in range(11):
        ck.save({"w": torch.full((100,), float(step)), "c": CONST}, step)     # "c" is stored as "same"
        for s in ck.steps()[-2:]:
            assert set(ck.chain(s)) <= set(ck.steps())
    assert ck.steps() == [8, 9, 10]          # 10 is a delta of 9 of 8 (full); 8 is needed
    assert ck.latest()["w"][0].item() == 10.0
    # resuming in a new process picks up the chain on disk
    ck2 = Checkpointer(tmp_path, full_every=4, keep=2)
    ck2.save({"w": torch.full((100,), 11.0), "c": CONST}, 11)
    assert ck2.chain(11) == [11, 10, 9, 8]          # the 4th file of the chain that 8 started
    ck2.save({"w": torch.full((100,), 12.0), "c": CONST}, 12)
    assert ck2.chain(12) == [12]                     # ... so the next one is full again
    with pytest.raises(ValueError, match="not after"):
        ck2.save({"w": torch.zeros(1)}, 5)


def test_chain_length_is_bounded(tmp_path, monkeypatch):
    from mithril_gpu.reader import MAX_CHAIN

    monkeypatch.setattr(mithril_gpu.api, "MAX_CHAIN", 10 ** 6)     # a writer that makes too long a chain
    prev = None
    for i in range(MAX_CHAIN + 2):
        p = tmp_path / f"{i}.mth"
        mithril_gpu.save({"w": torch.tensor([float(i), 1.0]), "c": CONST}, p, base=prev)
        prev = p
    with pytest.raises(mithril_gpu.CorruptFileError, match="chain"):
        mithril_gpu.load(prev)


def test_cli_delta_compress_info_decompress(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(FIXTURES, "minilm_l0_bf16.safetensors"))
    nxt = {k: v.clone() for k, v in sd.items()}
    name = "encoder.layer.0.attention.self.query.weight"
    nxt[name].view(-1)[::50] += 0.01
    save_file(sd, tmp_path / "a.safetensors")
    save_file(nxt, tmp_path / "b.safetensors")
    env = subprocess_env()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mithril_gpu.cli", *map(str, args)], capture_output=True,
                              text=True, env=env)

    assert cli("compress", tmp_path / "a.safetensors", tmp_path / "a.mth").returncode == 0
    p = cli("compress", tmp_path / "b.safetensors", tmp_path / "b.mth", "--base", tmp_path / "a.mth")
    assert p.returncode == 0, p.stderr
    ratio = float(p.stdout.split("(")[1].split("x")[0])
    assert ratio > 20            # one tensor changed sparsely, the rest are references
    info = cli("info", tmp_path / "b.mth").stdout
    assert "delta against 'a.mth'" in info and "chain" in info and "+same" in info
    os.rename(tmp_path / "a.mth", tmp_path / "moved.mth")
    p = cli("decompress", tmp_path / "b.mth", tmp_path / "b2.safetensors")
    assert p.returncode == 1 and "--base" in p.stderr and "Traceback" not in p.stderr
    assert "not opened" in cli("info", tmp_path / "b.mth").stdout
    p = cli("decompress", tmp_path / "b.mth", tmp_path / "b2.safetensors", "--base", tmp_path / "moved.mth")
    assert p.returncode == 0, p.stderr
    assert open(tmp_path / "b2.safetensors", "rb").read() == open(tmp_path / "b.safetensors", "rb").read()


def test_a_delta_cannot_replace_its_own_base(tmp_path):
    mithril_gpu.save({"w": torch.ones(10)}, tmp_path / "a.mth")
    before = (tmp_path / "a.mth").read_bytes()
    with pytest.raises(ValueError, match="against itself"):
        mithril_gpu.save({"w": torch.ones(10) * 2}, tmp_path / "a.mth", base=tmp_path / "a.mth")
    assert (tmp_path / "a.mth").read_bytes() == before
    os.symlink(tmp_path / "a.mth", tmp_path / "link.mth")           # the same file under another name
    os.symlink(tmp_path, tmp_path / "dirlink")
    for base, out in ((tmp_path / "link.mth", tmp_path / "a.mth"), (tmp_path / "a.mth", tmp_path / "dirlink" / "a.mth")):
        with pytest.raises(ValueError, match="against itself"):
            mithril_gpu.save({"w": torch.ones(10) * 2}, out, base=base)
    assert (tmp_path / "a.mth").read_bytes() == before


def test_background_saves_snapshot_the_state_and_keep_order(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with Checkpointer(tmp_path, full_every=3, keep=None) as ck:
        expected = {}
        for step in range(5):
            _train(model, opt, 1, step)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
            expected[step] = _state(model, opt, step)
            fut = ck.save(state, step, blocking=False)
            _train(model, opt, 1, 100 + step)        # training goes on while the save runs
        assert fut.result() == ck.path(4)
    for step in range(5):
        got = mithril_gpu.load(tmp_path / f"step-{step:09d}.mth")
        assert_tree_same(got["model"], {k: v for k, v in expected[step]["master"].items()})
    assert Checkpointer(tmp_path).chain(4) == [4, 3]


def test_background_save_errors_surface_on_the_next_call(tmp_path):
    class Bad:
        pass

    ck = Checkpointer(tmp_path, full_every=2, keep=None)
    ck.save({"w": torch.ones(3), "c": CONST}, 0)
    with pytest.raises(mithril_gpu.UnsupportedValueError):    # refused at once, while snapshotting
        ck.save({"w": torch.ones(3), "x": Bad()}, 1, blocking=False)
    ck.save_kwargs["level"] = 99                               # fails inside the background writer
    fut = ck.save({"w": torch.ones(3)}, 1, blocking=False)
    with pytest.raises(ValueError, match="level"):
        ck.wait()
    assert fut.done() and ck.steps() == [0]
    del ck.save_kwargs["level"]
    ck.save({"w": torch.ones(3) * 2, "c": CONST}, 2)           # and it goes on working
    assert ck.latest()["w"].tolist() == [2.0, 2.0, 2.0] and ck.chain(2) == [2, 0]
    ck.close()


def test_a_file_records_a_base_only_if_it_uses_it(tmp_path):
    mithril_gpu.save({"other": torch.randn(500)}, tmp_path / "unrelated.mth")
    state = {"w": torch.randn(1000), "b": torch.randn(10)}
    import warnings
    with warnings.catch_warnings(record=True) as notes:     # one note, not two
        warnings.simplefilter("always")
        mithril_gpu.save(state, tmp_path / "d.mth", base=tmp_path / "unrelated.mth")
    assert [str(n.message)[:60] for n in notes] == ["mithril: no tensor has one of the same name, dtype and shape"]
    with mithril_gpu.open(tmp_path / "d.mth") as f:
        assert f.index.base is None
    os.remove(tmp_path / "unrelated.mth")                  # the file never needed it
    assert_same(mithril_gpu.load(tmp_path / "d.mth")["w"], state["w"])
    # a base that matches a small part: still used for that part, with a note
    mithril_gpu.save({"b": state["b"]}, tmp_path / "small.mth")
    with pytest.warns(mithril_gpu.writer.BaseNote, match="only 1% of the bytes"):
        mithril_gpu.save(state, tmp_path / "d2.mth", base=tmp_path / "small.mth")
    with mithril_gpu.open(tmp_path / "d2.mth") as f:
        assert f.index.base is not None and f.entry("b").delta == {"op": "same", "base": "b"}


def test_bases_decode_in_place(tmp_path, monkeypatch):
    """A delta entry's base tensor is decoded into the entry's own output and the delta applied
    over it there, at every level of a chain, into fresh tensors and into ``into``: no buffer is
    allocated for a base."""
    from mithril_gpu import reader

    g = torch.Generator().manual_seed(3)
    a = torch.randn(20_000, generator=g).to(torch.bfloat16)
    s0 = {"a": a, "b": a.clone(), "c": torch.arange(1000.0)}
    s1 = {"a": a + (torch.randn(20_000, generator=g) * 1e-2).to(torch.bfloat16),
          "b": a + (torch.randn(20_000, generator=g) * 1e-2).to(torch.bfloat16), "c": s0["c"]}
    s2 = {k: v + 1e-3 if k != "c" else v for k, v in s1.items()}
    mithril_gpu.save(s0, tmp_path / "s0.mth")
    mithril_gpu.save(s1, tmp_path / "s1.mth", base=tmp_path / "s0.mth")
    mithril_gpu.save(s2, tmp_path / "s2.mth", base=tmp_path / "s1.mth")
    allocs = []
    real = reader._alloc
    monkeypatch.setattr(reader, "_alloc", lambda e: allocs.append(e.name) or real(e))
    assert_tree_same(mithril_gpu.load(tmp_path / "s2.mth"), s2)
    into = {k: torch.zeros_like(v) for k, v in s2.items()}
    mithril_gpu.load(tmp_path / "s2.mth", into=into)
    assert_tree_same(into, s2)
    with mithril_gpu.open(tmp_path / "s2.mth") as f:
        assert f.info("c")["delta"] == "same" and f.info("a")["delta"] in ("xor", "zigzag")
        assert_same(f.get_tensor("b"), s2["b"])
    assert allocs == []
    with mithril_gpu.open(tmp_path / "s2.mth") as f:          # one entry asked for twice: its base apart
        e = f.entry("a")
        o1, o2 = np.empty(e.nbytes, np.uint8), np.empty(e.nbytes, np.uint8)
        f.decode_into([e, e], [o1, o2])
        want = s2["a"].view(torch.uint8).numpy().tobytes()
        assert o1.tobytes() == want and o2.tobytes() == want


def test_a_delta_whose_chain_holds_the_file_being_replaced_is_refused(tmp_path):
    # a full, b against a, then a against b: b's chain holds a, which the save replaces; it used to
    # return normally and leave neither file loadable
    w = torch.randn(5000)
    mithril_gpu.save({"w": w}, tmp_path / "a.mth")
    mithril_gpu.save({"w": w + 1e-3}, tmp_path / "b.mth", base=tmp_path / "a.mth")
    before = (tmp_path / "a.mth").read_bytes()
    with pytest.raises(ValueError, match="chain of bases holds the file being replaced"):
        mithril_gpu.save({"w": w + 2e-3}, tmp_path / "a.mth", base=tmp_path / "b.mth")
    assert (tmp_path / "a.mth").read_bytes() == before
    assert torch.equal(mithril_gpu.load(tmp_path / "b.mth")["w"], w + 1e-3)


def test_a_delta_past_the_longest_chain_a_reader_follows_is_saved_whole(tmp_path, monkeypatch):
    # a chain of MAX_CHAIN + 1 files is the longest a reader follows: a delta against its newest
    # file used to be written, and no load could read it ("chain is longer than 64 files")
    from mithril_gpu import deltaplan, reader
    monkeypatch.setattr(reader, "MAX_CHAIN", 3)
    monkeypatch.setattr(mithril_gpu.api, "MAX_CHAIN", 3)
    monkeypatch.setattr(deltaplan, "DELTA_MIN_GAIN", 0.0)
    w = torch.randn(5000)
    mithril_gpu.save({"w": w}, tmp_path / "s0.mth")
    for k in range(1, 6):
        w[k] += 1
        p = tmp_path / f"s{k}.mth"
        if k != 4:                   # s3 ends a chain of 4 files: s4 is saved whole, s5 against it
            mithril_gpu.save({"w": w}, p, base=tmp_path / f"s{k - 1}.mth")
        else:
            with pytest.warns(mithril_gpu.writer.BaseNote, match="saved whole"):
                mithril_gpu.save({"w": w}, p, base=tmp_path / f"s{k - 1}.mth")
        assert torch.equal(mithril_gpu.load(p)["w"], w)
        with mithril_gpu.open(p) as f:
            assert (f.index.base is None) == (k == 4)


def test_base_may_be_a_bytes_path(tmp_path):
    # as load(base=) and open() take: save(base=b"...") raised a raw TypeError
    w = torch.randn(5000)
    mithril_gpu.save({"w": w}, tmp_path / "a.mth")
    mithril_gpu.save({"w": w + 1e-3}, tmp_path / "b.mth", base=os.fsencode(tmp_path / "a.mth"))
    assert torch.equal(mithril_gpu.load(tmp_path / "b.mth")["w"], w + 1e-3)
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        assert f.index.base is not None


def test_bases_through_bytes_paths_open_files_and_symlinked_folders(tmp_path):
    w = torch.randn(5000)
    mithril_gpu.save({"w": w}, tmp_path / "s0.mth")
    mithril_gpu.save({"w": w + 1e-3}, tmp_path / "s1.mth", base=tmp_path / "s0.mth")
    mithril_gpu.save({"w": w + 2e-3}, tmp_path / "s2.mth", base=tmp_path / "s1.mth")
    # a bytes path to a delta: its recorded (str) base path is joined to it (a raw TypeError)
    assert torch.equal(mithril_gpu.load(os.fsencode(tmp_path / "s2.mth"))["w"], w + 2e-3)
    with mithril_gpu.open(os.fsencode(tmp_path / "s2.mth")) as f:
        assert torch.equal(f.get_tensor("w"), w + 2e-3)
    # an open MthFile given as base= stays open: the caller's to close (load closed it)
    base = mithril_gpu.open(tmp_path / "s1.mth")
    assert torch.equal(mithril_gpu.load(tmp_path / "s2.mth", base=base)["w"], w + 2e-3)
    assert not base.closed and torch.equal(base.get_tensor("w"), w + 1e-3)
    base.close()
    # a delta written into a symlinked folder at another depth: its base path is recorded from the
    # real folder, so it loads by the link and by the real path (it loaded by neither)
    os.makedirs(tmp_path / "real" / "deeper" / "ck")
    os.symlink(tmp_path / "real" / "deeper" / "ck", tmp_path / "ck")
    mithril_gpu.save({"w": w + 3e-3}, tmp_path / "ck" / "s3.mth", base=tmp_path / "s2.mth")
    for p in (tmp_path / "ck" / "s3.mth", tmp_path / "real" / "deeper" / "ck" / "s3.mth"):
        assert torch.equal(mithril_gpu.load(p)["w"], w + 3e-3)


def test_a_delta_reached_through_a_linked_file_finds_its_base(tmp_path):
    # the Hugging Face cache: snapshots/<rev>/x.mth -> ../../blobs/<sha>; the base is found from
    # the folder the link is in
    w = torch.randn(5000)
    os.makedirs(tmp_path / "blobs")
    os.makedirs(tmp_path / "snap")
    mithril_gpu.save({"w": w}, tmp_path / "snap" / "base.mth")
    mithril_gpu.save({"w": w + 1e-3}, tmp_path / "blobs" / "abc", base=tmp_path / "snap" / "base.mth")
    # written in blobs/ against ../snap/base.mth; also reachable as a link in snap/
    os.symlink(tmp_path / "blobs" / "abc", tmp_path / "snap" / "delta.mth")
    assert torch.equal(mithril_gpu.load(tmp_path / "snap" / "delta.mth")["w"], w + 1e-3)
    # and a file written in snap/ against base.mth, then moved to blobs/ and linked back
    mithril_gpu.save({"w": w + 2e-3}, tmp_path / "snap" / "d2.mth", base=tmp_path / "snap" / "base.mth")
    os.rename(tmp_path / "snap" / "d2.mth", tmp_path / "blobs" / "def")
    os.symlink(tmp_path / "blobs" / "def", tmp_path / "snap" / "d2.mth")
    assert torch.equal(mithril_gpu.load(tmp_path / "snap" / "d2.mth")["w"], w + 2e-3)
