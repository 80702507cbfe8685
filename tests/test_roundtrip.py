"""Bit-exact round trips through save/load/open: every dtype, odd shapes, nests, real weights."""
import os
import subprocess
import sys

import pytest
import torch

import mithril_gpu
from conftest import ALL_DTYPES, assert_same, bits, random_tensor, subprocess_env


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7, 13), (70001,)], ids=str)
def test_every_dtype_and_shape_round_trips(tmp_path, dtype, shape):
    t = random_tensor(dtype, shape, seed=len(shape))
    mithril_gpu.save({"t": t}, tmp_path / "x.mth", chunk_elems=4096)
    back = mithril_gpu.load(tmp_path / "x.mth")
    assert list(back) == ["t"]
    assert_same(back["t"], t)


def test_non_contiguous_and_views_round_trip(tmp_path):
    base = random_tensor(torch.float32, (64, 48), seed=1)
    state = {"T": base.t(), "strided": base[::3, 1::2], "expanded": torch.arange(5.0).expand(4, 5),
             "offset_view": base[10:20], "neg": base.neg()}
    mithril_gpu.save(state, tmp_path / "x.mth")
    back = mithril_gpu.load(tmp_path / "x.mth")
    for k, v in state.items():
        assert_same(back[k], v.contiguous())
        assert back[k].is_contiguous()


def test_large_tensor_many_rows_and_threads_give_identical_files(tmp_path):
    t = (torch.randn(3_000_000, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    sd = {"w": t, "b": torch.zeros(10)}
    mithril_gpu.save(sd, tmp_path / "a.mth", threads=1)
    mithril_gpu.save(sd, tmp_path / "b.mth", threads=2)
    mithril_gpu.save(sd, tmp_path / "c.mth", threads=4)
    a = (tmp_path / "a.mth").read_bytes()
    assert a == (tmp_path / "b.mth").read_bytes() == (tmp_path / "c.mth").read_bytes()
    with mithril_gpu.open(tmp_path / "a.mth") as f:
        assert f.index.tensors[0].rows == -(-3_000_000 // (1 << 17))
    assert_same(mithril_gpu.load(tmp_path / "a.mth", threads=3)["w"], t)


def test_training_checkpoint_with_optimizer_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1200, "epoch": 3.0,
            "rng": torch.get_rng_state(), "note": None, "big": 2**70, "nan": float("nan"), "neg0": -0.0}
    mithril_gpu.save(ckpt, tmp_path / "ckpt.mth")
    back = mithril_gpu.load(tmp_path / "ckpt.mth")
    assert back["step"] == 1200 and back["epoch"] == 3.0 and back["note"] is None and back["big"] == 2**70
    assert back["nan"] != back["nan"] and str(back["neg0"]) == "-0.0"
    assert list(back["optimizer"]["state"]) == [0, 1, 2, 3]            # int keys stay ints
    assert back["optimizer"]["param_groups"] == ckpt["optimizer"]["param_groups"]
    for k, v in ckpt["model"].items():
        assert_same(back["model"][k], v)
    for i, st in ckpt["optimizer"]["state"].items():
        for k, v in st.items():
            assert_same(back["optimizer"]["state"][i][k], v)
    assert_same(back["rng"], ckpt["rng"])
    # the restored state drives a real model and optimizer
    model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model2.load_state_dict(back["model"])
    opt2 = torch.optim.AdamW(model2.parameters())
    opt2.load_state_dict(back["optimizer"])


def test_tied_tensors_are_stored_once(tmp_path):
    w = torch.randn(100, 100)
    mithril_gpu.save({"emb": w, "head": w, "other": w.clone()}, tmp_path / "x.mth")
    with mithril_gpu.open(tmp_path / "x.mth") as f:
        assert f.keys() == ["emb", "other"]
    back = mithril_gpu.load(tmp_path / "x.mth")
    assert back["emb"] is back["head"] and back["other"] is not back["emb"]


def test_callers_tensors_are_never_modified(tmp_path, minilm_bf16):
    before = {k: bits(v) for k, v in minilm_bf16.items()}
    seen = []

    def watch(_n):  # check mid-save too: zipnn 0.5.4 rotates bits in its input while it works
        seen.append(all(bits(v) == before[k] for k, v in minilm_bf16.items()))

    mithril_gpu.save(minilm_bf16, tmp_path / "x.mth", threads=2, progress=watch)
    assert seen and all(seen)
    assert {k: bits(v) for k, v in minilm_bf16.items()} == before


def test_real_weights_round_trip_and_compress(tmp_path, minilm_bf16):
    path = tmp_path / "m.mth"
    mithril_gpu.save(minilm_bf16, path)
    raw = sum(v.numel() * v.element_size() for v in minilm_bf16.values())
    ratio = raw / os.path.getsize(path)
    assert 1.45 < ratio < 1.6, ratio       # real bf16 weights: near the ~1.50x order-0 bound
    back = mithril_gpu.load(path)
    for k, v in minilm_bf16.items():
        assert_same(back[k], v)


def test_open_is_lazy_and_gives_metadata(tmp_path, minilm_bf16):
    path = tmp_path / "m.mth"
    mithril_gpu.save(minilm_bf16, path, metadata={"run": "r1"})
    name = "encoder.layer.0.attention.self.query.weight"
    with mithril_gpu.open(path) as f:
        assert set(f.keys()) == set(minilm_bf16) and name in f and len(f) == len(minilm_bf16)
        info = f.info(name)
        assert info["dtype"] == "BF16" and info["shape"] == (384, 384) and info["transform"] == "fieldsplit"
        assert 0 < info["stored"] < info["nbytes"]
        assert f.metadata == {"run": "r1"}
        assert_same(f.get_tensor(name), minilm_bf16[name])
        with pytest.raises(KeyError, match="no tensor named"):
            f.get_tensor("nope")


def test_level_and_chunk_size_options(tmp_path, minilm_bf16):
    mithril_gpu.save(minilm_bf16, tmp_path / "a.mth", level=3, chunk_elems=1000)
    back = mithril_gpu.load(tmp_path / "a.mth")
    for k, v in minilm_bf16.items():
        assert_same(back[k], v)
    with pytest.raises(ValueError, match="level"):
        mithril_gpu.save(minilm_bf16, tmp_path / "b.mth", level=99)
    with pytest.raises(ValueError, match="chunk_elems"):
        mithril_gpu.save(minilm_bf16, tmp_path / "b.mth", chunk_elems=0)
    assert not (tmp_path / "b.mth").exists()


@pytest.mark.parametrize("threads", [0, -1, 2.0, "2", True])
def test_threads_must_be_a_positive_int(tmp_path, threads):
    """0 and -1 (python-zstandard's "all cores") meant one thread, silently; a string gave a
    TypeError from a comparison deep inside."""
    state = {"a": torch.ones(5)}
    with pytest.raises(ValueError, match="threads must be None"):
        mithril_gpu.save(state, tmp_path / "a.mth", threads=threads)
    assert not (tmp_path / "a.mth").exists()
    mithril_gpu.save(state, tmp_path / "a.mth", threads=1)
    for call in (mithril_gpu.load, mithril_gpu.open):
        with pytest.raises(ValueError, match="threads must be None"):
            call(tmp_path / "a.mth", threads=threads)
    with pytest.raises(ValueError, match="threads must be None"):
        mithril_gpu.Checkpointer(tmp_path / "ck", threads=threads)


def test_metadata_that_is_not_a_dict_and_a_checkpointer_on_a_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="metadata must be a dict"):     # (an AttributeError)
        mithril_gpu.save({"a": torch.ones(2)}, tmp_path / "a.mth", metadata="step 3")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):          # ([Errno 17] File exists)
        mithril_gpu.Checkpointer(tmp_path / "f")


