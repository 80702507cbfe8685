"""Hugging Face: mithril_gpu.hf.from_pretrained on compressed model folders, and MithrilCallback
compressing a real Trainer's checkpoints (tiny models built from configs: no downloads, CPU)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import assert_same, subprocess_env
from hf_data import Tokens
from test_trainer_folder import assert_restored, run

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")    # the Trainer needs it

from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

import mithril_gpu.hf as mh  # noqa: E402


def tiny_config(**kw):
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_same(sa[k], sb[k])


@pytest.fixture(scope="module")
def packed_model(tmp_path_factory):
    """A bf16 tiny Llama saved in two shards, and the folder `mithril compress` made of it."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=False)).to(torch.bfloat16).eval()
    model.save_pretrained(root / "model", max_shard_size="40KB")
    assert len([n for n in os.listdir(root / "model") if n.endswith(".safetensors")]) == 2
    run("compress", root / "model", root / "packed")
    return model, root / "packed"


IDS = torch.tensor([[1, 5, 9, 3, 77]])


def test_from_pretrained_is_bit_exact_and_generates_the_same_tokens(packed_model):
    model, packed = packed_model
    for cls in (LlamaForCausalLM, AutoModelForCausalLM):
        back = mh.from_pretrained(cls, packed).eval()
        assert type(back) is LlamaForCausalLM and back.dtype == torch.bfloat16
        assert_same_model(model, back)
        want = model.generate(IDS, max_new_tokens=10, do_sample=False)
        assert torch.equal(back.generate(IDS, max_new_tokens=10, do_sample=False), want)
    assert back.generation_config.bos_token_id == model.generation_config.bos_token_id


def test_from_pretrained_passes_dtype_and_device_map_through(packed_model):
    model, packed = packed_model
    back = mh.from_pretrained(LlamaForCausalLM, packed, dtype=torch.float32, device_map="cpu")
    assert back.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.float())


def test_from_pretrained_reads_slices_lazily(packed_model, monkeypatch):
    """transformers gets slices, not tensors, and cuts each only when it places the weight."""
    _, packed = packed_model
    seen = []
    real = mh._slice

    def spy(f, name):
        s = real(f, name)
        assert not isinstance(s, torch.Tensor) and s.get_dtype() == "BF16" and isinstance(s.get_shape(), list)
        seen.append(name)
        return s

    monkeypatch.setattr(mh, "_slice", spy)
    mh.from_pretrained(LlamaForCausalLM, packed)
    assert len(seen) == 21 and "model.embed_tokens.weight" in seen


def test_a_config_without_dtype_takes_the_weights_dtype(tmp_path):
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    run("compress", tmp_path / "m", tmp_path / "p")
    back = mh.from_pretrained(LlamaForCausalLM, tmp_path / "p")
    assert back.dtype == torch.bfloat16
    assert_same_model(model, back)      # tied embeddings: lm_head comes back from embed_tokens


def test_a_hub_id_resolves_with_snapshot_download(packed_model, monkeypatch):
    model, packed = packed_model
    calls = []

    def snapshot_download(repo_id, **kw):      # stands in for the Hub: no network here
        calls.append((repo_id, kw))
        return str(packed)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    back = mh.from_pretrained(AutoModelForCausalLM, "someone/tiny-llama-mth", revision="v1", local_files_only=True)
    assert calls == [("someone/tiny-llama-mth", {"revision": "v1", "local_files_only": True,
                                                 "allow_patterns": ["*.json", "*.mth"]})]
    assert_same_model(model, back)
    with pytest.raises(mh.HubFolderError, match="no such folder"):
        mh.from_pretrained(AutoModelForCausalLM, str(packed) + "-missing")
    assert len(calls) == 1


def test_from_pretrained_errors_are_typed(packed_model, tmp_path):
    from mithril_gpu.errors import MithrilError

    _, packed = packed_model
    shutil.copytree(packed, tmp_path / "raw")
    for n in os.listdir(tmp_path / "raw"):
        if n.endswith(".mth"):
            os.unlink(tmp_path / "raw" / n)
    (tmp_path / "raw" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(mh.HubFolderError, match="no compressed model shards.*model.safetensors"):
        mh.from_pretrained(LlamaForCausalLM, tmp_path / "raw")
    assert issubclass(mh.HubFolderError, MithrilError)
    with pytest.raises(TypeError, match="state_dict"):
        mh.from_pretrained(LlamaForCausalLM, packed, state_dict={})
    # the shard index says which files are the model: a stray .mth beside them is not loaded
    shutil.copytree(packed, tmp_path / "extra")
    import mithril_gpu

    mithril_gpu.save({"lora_A": torch.ones(2)}, tmp_path / "extra" / "adapter_model.safetensors.mth")
    assert_same_model(packed_model[0], mh.from_pretrained(LlamaForCausalLM, tmp_path / "extra"))
    os.unlink(tmp_path / "extra" / "model-00002-of-00002.safetensors.mth")
    with pytest.raises(mh.HubFolderError, match="model-00002-of-00002.safetensors.mth"):
        mh.from_pretrained(LlamaForCausalLM, tmp_path / "extra")


def test_importing_the_module_does_not_import_transformers():
    code = "import sys, mithril_gpu, mithril_gpu.hf; assert 'transformers' not in sys.modules, 'imported'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------- the Trainer

class Snapshot(TrainerCallback):
    """Copies each checkpoint folder as the Trainer wrote it (runs before MithrilCallback)."""

    def __init__(self, into):
        self.into = into

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        shutil.copytree(os.path.join(args.output_dir, name), os.path.join(self.into, name))


def train(out, callbacks=(), resume=None, steps=8, eval_dataset=None, **kw):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(attention_dropout=0.1))     # dropout: a resume needs the RNG states too
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_strategy="no", **kw)
    Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=eval_dataset, callbacks=list(callbacks)).train(
        resume_from_checkpoint=None if resume is None else str(resume))
    return model


