"""MithrilCheckpointIO in a real Lightning Trainer (CPU): ModelCheckpoint(save_top_k=2), deltas,
AsyncCheckpointIO, and resuming from a compressed checkpoint bit-exact."""
import os

import pytest
import torch

lightning = pytest.importorskip("lightning", reason="Lightning is not installed (pip install mithril-gpu[lightning])")

import mithril_gpu  # noqa: E402
from conftest import assert_same, assert_tree_same  # noqa: E402
from mithril_gpu.lightning import MithrilCheckpointIO  # noqa: E402


class Tiny(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(tmp_path, plugin, max_steps, **kw):
    ckpt = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=2, monitor="train_loss",
                                                       every_n_train_steps=1, save_last=True)
    return lightning.Trainer(accelerator="cpu", max_steps=max_steps, plugins=[plugin], callbacks=[ckpt], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("deltas", [False, True])
def test_trainer_saves_and_resumes_bit_exact(tmp_path, deltas):
    torch.manual_seed(0)
    model = Tiny()
    trainer = _trainer(tmp_path, MithrilCheckpointIO(deltas=deltas, full_every=3), max_steps=7)
    trainer.fit(model, _data())
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ckpt"))
    assert "last.ckpt" in files and len(files) == 3                     # top 2 + last: the others were removed
    for f in files:                                                      # nothing a kept file needs was deleted
        state = mithril_gpu.load(tmp_path / f)
        assert set(state) >= {"state_dict", "optimizer_states", "global_step", "loops", "callbacks"}
    last = mithril_gpu.load(tmp_path / "last.ckpt")
    assert last["global_step"] == 7
    assert_tree_same(dict(last["state_dict"]), dict(model.state_dict()))
    assert_tree_same(last["optimizer_states"][0], trainer.optimizers[0].state_dict())
    anchors = [f for f in os.listdir(tmp_path) if f.startswith(".mithril-anchor-")]
    if deltas:
        with mithril_gpu.open(tmp_path / "last.ckpt") as fh:
            assert fh.index.base is not None and fh.index.base["path"].startswith(".mithril-anchor-")
            assert any(e.delta is not None for e in fh.index.tensors)
        assert 1 <= len(anchors) <= 3
    else:
        assert anchors == []
    # resume from the compressed checkpoint: weights and optimizer state come back bit-exact
    torch.manual_seed(1)
    model2 = Tiny()
    trainer2 = _trainer(tmp_path / "resumed", MithrilCheckpointIO(deltas=deltas), max_steps=7)
    trainer2.fit(model2, _data(), ckpt_path=tmp_path / "last.ckpt")
    assert trainer2.global_step == 7
    assert_tree_same(dict(model2.state_dict()), dict(model.state_dict()))
    assert_tree_same(trainer2.optimizers[0].state_dict(), trainer.optimizers[0].state_dict())


def test_async_checkpoint_io_with_deltas(tmp_path):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    torch.manual_seed(0)
    model = Tiny()
    trainer = _trainer(tmp_path, AsyncCheckpointIO(MithrilCheckpointIO(deltas=True, full_every=2)), max_steps=9)
    trainer.fit(model, _data())
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ckpt"))
    assert len(files) == 3
    for f in files:
        mithril_gpu.load(tmp_path / f)
    assert_tree_same(dict(mithril_gpu.load(tmp_path / "last.ckpt")["state_dict"]), dict(model.state_dict()))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_removing_a_checkpoint_never_removes_what_another_needs(tmp_path):
    io = MithrilCheckpointIO(deltas=True, full_every=2)
    states = [{"w": torch.full((1000,), float(i)), "c": torch.arange(100.0)} for i in range(5)]
    for i, s in enumerate(states):
        io.save_checkpoint(s, tmp_path / f"s{i}.ckpt")
    anchors = sorted(f for f in os.listdir(tmp_path) if f.startswith(".mithril-anchor-"))
    assert len(anchors) == 3                       # saves 0, 2 and 4 began a new anchor
    for i in (0, 1, 2, 3):
        io.remove_checkpoint(tmp_path / f"s{i}.ckpt")
        for j in range(i + 1, 5):                  # every file still there loads
            assert_same(mithril_gpu.load(tmp_path / f"s{j}.ckpt")["w"], states[j]["w"])
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".mithril-anchor-")) == [anchors[-1]]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(states[0], tmp_path / "x.ckpt", storage_options={"a": 1})


def test_decompressing_a_folder_of_delta_checkpoints_gives_plain_torch_files(tmp_path):
    """`mithril decompress` on a MithrilCheckpointIO(deltas=True) folder: each .ckpt (a .mth delta
    under Lightning's name) becomes a torch file of the same name that torch.load reads, and the
    hidden anchors are left out. It used to copy the .ckpt files as they were (still deltas, against
    anchors that OUT no longer held) and report success."""
    import subprocess
    import sys

    from conftest import subprocess_env

    io = MithrilCheckpointIO(deltas=True, full_every=10)
    g = torch.Generator().manual_seed(0)
    states = {}
    for step in (1, 2, 3):
        st = {"state_dict": {"w": torch.randn(64, 64, generator=g)}, "global_step": step, "epoch": 0}
        io.save_checkpoint(st, tmp_path / "ck" / f"epoch=0-step={step}.ckpt")
        states[f"epoch=0-step={step}.ckpt"] = st
    assert any(n.startswith(".mithril-anchor-") for n in os.listdir(tmp_path / "ck"))
    p = subprocess.run([sys.executable, "-m", "mithril_gpu", "decompress", tmp_path / "ck", tmp_path / "out"],
                       capture_output=True, text=True, env=subprocess_env())
    assert p.returncode == 0, p.stderr
    assert "decompressed 3 checkpoint files" in p.stdout and "left out .mithril-anchor-" in p.stdout
    assert sorted(os.listdir(tmp_path / "out")) == sorted(states)
    for name, st in states.items():
        assert_tree_same(torch.load(tmp_path / "out" / name, weights_only=True), st)


def test_a_url_dirpath_is_refused_not_written_to_a_local_folder_named_after_it(tmp_path, monkeypatch):
    # Lightning hands fsspec paths on as they are: "memory://run/x.ckpt" used to be written to a
    # local folder "memory:/run", so checkpoints never reached the remote store
    monkeypatch.chdir(tmp_path)
    io = MithrilCheckpointIO()
    for url in ("memory://run/ckpts/a.ckpt", "s3://bucket/a.ckpt"):
        with pytest.raises(ValueError, match="local files only"):
            io.save_checkpoint({"w": torch.ones(2)}, url)
        with pytest.raises(ValueError, match="local files only"):
            io.load_checkpoint(url)
        with pytest.raises(ValueError, match="local files only"):
            io.remove_checkpoint(url)
    assert os.listdir(tmp_path) == []
    io.save_checkpoint({"w": torch.ones(2)}, f"file://{tmp_path}/a.ckpt")          # file:// is local
    assert_tree_same(io.load_checkpoint(tmp_path / "a.ckpt"), {"w": torch.ones(2)})
