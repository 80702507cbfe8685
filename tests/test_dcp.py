"""PyTorch Distributed Checkpoint storage (mithril_gpu.dcp): FSDP2 on gloo, CPU only.

The multi-process scenarios run in ``tests/dcp_worker.py`` (torch.multiprocessing.spawn), once per
module: 2 ranks save (sync, async, delta, stock) and load back, a damaged rank file, killed saves,
then loads on 1 and 3 ranks. Each check leaves a marker file, so each test below says which one
failed.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import ROOT, assert_same, subprocess_env

torch_dist = pytest.importorskip("torch.distributed")
if not torch_dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from mithril_gpu import dcp  # noqa: E402
from mithril_gpu.errors import (BaseMismatchError, CorruptFileError, MithrilError,  # noqa: E402
                                UnsupportedValueError)

WORKER = os.path.join(ROOT, "tests", "dcp_worker.py")


def _run(mode, root, timeout=120):
    p = subprocess.run([sys.executable, WORKER, mode, str(root)], env=subprocess_env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stdout + p.stderr)[-6000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run every scenario once; returns (root, {mode: (rc, output)}, facts)."""
    root = tmp_path_factory.mktemp("dcp")
    out, facts = {}, {}
    out["save"] = _run("save", root)
    if os.path.exists(root / "m1" / dcp.METADATA_NAME):
        shutil.copytree(root / "m1", root / "ow")          # overwritten in place by a killed save
        facts["ow_before"] = {n: (root / "ow" / n).read_bytes() for n in os.listdir(root / "ow")}
    out["kill"] = _run("kill", root)
    out["load1"] = _run("load1", root)
    out["load3"] = _run("load3", root)
    return root, out, facts


def _ok(run, *names, mode):
    root, out, _ = run
    missing = [n for n in names if not (root / f"ok_{n}").exists()]
    assert not missing, f"{missing} failed; {mode} exited {out[mode][0]}:\n{out[mode][1]}"


def test_save_sync_loads_bit_exact_and_matches_stock(run):
    _ok(run, "save_sync", "load_sync", mode="save")
    root = run[0]
    d = json.loads((root / "m1" / dcp.METADATA_NAME).read_text())
    assert d["format"] == "mithril-dcp" and len(d["files"]) == 2
    kinds = {e["kind"] for e in d["entries"]}
    assert kinds == {"tensor", "bytes"}
    shard1 = next(e for e in d["entries"] if e["fqn"] == "extra.shard1")
    assert [c["offsets"] for c in shard1["chunks"]] == [[0, 0], [0, 5]]          # Shard(1)


def test_async_save(run):
    _ok(run, "save_async", "load_async", mode="save")


def test_delta_against_previous_checkpoint(run):
    _ok(run, "load_delta", mode="save")
    root = run[0]
    d = json.loads((root / "m2" / dcp.METADATA_NAME).read_text())
    assert d["base"] == "../m1"
    full = sum(os.path.getsize(root / "a2" / n) for n in os.listdir(root / "a2") if n.endswith(".mth"))
    delta = sum(os.path.getsize(root / "m2" / n) for n in os.listdir(root / "m2") if n.endswith(".mth"))
    assert delta < full


def test_reshard_2_to_1(run):
    _ok(run, "reshard1", mode="load1")


def test_reshard_2_to_3(run):
    _ok(run, "reshard3", mode="load3")


def test_damaged_rank_file_gives_typed_error(run):
    _ok(run, "damaged", mode="save")
    text = (run[0] / "damaged_1.txt").read_text()
    assert text.startswith(("ChecksumMismatchError", "CorruptFileError")) and "__1_" in text, text


def test_killed_save_commits_nothing_and_previous_loads(run):
    root, out, facts = run
    _ok(run, "killed", mode="kill")
    assert not (root / "k" / dcp.METADATA_NAME).exists()               # a fresh directory: nothing committed
    with pytest.raises(dcp.IncompleteCheckpointError):
        dcp.read_json_metadata(root / "k")
    before = facts["ow_before"]                                       # in place: the old commit still stands
    for name, data in before.items():
        assert (root / "ow" / name).read_bytes() == data, name
    _ok(run, "reshard1", mode="load1")                                 # ... and loads bit-exact (worker checks)


