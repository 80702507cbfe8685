"""Bad input gives a typed error with one line, never a crash, hang, huge allocation or wrong data."""
import json
import os
import struct

import pytest
import torch
import xxhash
import zstandard

import mithril_gpu
from conftest import assert_same
from mithril_gpu import container
from mithril_gpu.errors import (ChecksumMismatchError, CorruptFileError, FormatError, MithrilError,
                                NotMithrilFileError, TruncatedFileError, UnsupportedVersionError)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    state = {"w": (torch.randn(3000, generator=g) * 0.02).to(torch.bfloat16), "i": torch.arange(300),
             "m": {"step": 3, "s": torch.tensor(1.5)}}
    path = tmp_path_factory.mktemp("bad") / "small.mth"
    mithril_gpu.save(state, path, chunk_elems=1024)
    return path, path.read_bytes(), state


def _load_bytes(tmp_path, data, **kw):
    p = tmp_path / "t.mth"
    p.write_bytes(data)
    return mithril_gpu.load(p, **kw)


def test_truncation_at_every_offset_is_a_format_error(tmp_path, small_file):
    _, data, _ = small_file
    step = max(1, len(data) // 400)
    offsets = sorted(set(range(0, len(data), step)) | set(range(len(data) - 40, len(data))))
    for cut in offsets:
        with pytest.raises(FormatError):
            _load_bytes(tmp_path, data[:cut])


def test_every_single_bit_flip_is_detected_or_harmless(tmp_path, small_file):
    """No flip anywhere gives silently wrong data. A few zstd header bits are unused by the
    spec (RFC 8878, frame header descriptor bit 4): flipping them changes nothing decoded."""
    _, data, state = small_file
    assert len(data) < 20000
    harmless = 0
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        try:
            back = _load_bytes(tmp_path, bytes(bad))
        except MithrilError:
            continue
        harmless += 1
        assert_same(back["w"], state["w"]) and assert_same(back["i"], state["i"])
        assert back["m"]["step"] == 3 and back["m"]["s"].item() == 1.5
    assert harmless < 10


def test_flipped_payload_bit_names_the_tensor_and_can_be_skipped(tmp_path, small_file):
    path, data, _ = small_file
    with mithril_gpu.open(path) as f:
        off, csize, codec = f.entry("i").chunk(0, 0)
    bad = bytearray(data)
    bad[off + csize // 2] ^= 0x04
    with pytest.raises((ChecksumMismatchError, CorruptFileError), match="'i'|zstd"):
        _load_bytes(tmp_path, bytes(bad))


def test_foreign_files_are_not_mithril(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3)}, tmp_path / "a.safetensors")
    torch.save({"a": torch.ones(3)}, tmp_path / "a.pt")
    (tmp_path / "r.bin").write_bytes(os.urandom(1000))
    (tmp_path / "e.mth").write_bytes(b"")
    with pytest.raises(NotMithrilFileError, match="safetensors"):
        mithril_gpu.load(tmp_path / "a.safetensors")
    with pytest.raises(NotMithrilFileError, match="torch"):
        mithril_gpu.load(tmp_path / "a.pt")
    with pytest.raises(NotMithrilFileError):
        mithril_gpu.load(tmp_path / "r.bin")
    with pytest.raises(NotMithrilFileError):
        mithril_gpu.load(tmp_path / "e.mth")
    with pytest.raises(FileNotFoundError):
        mithril_gpu.load(tmp_path / "missing.mth")


def test_newer_version_is_refused_with_advice(tmp_path, small_file):
    """A newer file (preamble and index versions change together) asks for an upgrade; a version
    field alone changed in a sound version-1 file is damage (tests/test_hostile_files.py)."""
    _, data, _ = small_file
    newer = _rewrite_index(data, lambda d: d.update(mithril=2))
    bad = newer[:8] + struct.pack("<H", 2) + newer[10:]
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        _load_bytes(tmp_path, bad)


def _rewrite_index(data: bytes, edit) -> bytes:
    """Re-sign an edited index so that only the validation of its content can catch a lie."""
    off, length, _, magic = container.TRAILER.unpack(data[-32:])
    d = json.loads(zstandard.ZstdDecompressor().decompress(data[off:off + length]))
    edit(d)
    raw = zstandard.ZstdCompressor().compress(json.dumps(d).encode())
    return data[:off] + raw + container.TRAILER.pack(off, len(raw), xxhash.xxh64_intdigest(raw), magic)


