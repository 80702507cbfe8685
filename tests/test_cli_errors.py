"""`mithril` errors: one line on stderr, exit 1 (2 for bad usage), no traceback, nothing left behind;
signals clean up; a closed output pipe is no error; verify refuses what load refuses."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import xxhash
import zstandard

import mithril_gpu
from conftest import FIXTURES, subprocess_env
from mithril_gpu import container

MINILM = os.path.join(FIXTURES, "minilm_l0_bf16.safetensors")


def run(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "mithril_gpu.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or subprocess_env(), **kw)


def assert_one_line_error(p, code=1):
    assert p.returncode == code, (p.returncode, p.stderr)
    assert p.stderr.startswith("mithril: error:") and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr
    return p.stderr


def no_temps(folder) -> bool:
    return not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def rewrite_index(path, edit, out):
    """Copy the .mth file ``path`` to ``out`` with its index edited (and re-signed, so it passes
    the checksum: what a buggy or hostile writer would make)."""
    data = open(path, "rb").read()
    off, length, _, magic = container.TRAILER.unpack(data[-32:])
    d = json.loads(zstandard.ZstdDecompressor().decompress(data[off:off + length]))
    for t in d["tensors"]:             # optional row digests would catch most lies first: leave them out
        t.pop("row_xxh64", None)
    edit(d)
    raw = zstandard.ZstdCompressor().compress(json.dumps(d).encode())
    with open(out, "wb") as f:
        f.write(data[:off] + raw + container.TRAILER.pack(off, len(raw), xxhash.xxh64_intdigest(raw), magic))
    return out


@pytest.fixture(scope="module")
def minilm_mth(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "m.mth"
    assert run("compress", MINILM, out).returncode == 0
    return out


# ---------------------------------------------------------------- damaged files

def _header_record(body: bytes) -> str:
    import base64
    import struct

    return base64.b64encode(struct.pack("<Q", len(body)) + body).decode()


SOURCE_LIES = {
    "header is a list": lambda d: d["source"].update(header=_header_record(b"[1, 2]")),
    "header is not base64": lambda d: d["source"].update(header="%%%"),
    "header is not a string": lambda d: d["source"].update(header=7),
    "length prefix lies": lambda d: d["source"].update(header=_header_record(b"{}")[:-4] + "AAAA"),
    "a tensor's dtype changed": lambda d: d["source"].update(header=_header_record(json.dumps(
        {k: ({**v, "dtype": "F16"} if isinstance(v, dict) and "dtype" in v else v)
         for k, v in json.loads(_stored_header(d)[8:]).items()}).encode())),
    "a tensor missing": lambda d: d["source"].update(header=_header_record(json.dumps(
        dict(list(json.loads(_stored_header(d)[8:]).items())[:-1])).encode())),
}


def _stored_header(d) -> bytes:
    import base64

    return base64.b64decode(d["source"]["header"])


@pytest.mark.parametrize("lie", list(SOURCE_LIES))
def test_a_bad_stored_safetensors_header_is_a_one_line_error(tmp_path, minilm_mth, lie):
    """The header kept for the byte-exact round trip: malformed (before: AttributeError or a
    TypeError traceback) or not matching the tensors (before: written out as it was, giving a
    file that is not the original and not valid safetensors) is refused."""
    bad = rewrite_index(minilm_mth, SOURCE_LIES[lie], tmp_path / "bad.mth")
    msg = assert_one_line_error(run("decompress", bad, tmp_path / "out.safetensors"))
    assert "safetensors header" in msg
    assert not (tmp_path / "out.safetensors").exists() and no_temps(tmp_path)


TREE_LIES = {
    "a dict pair of one": {"dict": [[{"str": "a"}]]},
    "an unhashable key": {"dict": [[{"str": "a"}, {"tensor": 0}], [{"list": []}, {"int": "1"}]]},
    "dict of a number": {"dict": 3},
    "a pair of strings": {"dict": ["ab"]},
    "unknown node": {"dict": [[{"str": "a"}, {"tensor": 0}], [{"str": "b"}, {"frob": 1}]]},
    "ndarray of the wrong dtype": {"dict": [[{"str": "a"}, {"ndarray": [0, "<f8"]}]]},
}


@pytest.mark.parametrize("lie", list(TREE_LIES))
def test_verify_and_decompress_refuse_a_tree_that_load_refuses(tmp_path, minilm_mth, lie):
    """Before: verify said OK (it never looked at the tree) and decompress gave a traceback."""
    bad = rewrite_index(minilm_mth, lambda d: d.update(tree=TREE_LIES[lie]), tmp_path / "bad.mth")
    with pytest.raises(mithril_gpu.MithrilError):
        mithril_gpu.load(bad)
    assert "corrupt" in assert_one_line_error(run("verify", bad))
    for out in ("out.safetensors", "out.pt"):
        assert "corrupt" in assert_one_line_error(run("decompress", bad, tmp_path / out))
        assert not (tmp_path / out).exists()
    assert no_temps(tmp_path)


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))


def test_a_tensor_too_big_for_memory_is_a_one_line_error(tmp_path):
    """A legal file (1 MiB of chunks) that claims a 32 GiB tensor, read with 16 GiB of address
    space: before, numpy's MemoryError came out as a traceback."""
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    mithril_gpu.save({"w": torch.from_numpy(data)}, tmp_path / "s.mth")
    rows = 512

    def huge(d):
        d["tensors"][0].update(shape=[1 << 35], chunk_elems=1 << 26,
                               chunks=[v for k in range(rows) for v in (16 + 2048 * k, 2048, 1)])
    big = rewrite_index(tmp_path / "s.mth", huge, tmp_path / "big.mth")
    for args in (["verify", big], ["decompress", big, tmp_path / "o.safetensors"],
                 ["decompress", big, tmp_path / "o.pt"]):
        msg = assert_one_line_error(run(*args, preexec_fn=_limit_memory))
        assert "memory" in msg
    assert sorted(os.listdir(tmp_path)) == ["big.mth", "s.mth"]


