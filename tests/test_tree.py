"""The object tree (mithril_gpu/tree.py): numpy arrays round trip as numpy arrays, strings UTF-8
cannot encode are refused as UnsupportedValueError, and malformed trees are CorruptFileError."""
import json
import os

import numpy as np
import pytest
import torch

import mithril_gpu
from mithril_gpu import tree as tree_mod
from mithril_gpu.errors import CorruptFileError, UnsupportedValueError

CODES = sorted(tree_mod.NDARRAY_CODES)


def _arrays():
    """Every numpy dtype an ndarray node takes, both byte orders, with awkward layouts."""
    rng = np.random.default_rng(0)
    out = {}
    for code in CODES:
        for order in ("<", ">") if code[1] != "1" else ("|",):
            dt = np.dtype(order + code)
            raw = rng.integers(0, 256, 7 * 5 * dt.itemsize, dtype=np.uint8)
            if code == "b1":
                raw = raw & 1
            a = raw.view(dt).reshape(7, 5)        # random bits: NaN payloads, -0.0, subnormals
            out[f"{dt.str}/c"] = a
            out[f"{dt.str}/fortran"] = np.asfortranarray(a)
            out[f"{dt.str}/strided"] = a[::2, ::-1]
            out[f"{dt.str}/0d"] = a[:1, :1].reshape(())
            out[f"{dt.str}/empty"] = a[:0]
    ro = np.arange(6, dtype=np.float32)
    ro.flags.writeable = False
    out["readonly"] = ro
    return out


def test_numpy_arrays_round_trip_as_numpy_arrays_bit_exact(tmp_path):
    arrays = _arrays()
    rng_state = np.random.RandomState(3).get_state()         # ('MT19937', uint32[624], int, int, float)
    obj = {"arrays": arrays, "rng": rng_state, "w": torch.ones(3)}
    mithril_gpu.save(obj, tmp_path / "x.mth")
    back = mithril_gpu.load(tmp_path / "x.mth")
    for k, a in arrays.items():
        b = back["arrays"][k]
        assert type(b) is np.ndarray, k
        assert b.dtype.str == a.dtype.str and b.shape == a.shape, k
        assert b.tobytes() == a.tobytes(), k                   # C-order bytes, bit for bit
    assert back["rng"][0] == "MT19937" and back["rng"][2:] == rng_state[2:]
    assert back["rng"][1].dtype == np.uint32 and np.array_equal(back["rng"][1], rng_state[1])
    np.random.RandomState().set_state(back["rng"])            # usable as it was
    assert isinstance(back["w"], torch.Tensor)


def test_a_numpy_array_seen_twice_is_stored_once(tmp_path):
    a = np.arange(1000, dtype=">f8")
    mithril_gpu.save({"a": a, "b": a}, tmp_path / "x.mth")
    with mithril_gpu.open(tmp_path / "x.mth") as f:
        assert f.keys() == ["a"]
    back = mithril_gpu.load(tmp_path / "x.mth")
    assert back["b"].dtype.str == ">f8" and np.array_equal(back["a"], back["b"])


@pytest.mark.parametrize("value, match", [
    (np.array([1, "x"], dtype=object), "object"),
    (np.zeros(2, np.complex64), "complex64"),
    (np.zeros(2, "U3"), "U3"),
    (np.zeros(2, "i4,f4"), "dtype"),
    (np.zeros(2, "M8[s]"), "datetime64"),
    (np.ma.array([1, 2]), "MaskedArray"),
])
def test_numpy_arrays_that_cannot_be_stored_are_refused_clearly(tmp_path, value, match):
    with pytest.raises(UnsupportedValueError, match=match) as e:
        mithril_gpu.save({"state": {"x": value}}, tmp_path / "x.mth")
    assert "state/x" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("obj, where", [
    ({"k\udc80": torch.ones(1)}, "<key>"),
    ({"cfg": {"name": "run-\udcff"}}, "cfg/name"),
    ({"cfg": ["ok", "bad\ud800"]}, "cfg/1"),
])
def test_strings_with_lone_surrogates_are_unsupported_values(tmp_path, obj, where):
    """Before: UnicodeEncodeError from deep inside the writer, after a temp file was made."""
    with pytest.raises(UnsupportedValueError, match="surrogate") as e:
        mithril_gpu.save(obj, tmp_path / "x.mth")
    msg = str(e.value)
    assert where in msg and msg.isprintable() and msg.encode("utf-8")
    assert os.listdir(tmp_path) == []


def test_unsupported_value_messages_are_bounded_and_printable(tmp_path):
    class Custom:
        pass

    key = "k" * 5000 + "\udc80\n"
    with pytest.raises(UnsupportedValueError) as e:
        mithril_gpu.save({key: Custom()}, tmp_path / "x.mth")
    assert len(str(e.value)) < 600 and str(e.value).isprintable()


@pytest.mark.parametrize("node", [
    {"dict": [[{"str": "a"}]]},                              # a pair of one
    {"dict": [[{"list": []}, {"int": "1"}]]},                # an unhashable key
    {"dict": 5},
    {"ndarray": [0, "<f8"]},                                 # tensor 0 is F32, not F64
    {"ndarray": [0, "<c8"]},
    {"ndarray": [0]},
    {"ndarray": [True, "<f4"]},
    {"ndarray": [9, "<f4"]},
    {"frob": 1},
])
def test_check_refuses_what_decode_refuses(node):
    """check() refuses every malformed tree; decode() (given tensors that exist: the reader has
    checked the indexes when the file opened) refuses the same ones."""
    with pytest.raises(CorruptFileError):
        tree_mod.check(node, ["F32"])
    with pytest.raises(CorruptFileError):
        tree_mod.decode(node, lambda i: torch.ones(2) if i == 0 else torch.ones(2, dtype=torch.float64))