def test_unsupported_values_are_refused_with_the_path(tmp_path):
    class Custom:
        pass

    with pytest.raises(mithril_gpu.UnsupportedValueError, match="model/cfg"):
        mithril_gpu.save({"model": {"cfg": Custom()}}, tmp_path / "x.mth")
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="complex"):
        mithril_gpu.save({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.mth")
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="sparse"):
        mithril_gpu.save({"s": torch.eye(3).to_sparse()}, tmp_path / "x.mth")
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="meta device"):     # was NotImplementedError
        mithril_gpu.save({"a": torch.ones(2), "m": torch.empty(3, device="meta")}, tmp_path / "x.mth")
    assert list(tmp_path.iterdir()) == []


def test_a_torch_file_with_meta_tensors_is_refused_in_one_line(tmp_path):
    """A model built on the meta device and saved by mistake: ``mithril compress`` says so in
    one line (it printed a traceback), and writes nothing."""
    torch.save({"w": torch.empty(2, 3, device="meta")}, tmp_path / "m.pt")
    p = subprocess.run([sys.executable, "-m", "mithril_gpu.cli", "compress", str(tmp_path / "m.pt"),
                        str(tmp_path / "m.mth")], capture_output=True, text=True, env=subprocess_env())
    assert p.returncode == 1 and "meta device" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.mth").exists()


def test_load_to_other_device_string_is_checked(tmp_path):
    mithril_gpu.save({"a": torch.ones(2)}, tmp_path / "x.mth")
    with pytest.raises(ValueError, match="device"):
        mithril_gpu.load(tmp_path / "x.mth", device="tpu")