# ---------------------------------------------------------------- names and messages

def test_info_prints_a_tensor_name_with_a_lone_surrogate_escaped(tmp_path):
    """Before: UnicodeEncodeError on a UTF-8 stdout."""
    mithril_gpu.save({"ok": torch.ones(2), "x": torch.zeros(3)}, tmp_path / "s.mth")

    def rename(d):
        d["tensors"][1]["name"] = "bad\udc80name"
        d["tree"]["dict"][1][0]["str"] = "bad\udc80name"
    bad = rewrite_index(tmp_path / "s.mth", rename, tmp_path / "b.mth")
    env = subprocess_env(PYTHONIOENCODING="utf-8:strict", LC_ALL="C.UTF-8")
    p = run("info", bad, env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "bad\\udc80name" in p.stdout
    p = run("info", "--json", bad, env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["tensors"][1]["name"] == "bad\udc80name"


def test_messages_do_not_embed_paths_of_any_length(tmp_path):
    long_dir = os.path.join(tmp_path, *["d" * 200] * 15)        # 3000 characters
    for args in (["decompress", os.path.join(long_dir, "x.mth"), tmp_path / "o.pt"],
                 ["verify", os.path.join(long_dir, "x.mth")],
                 ["compress", os.path.join(long_dir, "x.pt"), tmp_path / "o.mth"],
                 ["compress", MINILM, tmp_path / "o.mth", "--base", os.path.join(long_dir, "b.mth")]):
        msg = assert_one_line_error(run(*args))
        assert len(msg) < 600, (args[0], len(msg))


def test_torch_refusal_is_one_clean_line_naming_the_global(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    msg = assert_one_line_error(run("compress", tmp_path / "evil.pt", tmp_path / "e.mth"))
    assert "\x1b" not in msg                                      # before: raw terminal colour codes
    assert "Unsupported global: GLOBAL posix.system" in msg or "GLOBAL nt.system" in msg
    assert not (tmp_path / "e.mth").exists()


def test_missing_base_file_is_named_as_missing(tmp_path):
    """Before: "... was not found; pass base=PATH (CLI: --base PATH)" though --base was passed."""
    a = {"w": torch.arange(1000.0)}
    mithril_gpu.save(a, tmp_path / "a.mth")
    mithril_gpu.save({"w": a["w"] + 1}, tmp_path / "b.mth", base=tmp_path / "a.mth")
    for args in (["decompress", tmp_path / "b.mth", tmp_path / "b.pt"], ["verify", tmp_path / "b.mth"],
                 ["info", tmp_path / "b.mth"], ["compress", MINILM, tmp_path / "c.mth"]):
        msg = assert_one_line_error(run(*args, "--base", tmp_path / "nope.mth"))
        assert "nope.mth" in msg and "no such file" in msg and "pass" not in msg
    assert sorted(os.listdir(tmp_path)) == ["a.mth", "b.mth"]


@pytest.mark.parametrize("args", [
    ["compress", "--level", "0"], ["compress", "--level", "23"], ["compress", "--level", "x"],
    ["compress", "--chunk-elems", "0"], ["compress", "--chunk-elems", str(1 << 30)],
    ["compress", "--threads", "0"], ["compress", "--threads", "-1"],
    ["decompress", "--threads", "0"], ["verify", "--threads", "-1"],
])
def test_bad_option_values_are_usage_errors(tmp_path, minilm_mth, args):
    """Before: --level 0/23 and --chunk-elems 0 gave tracebacks, --threads 0/-1 were accepted."""
    cmd, opt, value = args
    files = {"compress": [MINILM, tmp_path / "o.mth"], "decompress": [minilm_mth, tmp_path / "o.pt"],
             "verify": [minilm_mth]}[cmd]
    p = run(cmd, *files, opt, value)
    assert p.returncode == 2 and "usage:" in p.stderr and opt in p.stderr and "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- pipes and signals

def test_a_closed_output_pipe_ends_quietly(minilm_mth):
    """`mithril info X | head`: before, "Broken pipe" on stderr and exit 1."""
    r, w = os.pipe()
    os.close(r)                                  # the reader is gone before anything is written
    try:
        p = subprocess.run([sys.executable, "-m", "mithril_gpu.cli", "info", str(minilm_mth)], stdout=w,
                           stderr=subprocess.PIPE, text=True, env=subprocess_env())
    finally:
        os.close(w)
    assert p.stderr == "" and p.returncode == 128 + signal.SIGPIPE


SIGNAL_SCRIPT = """
import os, signal, sys
import mithril_gpu.writer as writer
from mithril_gpu.reader import MthFile
from mithril_gpu import cli

def hit(fn):
    def wrapped(*args, **kw):          # mid-write: the temp file exists
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return fn(*args, **kw)
    return wrapped

writer.encode_all = hit(writer.encode_all)
MthFile.decode_into = hit(MthFile.decode_into)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("cmd, sig", [("compress", "SIGTERM"), ("decompress", "SIGHUP"), ("compress", "SIGHUP")])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, minilm_mth, cmd, sig):
    """Before: killed with no message, the temp file left behind."""
    src = MINILM if cmd == "compress" else minilm_mth
    out = tmp_path / ("out.mth" if cmd == "compress" else "out.safetensors")
    out.write_bytes(b"previous")
    p = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, sig, cmd, "-f", src, out], capture_output=True,
                       text=True, env=subprocess_env())
    assert p.returncode == 128 + getattr(signal, sig), p.stderr
    assert p.stderr == f"mithril: interrupted by {sig}\n"
    assert os.listdir(tmp_path) == [out.name] and out.read_bytes() == b"previous"


def _safetensors(path, header: dict, data: bytes = b"\0" * 8):
    import struct

    raw = json.dumps(header).encode()          # ensure_ascii: a lone surrogate is written as \udc80
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, words", [
    ({"w\udc80": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "surrogate"),
    ({"__metadata__": {"k": "v\udc80"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "surrogate"),
    ({"__metadata__": {"k": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
    ({"__metadata__": [], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
])
def test_safetensors_headers_a_mth_index_cannot_hold_are_refused(tmp_path, header, words):
    """Before: a UnicodeEncodeError traceback, or (metadata that is not str -> str) a .mth file
    written that every reader then refuses."""
    src = _safetensors(tmp_path / "in.safetensors", header)
    assert words in assert_one_line_error(run("compress", src, tmp_path / "o.mth"))
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("cmd", ["compress", "decompress", "info", "verify"])
def test_a_pipe_as_input_is_refused_at_once(tmp_path, cmd):
    """As gzip and zstd do: a FIFO nobody writes to used to hang the command (opening it waits for
    a writer), and a pipe with data gave misleading errors ("too short to be a safetensors file")."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    args = [cmd, fifo] + ([tmp_path / "out"] if cmd in ("compress", "decompress") else [])
    err = assert_one_line_error(run(*args, timeout=60))
    assert "not a regular file" in err
    assert sorted(os.listdir(tmp_path)) == ["in.fifo"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_loading_a_pipe_or_a_folder_is_a_typed_error(tmp_path):
    os.mkfifo(tmp_path / "f")
    code = ("import sys, mithril_gpu\n"
            "try:\n    mithril_gpu.load(sys.argv[1])\n"
            "except mithril_gpu.NotMithrilFileError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)        # (it waited for a writer: a timeout here)
    assert "is not a regular file (a pipe" in p.stdout, p.stderr
    with pytest.raises(mithril_gpu.NotMithrilFileError, match="folder"):
        mithril_gpu.load(tmp_path)                     # (an IsADirectoryError from open)


def test_info_and_verify_on_a_folder_name_a_file_to_give_and_verify_q_is_quiet(tmp_path):
    import torch

    import mithril_gpu
    os.makedirs(tmp_path / "ck")
    mithril_gpu.save({"w": torch.ones(10)}, tmp_path / "ck" / "model.safetensors.mth")
    for cmd in ("info", "verify"):
        p = subprocess.run([sys.executable, "-m", "mithril_gpu", cmd, str(tmp_path / "ck")], capture_output=True,
                           text=True, env=subprocess_env())
        assert p.returncode == 1 and "is a folder: give one of its .mth files (such as" in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1
    p = subprocess.run([sys.executable, "-m", "mithril_gpu", "verify", "-q", str(tmp_path / "ck" / "model.safetensors.mth")],
                       capture_output=True, text=True, env=subprocess_env())
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""


def test_a_tensor_named_metadata_is_never_written_to_safetensors(tmp_path):
    """torch allows a state dict key '__metadata__'; safetensors keeps that key for its header.
    Decompressing such a file to .safetensors wrote an invalid file with exit 0."""
    mithril_gpu.save({"__metadata__": torch.ones(3), "w": torch.zeros(2)}, tmp_path / "m.mth")
    p = run("decompress", tmp_path / "m.mth", tmp_path / "m.safetensors")
    assert_one_line_error(p)
    assert "'__metadata__'" in p.stderr and ".pt" in p.stderr
    assert not (tmp_path / "m.safetensors").exists()
    assert run("decompress", tmp_path / "m.mth", tmp_path / "m.pt").returncode == 0


def test_a_stride_0_view_too_large_for_memory_is_a_typed_error(tmp_path):
    """A 1.5 KB .pt holding torch.ones(1).expand(2**31): weights_only=True rebuilds the view
    without allocating, and laying it out needs 8 GB. Under a memory limit that was a traceback."""
    torch.save({"x": torch.ones(1).expand(1 << 31)}, tmp_path / "e.pt")
    assert os.path.getsize(tmp_path / "e.pt") < 4096

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    p = run("compress", tmp_path / "e.pt", tmp_path / "e.mth", preexec_fn=limit, timeout=300)
    assert "not enough memory to lay out a (2147483648,) torch.float32 tensor" in assert_one_line_error(p)
    assert not (tmp_path / "e.mth").exists()


def test_decompress_to_torch_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """torch.save replaced the write's own error (a full disk, a Ctrl-C) with its own
    RuntimeError ("unexpected pos ..."), printed as a traceback: the write's error is said."""
    from mithril_gpu import cli, writer

    mithril_gpu.save({"w": torch.randn(300000)}, tmp_path / "m.mth")
    real = writer.AtomicFile.write
    seen = []

    def full(self, data, lent=False):
        seen.append(len(data))
        if sum(seen) > 100_000:
            raise OSError(28, "No space left on device")
        return real(self, data, lent)
    monkeypatch.setattr(writer.AtomicFile, "write", full)
    assert cli.main(["decompress", str(tmp_path / "m.mth"), str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mithril: error:") and "No space left on device" in err and err.count("\n") == 1, err
    assert "unexpected pos" not in err
    assert sorted(os.listdir(tmp_path)) == ["m.mth"]