LIES = {
    "huge shape": lambda d: d["tensors"][0].update(shape=[1 << 40, 1 << 40]),
    "shape needing more rows": lambda d: d["tensors"][0].update(shape=[1 << 30]),
    "chunk beyond the data": lambda d: d["tensors"][0]["chunks"].__setitem__(0, 1 << 40),
    "chunk into the index": lambda d: d["tensors"][0]["chunks"].__setitem__(1, 1 << 20),
    "negative size": lambda d: d["tensors"][0]["chunks"].__setitem__(1, -5),
    "zstd too small for its size": lambda d: (d["tensors"][0].update(shape=[3000 * 40000], chunk_elems=1 << 26),
                                              d["tensors"][0].update(chunks=[16, 2, 1, 18, 2, 1])),
    "unknown codec": lambda d: d["tensors"][0]["chunks"].__setitem__(2, 7),
    "stored size mismatch": lambda d: d["tensors"][0]["chunks"].__setitem__(4, 1000),
    "unknown dtype": lambda d: d["tensors"][0].update(dtype="C64"),
    "fieldsplit on ints": lambda d: d["tensors"][1].update(transform="fieldsplit"),
    "bad checksum text": lambda d: d["tensors"][0].update(xxh64="zz"),
    "chunk_elems zero": lambda d: d["tensors"][0].update(chunk_elems=0),
    "string as size": lambda d: d["tensors"][0]["chunks"].__setitem__(1, "12"),
    "tree points nowhere": lambda d: d.update(tree={"tensor": 99}),
    "tree garbage": lambda d: d.update(tree={"dict": [[{"list": []}, {"int": "1"}]]}),
    "deep tree": lambda d: d.update(tree=json.loads('{"list":[' * 150 + "]}" * 150)),
    "unknown feature": lambda d: d.update(features=["hyperdrive"]),
    "delta without base": lambda d: d["tensors"][0].update(delta={"op": "xor", "base": "w"}),
    "duplicate names": lambda d: d["tensors"][1].update(name=d["tensors"][0]["name"]),
    "wrong version": lambda d: d.update(mithril=9),
    "not an object": lambda d: d.clear() or d.update(tensors="x"),
    "rank 65": lambda d: d["tensors"][0].update(shape=[1] * 65),
    "float shape": lambda d: d["tensors"][0].update(shape=[3000.0]),
    "nested chunk fields": lambda d: d["tensors"][0].update(chunks=[[v] for v in d["tensors"][0]["chunks"]]),
    "float chunk field": lambda d: d["tensors"][0]["chunks"].__setitem__(0, 16.0),
    "huge chunk field": lambda d: d["tensors"][0]["chunks"].__setitem__(1, 1 << 70),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_lying_index_is_refused_before_use(tmp_path, small_file, lie):
    _, data, _ = small_file
    with pytest.raises(FormatError):
        _load_bytes(tmp_path, _rewrite_index(data, LIES[lie]))


def test_lying_trailer_offsets(tmp_path, small_file):
    _, data, _ = small_file
    off, length, digest, magic = container.TRAILER.unpack(data[-32:])
    for o, n in [(0, length), (off + 1, length), (off, length + 1), (off, 1 << 40), (1 << 62, 8)]:
        with pytest.raises(FormatError):
            _load_bytes(tmp_path, data[:-32] + container.TRAILER.pack(o, n, digest, magic))


def test_swapped_payload_fails_the_checksum_not_silently(tmp_path, small_file):
    """Two chunks of the same size swapped: every frame decodes, only the checksum can tell."""
    _, data, _ = small_file

    def swap(d):
        c = d["tensors"][1]["chunks"]            # int64 arange, bytegroup: planes 1..7 are zeros
        c[3 * 1:3 * 1 + 3], c[3 * 2:3 * 2 + 3] = c[3 * 2:3 * 2 + 3], c[3 * 1:3 * 1 + 3]
        c[0:3], c[3:6] = c[3:6], c[0:3]

    bad = _rewrite_index(data, swap)
    with pytest.raises(ChecksumMismatchError, match="'i'"):
        _load_bytes(tmp_path, bad)
    state = _load_bytes(tmp_path, bad, verify=False)          # opting out decodes without checking
    assert state["i"].shape == (300,)


def test_truncated_file_message_is_one_line(tmp_path, small_file):
    _, data, _ = small_file
    with pytest.raises(TruncatedFileError) as e:
        _load_bytes(tmp_path, data[:-10])
    assert "\n" not in str(e.value) and "truncated" in str(e.value)


def test_a_delta_whose_base_is_itself_is_refused_from_its_trailer(tmp_path, monkeypatch):
    """A small file whose base record names the file itself used to open (and parse) itself 64
    times before the chain's depth stopped it, holding every parsed index: a hostile 2 KB file
    with a large index took gigabytes. A base candidate's identity is now checked from its
    trailer before its index is read."""
    import mithril_gpu

    mithril_gpu.save({"w": torch.arange(1000, dtype=torch.float32)}, tmp_path / "a.mth")
    mithril_gpu.save({"w": torch.arange(1000, dtype=torch.float32) + 1}, tmp_path / "b.mth", base=tmp_path / "a.mth")
    data = (tmp_path / "b.mth").read_bytes()
    looped = _rewrite_index(data, lambda d: d["base"].update(path="self.mth"))
    (tmp_path / "self.mth").write_bytes(looped)
    parsed = []
    real = container.parse_index
    monkeypatch.setattr(container, "parse_index", lambda *a, **k: parsed.append(1) or real(*a, **k))
    with pytest.raises(mithril_gpu.CorruptFileError, match="self.mth: its delta chain loops back to this file"):
        mithril_gpu.load(tmp_path / "self.mth")
    assert len(parsed) == 1                         # its own index only, not the base's again
    (tmp_path / "other.mth").write_bytes(looped)    # another file, the same bytes: the identity tells
    parsed.clear()
    with pytest.raises(mithril_gpu.BaseMismatchError, match="is not the base"):
        mithril_gpu.load(tmp_path / "self.mth", base=tmp_path / "other.mth")
    assert len(parsed) == 1


@pytest.mark.parametrize("info", [
    {"dtype": "U8", "shape": "12", "data_offsets": [0, 2]},
    {"dtype": "U8", "shape": [2], "data_offsets": [0.0, 2.0]},
    {"dtype": "U8", "shape": [2], "data_offsets": ["0", "2"]},
    {"dtype": "U8", "shape": [True, 2], "data_offsets": [0, 2]},
    {"dtype": "U8", "shape": {"2": 1}, "data_offsets": [0, 2]},
    {"dtype": "F32", "shape": [1 << 40, 1 << 40, 0], "data_offsets": [0, 0]},
    {"dtype": "F32", "shape": [0, 1 << 70], "data_offsets": [0, 0]},
    {"dtype": "U8", "shape": [1] * 100, "data_offsets": [0, 1]},
], ids=["shape text", "float offsets", "text offsets", "bool size", "shape dict", "running product overflows",
        "size above 2^62", "rank 100"])
def test_safetensors_headers_no_reader_opens_are_refused_at_compress(tmp_path, info):
    """These compressed with exit 0 into files that no reader would open (or that decompressed to
    something else): the input is now held to JSON integers and to what a .mth index can hold."""
    from mithril_gpu import formats

    h = json.dumps({"a": info}).encode()
    h += b" " * (-len(h) % 8)
    data = b"xy" if info["data_offsets"][-1] in (2, 2.0, "2") else (b"x" if info["data_offsets"][-1] == 1 else b"")
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)
    with pytest.raises(formats.InputFormatError, match="malformed entry|a .mth file cannot hold it"):
        formats.SafetensorsFile(tmp_path / "a.safetensors")


