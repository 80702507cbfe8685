"""A tiny token dataset for the Hugging Face Trainer tests (test_hf.py and hf_ddp_worker.py)."""
import torch


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}
