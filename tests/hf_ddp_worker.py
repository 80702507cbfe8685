"""A 2-process (gloo, CPU) Hugging Face Trainer run with MithrilCallback, for tests/test_hf.py.

    python tests/hf_ddp_worker.py ROOT

Rank 1 writes its RNG state late (a slow writer: a big shard, a slow disk), so that rank 0's
callback runs before rank 1's files are there unless it waits for every rank. Rank 0 then checks
that every checkpoint folder holds both ranks' RNG states, compressed, and that they decompress
to what the ranks wrote; it leaves ``ROOT/ok`` when all checks pass.
"""
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT_DIR not in sys.path:
    sys.path.insert(0, ROOT_DIR)


def _rank(rank, world, root, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    import mithril_gpu.hf as mh
    from hf_data import Tokens

    real = Trainer._save_rng_state

    def slow_rng_state(self, output_dir):
        if rank == 1:
            time.sleep(2.0)
        real(self, output_dir)
    Trainer._save_rng_state = slow_rng_state

    class Raw(TrainerCallback):          # each rank's own RNG file as written (listed before MithrilCallback)
        def on_save(self, args, state, control, **kw):
            src = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", f"rng_state_{rank}.pth")
            with open(src, "rb") as f, open(os.path.join(root, f"raw-{state.global_step}-{rank}"), "wb") as g:
                g.write(f.read())

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    out = os.path.join(root, "out")
    args = TrainingArguments(output_dir=out, max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0,
                             logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=Tokens(),
            callbacks=[Raw(), mh.MithrilCallback(deltas=True, full_every=2)]).train()
    if rank != 0:
        return
    for step in (2, 4):
        folder = os.path.join(out, f"checkpoint-{step}")
        names = sorted(os.listdir(folder))
        assert "rng_state_0.pth.mth" in names and "rng_state_1.pth.mth" in names, names
        assert not any(n.endswith(".pth") for n in names), names
        restored = mh.restore_checkpoint(folder, os.path.join(root, f"restored-{step}"))
        for r in (0, 1):
            want = torch.load(os.path.join(root, f"raw-{step}-{r}"), weights_only=False)
            got = torch.load(os.path.join(restored, f"rng_state_{r}.pth"), weights_only=False)
            assert torch.equal(got["cpu"], want["cpu"]), (step, r)
    open(os.path.join(root, "ok"), "w").close()


def main():
    root = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, root, port), nprocs=2, join=True)


if __name__ == "__main__":
    main()