def test_what_a_reader_refuses_is_never_written(tmp_path, monkeypatch):
    """A tensor of 70 dimensions, or an index over the readers' limit (a 270 MB string), saved
    with success into files every reader refused. Both are refused at save, the old file kept."""
    import mithril_gpu

    mithril_gpu.save({"old": torch.ones(2)}, tmp_path / "x.mth")
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="70 dimensions"):
        mithril_gpu.save({"t": torch.zeros([1] * 70)}, tmp_path / "x.mth")
    monkeypatch.setattr(container, "MAX_INDEX_BYTES", 4000)
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="index would be .* more than readers accept"):
        mithril_gpu.save({"t": torch.ones(2), "s": "x" * 5000}, tmp_path / "x.mth")
    assert list(mithril_gpu.load(tmp_path / "x.mth")) == ["old"]
    mithril_gpu.save({"t": torch.zeros([1] * 64), "s": "x" * 100}, tmp_path / "x.mth")


@pytest.mark.parametrize("tree", [
    {"dict": [[{"str": "a"}, {"tensor": 0}, {"none": None}]]},
    {"dict": [5]},
    {"dict": [[{}, {"tensor": 0}]]},
], ids=["three items", "not a pair", "empty key"])
def test_load_subtree_of_a_malformed_tree_is_a_typed_error(tmp_path, tree):
    """load(subtree=) walks the tree before it is checked: malformed pairs gave ValueError,
    TypeError, StopIteration."""
    import mithril_gpu

    mithril_gpu.save({"a": torch.ones(3)}, tmp_path / "s.mth")
    bad = _rewrite_index((tmp_path / "s.mth").read_bytes(), lambda d: d.update(tree=tree))
    (tmp_path / "s.mth").write_bytes(bad)
    with pytest.raises(mithril_gpu.CorruptFileError):
        mithril_gpu.load(tmp_path / "s.mth", subtree="a")


def test_load_subtree_enters_an_ordered_dict(tmp_path):
    from collections import OrderedDict

    import mithril_gpu

    mithril_gpu.save(OrderedDict(a={"w": torch.ones(3)}), tmp_path / "o.mth")
    assert_same(mithril_gpu.load(tmp_path / "o.mth", subtree="a")["w"], torch.ones(3))
