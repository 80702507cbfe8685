"""The `mithril` command: byte-exact safetensors round trip, torch checkpoints, info, verify, errors."""
import hashlib
import os
import shutil
import subprocess
import sys

import torch

import mithril_gpu
from conftest import FIXTURES, assert_same, subprocess_env

MINILM = os.path.join(FIXTURES, "minilm_l0_bf16.safetensors")


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "mithril_gpu.cli", *map(str, args)], capture_output=True, text=True,
                       env=subprocess_env())
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_safetensors_round_trip_is_byte_identical(tmp_path):
    out = run("compress", MINILM, tmp_path / "m.mth")
    summary = out.stdout.strip()
    assert summary.count("\n") == 0 and summary.endswith("MB/s")   # one line: sizes, ratio, speed
    assert 1.45 < float(summary.split("(")[1].split("x)")[0]) < 1.6
    run("decompress", tmp_path / "m.mth", tmp_path / "back.safetensors")
    assert sha(tmp_path / "back.safetensors") == sha(MINILM)
    assert os.path.getsize(tmp_path / "m.mth") < os.path.getsize(MINILM) / 1.4


def test_safetensors_from_a_torch_state_dict_loads_in_safetensors(tmp_path):
    from safetensors.torch import load_file

    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    mithril_gpu.save(sd, tmp_path / "x.mth", metadata={"k": "v"})
    run("decompress", tmp_path / "x.mth", tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")
    for k in sd:
        assert_same(back[k], sd[k])


def test_torch_checkpoint_in_and_out(tmp_path):
    ckpt = {"model": {"w": torch.randn(10, 10).to(torch.bfloat16)}, "step": 7, "opt": {"state": {0: {"m": torch.ones(3)}}}}
    torch.save(ckpt, tmp_path / "c.pt")
    run("compress", tmp_path / "c.pt", tmp_path / "c.mth")
    run("decompress", tmp_path / "c.mth", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["step"] == 7 and list(back["opt"]["state"]) == [0]
    assert_same(back["model"]["w"], ckpt["model"]["w"])
    p = run("decompress", tmp_path / "c.mth", tmp_path / "nested.safetensors", ok=False)
    assert p.returncode == 1 and ".pt" in p.stderr and not (tmp_path / "nested.safetensors").exists()


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    p = run("compress", tmp_path / "evil.pt", tmp_path / "e.mth", ok=False)
    assert p.returncode == 1 and "weights_only" in p.stderr and "pwned" not in p.stdout
    assert not (tmp_path / "e.mth").exists()


def test_info_and_verify(tmp_path):
    run("compress", MINILM, tmp_path / "m.mth")
    out = run("info", tmp_path / "m.mth").stdout
    assert "encoder.layer.0.attention.self.query.weight" in out and "BF16" in out and "fieldsplit" in out
    assert "16 tensors" in out or "tensors" in out.splitlines()[-2]
    v = run("verify", tmp_path / "m.mth").stdout
    assert v.startswith("OK") and "checksums verified" in v


def test_errors_are_one_line_with_exit_1_and_no_output_left(tmp_path):
    data = open(MINILM, "rb").read()
    run("compress", MINILM, tmp_path / "m.mth")
    mth = (tmp_path / "m.mth").read_bytes()
    cases = {
        "missing": tmp_path / "nope.mth",
        "truncated": tmp_path / "t.mth",
        "flipped": tmp_path / "f.mth",
        "foreign": MINILM,
    }
    (tmp_path / "t.mth").write_bytes(mth[: len(mth) // 2])
    flipped = bytearray(mth)
    flipped[len(mth) // 3] ^= 0x40
    (tmp_path / "f.mth").write_bytes(bytes(flipped))
    for what, src in cases.items():
        for cmd in ("decompress", "verify"):
            args = [cmd, src] + ([tmp_path / f"out-{what}.safetensors"] if cmd == "decompress" else [])
            p = run(*args, ok=False)
            assert p.returncode == 1, (what, cmd, p.stderr)
            assert p.stderr.startswith("mithril: error:") and p.stderr.count("\n") == 1, (what, p.stderr)
            assert "Traceback" not in p.stderr
        assert not (tmp_path / f"out-{what}.safetensors").exists()
    (tmp_path / "junk.bin").write_bytes(data[100:200])
    p = run("compress", tmp_path / "junk.bin", tmp_path / "j.mth", ok=False)
    assert p.returncode == 1 and "not a .safetensors file" in p.stderr and not (tmp_path / "j.mth").exists()
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert leftovers == []


def test_help_explains_itself():
    out = run("--help").stdout
    for word in ("compress", "decompress", "info", "verify", "examples", "--base"):
        assert word in out
    assert "byte-identical" in run("decompress", "--help").stdout


def test_failed_write_keeps_existing_output(tmp_path):
    shutil.copy(MINILM, tmp_path / "in.safetensors")
    run("compress", tmp_path / "in.safetensors", tmp_path / "m.mth")
    before = sha(tmp_path / "m.mth")
    (tmp_path / "bad.safetensors").write_bytes(open(MINILM, "rb").read()[:-1000])
    p = run("compress", "-f", tmp_path / "bad.safetensors", tmp_path / "m.mth", ok=False)
    assert p.returncode == 1 and "exists" not in p.stderr     # it failed on the input, with --force given
    assert sha(tmp_path / "m.mth") == before


def test_info_json(tmp_path):
    import json

    run("compress", MINILM, tmp_path / "m.mth")
    d = json.loads(run("info", "--json", tmp_path / "m.mth").stdout)
    assert d["version"] == 1 and len(d["tensors"]) == 16 and d["metadata"]["source"].startswith("sentence")
    t = d["tensors"][0]
    assert {"name", "dtype", "shape", "nbytes", "stored", "transform", "xxh64"} <= set(t)
    assert sum(x["stored"] for x in d["tensors"]) < os.path.getsize(tmp_path / "m.mth")


def test_info_counts_chunks_by_codec(tmp_path):
    """`info` says how a file's chunks are coded (here a delta with ans chunks), as text and JSON."""
    import json

    from conftest import FIXTURES

    f, base = os.path.join(FIXTURES, "golden_v1_ans.mth"), os.path.join(FIXTURES, "golden_ans_base.mth")
    out = run("info", f, "--base", base).stdout
    line = next(x for x in out.splitlines() if x.startswith("chunks: "))
    assert "ans 17 (" in line and "zstd " in line and "stored " in line
    d = json.loads(run("info", "--json", f, "--base", base).stdout)
    assert set(d["codecs"]) == {"ans", "stored", "zstd"} and d["codecs"]["ans"]["chunks"] == 17
    assert sum(v["bytes"] for v in d["codecs"].values()) < os.path.getsize(f)


def test_refuses_to_overwrite_its_input(tmp_path):
    shutil.copy(MINILM, tmp_path / "m.safetensors")
    before = sha(tmp_path / "m.safetensors")
    p = run("compress", tmp_path / "m.safetensors", tmp_path / "m.safetensors", ok=False)
    assert p.returncode == 1 and "same file" in p.stderr
    assert sha(tmp_path / "m.safetensors") == before
    run("compress", tmp_path / "m.safetensors", tmp_path / "m.mth")
    p = run("decompress", tmp_path / "m.mth", tmp_path / "other.mth", ok=False)
    assert p.returncode == 1 and ".safetensors or .pt" in p.stderr


def test_python_dash_m_is_the_command():
    p = subprocess.run([sys.executable, "-m", "mithril_gpu", "--version"], capture_output=True, text=True,
                       env=subprocess_env())
    assert p.returncode == 0 and p.stdout.startswith("mithril-gpu ")


def test_directories_round_trip_byte_identical(tmp_path):
    """A sharded model folder: shards compressed, configs copied, subfolders kept, deltas by file."""
    from safetensors.torch import load_file, save_file

    sd = load_file(MINILM)
    names = sorted(sd)
    model = tmp_path / "model"
    (model / "1_Pooling").mkdir(parents=True)
    save_file({k: sd[k] for k in names[:8]}, model / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in names[8:]}, model / "model-00002-of-00002.safetensors")
    (model / "config.json").write_text('{"hidden_size": 384}')
    (model / "1_Pooling" / "config.json").write_text("{}")
    out = run("compress", model, tmp_path / "packed").stdout
    assert "compressed 2 checkpoint files" in out
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == [
        "1_Pooling", "config.json", "model-00001-of-00002.safetensors.mth", "model-00002-of-00002.safetensors.mth"]
    run("decompress", tmp_path / "packed", tmp_path / "restored")
    for f in model.rglob("*"):
        if f.is_file():
            assert sha(f) == sha(tmp_path / "restored" / f.relative_to(model)), f
    # a fine-tune of one shard, stored against the packed base folder, file by file
    tuned = tmp_path / "tuned"
    import shutil as sh

    sh.copytree(model, tuned)
    first = {k: sd[k].clone() for k in names[:8]}
    first[names[0]].view(-1)[::7] += 1
    save_file(first, tuned / "model-00001-of-00002.safetensors")
    run("compress", tuned, tmp_path / "tuned-packed", "--base", tmp_path / "packed")
    with mithril_gpu.open(tmp_path / "tuned-packed" / "model-00002-of-00002.safetensors.mth",
                          base=tmp_path / "packed" / "model-00002-of-00002.safetensors.mth") as f:
        assert f.index.base is not None and all((e.delta or {}).get("op") == "same" for e in f.index.tensors)
    p = run("compress", model, model / "inside", ok=False)
    assert p.returncode == 1 and "inside" in p.stderr


def test_directory_decompress_finds_moved_bases_with_base_dir(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(MINILM)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file(sd, tmp_path / "a" / "m.safetensors")
    tuned = {k: v.clone() for k, v in sd.items()}
    next(iter(tuned.values())).view(-1)[::5] += 1
    save_file(tuned, tmp_path / "b" / "m.safetensors")
    run("compress", tmp_path / "a", tmp_path / "pa")
    run("compress", tmp_path / "b", tmp_path / "pb", "--base", tmp_path / "pa")
    os.rename(tmp_path / "pa", tmp_path / "moved")
    p = run("decompress", tmp_path / "pb", tmp_path / "rb", ok=False)
    assert p.returncode == 1 and "--base" in p.stderr
    run("decompress", tmp_path / "pb", tmp_path / "rb", "--base", tmp_path / "moved")
    assert sha(tmp_path / "rb" / "m.safetensors") == sha(tmp_path / "b" / "m.safetensors")


def test_an_unrelated_base_is_said_in_one_line_and_not_recorded(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.randn(100)}, tmp_path / "other.safetensors")
    run("compress", tmp_path / "other.safetensors", tmp_path / "other.mth")
    save_file({"w": torch.randn(1000)}, tmp_path / "b.safetensors")
    p = run("compress", tmp_path / "b.safetensors", tmp_path / "b.mth", "--base", tmp_path / "other.mth")
    notes = [ln for ln in p.stderr.splitlines() if ln.startswith("mithril: note: ")]
    assert len(notes) == 1 and "no tensor has one of the same name" in notes[0] and "full checkpoint" in notes[0]
    assert "Warning" not in p.stderr and "warn(" not in p.stderr
    with mithril_gpu.open(tmp_path / "b.mth") as f:
        assert f.index.base is None


def _safetensors_with_header_length(path, want):
    """A safetensors file (safetensors' own writer) whose header is ``want`` bytes long."""
    import struct

    from safetensors.torch import save_file
    for k in range(0, 4 * want):
        save_file({"w": torch.arange(6, dtype=torch.float32)}, path, metadata={"format": "pt", "note": "x" * k})
        n = struct.unpack("<Q", open(path, "rb").read(8))[0]
        if n == want:
            return
        if n > want:
            break
    raise AssertionError(f"no header of {want} bytes")


def test_safetensors_whose_first_bytes_look_like_a_pickle_or_a_zip_round_trip_byte_identical(tmp_path):
    # the header length's low byte comes first: 0x80 (a pickle's first byte) for one length in 32,
    # "PK" (a zip's) for 0x4B50; such files were taken for torch files, re-serialised and lost
    # their __metadata__
    from mithril_gpu import formats
    for want, head in ((384, b"\x80"), (0x4B50, b"PK")):
        p = tmp_path / f"h{want}.safetensors"
        _safetensors_with_header_length(p, want)
        assert open(p, "rb").read(len(head)) == head and formats.sniff(p) == "safetensors"
        run("compress", p, tmp_path / f"h{want}.mth")
        run("decompress", tmp_path / f"h{want}.mth", tmp_path / f"b{want}.safetensors")
        assert sha(tmp_path / f"b{want}.safetensors") == sha(p)
    torch.save({"w": torch.ones(3)}, tmp_path / "t.pt")
    assert formats.sniff(tmp_path / "t.pt") == "torch"