def test_requires_grad_parameters_are_saved_as_plain_tensors(tmp_path):
    p = torch.nn.Parameter(torch.randn(4, 4))
    mithril_gpu.save({"p": p}, tmp_path / "x.mth")
    back = mithril_gpu.load(tmp_path / "x.mth")["p"]
    assert type(back) is torch.Tensor and not back.requires_grad
    assert_same(back, p.detach())


def test_load_into_an_existing_state_dict_fills_it_in_place(tmp_path):
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.LayerNorm(20))
    mithril_gpu.save({"model": src.state_dict(), "step": 5, "extra": torch.arange(3)}, tmp_path / "c.mth")
    dst = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.LayerNorm(20))
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    back = mithril_gpu.load(tmp_path / "c.mth", into=dst.state_dict(), subtree="model")
    for k, v in src.state_dict().items():
        assert_same(dst.state_dict()[k], v)                       # the module itself now holds the weights
        assert back[k].data_ptr() == ptrs[k]                      # and no second copy was made
    assert sorted(back) == sorted(src.state_dict())
    dst2 = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.LayerNorm(20))
    with pytest.warns(mithril_gpu.api.LoadReport, match="filled 4 tensors; 1 of the file were not in into.*extra"):
        whole = mithril_gpu.load(tmp_path / "c.mth", into={"model": dst2.state_dict()}, strict=False)
    assert whole["step"] == 5 and whole["extra"].tolist() == [0, 1, 2]
    assert_same(dst2.state_dict()["0.weight"], src.state_dict()["0.weight"])


def test_load_into_is_strict_by_default_and_never_silently_empty(tmp_path):
    src = torch.nn.Linear(6, 4)
    mithril_gpu.save({"model": src.state_dict(), "optimizer": {"state": {}}, "step": 3}, tmp_path / "t.mth")
    dst = torch.nn.Linear(6, 4)
    before = dst.weight.detach().clone()
    # the training-state file holds the weights under "model/": a flat state dict matches nothing
    for strict in (True, False):
        with pytest.raises(mithril_gpu.StateMismatchError, match="would fill no tensor.*subtree='model'"):
            mithril_gpu.load(tmp_path / "t.mth", into=dst.state_dict(), strict=strict)
    assert torch.equal(dst.weight.detach(), before)
    # a name the file lacks, with the right subtree: strict refuses, listing it, before writing anything
    extra = dict(dst.state_dict(), scale=torch.zeros(1))
    with pytest.raises(mithril_gpu.StateMismatchError, match="1 tensors of into are not in the file \\(scale\\)"):
        mithril_gpu.load(tmp_path / "t.mth", into=extra, subtree="model")
    assert torch.equal(dst.weight.detach(), before)
    with pytest.warns(mithril_gpu.api.LoadReport, match="1 of into are not in the file.*scale"):
        mithril_gpu.load(tmp_path / "t.mth", into=extra, subtree="model", strict=False)
    assert_same(dst.weight.detach(), src.weight.detach())
    with pytest.raises(KeyError, match="no key 'optim'.*model, optimizer, step"):
        mithril_gpu.load(tmp_path / "t.mth", subtree="optim")
    assert mithril_gpu.load(tmp_path / "t.mth", subtree="optimizer") == {"state": {}}


def test_load_to_cuda_without_cuda_is_a_typed_error(tmp_path):
    mithril_gpu.save({"a": torch.ones(3)}, tmp_path / "c.mth")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(mithril_gpu.BackendUnavailableError, match="device='cuda'"):
        mithril_gpu.load(tmp_path / "c.mth", device="cuda")


def test_load_into_refuses_a_mismatch_before_writing(tmp_path):
    mithril_gpu.save({"a": torch.ones(4), "b": torch.ones(3)}, tmp_path / "c.mth")
    a = torch.zeros(4)
    with pytest.raises(mithril_gpu.StateMismatchError, match="'b'"):
        mithril_gpu.load(tmp_path / "c.mth", into={"a": a, "b": torch.zeros(5)})
    assert a.tolist() == [0, 0, 0, 0]                             # nothing was written
    nc = torch.zeros(8)[::2]                                      # non-contiguous targets are filled too
    with pytest.warns(mithril_gpu.api.LoadReport):
        back = mithril_gpu.load(tmp_path / "c.mth", into={"a": nc}, strict=False)
    assert back["a"] is nc and nc.tolist() == [1, 1, 1, 1]