def test_writer_and_reader_pickle(tmp_path):
    w = dcp.MithrilWriter(tmp_path / "a", base=tmp_path / "b", level=3, threads=2)
    w2 = pickle.loads(pickle.dumps(w))
    assert type(w2) is dcp.MithrilWriter and vars(w2) == vars(w)
    assert all(isinstance(v, (str, int, bool, type(None))) for v in vars(w).values())   # no files, threads
    r = dcp.MithrilReader(tmp_path / "a")
    assert pickle.loads(pickle.dumps(r)).path == r.path


def _flat_state(metadata):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: torch.zeros(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _load_single(path, reader):
    import torch.distributed.checkpoint as dcp_

    r = reader(str(path))
    state = _flat_state(r.read_metadata())
    r.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.load(state, storage_reader=r, no_dist=True)
    return state


def test_cli_compress_decompress_info(run, tmp_path, capsys):
    from torch.distributed.checkpoint import FileSystemReader

    from mithril_gpu.cli import main

    root = run[0]
    if not (root / "stock" / ".metadata").exists():
        pytest.fail("the stock checkpoint was not written: " + run[1]["save"][1])
    shutil.copytree(root / "stock", tmp_path / "in")
    (tmp_path / "in" / "meta.pt").write_bytes(b"other files (Lightning's meta.pt) are copied as they are")
    assert main(["compress", str(tmp_path / "in"), str(tmp_path / "c")]) == 0
    assert "compressed DCP checkpoint" in capsys.readouterr().out
    want = _load_single(root / "stock", FileSystemReader)
    got = _load_single(tmp_path / "c", dcp.MithrilReader)
    assert want.keys() == got.keys() and len(want) > 10
    for k in want:                                      # whole tensors, on one process: 2 -> 1 boxes
        assert_same(want[k], got[k])
    assert main(["info", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "mithril DCP checkpoint, 2 ranks" in text and "22 tensors" in text
    assert main(["decompress", str(tmp_path / "c"), str(tmp_path / "s")]) == 0
    for name in os.listdir(root / "stock"):            # the data files come back byte for byte
        if name.endswith(".distcp"):
            assert (tmp_path / "s" / name).read_bytes() == (root / "stock" / name).read_bytes(), name
    assert (tmp_path / "s" / "meta.pt").read_bytes() == (tmp_path / "in" / "meta.pt").read_bytes()
    assert (tmp_path / "c" / "meta.pt").exists()
    back = _load_single(tmp_path / "s", FileSystemReader)
    for k in want:
        assert_same(want[k], back[k])
    assert main(["compress", str(root / "stock"), str(tmp_path / "c")]) == 1         # OUT exists, no -f
    assert "exists" in capsys.readouterr().err
    assert main(["compress", str(root / "m1"), str(tmp_path / "z")]) == 1
    assert "already a mithril DCP checkpoint" in capsys.readouterr().err
    assert main(["decompress", str(root / "stock"), str(tmp_path / "z")]) == 1
    assert "stock DCP checkpoint" in capsys.readouterr().err
    assert main(["info", str(root / "stock")]) == 0
    assert "stock (FileSystemWriter) DCP checkpoint, 2 ranks" in capsys.readouterr().out
    # a delta conversion against a mithril checkpoint of the same run
    assert main(["compress", str(root / "stock"), str(tmp_path / "d"), "--base", str(root / "m1"), "-q"]) == 0
    got = _load_single(tmp_path / "d", dcp.MithrilReader)
    for k in want:
        assert_same(want[k], got[k])


def test_stock_metadata_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ".metadata").write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(UnsupportedValueError, match="refusing to unpickle"):
        dcp.load_stock_metadata(tmp_path / "x")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "x" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CorruptFileError):
        dcp.load_stock_metadata(tmp_path / "x")


def test_metadata_json_damage_is_typed(run, tmp_path):
    root = run[0]
    if not (root / "m1" / dcp.METADATA_NAME).exists():
        pytest.fail("m1 was not written")
    shutil.copytree(root / "m1", tmp_path / "m")
    p = tmp_path / "m" / dcp.METADATA_NAME
    d = json.loads(p.read_text())
    cases = [b"{not json", json.dumps({**d, "format": "x"}).encode(),
             json.dumps({**d, "files": {"../etc": {"xxh64": "0"}}}).encode(),
             json.dumps({**d, "entries": [{**d["entries"][0], "dtype": "os.system"}]}).encode(),
             json.dumps({**d, "entries": [{**d["entries"][0], "size": [1]}]}).encode()]
    for raw in cases:
        p.write_bytes(raw)
        with pytest.raises(MithrilError):
            dcp.MithrilReader(tmp_path / "m").read_metadata()
    p.write_bytes(json.dumps(d).encode())
    assert dcp.MithrilReader(tmp_path / "m").read_metadata().state_dict_metadata


def test_single_process_and_mixed_or_missing_rank_files(run, tmp_path):
    """No process group (no_dist): save and load; a rank file from another save, or none, is a typed error."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.api import CheckpointException

    state = {"w": torch.randn(40, 24).to(torch.bfloat16), "b": torch.arange(7), "step": 3, "s": "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save(state, storage_writer=dcp.MithrilWriter(tmp_path / "one"), no_dist=True)
        back = {"w": torch.zeros(40, 24, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.int64), "step": 0,
                "s": ""}
        dcp_.load(back, storage_reader=dcp.MithrilReader(tmp_path / "one"), no_dist=True)
    assert_same(back["w"], state["w"])
    assert_same(back["b"], state["b"])
    assert back["step"] == 3 and back["s"] == "x"

    root = run[0]
    if not (root / "m2" / dcp.METADATA_NAME).exists():
        pytest.fail("m2 was not written")
    shutil.copytree(root / "m1", tmp_path / "mix")
    mine = next(n for n in os.listdir(tmp_path / "mix") if n.startswith("__0_"))
    other = next(n for n in os.listdir(root / "a2") if n.startswith("__0_"))
    shutil.copy(root / "a2" / other, tmp_path / "mix" / mine)          # a file of another save, same name
    with pytest.raises(CheckpointException) as ei:
        _load_single(tmp_path / "mix", dcp.MithrilReader)
    errs = [e for e, _ in ei.value.failures.values()]
    assert any(isinstance(e, BaseMismatchError) and "mixes files of two saves" in str(e) for e in errs), errs
    os.unlink(tmp_path / "mix" / mine)
    with pytest.raises(CheckpointException) as ei:
        _load_single(tmp_path / "mix", dcp.MithrilReader)
    errs = [e for e, _ in ei.value.failures.values()]
    assert any(isinstance(e, dcp.IncompleteCheckpointError) for e in errs), errs


@pytest.mark.skipif(os.environ.get("MITHRIL_DCP_PROCESS") != "1",
                    reason="opt-in (MITHRIL_DCP_PROCESS=1): ~8 s more and a local TCP port")
def test_async_save_process_mode(tmp_path):
    """dcp.async_save(async_checkpointer_type=PROCESS) pickles the writer into DCP's checkpoint process."""
    rc, out = _run("process", tmp_path)
    assert rc == 0 and (tmp_path / "ok_process_mode").exists(), out


def test_compress_reads_the_zstandard_extension(tmp_path):
    """A stock checkpoint written with FileSystemWriter's ZStandard extension converts too."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    state = {"w": (0.02 * torch.randn(64, 48)).to(torch.bfloat16), "m": torch.randn(64, 48), "step": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save(state, storage_writer=FileSystemWriter(str(tmp_path / "z"), _extensions=[ZStandard()]),
                  no_dist=True)
    dcp.compress_dir(tmp_path / "z", tmp_path / "c")
    got = _load_single(tmp_path / "c", dcp.MithrilReader)
    assert_same(got["w"], state["w"])
    assert_same(got["m"], state["m"])


def test_earlier_rank_files_are_removed_after_a_commit_big_ones_off_the_critical_path(tmp_path, monkeypatch):
    import threading

    from mithril_gpu import writer

    keep, small, big, other = "__0_0123abcd.mth", "__1_0123abcd.mth", "__0_89abcdef.mth", "notes.txt"
    for name in (keep, small, other):
        (tmp_path / name).write_bytes(b"x" * 100)
    with open(tmp_path / big, "wb") as fh:          # sparse: big by size, cheap to make
        fh.truncate(writer.OLD_FILE_BYTES)
    held, fds = threading.Event(), []
    real = writer._free_old

    def slow_free(fd):                # hold the background close until the test has looked
        fds.append(fd)
        held.wait(5)
        real(fd)
    monkeypatch.setattr(writer, "_free_old", slow_free)
    dcp._remove_unlisted(str(tmp_path), {keep: {}})
    assert sorted(os.listdir(tmp_path)) == sorted([keep, other])          # every name gone at once
    assert len(writer._old_fds) == 1                                      # the big one still open
    held.set()
    for t in threading.enumerate():
        if t.name == "mithril-free-old":
            t.join(5)
    assert fds and not writer._old_fds


def test_a_save_releases_the_cache_of_its_own_ranks_earlier_files_only(tmp_path, monkeypatch):
    """The rank files a save replaces give their cached pages up as it starts (writer.release_cache),
    never another rank's, never the base's, and they stay loadable until the commit."""
    import torch.distributed.checkpoint as dcp_

    from mithril_gpu import writer

    released = []
    monkeypatch.setattr(writer, "release_cache", lambda paths: released.append(
        sorted(os.path.basename(p) for p in paths if os.path.exists(p))))        # (as it does: what is there)
    state = {"w": torch.randn(40, 24).to(torch.bfloat16), "step": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save(state, storage_writer=dcp.MithrilWriter(tmp_path / "c"), no_dist=True)
        first = sorted(n for n in os.listdir(tmp_path / "c") if n.endswith(".mth"))
        (tmp_path / "c" / "__1_0123abcd.mth").write_bytes(b"x")        # another rank's (a bigger world)
        released.clear()
        dcp_.save(state, storage_writer=dcp.MithrilWriter(tmp_path / "c"), no_dist=True)
        assert [r for r in released if r and r[0].startswith("__")] == [first]
        released.clear()
        dcp_.save(state, storage_writer=dcp.MithrilWriter(tmp_path / "d", base=tmp_path / "c"), no_dist=True)
        assert not any(r and r[0].startswith("__") for r in released)   # a new directory: nothing; the base: never
        back = {"w": torch.zeros(40, 24, dtype=torch.bfloat16), "step": 0}
        dcp_.load(back, storage_reader=dcp.MithrilReader(tmp_path / "d"), no_dist=True)
    assert_same(back["w"], state["w"])


def test_base_that_is_the_checkpoint_itself_through_a_link_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.api import CheckpointException

    state = {"w": torch.randn(40, 24).to(torch.bfloat16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save(state, storage_writer=dcp.MithrilWriter(tmp_path / "c"), no_dist=True)
        os.symlink(tmp_path / "c", tmp_path / "link")
        before = sorted(os.listdir(tmp_path / "c"))
        with pytest.raises(CheckpointException) as ei:
            dcp_.save(state, storage_writer=dcp.MithrilWriter(tmp_path / "c", base=tmp_path / "link"), no_dist=True)
        errs = [e for e, _ in ei.value.failures.values()]
        assert any("earlier checkpoint directory" in str(e) for e in errs), errs
        assert sorted(os.listdir(tmp_path / "c")) == before
        back = {"w": torch.zeros(40, 24, dtype=torch.bfloat16)}
        dcp_.load(back, storage_reader=dcp.MithrilReader(tmp_path / "c"), no_dist=True)
    assert_same(back["w"], state["w"])


def test_two_slots_saved_in_turn_against_each_other_are_refused(tmp_path):
    """slot0 full, slot1 against slot0, then slot0 against slot1: slot1's chain holds slot0 itself,
    whose files the save removes. It used to return normally and leave neither loadable."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.api import CheckpointException

    w = torch.randn(40, 24).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"w": w}, storage_writer=dcp.MithrilWriter(tmp_path / "s0"), no_dist=True)
        dcp_.save({"w": w + 1}, storage_writer=dcp.MithrilWriter(tmp_path / "s1", base=tmp_path / "s0"), no_dist=True)
        before = sorted(os.listdir(tmp_path / "s0"))
        with pytest.raises(CheckpointException) as ei:
            dcp_.save({"w": w + 2}, storage_writer=dcp.MithrilWriter(tmp_path / "s0", base=tmp_path / "s1"),
                      no_dist=True)
        errs = [e for e, _ in ei.value.failures.values()]
        assert any("chain of bases holds" in str(e) for e in errs), errs
        assert sorted(os.listdir(tmp_path / "s0")) == before
        for d, want in (("s0", w), ("s1", w + 1)):
            back = {"w": torch.zeros(40, 24, dtype=torch.bfloat16)}
            dcp_.load(back, storage_reader=dcp.MithrilReader(tmp_path / d), no_dist=True)
            assert_same(back["w"], want)


