"""`mithril compress DIR OUT` on a training checkpoint folder (a Hugging Face Trainer's
checkpoint-N/): tensor files compressed, files that are not plain tensor checkpoints copied byte
for byte and never unpickled, and OUT appearing whole or not at all."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import assert_same, subprocess_env

UNPICKLED = []


def _side_effect(*args):     # what unpickling a TrainingArguments-like object would run
    UNPICKLED.append(args)


class TrainingArgs:
    """Stands for transformers.TrainingArguments: a pickled object that weights_only refuses."""

    def __init__(self, lr):
        self.lr = lr

    def __reduce__(self):
        return (_side_effect, (self.lr,))


def run(*args, ok=True):
    """`mithril ARGS`, in this process (so that anything it unpickled would show in UNPICKLED)."""
    import contextlib
    import io
    import types

    from mithril_gpu import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    p = types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def load_weights_only(path):
    from mithril_gpu import formats

    return formats.load_torch(path)        # torch.load(weights_only=True), numeric numpy arrays allowed


def assert_values_same(a, b, where="value"):
    """Two loaded checkpoints hold the same values: same types and containers, tensors bit for bit,
    numpy arrays equal in dtype, shape and bytes."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert_same(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_values_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_values_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def make_checkpoint_folder(root, step=2, seed=0):
    """A folder laid out as a Trainer's checkpoint-N/, with real Adam moments."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100)
    for _ in range(step):
        model(torch.randn(16, 128)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    os.makedirs(root)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(root, "model.safetensors"),
              metadata={"format": "pt"})
    torch.save(opt.state_dict(), os.path.join(root, "optimizer.pt"))
    torch.save(sched.state_dict(), os.path.join(root, "scheduler.pt"))
    rs = np.random.RandomState(seed)
    torch.save({"python": (3, tuple(range(625)), None), "numpy": rs.get_state(), "cpu": torch.get_rng_state()},
               os.path.join(root, "rng_state.pth"))
    torch.save(TrainingArgs(1e-3), os.path.join(root, "training_args.bin"))
    with open(os.path.join(root, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "log_history": []}, f)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"hidden_size": 128}, f)
    return root


TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
COPIED = ("training_args.bin", "trainer_state.json", "config.json")


def assert_restored(src, back):
    """Every file back: byte-identical, or for torch files, the same values read back."""
    assert sorted(os.listdir(back)) == sorted(os.listdir(src))
    for name in os.listdir(src):
        if name in TORCH_FILES:
            assert_values_same(load_weights_only(os.path.join(src, name)), load_weights_only(os.path.join(back, name)),
                               name)
        else:
            assert sha(os.path.join(src, name)) == sha(os.path.join(back, name)), name


def test_a_trainer_checkpoint_folder_round_trips_and_pickles_are_copied_not_run(tmp_path):
    ckpt = make_checkpoint_folder(str(tmp_path / "checkpoint-2"))
    UNPICKLED.clear()
    p = run("compress", ckpt, tmp_path / "packed")
    assert "copied training_args.bin as it is" in p.stdout and "compressed 4 checkpoint files" in p.stdout
    assert sorted(os.listdir(tmp_path / "packed")) == sorted(
        [n + ".mth" for n in ("model.safetensors",) + TORCH_FILES] + list(COPIED))
    for name in COPIED:
        assert sha(os.path.join(ckpt, name)) == sha(tmp_path / "packed" / name)
    # the optimizer's fp32 moments are in the .mth, compressed
    import mithril_gpu

    with mithril_gpu.open(tmp_path / "packed" / "optimizer.pt.mth") as f:
        moments = [e for e in f.index.tensors if e.name.endswith(("exp_avg", "exp_avg_sq"))]
        assert len(moments) == 8 and all(e.dtype.name == "F32" for e in moments)
        assert sum(e.stored_bytes for e in moments) < 0.9 * sum(e.nbytes for e in moments)
    assert os.path.getsize(tmp_path / "packed" / "optimizer.pt.mth") < 0.9 * os.path.getsize(os.path.join(ckpt, "optimizer.pt"))
    run("decompress", tmp_path / "packed", tmp_path / "back")
    assert_restored(ckpt, tmp_path / "back")
    assert not UNPICKLED                             # training_args.bin was never unpickled
    # and the file itself is intact: unpickled here on purpose, it runs what it holds
    torch.load(tmp_path / "back" / "training_args.bin", weights_only=False)
    assert UNPICKLED == [(1e-3,)]


def test_a_pickle_alone_is_still_refused_with_one_line(tmp_path):
    torch.save(TrainingArgs(1), tmp_path / "training_args.bin")
    p = run("compress", tmp_path / "training_args.bin", tmp_path / "a.mth", ok=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "weights_only=True" in p.stderr
    assert sorted(os.listdir(tmp_path)) == ["training_args.bin"]


def test_folder_deltas_against_an_earlier_checkpoint(tmp_path):
    first = make_checkpoint_folder(str(tmp_path / "checkpoint-2"), step=2)
    second = make_checkpoint_folder(str(tmp_path / "checkpoint-4"), step=4)
    run("compress", first, tmp_path / "p2")
    run("compress", second, tmp_path / "p4", "--base", tmp_path / "p2")
    import mithril_gpu

    with mithril_gpu.open(tmp_path / "p4" / "model.safetensors.mth") as f:
        assert f.index.base is not None
    run("decompress", tmp_path / "p4", tmp_path / "b4")
    assert_restored(second, tmp_path / "b4")


def _listing(root):
    return sorted(os.listdir(root))


def test_a_failed_run_leaves_no_out_and_no_temp_folder(tmp_path):
    ckpt = make_checkpoint_folder(str(tmp_path / "checkpoint-2"))
    with open(os.path.join(ckpt, "zz-broken.pt"), "wb") as f:          # a torch zip cut short
        f.write(open(os.path.join(ckpt, "optimizer.pt"), "rb").read()[:3000])
    p = run("compress", ckpt, tmp_path / "packed", ok=False)
    assert p.returncode == 1 and "zz-broken.pt" in p.stderr
    assert _listing(tmp_path) == ["checkpoint-2"]
    # an existing OUT (with -f) is left exactly as it was
    os.makedirs(tmp_path / "packed")
    (tmp_path / "packed" / "old.txt").write_text("old")
    run("compress", "-f", ckpt, tmp_path / "packed", ok=False)
    assert _listing(tmp_path) == ["checkpoint-2", "packed"] and _listing(tmp_path / "packed") == ["old.txt"]
    # without the broken file, -f writes into it, keeping files of other names
    os.unlink(os.path.join(ckpt, "zz-broken.pt"))
    run("compress", "-f", ckpt, tmp_path / "packed")
    assert "old.txt" in _listing(tmp_path / "packed") and "optimizer.pt.mth" in _listing(tmp_path / "packed")
    assert _listing(tmp_path) == ["checkpoint-2", "packed"]


KILL_SCRIPT = r"""
import os, signal, sys
from mithril_gpu import cli, formats
real, seen = formats.load_torch, []
def load_torch(path):
    seen.append(path)
    if len(seen) == 2:                  # the second torch file: die as a kill -9 would
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path)
formats.load_torch = load_torch
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_run_never_leaves_a_half_written_out(tmp_path):
    ckpt = make_checkpoint_folder(str(tmp_path / "checkpoint-2"))
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "compress", ckpt, tmp_path / "packed"],
                       capture_output=True, text=True, env=subprocess_env())
    assert p.returncode == -signal.SIGKILL
    left = [n for n in _listing(tmp_path) if n != "checkpoint-2"]
    # no OUT; what the killed run wrote is in one hidden folder, next to where OUT would have been
    assert len(left) == 1 and left[0].startswith(".packed.mithril-") and left[0].endswith(".partial")
    assert any(n.endswith(".mth") for n in os.listdir(tmp_path / left[0]))
    run("compress", ckpt, tmp_path / "packed")      # a later run removes it (no live process holds it)
    assert "optimizer.pt.mth" in _listing(tmp_path / "packed")
    assert _listing(tmp_path) == ["checkpoint-2", "packed"]


