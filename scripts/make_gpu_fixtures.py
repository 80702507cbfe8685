"""Write the GPU-written fixtures (on a device): .mth files saved by the GPU path, with the
SHA-256 of every decoded tensor, so CI proves on every run that the CPU path decodes what the
GPU wrote (tests/test_golden.py). Run on the device machine, then copy the files from --out into
fixtures/:

    MITHRIL_GPU_EXPERIMENTAL=1 python3 scripts/make_gpu_fixtures.py --out DIR

Files: gpu_v1_dtypes.mth (every dtype, odd sizes, a 1-byte tensor at an odd offset, empty and
0-dim tensors, chunks both zstd and stored), gpu_v1_weights.mth (weight-like bf16 and fp32,
several rows), and gpu_v1.json (per file: tensor -> SHA-256 of its bytes, and what wrote it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def states():
    import torch

    from conftest import ALL_DTYPES, random_tensor

    g = torch.Generator().manual_seed(8)
    dtypes = {str(d).removeprefix("torch."): random_tensor(d, (3, 1000 + i), seed=i) for i, d in enumerate(ALL_DTYPES)}
    small = torch.randint(0, 16, (70003,), dtype=torch.uint8, generator=g)
    dtypes["u8_odd_offset"] = small[3:]                       # a 1-byte tensor 3 bytes into its storage
    dtypes["empty"] = torch.zeros(0, 5, dtype=torch.bfloat16)
    dtypes["scalar"] = torch.tensor(1.5, dtype=torch.float32)
    weights = {"w_bf16": (torch.randn(300001, generator=g) * 0.02).to(torch.bfloat16),
               "w_f32": torch.randn(1000, 333, generator=g) * 0.05,
               "ln_f16": (1 + 0.01 * torch.randn(4096, generator=g)).to(torch.float16)}
    return {"gpu_v1_dtypes.mth": dtypes, "gpu_v1_weights.mth": weights}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    os.environ.setdefault("MITHRIL_GPU_EXPERIMENTAL", "1")
    import cupy
    import torch
    from nvidia import nvcomp

    import mithril_gpu

    manifest = {"written_by": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "cupy": cupy.__version__, "nvcomp": nvcomp.__version__}}
    os.makedirs(a.out, exist_ok=True)
    for name, state in states().items():
        path = os.path.join(a.out, name)
        cuda = {k: v.cuda() for k, v in state.items()}
        big = state.get("u8_odd_offset")
        if big is not None:
            full = torch.empty(big.numel() + 3, dtype=torch.uint8)
            full[3:] = big
            cuda["u8_odd_offset"] = full.cuda()[3:]
            assert cuda["u8_odd_offset"].data_ptr() % 4 != 0
        mithril_gpu.save(cuda, path, device="cuda", chunk_elems=4096)   # raises if the GPU backend cannot run
        with mithril_gpu.open(path) as f:
            manifest[name] = {k: hashlib.sha256(f.get_bytes(k).tobytes()).hexdigest() for k in f.keys()}
            codec_ids = sorted({c for e in f.index.tensors for c in e.chunks[2::3]})
        want = {k: hashlib.sha256(mithril_gpu.api.tensor_bytes(v).tobytes()).hexdigest() for k, v in state.items()}
        assert manifest[name] == want, f"{name}: the CPU path decodes the GPU file to other bytes"
        print(f"{name}: {len(want)} tensors, {os.path.getsize(path)} bytes, codecs {codec_ids}, decoded on the CPU bit-exact")
    with open(os.path.join(a.out, "gpu_v1.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    if os.path.isdir(os.path.join(ROOT, "fixtures")) and os.environ.get("MITHRIL_FIXTURES_INTO_REPO") == "1":
        for n in list(states()) + ["gpu_v1.json"]:
            shutil.copy(os.path.join(a.out, n), os.path.join(ROOT, "fixtures", n))


if __name__ == "__main__":
    main()