def test_callback_with_deltas_then_resume_from_the_decompressed_folder_is_bit_exact(tmp_path):
    cb = mh.MithrilCallback(deltas=True, full_every=3)
    done = train(tmp_path / "out", [Snapshot(str(tmp_path / "raw")), cb], save_total_limit=2)
    assert [os.path.basename(p) for p in cb.compressed] == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                           "checkpoint-8"]
    # checkpoint-2 and -4 were rotated away; -6 is a delta against the anchor of -2, which is kept
    # for it; -8 began a new anchor
    assert sorted(os.listdir(tmp_path / "out")) == [".mithril-anchor-000000002", ".mithril-anchor-000000008",
                                                   "checkpoint-6", "checkpoint-8"]
    six = tmp_path / "out" / "checkpoint-6"
    assert sorted(os.listdir(six)) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.mth", "optimizer.pt.mth", "rng_state.pth.mth",
         "scheduler.pt.mth", "trainer_state.json", "training_args.bin"])
    import mithril_gpu

    with mithril_gpu.open(six / "model.safetensors.mth") as f:
        assert f.index.base["path"] == "../.mithril-anchor-000000002/model.safetensors.mth"
    # the CLI gives the folder back (deltas resolved), and the Trainer resumes from it
    run("decompress", six, tmp_path / "restored-6")
    assert_restored(tmp_path / "raw" / "checkpoint-6", tmp_path / "restored-6")
    resumed = train(tmp_path / "again", resume=tmp_path / "restored-6")
    assert_same_model(done, resumed)
    # restore_checkpoint in place, then resume
    mh.restore_checkpoint(tmp_path / "out" / "checkpoint-8")
    assert_restored(tmp_path / "raw" / "checkpoint-8", tmp_path / "out" / "checkpoint-8")


def test_callback_full_files_and_a_real_trainer_folder_through_the_cli(tmp_path):
    cb = mh.MithrilCallback()
    train(tmp_path / "out", [Snapshot(str(tmp_path / "raw")), cb], steps=2)
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert "optimizer.pt.mth" in os.listdir(ckpt) and "optimizer.pt" not in os.listdir(ckpt)
    import mithril_gpu

    with mithril_gpu.open(ckpt / "optimizer.pt.mth") as f:
        assert f.index.base is None
    out = mh.restore_checkpoint(ckpt, tmp_path / "restored")
    assert_restored(tmp_path / "raw" / "checkpoint-2", out)
    # the raw folder the Trainer wrote, through `mithril compress` / `mithril decompress`
    p = run("compress", tmp_path / "raw" / "checkpoint-2", tmp_path / "packed")
    assert "copied training_args.bin as it is" in p.stdout
    run("decompress", tmp_path / "packed", tmp_path / "back")
    assert_restored(tmp_path / "raw" / "checkpoint-2", tmp_path / "back")


def test_callback_refuses_load_best_model_at_end_and_bad_arguments(tmp_path):
    for bad in ({"level": 99}, {"threads": 0}, {"full_every": 0}):
        with pytest.raises(ValueError):
            mh.MithrilCallback(**bad)
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        train(tmp_path / "out", [mh.MithrilCallback()], steps=2, load_best_model_at_end=True,
              eval_strategy="steps", eval_steps=2, eval_dataset=Tokens())


def test_callback_in_a_two_process_run_waits_for_every_process_files(tmp_path):
    """Each process writes its own RNG state (and, sharded, its own shards), and the Trainer calls
    on_save without waiting for the others: the first process used to compress the folder while
    a slower one was still writing, leaving its file uncompressed (or catching it half written).
    tests/hf_ddp_worker.py: 2 processes (gloo), rank 1 writes late."""
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "hf_ddp_worker.py"), str(tmp_path)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0 and os.path.exists(tmp_path / "ok"), p.stderr[-3000:]