def _one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    return dist


def test_a_shard_name_never_takes_another_fqns_and_a_cast_load_works(tmp_path):
    """A rank holding two shards of "w" names them "w@<offsets>": an fqn spelled "w@0,0" used to
    take the first shard's place in the rank file, silently. And loading into tensors of another
    dtype (bf16 saved, fp32 parameters) casts as stock DCP does; it was refused as a damaged file."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards

    dist = _one_rank_group(tmp_path)
    try:
        def state(fill=None):
            full = torch.arange(24, dtype=torch.float32).reshape(8, 3)
            shards = [STShard(full[o:o + 4].clone() if fill is None else torch.full((4, 3), fill),
                              ShardMetadata([o, 0], [4, 3], "rank:0/cpu")) for o in (0, 4)]
            return {"w": init_from_local_shards(shards, [8, 3]),
                    "w@0,0": torch.full((4, 3), -7.0) if fill is None else torch.full((4, 3), fill),
                    "b": torch.arange(6.0).to(torch.bfloat16)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_.save(state(), storage_writer=dcp.MithrilWriter(tmp_path / "c"))
            back = state(fill=0.0)
            back["b"] = torch.zeros(6, dtype=torch.float32)
            dcp_.load(back, storage_reader=dcp.MithrilReader(tmp_path / "c"))
        assert back["w"].local_shards()[0].tensor.flatten().tolist() == list(range(12))
        assert back["w"].local_shards()[1].tensor.flatten().tolist() == list(range(12, 24))
        assert back["w@0,0"].flatten().tolist() == [-7.0] * 12
        assert back["b"].dtype == torch.float32 and back["b"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    finally:
        dist.destroy_process_group()


def test_a_failed_cli_conversion_leaves_no_output_folder(tmp_path, capsys):
    """`mithril compress`/`decompress` of a DCP folder wrote straight into OUT: a damaged rank
    file left a partial OUT (rank files without the metadata that commits them) that the next run
    then refused without -f. OUT now appears whole or not at all."""
    import torch.distributed.checkpoint as dcp_

    from mithril_gpu.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"a": torch.randn(300, 30), "b": torch.randn(40)},
                  storage_writer=dcp_.FileSystemWriter(tmp_path / "stock"), no_dist=True)
    shutil.copytree(tmp_path / "stock", tmp_path / "bad")
    for n in os.listdir(tmp_path / "bad"):
        if n.endswith(".distcp"):
            p = tmp_path / "bad" / n
            os.truncate(p, os.path.getsize(p) // 2)
    assert main(["compress", str(tmp_path / "bad"), str(tmp_path / "c")]) == 1
    assert main(["compress", str(tmp_path / "stock"), str(tmp_path / "good")]) == 0
    shutil.copytree(tmp_path / "good", tmp_path / "good_bad")
    for n in os.listdir(tmp_path / "good_bad"):
        if n.endswith(".mth"):
            with open(tmp_path / "good_bad" / n, "r+b") as fh:
                fh.seek(200)
                fh.write(b"\xff" * 64)
    assert main(["decompress", str(tmp_path / "good_bad"), str(tmp_path / "s")]) == 1
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["bad", "good", "good_bad", "stock"]     # no OUT, no hidden sibling


def test_a_save_over_a_stock_checkpoint_removes_it(tmp_path):
    # its .metadata and .distcp files stayed, and dcp.load(checkpoint_id=D) went on loading the old
    # step silently
    import torch.distributed.checkpoint as dcp_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"w": torch.zeros(50)}, storage_writer=dcp_.FileSystemWriter(tmp_path / "c"), no_dist=True)
        dcp_.save({"w": torch.ones(50)}, storage_writer=dcp.MithrilWriter(tmp_path / "c"), no_dist=True)
        left = sorted(os.listdir(tmp_path / "c"))
        assert ".metadata" not in left and not any(n.endswith(".distcp") for n in left), left
        back = {"w": torch.zeros(50)}
        dcp_.load(back, storage_reader=dcp.MithrilReader(tmp_path / "c"), no_dist=True)
    assert back["w"].tolist() == [1.0] * 50


def test_overwrite_false_refuses_a_stock_checkpoint_and_cli_f_leaves_no_other_commit(tmp_path):
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.api import CheckpointException

    from mithril_gpu.cli import main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"w": torch.zeros(50)}, storage_writer=dcp_.FileSystemWriter(tmp_path / "c"), no_dist=True)
        with pytest.raises(CheckpointException):       # (it went ahead, and then removed the stock one)
            dcp_.save({"w": torch.ones(50)}, storage_writer=dcp.MithrilWriter(tmp_path / "c", overwrite=False),
                      no_dist=True)
        assert sorted(os.listdir(tmp_path / "c")) == [".metadata", "__0_0.distcp"]
        dcp_.save({"w": torch.ones(50)}, storage_writer=dcp_.FileSystemWriter(tmp_path / "new"), no_dist=True)
        # `mithril compress new c -f`: c's stock commit used to stay beside the new one
        assert main(["compress", str(tmp_path / "new"), str(tmp_path / "c"), "-f", "-q"]) == 0
        left = sorted(os.listdir(tmp_path / "c"))
        assert ".metadata" not in left and not any(n.endswith(".distcp") for n in left), left


class _Marker:
    """A pickle that would write a file if it were ever unpickled without weights_only."""
    path = ""

    def __reduce__(self):
        return (open, (_Marker.path, "w"))


class _Plain:
    def __init__(self, v=0):
        self.v = v


def test_a_pickled_value_runs_nothing_at_load(tmp_path):
    """DCP's planner unpickles BYTE_IO values with weights_only=False: a rank file whose value is a
    hostile pickle would run it. MithrilReader unpickles each with weights_only=True first and
    refuses what needs more; a class the caller allows (add_safe_globals) loads."""
    import io

    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.api import CheckpointException

    import mithril_gpu
    from mithril_gpu.reader import MthFile

    d = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"w": torch.ones(4), "step": 7, "obj": _Plain(5)}, storage_writer=dcp.MithrilWriter(d), no_dist=True)
    meta = json.loads((d / dcp.METADATA_NAME).read_text())
    fname = next(iter(meta["files"]))
    with MthFile(d / fname) as f:
        state = {n: f.get_tensor(n) for n in f.keys()}
    objs = [e["name"] for e in meta["entries"] if e["kind"] == "bytes"]
    obj_name = next(n for n in objs if n.startswith("obj"))

    def load(into):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_.load(into, storage_reader=dcp.MithrilReader(d), no_dist=True)
        return into

    with pytest.raises(CheckpointException) as ei:              # a custom class: not on the allow-list
        load({"w": torch.zeros(4), "step": 0, "obj": None})
    errs = [e for e, _ in ei.value.failures.values()]
    assert any(isinstance(e, UnsupportedValueError) and "add_safe_globals" in str(e) for e in errs), errs
    with torch.serialization.safe_globals([_Plain]):
        back = load({"w": torch.zeros(4), "step": 0, "obj": None})
    assert back["step"] == 7 and back["obj"].v == 5

    _Marker.path = str(tmp_path / "RAN")
    buf = io.BytesIO()
    torch.save(_Marker(), buf)
    state[obj_name] = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    os.remove(d / fname)
    mithril_gpu.save(state, d / fname)
    with MthFile(d / fname) as f:
        meta["files"][fname]["xxh64"] = f.identity
    (d / dcp.METADATA_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointException) as ei:
        with torch.serialization.safe_globals([_Plain]):
            load({"w": torch.zeros(4), "step": 0, "obj": None})
    errs = [e for e, _ in ei.value.failures.values()]
    assert any(isinstance(e, UnsupportedValueError) and "nothing in a file is executed" in str(e) for e in errs), errs
    assert not (tmp_path / "RAN").exists()


def test_a_recorded_source_name_other_than_a_stock_file_is_not_used(tmp_path):
    """The rank file's "source" (the stock file it was converted from) names decompress's output:
    a hostile ".metadata" there wrote the rank's data over the commit file (exit 0, an output
    that does not load). Only stock data-file names are taken; any other gets a fresh name."""
    import torch.distributed.checkpoint as dcp_

    d = tmp_path / "m"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"w": torch.arange(12.).reshape(4, 3), "step": 7}, storage_writer=dcp.MithrilWriter(d), no_dist=True)
    meta = json.loads((d / dcp.METADATA_NAME).read_text())
    for rec in meta["files"].values():
        rec["source"] = ".metadata"
    (d / dcp.METADATA_NAME).write_text(json.dumps(meta))
    p = subprocess.run([sys.executable, "-m", "mithril_gpu.cli", "decompress", str(d), str(tmp_path / "out")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    back = {"w": torch.zeros(4, 3), "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.load(back, storage_reader=dcp_.FileSystemReader(tmp_path / "out"), no_dist=True)
    assert torch.equal(back["w"], torch.arange(12.).reshape(4, 3)) and back["step"] == 7


def test_hostile_metadata_gives_typed_errors(tmp_path):
    """Values of the right JSON shape but the wrong types (storage_meta.modules an int, a chunk's
    file a list, ranks of mixed types), and stock .metadata whose records lie (a length past the
    file's end, read as a 2^62-byte allocation; a negative size, written into an unreadable
    checkpoint) gave tracebacks or exit 0. All are CorruptFileError now."""
    import copy
    import dataclasses

    import torch.distributed.checkpoint as dcp_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"w": torch.ones(4, 3), "step": 7}, storage_writer=dcp.MithrilWriter(tmp_path / "m"), no_dist=True)
        dcp_.save({"w": torch.ones(4, 3), "step": 7}, storage_writer=dcp_.FileSystemWriter(tmp_path / "s"),
                  no_dist=True)
    good = json.loads((tmp_path / "m" / dcp.METADATA_NAME).read_text())
    fname = next(iter(good["files"]))

    def modules(d):
        d["storage_meta"] = {"modules": 5}

    def file_list(d):
        for e in d["entries"]:
            for c in e.get("chunks", [e]):
                c["file"] = [1]

    def ranks(d):
        d["files"]["__1_x.mth"] = dict(d["files"][fname])
        d["files"][fname]["rank"] = "x"
    for edit in (modules, file_list, ranks):
        d = copy.deepcopy(good)
        edit(d)
        with pytest.raises(CorruptFileError, match="corrupt DCP metadata"):
            dcp.metadata_from_json(d)

    md = pickle.loads((tmp_path / "s" / ".metadata").read_bytes())
    for what, change in (("length", lambda idx, info: dataclasses.replace(info, length=1 << 62)),
                         ("size", None)):
        m = copy.deepcopy(md)
        if change is not None:
            m.storage_data = {idx: change(idx, info) for idx, info in m.storage_data.items()}
        else:
            w = m.state_dict_metadata["w"]
            m.state_dict_metadata["w"] = dataclasses.replace(w, size=torch.Size([-4, 3]))
        case = tmp_path / f"s_{what}"
        shutil.copytree(tmp_path / "s", case)
        (case / ".metadata").write_bytes(pickle.dumps(m))
        with pytest.raises(CorruptFileError, match="beyond the end|negative size"):
            dcp.info_dir(case)
        with pytest.raises(CorruptFileError, match="beyond the end|negative size"):
            dcp.compress_dir(case, tmp_path / f"out_{what}")


def test_a_commit_that_fails_leaves_no_rank_file_behind(tmp_path, monkeypatch):
    """A disk that fills while mithril_dcp.json is written: the error is typed and the earlier
    checkpoint loads, but the new rank file (as big as the checkpoint) was left, unlisted, keeping
    the disk full until a later save into the folder. It is removed now."""
    import torch.distributed.checkpoint as dcp_

    d = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save({"w": torch.ones(64, 64)}, storage_writer=dcp.MithrilWriter(d), no_dist=True)
        before = sorted(os.listdir(d))

        def full(path, obj):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(dcp, "_write_json_atomic", full)
        from torch.distributed.checkpoint.api import CheckpointException

        with pytest.raises(CheckpointException) as ei:
            dcp_.save({"w": torch.zeros(64, 64)}, storage_writer=dcp.MithrilWriter(d), no_dist=True)
        assert any("No space left" in str(e) for e, _ in ei.value.failures.values())
        monkeypatch.undo()
        assert sorted(os.listdir(d)) == before
        back = {"w": torch.zeros(64, 64)}
        dcp_.load(back, storage_reader=dcp.MithrilReader(d), no_dist=True)
    assert torch.equal(back["w"], torch.ones(64, 64))


def test_an_interrupt_after_the_commit_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A Ctrl-C that lands after mithril_dcp.json was renamed into place (during the folder's
    fsync) must not remove the rank files the new commit names."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.checkpoint.api import CheckpointException

    real = dcp._write_json_atomic

    def committed_then_interrupted(path, obj):
        real(path, obj)
        raise KeyboardInterrupt
    d = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(dcp, "_write_json_atomic", committed_then_interrupted)
        with pytest.raises((KeyboardInterrupt, CheckpointException)):
            dcp_.save({"w": torch.ones(64, 64)}, storage_writer=dcp.MithrilWriter(d), no_dist=True)
        monkeypatch.undo()
        back = {"w": torch.zeros(64, 64)}
        dcp_.load(back, storage_reader=dcp.MithrilReader(d), no_dist=True)
    assert torch.equal(back["w"], torch.ones(64, 64))


def test_plain_values_training_states_hold_load_through_mithril_reader(tmp_path):
    """The weights_only check must not refuse what training states commonly keep as DCP values:
    numpy scalars and RNGs, io.BytesIO, datetime values, paths (stock DCP loads them). (A deque
    is refused: torch's weights_only unpickler extends only lists.)"""
    import datetime
    import io
    import pathlib

    import numpy as np
    import torch.distributed.checkpoint as dcp_

    vals = {"f": np.float64(1.5), "i": np.int64(3), "buf": io.BytesIO(b"abc"), "rs": np.random.RandomState(0),
            "gen": np.random.default_rng(1), "when": datetime.datetime(2020, 1, 2, 3),
            "p": pathlib.PosixPath("/a/b"), "d": datetime.date(2020, 1, 1)}
    d = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_.save(dict(vals), storage_writer=dcp.MithrilWriter(d), no_dist=True)
        back = {k: None for k in vals}
        dcp_.load(back, storage_reader=dcp.MithrilReader(d), no_dist=True)
    assert back["f"] == 1.5 and back["i"] == 3 and back["buf"].getvalue() == b"abc"
    assert back["rs"].randint(1 << 30) == np.random.RandomState(0).randint(1 << 30)
    assert back["gen"].integers(1 << 30) == np.random.default_rng(1).integers(1 << 30)
    assert back["when"] == vals["when"] and back["p"] == vals["p"]