def test_a_live_runs_temp_folder_is_not_removed(tmp_path):
    from mithril_gpu.formats import StagedDir

    ckpt = make_checkpoint_folder(str(tmp_path / "checkpoint-2"))
    live = StagedDir(tmp_path / "packed")              # another run, still writing
    open(os.path.join(live.tmp, "partial.mth"), "wb").close()
    run("compress", ckpt, tmp_path / "packed")
    assert os.path.exists(os.path.join(live.tmp, "partial.mth"))
    live.abort()
    assert _listing(tmp_path) == ["checkpoint-2", "packed"]


def test_the_out_folder_gets_the_usual_permissions(tmp_path):
    ckpt = make_checkpoint_folder(str(tmp_path / "checkpoint-2"))
    run("compress", ckpt, tmp_path / "packed")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "packed").st_mode & 0o777 == 0o777 & ~umask


def test_a_dcp_folder_inside_is_kept_as_it_is(tmp_path):
    """FSDP's sharded state (a torch.distributed.checkpoint folder inside the checkpoint folder):
    its .distcp files look like torch files, and compressing them one by one failed the whole
    folder (and, through MithrilCallback, the training run at its first save). It is kept as it
    is, said in one line; the other files are compressed."""
    import torch.distributed.checkpoint as dcp

    import mithril_gpu.hf as mh

    src = tmp_path / "ckpt"
    dcp.save({"a": torch.randn(100), "b": torch.randn(50)}, checkpoint_id=str(src / "pytorch_model_fsdp_0"))
    torch.save({"x": torch.ones(3)}, src / "optimizer.pt")
    p = run("compress", src, tmp_path / "out")
    assert "kept pytorch_model_fsdp_0/ as it is" in p.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["optimizer.pt.mth", "pytorch_model_fsdp_0"]
    for n in os.listdir(src / "pytorch_model_fsdp_0"):
        assert sha(src / "pytorch_model_fsdp_0" / n) == sha(tmp_path / "out" / "pytorch_model_fsdp_0" / n)
    assert mh.compress_checkpoint(src) == ["optimizer.pt"]                  # in place, as MithrilCallback does
    assert sorted(os.listdir(src / "pytorch_model_fsdp_0")) == [".metadata", "__0_0.distcp"]
