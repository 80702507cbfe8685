"""Hostile files: every one is refused with a typed, one-line error, before it costs memory or time
beyond what its size allows (FORMAT.md "What a reader must refuse", SECURITY.md)."""
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
import xxhash
import zstandard

import mithril_gpu
from conftest import assert_same
from mithril_gpu import checksum, codecs, container
from mithril_gpu.errors import (BaseMismatchError, ChecksumMismatchError, CorruptFileError, FormatError,
                                MissingBaseError, MithrilError, TruncatedFileError, UnsupportedVersionError)


def build(payload: bytes, tensors: list, tree, **top) -> bytes:
    """A complete file from payload bytes (placed at offset 16) and index fields."""
    d = {"mithril": 1, "features": [], "writer": "hostile", "tensors": tensors, "tree": tree,
         "metadata": None, "source": None, "base": None, **top}
    raw = zstandard.ZstdCompressor().compress(json.dumps(d).encode())
    at = container.PREAMBLE_SIZE + len(payload)
    return container.pack_preamble() + payload + raw + container.pack_trailer(at, raw)


def index_of(data: bytes) -> dict:
    off, length, _, _ = container.TRAILER.unpack(data[-32:])
    return json.loads(zstandard.ZstdDecompressor().decompress(data[off:off + length]))


def no_rows(t: dict) -> dict:
    """Tensor entry ``t`` without its optional row digests (for edits that change what they sum up)."""
    t.pop("row_xxh64", None)
    return t


def resign(data: bytes, edit) -> bytes:
    """Edit a file's index and re-sign it, so only validation of its content can catch a lie."""
    off, length, _, magic = container.TRAILER.unpack(data[-32:])
    d = index_of(data)
    edit(d)
    raw = zstandard.ZstdCompressor().compress(json.dumps(d).encode())
    return data[:off] + raw + container.TRAILER.pack(off, len(raw), xxhash.xxh64_intdigest(raw), magic)


