"""`mithril` conventions: OUT is never replaced without -f, directories in need directories out,
summaries read in the order of the work, outputs keep the input's permission bits, and torch
checkpoints holding numpy arrays round trip."""
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import mithril_gpu
from conftest import FIXTURES, subprocess_env
from mithril_gpu import formats

MINILM = os.path.join(FIXTURES, "minilm_l0_bf16.safetensors")


def run(*args):
    return subprocess.run([sys.executable, "-m", "mithril_gpu.cli", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


def ok(*args):
    p = run(*args)
    assert p.returncode == 0, p.stderr
    return p.stdout


def error(*args) -> str:
    p = run(*args)
    assert p.returncode == 1 and p.stderr.startswith("mithril: error:") and p.stderr.count("\n") == 1, p.stderr
    return p.stderr


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def minilm_mth(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "m.mth"
    ok("compress", MINILM, out)
    return out


# ---------------------------------------------------------------- OUT exists

@pytest.mark.parametrize("cmd", ["compress", "decompress"])
def test_an_existing_out_is_replaced_only_with_force(tmp_path, minilm_mth, cmd):
    src, name = (MINILM, "o.mth") if cmd == "compress" else (minilm_mth, "o.safetensors")
    out = tmp_path / name
    out.write_bytes(b"keep me")
    assert "-f/--force" in error(cmd, src, out)
    assert out.read_bytes() == b"keep me"
    ok(cmd, "-f", src, out)
    assert out.read_bytes() != b"keep me"
    ok(cmd, "--force", src, out)
    if cmd == "decompress":
        assert sha(out) == sha(MINILM)


@pytest.mark.parametrize("cmd", ["compress", "decompress"])
def test_a_directory_where_a_file_is_expected_is_refused_before_any_work(tmp_path, minilm_mth, cmd):
    src = MINILM if cmd == "compress" else minilm_mth
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    for force in ([], ["-f"]):
        assert "is a directory" in error(cmd, *force, src, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["x"]


def _model_dir(root):
    os.makedirs(root / "sub")
    shutil.copy(MINILM, root / "model.safetensors")
    (root / "config.json").write_text("{}")
    (root / "sub" / "notes.txt").write_text("hi")
    return root


def test_an_existing_out_directory_is_written_into_only_with_force(tmp_path):
    model = _model_dir(tmp_path / "model")
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "old.txt").write_text("old")
    assert "-f/--force" in error("compress", model, tmp_path / "packed")
    assert os.listdir(tmp_path / "packed") == ["old.txt"]
    ok("compress", "-f", model, tmp_path / "packed")
    assert sorted(os.listdir(tmp_path / "packed")) == ["config.json", "model.safetensors.mth", "old.txt", "sub"]
    (tmp_path / "restored").mkdir()
    assert "-f/--force" in error("decompress", tmp_path / "packed", tmp_path / "restored")
    ok("decompress", "-f", tmp_path / "packed", tmp_path / "restored")
    assert sha(tmp_path / "restored" / "model.safetensors") == sha(MINILM)


def test_a_folder_without_checkpoints_is_an_error(tmp_path):
    """Before: "compressed 0 checkpoint files ... (infx)", exit 0, and an OUT folder made."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("no weights here")
    assert "no checkpoint files" in error("compress", tmp_path / "docs", tmp_path / "packed")
    assert "no .mth files" in error("decompress", tmp_path / "docs", tmp_path / "restored")
    assert sorted(os.listdir(tmp_path)) == ["docs"]


def test_a_directory_in_needs_a_directory_out(tmp_path):
    """Before: `compress dir out.mth` made a directory named out.mth."""
    model = _model_dir(tmp_path / "model")
    msg = error("compress", model, tmp_path / "out.mth")
    assert "directory" in msg and "out.mth" in msg
    (tmp_path / "file.mth").write_bytes(b"x")
    assert "not" in error("compress", "-f", model, tmp_path / "file.mth")
    assert (tmp_path / "file.mth").read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == ["file.mth", "model"]


def test_a_failed_directory_run_leaves_no_out(tmp_path):
    model = _model_dir(tmp_path / "model")
    (model / "zz-broken.safetensors").write_bytes(open(MINILM, "rb").read()[:-100])
    error("compress", model, tmp_path / "packed")
    assert sorted(os.listdir(tmp_path)) == ["model"]


# ---------------------------------------------------------------- summaries and modes

def _sizes(line: str) -> tuple[float, float]:
    a, b = re.search(r": ([\d,.]+) MB -> ([\d,.]+) MB", line).groups()
    return float(a.replace(",", "")), float(b.replace(",", ""))


def test_summaries_read_in_the_order_of_the_work(tmp_path, minilm_mth):
    """compress: big -> small; decompress: small -> big (before: decompress printed big -> small)."""
    c = ok("compress", MINILM, tmp_path / "m.mth")
    d = ok("decompress", minilm_mth, tmp_path / "m.safetensors")
    assert _sizes(c)[0] > _sizes(c)[1] and _sizes(d)[0] < _sizes(d)[1]
    assert _sizes(c) == _sizes(d)[::-1]
    model = _model_dir(tmp_path / "model")
    ok("compress", model, tmp_path / "packed")
    line = ok("decompress", tmp_path / "packed", tmp_path / "restored").strip().splitlines()[-1]
    assert _sizes(line)[0] < _sizes(line)[1]


def test_tiny_files_report_no_zero_speed(tmp_path):
    """Before: "... in 0.31 s, 0 MB/s" for a few bytes (start-up, not throughput)."""
    mithril_gpu.save({"w": torch.ones(4)}, tmp_path / "t.mth")
    torch.save({"w": torch.ones(4)}, tmp_path / "t.pt")
    for line in (ok("compress", tmp_path / "t.pt", tmp_path / "t2.mth"),
                 ok("decompress", tmp_path / "t.mth", tmp_path / "t.safetensors"),
                 ok("verify", tmp_path / "t.mth")):
        assert " 0 MB/s" not in line and "0.0 MB/s" not in line, line


@pytest.mark.parametrize("mode", [0o710])      # x bits (never set by default) and none for others
def test_outputs_keep_the_input_permission_bits(tmp_path, mode):
    """As zstd and gzip do (before: 0666 minus the umask, whatever the input's bits)."""
    shutil.copy(MINILM, tmp_path / "in.safetensors")
    os.chmod(tmp_path / "in.safetensors", mode)
    ok("compress", tmp_path / "in.safetensors", tmp_path / "m.mth")
    assert stat.S_IMODE(os.stat(tmp_path / "m.mth").st_mode) == mode
    for out in ("back.safetensors", "back.pt"):
        ok("decompress", tmp_path / "m.mth", tmp_path / out)
        assert stat.S_IMODE(os.stat(tmp_path / out).st_mode) == mode


# ---------------------------------------------------------------- numpy arrays in torch checkpoints

def test_torch_checkpoints_with_numpy_arrays_round_trip(tmp_path):
    """RNG states and other numeric numpy arrays: before, torch.load(weights_only=True) refused the
    file ("Unsupported global ... _reconstruct")."""
    ckpt = {"model": {"w": torch.randn(8, 8)}, "step": 3,
            "rng": {"numpy": np.random.RandomState(1).get_state(), "torch": torch.get_rng_state()},
            "stats": {"be": np.arange(6, dtype=">f4").reshape(2, 3), "u16": np.arange(5, dtype=np.uint16),
                      "flags": np.array([True, False]), "scalar": np.array(2.5)}}
    torch.save(ckpt, tmp_path / "c.pt")
    ok("compress", tmp_path / "c.pt", tmp_path / "c.mth")
    back = mithril_gpu.load(tmp_path / "c.mth")
    ok("decompress", tmp_path / "c.mth", tmp_path / "back.pt")
    again = formats.load_torch(tmp_path / "back.pt")
    src = formats.load_torch(tmp_path / "c.pt")       # (pickle gives big-endian arrays back native)
    for got in (back, again):
        for k, a in src["stats"].items():
            assert type(got["stats"][k]) is np.ndarray and got["stats"][k].dtype.str == a.dtype.str
            assert got["stats"][k].shape == a.shape and got["stats"][k].tobytes() == a.tobytes()
            assert np.array_equal(got["stats"][k], ckpt["stats"][k])
        state = got["rng"]["numpy"]
        assert state[0] == "MT19937" and np.array_equal(state[1], ckpt["rng"]["numpy"][1]) and state[2:] == (624, 0, 0.0)
        assert torch.equal(got["model"]["w"], ckpt["model"]["w"]) and got["step"] == 3


def test_numpy_object_arrays_in_a_checkpoint_are_refused_without_unpickling(tmp_path):
    torch.save({"o": np.array([1, "x"], dtype=object)}, tmp_path / "o.pt")
    msg = error("compress", tmp_path / "o.pt", tmp_path / "o.mth")
    assert "weights_only" in msg and "dtype object" in msg
    assert not (tmp_path / "o.mth").exists()


def test_two_files_of_a_folder_never_write_the_same_output(tmp_path):
    """x.safetensors compresses to x.safetensors.mth, which IN also holds (it would be copied):
    before, the copy silently replaced the compressed file."""
    model = _model_dir(tmp_path / "model")
    shutil.copy(MINILM, model / "x.safetensors")
    ok("compress", MINILM, model / "x.safetensors.mth")
    assert "both" in error("compress", model, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_a_base_that_out_replaces_is_refused_before_any_work(tmp_path):
    """--base OUT -f: OUT is built aside and moved into place, so each delta was coded against the
    file it then replaced; both checkpoints were lost and the command exited 0. A single file gave
    a traceback. Both are one-line errors now, and OUT is left as it was."""
    from safetensors.torch import save_file
    w = torch.randn(512, 300, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        os.makedirs(tmp_path / f"ck{i}" / "sub")
        save_file({"w": (w + 1e-3 * i).bfloat16()}, tmp_path / f"ck{i}" / "model.safetensors")
        save_file({"w": (w + 2e-3 * i).bfloat16()}, tmp_path / f"ck{i}" / "sub" / "part.safetensors")
    ok("compress", tmp_path / "ck0", tmp_path / "packed")
    before = sha(tmp_path / "packed" / "model.safetensors.mth")
    assert "a file this run writes" in error("compress", tmp_path / "ck1", tmp_path / "packed", "--base",
                                             tmp_path / "packed", "-f")
    assert sha(tmp_path / "packed" / "model.safetensors.mth") == before
    ok("compress", tmp_path / "ck0" / "model.safetensors", tmp_path / "s.mth")
    assert "delta against itself" in error("compress", tmp_path / "ck1" / "model.safetensors", tmp_path / "s.mth",
                                           "--base", tmp_path / "s.mth", "-f")
    # -f into an OUT where a folder of IN is a file: refused before any work (it failed halfway)
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "sub").write_text("a file")
    assert "where the folder sub would be written" in error("compress", tmp_path / "ck0", tmp_path / "out", "-f")
    assert sorted(os.listdir(tmp_path / "out")) == ["sub"]
    # decompress --base DIR lacking one of IN's folders, whose files need no base: fine
    ok("compress", tmp_path / "ck1", tmp_path / "p1", "--base", tmp_path / "packed")
    shutil.rmtree(tmp_path / "packed" / "sub")
    ok("compress", tmp_path / "ck1" / "sub" / "part.safetensors", tmp_path / "p1" / "sub" / "part.safetensors.mth",
       "-f")
    ok("decompress", tmp_path / "p1", tmp_path / "back", "--base", tmp_path / "packed")
    assert sha(tmp_path / "back" / "model.safetensors") == sha(tmp_path / "ck1" / "model.safetensors")


def test_an_out_folder_another_run_made_meanwhile_is_written_into_only_with_force(tmp_path):
    # two runs to one new OUT at once: the later one failed with a raw error naming its hidden
    # folder ("Directory not empty"); it now says what happened, replaces nothing without -f, and
    # writes into it with -f
    from mithril_gpu.errors import MithrilError
    for force in (False, True):
        out = tmp_path / f"out{int(force)}"
        st = formats.StagedDir(out, force=force)
        with open(os.path.join(st.tmp, "a"), "w") as fh:
            fh.write("mine")
        os.makedirs(out)                      # the other run's OUT
        (out / "b").write_text("theirs")
        if force:
            with st:
                pass
            assert sorted(os.listdir(out)) == ["a", "b"]
        else:
            with pytest.raises(MithrilError, match="appeared while this run was writing it"):
                with st:
                    pass
            assert sorted(os.listdir(out)) == ["b"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


def test_a_delta_folder_written_into_a_linked_out_at_another_depth_loads(tmp_path):
    # OUT a link to a folder elsewhere: the files were staged beside the link and recorded their
    # base from there; moved into the link's target, they loaded by no path
    from safetensors.torch import save_file
    w = torch.randn(512, 300, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        os.makedirs(tmp_path / f"in{i}")
        save_file({"w": (w + 1e-3 * i).bfloat16()}, tmp_path / f"in{i}" / "m.safetensors")
    ok("compress", tmp_path / "in0", tmp_path / "base")
    os.makedirs(tmp_path / "deep" / "er" / "real")
    os.symlink(tmp_path / "deep" / "er" / "real", tmp_path / "out")
    ok("compress", tmp_path / "in1", tmp_path / "out", "--base", tmp_path / "base", "-f")
    with mithril_gpu.open(tmp_path / "out" / "m.safetensors.mth") as f:
        assert f.index.base is not None
    back = mithril_gpu.load(tmp_path / "out" / "m.safetensors.mth")["w"]
    assert torch.equal(back, (w + 1e-3).bfloat16())


def test_special_files_in_a_folder_are_refused_before_anything_is_written(tmp_path):
    """A FIFO named b.pt in IN hung `compress` forever (sniffed by opening it); a link to
    /dev/zero was copied until the disk was full. Both are refused up front, nothing written."""
    model = _model_dir(tmp_path / "model")
    os.mkfifo(model / "b.pt")
    msg = error("compress", model, tmp_path / "packed")
    assert "b.pt is not a regular file" in msg
    assert not (tmp_path / "packed").exists()
    os.unlink(model / "b.pt")
    os.symlink("/dev/zero", model / "zero.bin")
    assert "zero.bin is not a regular file" in error("compress", model, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    os.unlink(model / "zero.bin")
    os.symlink(tmp_path / "nowhere", model / "dangling.bin")
    assert "dangling.bin cannot be read" in error("compress", model, tmp_path / "packed")
    os.unlink(model / "dangling.bin")
    ok("compress", model, tmp_path / "packed")
    os.mkfifo(tmp_path / "packed" / "x.mth")
    assert "x.mth is not a regular file" in error("decompress", tmp_path / "packed", tmp_path / "restored")


def test_a_folder_written_into_with_force_is_swapped_in_whole(tmp_path):
    """`-f` into an existing OUT moved the new files in one by one: a kill midway left OUT a mix
    of two runs' files (a Trainer folder's model from one step and optimizer from another, both
    loading). OUT's other files are now hard-linked into the stage and the two folders exchanged
    in one step."""
    from mithril_gpu import formats

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.mth").write_text("old")
    (out / "keep.txt").write_text("kept")
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("deep")
    before, kept = os.stat(out).st_ino, os.stat(out / "keep.txt").st_ino
    with formats.StagedDir(out, force=True) as st:
        with open(st.where(str(out / "a.mth")), "w") as fh:
            fh.write("new")
    assert (out / "a.mth").read_text() == "new" and (out / "keep.txt").read_text() == "kept"
    assert (out / "sub" / "deep.txt").read_text() == "deep"
    assert os.stat(out / "keep.txt").st_ino == kept            # the same file, linked
    assert os.stat(out).st_ino != before                        # a folder exchanged, not files moved in
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_without_an_exchange_a_checkpoint_commit_file_goes_in_last(tmp_path, monkeypatch):
    """Where folders cannot be exchanged, files are moved in one by one: the old commit file is
    removed first and the new one moved in last, so a kill midway leaves an uncommitted folder
    (an IncompleteCheckpointError), never a commit that names another run's data."""
    from mithril_gpu import formats

    monkeypatch.setattr(formats, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".metadata").write_text("old commit")
    (out / "__0_0.distcp").write_text("old data")
    real, calls = os.replace, []

    def killed(a, b):
        calls.append(b)
        if len(calls) == 1 and not str(b).endswith(".metadata"):
            raise KeyboardInterrupt
        return real(a, b)
    with pytest.raises(KeyboardInterrupt):
        with formats.StagedDir(out, force=True) as st:
            for n in (".metadata", "__0_0.distcp"):
                with open(st.where(str(out / n)), "w") as fh:
                    fh.write("new")
            monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(os, "replace", real)
    assert not (out / ".metadata").exists()                     # uncommitted, not mixed
    assert (out / "__0_0.distcp").read_text() == "old data"


def test_a_file_beside_its_own_mth_from_an_interrupted_in_place_compress_restores(tmp_path):
    """hf.compress_checkpoint (MithrilCallback) writes x.mth, then removes x: killed in between, the
    folder held both, and restoring it (`decompress DIR OUT`, restore_checkpoint(out=)) refused
    ("would both be written"). x is copied as it is and x.mth left out, with a note."""
    from mithril_gpu import hf

    model = _model_dir(tmp_path / "ckpt")
    assert hf.compress_checkpoint(model) == ["model.safetensors"]
    shutil.copy(MINILM, model / "model.safetensors")           # as if killed before its removal
    out = ok("decompress", model, tmp_path / "restored")
    assert "left out model.safetensors.mth" in out
    assert sha(tmp_path / "restored" / "model.safetensors") == sha(MINILM)


def test_a_json_file_with_a_brace_at_byte_8_is_copied_not_taken_for_safetensors(tmp_path):
    """sniff() called any file whose ninth byte is "{" a (damaged) safetensors file, so a config
    such as {"cfg": {...}} in a folder made `compress DIR OUT` fail."""
    model = _model_dir(tmp_path / "model")
    (model / "trainer.json").write_text('{"cfg": {"lr": 0.1}}')
    ok("compress", model, tmp_path / "packed")
    assert (tmp_path / "packed" / "trainer.json").read_text() == '{"cfg": {"lr": 0.1}}'
    (model / "broken.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert "broken.safetensors" in error("compress", "-f", model, tmp_path / "packed")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give OUT another owner")
def test_an_out_folder_of_another_owner_keeps_its_owner(tmp_path):
    """Exchanging folders would give OUT the running user's owner and group (a group-shared team
    folder would lose its group): such an OUT gets its files moved in instead, and keeps its
    owner, its inode and its other files."""
    from mithril_gpu import formats

    out = tmp_path / "out"
    (out / "ro").mkdir(parents=True)
    (out / "ro" / "notes.txt").write_text("n")
    os.chown(out, 12345, 12345)
    before = os.stat(out)
    with formats.StagedDir(out, force=True) as st:
        with open(st.where(str(out / "a.mth")), "w") as fh:
            fh.write("new")
    after = os.stat(out)
    assert (after.st_uid, after.st_gid, after.st_ino) == (before.st_uid, before.st_gid, before.st_ino)
    assert (out / "a.mth").read_text() == "new" and (out / "ro" / "notes.txt").read_text() == "n"
    assert sorted(os.listdir(tmp_path)) == ["out"]