def test_load_into_a_negated_view_gives_the_stored_values(tmp_path):
    mithril_gpu.save({"a": torch.arange(4.0)}, tmp_path / "c.mth")
    base = torch.zeros(4)
    neg = base.neg() if not hasattr(torch, "_neg_view") else torch._neg_view(base)
    mithril_gpu.load(tmp_path / "c.mth", into={"a": neg})
    assert neg.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_progress_true_draws_a_bar_and_callables_get_bytes(tmp_path, capsys):
    t = torch.randn(300_000)
    mithril_gpu.save({"a": t}, tmp_path / "p.mth", progress=True)
    mithril_gpu.load(tmp_path / "p.mth", progress=True)
    err = capsys.readouterr().err
    assert "save" in err and "load" in err and "B" in err
    seen = []
    mithril_gpu.save({"a": t}, tmp_path / "q.mth", progress=seen.append)
    assert sum(seen) == t.numel() * 4


def test_load_into_matches_places_not_names(tmp_path):
    # {"a/b": x, "a": {"b": y}}: both places are named "a/b" (the second "a/b#1", by order of
    # appearance); an into= with the keys in the other order used to get x and y swapped, silently
    x, y = torch.full((2,), 1.0), torch.full((2,), 2.0)
    mithril_gpu.save({"a/b": x, "a": {"b": y}}, tmp_path / "s.mth")
    dst = {"a": {"b": torch.zeros(2)}, "a/b": torch.zeros(2)}
    mithril_gpu.load(tmp_path / "s.mth", into=dst)
    assert dst["a/b"].tolist() == [1.0, 1.0] and dst["a"]["b"].tolist() == [2.0, 2.0]
    # int and str keys are different places too ("1" and 1 are both named "1")
    mithril_gpu.save({1: x, "1": y}, tmp_path / "k.mth")
    dst = {"1": torch.zeros(2), 1: torch.zeros(2)}
    mithril_gpu.load(tmp_path / "k.mth", into=dst)
    assert dst[1].tolist() == [1.0, 1.0] and dst["1"].tolist() == [2.0, 2.0]
    # one tensor in two places of the file, two tensors there in into: refused, nothing written
    mithril_gpu.save({"p": x, "q": x}, tmp_path / "t.mth")
    dst = {"p": torch.zeros(2), "q": torch.zeros(2)}
    with pytest.raises(mithril_gpu.StateMismatchError, match="holds one tensor"):
        mithril_gpu.load(tmp_path / "t.mth", into=dst)
    assert dst["p"].tolist() == [0.0, 0.0]
    shared = torch.zeros(2)
    mithril_gpu.load(tmp_path / "t.mth", into={"p": shared, "q": shared.detach()})      # tied: one memory
    assert shared.tolist() == [1.0, 1.0]


def test_tensors_save_cannot_store_are_typed_one_line_errors(tmp_path):
    # a strided nested tensor and a DTensor (an FSDP2 state_dict's values) escaped as RuntimeErrors
    # from deep inside; chunk_elems=True was taken for 1 and wrote a file no load could read
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="nested tensor"):
        mithril_gpu.save({"n": nested}, tmp_path / "n.mth")
    with pytest.raises(ValueError, match="chunk_elems"):
        mithril_gpu.save({"a": torch.ones(3)}, tmp_path / "b.mth", chunk_elems=True)
    assert sorted(os.listdir(tmp_path)) == []
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        d = distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(mithril_gpu.UnsupportedValueError, match="DTensor.*MithrilWriter"):
            mithril_gpu.save({"d": d}, tmp_path / "d.mth")
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "d.mth").exists()


def test_a_file_closed_by_another_thread_mid_decode_is_not_called_damaged(tmp_path, monkeypatch):
    # the decode then fails on released memory, which used to come out as CorruptFileError
    from mithril_gpu import reader
    mithril_gpu.save({"w": torch.randn(300, 40)}, tmp_path / "c.mth")
    f = mithril_gpu.open(tmp_path / "c.mth")

    def close_then_fail(*a, **k):
        f.close()
        raise mithril_gpu.CorruptFileError("corrupt file: operation forbidden on released memoryview object")
    monkeypatch.setattr(reader, "decode_all", close_then_fail)
    monkeypatch.setattr(reader, "decode_rows", close_then_fail)
    with pytest.raises(ValueError, match="closed \\(by another thread\\) while it was being decoded"):
        f.get_tensor("w")
    f = mithril_gpu.open(tmp_path / "c.mth")
    with pytest.raises(ValueError, match="closed \\(by another thread\\)"):
        f.get_slice("w")[3:5]
    f = mithril_gpu.open(tmp_path / "c.mth")         # a real damage, file open: still CorruptFileError
    monkeypatch.setattr(reader, "decode_all", lambda *a, **k: (_ for _ in ()).throw(
        mithril_gpu.CorruptFileError("corrupt file: bad")))
    with pytest.raises(mithril_gpu.CorruptFileError):
        f.get_tensor("w")
    f.close()