def zeros_file(rows: int, row_bytes: int, chunks_for_row) -> bytes:
    """One U8 tensor of ``rows`` rows of zeros, whose checksum is right, with one zstd frame of
    ``row_bytes`` zeros at offset 16 and the chunk fields ``chunks_for_row(r, frame_len)``."""
    frame = zstandard.ZstdCompressor(level=19).compress(bytes(row_bytes))
    digest = checksum.combine([checksum.row_digest(np.zeros(row_bytes, np.uint8))] * rows)
    chunks = [v for r in range(rows) for v in chunks_for_row(r, len(frame))]
    t = {"name": "w", "dtype": "U8", "shape": [rows * row_bytes], "transform": "raw",
         "chunk_elems": row_bytes, "xxh64": f"{digest:016x}", "chunks": chunks}
    return build(frame * rows, [t], {"tensor": 0})


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any chunk gets decoded: a refusal must come before the work."""
    def boom(*a, **k):
        raise AssertionError("a chunk was decoded")
    monkeypatch.setattr(codecs, "decode", boom)


def write(tmp_path, data: bytes, name="t.mth"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def one_line(exc) -> str:
    s = str(exc.value)
    assert "\n" not in s and len(s) < 1000, s
    return s


# ------------------------------------------------------------------ overlapping chunks

def test_control_distinct_chunks_of_the_same_content_load(tmp_path):
    """The honest form of the file below: every row has its own copy of the frame."""
    data = zeros_file(4, 1 << 16, lambda r, n: [16 + r * n, n, codecs.ZSTD])
    back = mithril_gpu.load(write(tmp_path, data))
    assert back.shape == (4 << 16,) and not back.any()


def test_overlapping_chunks_are_refused_before_decoding(tmp_path, no_decoding):
    """Every row pointing at one frame made a 2.3 KB file load as a valid 1 GiB tensor (and a
    433-byte one cost seconds of CPU before its error). Here: 64 rows of 1 MiB from one frame."""
    data = zeros_file(64, 1 << 20, lambda r, n: [16, n, codecs.ZSTD])
    with pytest.raises(CorruptFileError, match="overlap") as e:
        mithril_gpu.open(write(tmp_path, data))
    one_line(e)


def test_partly_overlapping_chunks_across_tensors_are_refused(tmp_path):
    frame = zstandard.ZstdCompressor().compress(bytes(1000))
    digest = checksum.combine([checksum.row_digest(np.zeros(1000, np.uint8))])

    def t(name, off):
        return {"name": name, "dtype": "U8", "shape": [1000], "transform": "raw", "chunk_elems": 1000,
                "xxh64": f"{digest:016x}", "chunks": [off, len(frame), codecs.ZSTD]}

    payload = frame + frame
    tree = {"list": [{"tensor": 0}, {"tensor": 1}]}
    ok = build(payload, [t("a", 16), t("b", 16 + len(frame))], tree)
    assert [x.sum().item() for x in mithril_gpu.load(write(tmp_path, ok))] == [0, 0]
    for second in (16, 17, 16 + len(frame) - 1):
        bad = build(payload, [t("a", 16), t("b", second)], tree)
        with pytest.raises(CorruptFileError, match="overlap"):
            mithril_gpu.open(write(tmp_path, bad))


def test_empty_chunks_may_share_offsets(tmp_path):
    """Masked rows with no nonzero element have empty value planes (csize 0) at the offset of
    the next chunk: no payload, so no overlap."""
    base = {"w": torch.arange(50000, dtype=torch.float32), "z": torch.ones(3000, dtype=torch.int64)}
    nxt = {"w": base["w"].clone(), "z": base["z"].clone()}
    nxt["w"][7] = -1.0
    nxt["z"][100] = 5
    mithril_gpu.save(base, tmp_path / "b.mth", chunk_elems=1024)
    mithril_gpu.save(nxt, tmp_path / "d.mth", base=tmp_path / "b.mth", chunk_elems=1024)
    with mithril_gpu.open(tmp_path / "d.mth") as f:
        masked = [e for e in f.index.tensors if e.transform == "masked"]
        assert masked and any(e.chunks[1::3].count(0) for e in masked)
    back = mithril_gpu.load(tmp_path / "d.mth")
    assert_same(back["w"], nxt["w"]) and assert_same(back["z"], nxt["z"])


def test_two_deltas_naming_one_base_tensor_are_refused(tmp_path):
    """Without the rule, n "same" entries cost n times a base tensor for a few bytes each."""
    mithril_gpu.save({"w": torch.ones(1000)}, tmp_path / "b.mth")
    mithril_gpu.save({"w": torch.ones(1000)}, tmp_path / "d.mth", base=tmp_path / "b.mth")
    data = (tmp_path / "d.mth").read_bytes()

    def dup(d):
        t = dict(d["tensors"][0], name="w2")
        d["tensors"].append(t)
        d["tree"] = {"list": [{"tensor": 0}, {"tensor": 1}]}

    assert index_of(data)["tensors"][0]["delta"]["op"] == "same"
    with pytest.raises(CorruptFileError, match="base tensor"):
        mithril_gpu.open(write(tmp_path, resign(data, dup), "d.mth"))


def test_same_entry_of_another_dtype_or_shape_is_refused(tmp_path):
    mithril_gpu.save({"w": torch.ones(6, 4)}, tmp_path / "b.mth")
    mithril_gpu.save({"w": torch.ones(6, 4)}, tmp_path / "d.mth", base=tmp_path / "b.mth")
    data = (tmp_path / "d.mth").read_bytes()
    for edit in ({"shape": [4, 6]}, {"dtype": "F16", "shape": [12, 4]}):   # same byte count
        bad = resign(data, lambda d: d["tensors"][0].update(edit))
        with pytest.raises(BaseMismatchError):
            mithril_gpu.load(write(tmp_path, bad, "d.mth"))


def test_empty_shape_that_overflows_int64_is_refused(tmp_path, small):
    """(2^40, 2^40, 0) has no element, but torch cannot make a tensor of it."""
    empty = f"{xxhash.xxh64_intdigest(b''):016x}"
    data = resign(small, lambda d: no_rows(d["tensors"][0]).update(shape=[1 << 40, 1 << 40, 0], chunks=[], xxh64=empty))
    with pytest.raises(CorruptFileError, match="shape"):
        mithril_gpu.load(write(tmp_path, data))
    data = resign(small, lambda d: no_rows(d["tensors"][0]).update(shape=[0, 1 << 40, 1 << 40], chunks=[], xxh64=empty))
    assert mithril_gpu.load(write(tmp_path, data))["w"].shape == (0, 1 << 40, 1 << 40)


# ------------------------------------------------------------------ delta bases

@pytest.fixture
def delta_pair(tmp_path):
    a = {"w": torch.randn(2000)}
    mithril_gpu.save(a, tmp_path / "base.mth")
    mithril_gpu.save({"w": a["w"] * 1.01}, tmp_path / "delta.mth", base=tmp_path / "base.mth")
    return tmp_path / "delta.mth", (tmp_path / "delta.mth").read_bytes()


def _with_base_path(data: bytes, path: str) -> bytes:
    return resign(data, lambda d: d["base"].update(path=path))


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs /proc")
def test_base_path_to_proc_self_mem_is_a_typed_error(tmp_path, delta_pair):
    path, data = delta_pair
    path.write_bytes(_with_base_path(data, "/proc/self/mem"))
    with pytest.raises(MissingBaseError) as e:
        mithril_gpu.open(path)
    assert "/proc/self/mem" in one_line(e)


def test_base_path_to_special_files_and_folders_is_missing(tmp_path, delta_pair):
    path, data = delta_pair
    os.mkfifo(tmp_path / "fifo")
    for target in (str(tmp_path / "fifo"), str(tmp_path), "/dev/zero", "../" * 40 + "etc",
                   "x\x00y", "\udcff"):
        path.write_bytes(_with_base_path(data, target))
        with pytest.raises(MissingBaseError) as e:
            mithril_gpu.open(path)
        one_line(e)


def test_base_path_to_a_foreign_or_damaged_file_is_a_typed_error(tmp_path, delta_pair):
    path, data = delta_pair
    (tmp_path / "junk").write_bytes(os.urandom(5000))
    path.write_bytes(_with_base_path(data, "junk"))
    with pytest.raises(BaseMismatchError, match="junk") as e:
        mithril_gpu.open(path)
    one_line(e)
    base = (tmp_path / "base.mth").read_bytes()
    (tmp_path / "cut.mth").write_bytes(base[:-5])
    path.write_bytes(_with_base_path(data, "cut.mth"))
    with pytest.raises(TruncatedFileError, match="cut.mth"):
        mithril_gpu.open(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_base_is_missing(tmp_path, delta_pair):
    path, data = delta_pair
    os.chmod(tmp_path / "base.mth", 0)
    try:
        with pytest.raises(MissingBaseError, match="base.mth"):
            mithril_gpu.open(path)
    finally:
        os.chmod(tmp_path / "base.mth", 0o644)


# ------------------------------------------------------------------ closed files

def test_get_tensor_after_close_says_closed(tmp_path):
    mithril_gpu.save({"w": torch.ones(10)}, tmp_path / "a.mth")
    f = mithril_gpu.open(tmp_path / "a.mth")
    f.close()
    for call in (lambda: f.get_tensor("w"), lambda: f.get_bytes("w"), f.load, f.check):
        with pytest.raises(ValueError, match="closed") as e:
            call()
        assert not isinstance(e.value, MithrilError)
    f.close()                                   # closing twice is fine
    assert f.keys() == ["w"]                    # what the index says stays readable


# ------------------------------------------------------------------ messages: damage reads as damage

@pytest.fixture
def small(tmp_path_factory):
    p = tmp_path_factory.mktemp("small") / "s.mth"
    mithril_gpu.save({"w": torch.randn(300), "i": torch.arange(10)}, p, chunk_elems=128)
    return p.read_bytes()


def test_damaged_flag_bytes_say_damaged_not_upgrade(tmp_path, small):
    for pos, val in ((10, 0x01), (11, 0x80), (12, 0x04), (15, 0xFF)):
        bad = bytearray(small)
        bad[pos] ^= val
        with pytest.raises(CorruptFileError, match="damaged") as e:
            mithril_gpu.open(write(tmp_path, bytes(bad)))
        assert "upgrade" not in one_line(e)


def test_damaged_version_bytes_say_damaged(tmp_path, small):
    """A version field that a bit flip changed, in a file whose index is a sound version-1 index."""
    for version in (0, 3, 5, 129, 257, 0x8001):
        bad = small[:8] + struct.pack("<H", version) + small[10:]
        with pytest.raises(CorruptFileError, match="damaged") as e:
            mithril_gpu.open(write(tmp_path, bad))
        assert "upgrade" not in one_line(e)


def test_a_real_newer_version_says_upgrade(tmp_path, small):
    newer = resign(small, lambda d: d.update(mithril=2))
    newer = newer[:8] + struct.pack("<H", 2) + newer[10:]
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        mithril_gpu.open(write(tmp_path, newer))
    # a newer index this reader cannot even parse: still the upgrade advice, with the caveat
    off, length, _, magic = container.TRAILER.unpack(small[-32:])
    raw = b"future index encoding"
    v2 = small[:8] + struct.pack("<H", 2) + small[10:off] + raw + container.TRAILER.pack(
        off, len(raw), xxhash.xxh64_intdigest(raw), magic)
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        mithril_gpu.open(write(tmp_path, v2))


def test_index_version_that_disagrees_with_the_preamble_is_damage(tmp_path, small):
    with pytest.raises(CorruptFileError, match="damaged"):
        mithril_gpu.open(write(tmp_path, resign(small, lambda d: d.update(mithril=2))))


def test_damaged_trailer_says_damaged(tmp_path, small):
    for pos in (-32 + 4, -32 + 12, -32 + 3, -32 + 0):  # index offset / length bytes
        bad = bytearray(small)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptFileError, match="damaged") as e:
            mithril_gpu.open(write(tmp_path, bytes(bad)))
        one_line(e)


def test_undecodable_chunk_says_damaged(tmp_path):
    mithril_gpu.save({"i": torch.arange(5000)}, tmp_path / "a.mth", chunk_elems=5000)
    data = bytearray((tmp_path / "a.mth").read_bytes())
    with mithril_gpu.open(tmp_path / "a.mth") as f:
        off, csize, codec = f.entry("i").chunk(0, 1)
    assert codec == codecs.ZSTD
    data[off + 4] ^= 0xFF                       # the frame header descriptor
    with pytest.raises(CorruptFileError, match="damaged"):
        mithril_gpu.load(write(tmp_path, bytes(data)))


# ------------------------------------------------------------------ check()

def test_check_decodes_everything_and_returns_the_byte_count(tmp_path):
    state = {"model": {"w": torch.randn(5000), "b": torch.zeros(3, dtype=torch.bfloat16)}, "step": 3}
    mithril_gpu.save(state, tmp_path / "a.mth", chunk_elems=1000)
    with mithril_gpu.open(tmp_path / "a.mth") as f:
        seen = []
        assert f.check(progress=seen.append) == 5000 * 4 + 6
        assert sum(seen) == 5000 * 4 + 6


def test_check_verifies_even_when_opened_without_verification(tmp_path):
    mithril_gpu.save({"i": torch.arange(5000)}, tmp_path / "a.mth", chunk_elems=1000)
    data = (tmp_path / "a.mth").read_bytes()
    # two same-size chunks swapped: every frame decodes, only checksums can tell
    bad = resign(data, lambda d: d["tensors"][0]["chunks"].__setitem__(
        slice(0, 48), d["tensors"][0]["chunks"][24:48] + d["tensors"][0]["chunks"][0:24]))
    p = write(tmp_path, bad)
    with mithril_gpu.open(p, verify=False) as f:
        f.get_tensor("i")                      # no verification asked for: decodes
        with pytest.raises(ChecksumMismatchError, match="'i'"):
            f.check()


def test_check_validates_the_tree_as_load_does(tmp_path, small):
    bad = resign(small, lambda d: d.update(tree={"list": [{"tensor": 0}, {"float": 3}]}))
    p = write(tmp_path, bad)
    with pytest.raises(CorruptFileError, match="tree"):
        mithril_gpu.load(p)
    with mithril_gpu.open(p) as f:
        with pytest.raises(CorruptFileError, match="tree"):
            f.check()


def test_check_of_a_delta_verifies_the_base_it_uses(tmp_path, delta_pair):
    path, _ = delta_pair
    with mithril_gpu.open(path) as f:
        assert f.check() == 2000 * 4
        off, _, _ = f.base_file.entry("w").chunk(0, 1)
    base = bytearray((tmp_path / "base.mth").read_bytes())
    base[off + 3] ^= 0x01                       # a stored mantissa plane: decodes, checksum fails
    (tmp_path / "base.mth").write_bytes(bytes(base))
    with mithril_gpu.open(path, verify=False) as f:
        with pytest.raises(ChecksumMismatchError):
            f.check(chain=True)


def test_a_long_tensor_name_keeps_decoding_errors_short(tmp_path):
    """Found by the fuzzer: a 5000-character name put whole into a checksum error."""
    name = "x" * 5000 + "\n"
    mithril_gpu.save({name: torch.arange(100)}, tmp_path / "a.mth")
    bad = resign((tmp_path / "a.mth").read_bytes(), lambda d: no_rows(d["tensors"][0]).update(xxh64="0" * 16))
    for call in (mithril_gpu.load, lambda p: mithril_gpu.open(p).check()):
        with pytest.raises(ChecksumMismatchError) as e:
            call(write(tmp_path, bad))
        assert len(one_line(e)) <= 600


def test_running_out_of_memory_on_the_index_is_a_typed_error(tmp_path, small, monkeypatch):
    """A small file's index may expand to 256 MiB of JSON; under a memory limit, parsing it fails
    with a MithrilError, not a bare MemoryError."""
    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(container.json, "loads", no_memory)
    with pytest.raises(MithrilError, match="memory") as e:
        mithril_gpu.open(write(tmp_path, small))
    one_line(e)


def test_check_refuses_an_array_as_a_dict_key_as_load_does(tmp_path):
    """Found by the fuzzer: load() cannot make a numpy array a dict key; check() said the file was fine."""
    import numpy

    mithril_gpu.save({"a": numpy.arange(4, dtype="<f4"), "t": torch.ones(2)}, tmp_path / "a.mth")
    data = (tmp_path / "a.mth").read_bytes()
    tree = index_of(data)["tree"]
    nd = next(v for k, v in tree["dict"] if "ndarray" in v)
    bad = write(tmp_path, resign(data, lambda d: d["tree"]["dict"].append([nd, {"int": "1"}])))
    with pytest.raises(CorruptFileError):
        mithril_gpu.load(bad)
    with mithril_gpu.open(bad) as f:
        with pytest.raises(CorruptFileError, match="tree"):
            f.check()