def test_check_refuses_tensors_that_do_not_exist():
    for node in ({"tensor": 9}, {"tensor": -1}, {"tensor": "0"}, {"list": [{"ndarray": [1, "<f4"]}]}):
        with pytest.raises(CorruptFileError):
            tree_mod.check(node, ["F32"])


def test_check_rebuilds_the_tree_with_stubs():
    node = {"dict": [[{"str": "w"}, {"tensor": 0}], [{"str": "r"}, {"ndarray": [1, ">u4"]}],
                     [{"int": "3"}, {"tuple": [{"none": None}, {"float": "0.5"}]}]]}
    out = tree_mod.check(node, ["BF16", "U32"])
    assert isinstance(out["w"], tree_mod.Stub) and out["r"].dtype == "U32" and out[3] == (None, 0.5)


def test_features_name_ndarray_only_when_used():
    assert tree_mod.features({"dict": [[{"str": "a"}, {"tensor": 0}]]}) == set()
    assert tree_mod.features({"list": [{"dict": [[{"int": "0"}, {"ndarray": [0, "|u1"]}]]}]}) == {"ndarray"}


def test_ndarray_refs_are_validated_when_the_file_opens(tmp_path):
    """The reader checks every tensor index the tree names, ndarray nodes included."""
    assert list(tree_mod.tensor_refs({"list": [{"ndarray": [7, "<f4"]}, {"tensor": 1}]})) == [7, 1]


def test_files_with_numpy_arrays_announce_the_feature(tmp_path):
    import numpy as np

    import mithril_gpu

    mithril_gpu.save({"rng": np.arange(5, dtype=np.uint32), "w": torch.ones(2)}, tmp_path / "n.mth")
    mithril_gpu.save({"w": torch.ones(2)}, tmp_path / "p.mth")
    with mithril_gpu.open(tmp_path / "n.mth") as f, mithril_gpu.open(tmp_path / "p.mth") as g:
        feats = [json.loads(x.index.to_json())["features"] for x in (f, g)]
        assert feats == [["ndarray"], []]


def test_an_int_a_reader_would_refuse_is_refused_when_saved(tmp_path):
    # a reader takes int nodes of up to 4300 characters, sign included; a writer took a negative
    # int of 4300 digits (4301 characters): the save returned and no load could read the file
    import mithril_gpu
    for v in (10 ** 4299, -(10 ** 4298)):           # 4300 characters: saved and read back
        mithril_gpu.save({"x": v}, tmp_path / "a.mth")
        assert mithril_gpu.load(tmp_path / "a.mth")["x"] == v
    for v in (-(10 ** 4299), 10 ** 4300):
        with pytest.raises(mithril_gpu.UnsupportedValueError, match="at x: an int of more than 4300 characters"):
            mithril_gpu.save({"x": v}, tmp_path / "b.mth")
    assert not (tmp_path / "b.mth").exists()


def test_torch_values_torch_would_change_are_refused():
    # torch.device keeps an index below 64 and wraps others ("cuda:999999" came back as
    # "cuda:63"); a size beyond int64 made a torch.Size whose repr raised
    from mithril_gpu import tree
    from mithril_gpu.errors import CorruptFileError
    for node in ({"torch_device": "cuda:999999"}, {"torch_device": "cuda:256"},
                 {"torch_size": ["9999999999999999999"]}):
        with pytest.raises(CorruptFileError, match="bad tree node"):
            tree.decode(node, lambda i: None)
    assert str(tree.decode({"torch_device": "cuda:3"}, lambda i: None)) == "cuda:3"
    assert tuple(tree.decode({"torch_size": ["2", "-1"]}, lambda i: None)) == (2, -1)


def test_containers_shared_over_and_over_are_refused_not_expanded(tmp_path, monkeypatch):
    """A 2 KB torch file of lists that hold one list twice, 40 deep, is 2^40 values once expanded:
    `compress` ran until killed. The structure's size is bounded (tree.MAX_NODES)."""
    import mithril_gpu
    from mithril_gpu import tree

    import time

    a: list = []
    for _ in range(40):
        a = [a, a]
    t = time.perf_counter()
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="shared over and over.*more than 2,000,000"):
        mithril_gpu.save({"x": a}, tmp_path / "x.mth")
    assert time.perf_counter() - t < 60 and not (tmp_path / "x.mth").exists()
    big = list(range(2_500_000))                  # a sampler's indices: many values, none shared
    mithril_gpu.save({"order": big, "again": [big[:10]] * 3}, tmp_path / "ok.mth")
    assert mithril_gpu.load(tmp_path / "ok.mth")["order"] == big
    monkeypatch.setattr(tree, "MAX_NODES", 25)        # what repeats is counted: 3 repeats x 11 values > 25
    mithril_gpu.save({"again": [list(range(10))] * 3}, tmp_path / "ok.mth")       # 2 repeats: 22
    with pytest.raises(mithril_gpu.UnsupportedValueError, match="more than 25 values"):
        mithril_gpu.save({"again": [list(range(10))] * 4}, tmp_path / "no.mth")
