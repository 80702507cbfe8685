"""torch values that torch.load(weights_only=True) allows round trip (issue 13): torch.Size,
torch.dtype, torch.device, and OrderedDict with its ``_metadata`` attribute (which
load_state_dict reads for module versions). They are tree nodes of feature "torch"."""
import collections
import json
import subprocess
import sys

import pytest
import torch

import mithril_gpu
from mithril_gpu import tree as tree_mod
from mithril_gpu.errors import CorruptFileError

from conftest import subprocess_env
from test_hostile_files import index_of, resign


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.LayerNorm(4))


def test_state_dict_keeps_its_ordered_dict_type_and_metadata(tmp_path):
    sd = _model().state_dict()
    assert isinstance(sd, collections.OrderedDict) and sd._metadata    # what torch gives
    mithril_gpu.save({"model": sd}, tmp_path / "x.mth")
    back = mithril_gpu.load(tmp_path / "x.mth")["model"]
    assert type(back) is collections.OrderedDict
    assert list(back) == list(sd)
    assert back._metadata == sd._metadata
    assert type(back._metadata) is type(sd._metadata)
    for k in sd:
        assert torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype
    # load_state_dict sees the versions (BatchNorm's _load_from_state_dict reads them)
    seen = {}
    m = _model()
    orig = torch.nn.BatchNorm1d._load_from_state_dict

    def spy(self, state_dict, prefix, local_metadata, *a, **k):
        seen[prefix] = local_metadata.get("version")
        return orig(self, state_dict, prefix, local_metadata, *a, **k)

    torch.nn.BatchNorm1d._load_from_state_dict = spy
    try:
        m.load_state_dict(back)
    finally:
        torch.nn.BatchNorm1d._load_from_state_dict = orig
    assert seen == {"1.": 2}


def test_torch_size_dtype_device_round_trip_anywhere(tmp_path):
    od_plain = collections.OrderedDict([("b", 1), ("a", 2)])          # no _metadata: none comes back
    obj = {
        "shape": torch.Size([2, 3, 0]), "scalar_shape": torch.Size([]), "odd": torch.Size([-1, 7]),
        "dtypes": [torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.bool, torch.complex64],
        "devices": (torch.device("cpu"), torch.device("cuda:3"), torch.device("meta")),
        torch.float16: "a dtype as a key", torch.device("cpu"): "a device as a key",
        "od": od_plain, "w": torch.ones(2),
    }
    mithril_gpu.save(obj, tmp_path / "x.mth")
    back = mithril_gpu.load(tmp_path / "x.mth")
    assert back == {k: v for k, v in obj.items() if k != "w"} | {"w": back["w"]}
    assert type(back["shape"]) is torch.Size and back["shape"] == (2, 3, 0)
    assert back["dtypes"] == obj["dtypes"] and all(isinstance(d, torch.dtype) for d in back["dtypes"])
    assert back["devices"][1] == torch.device("cuda", 3)               # no CUDA needed to read it
    assert type(back["od"]) is collections.OrderedDict and not hasattr(back["od"], "_metadata")
    assert list(back["od"]) == ["b", "a"]
    with mithril_gpu.open(tmp_path / "x.mth") as f:
        assert "torch" in json.loads(f.index.to_json())["features"]


def test_the_torch_feature_is_listed_only_when_used(tmp_path):
    mithril_gpu.save({"w": torch.ones(2), "d": {"x": 1}}, tmp_path / "plain.mth")
    with mithril_gpu.open(tmp_path / "plain.mth") as f:
        assert json.loads(f.index.to_json())["features"] == []
    assert tree_mod.features({"list": [{"torch_dtype": "float32"}]}) == {"torch"}
    assert tree_mod.features({"odict": [[[{"str": "a"}, {"ndarray": [0, "<f4"]}]], None]}) == {"ndarray", "torch"}


def test_tensors_inside_ordered_dicts_and_their_metadata_are_found(tmp_path):
    od = collections.OrderedDict(w=torch.arange(4.0))
    od._metadata = collections.OrderedDict(v=torch.tensor([7]))       # odd, but allowed
    mithril_gpu.save({"od": od}, tmp_path / "x.mth")
    with mithril_gpu.open(tmp_path / "x.mth") as f:
        assert sorted(f.keys()) == ["od/<_metadata>/v", "od/w"]
    back = mithril_gpu.load(tmp_path / "x.mth")["od"]
    assert torch.equal(back["w"], od["w"]) and torch.equal(back._metadata["v"], od._metadata["v"])


@pytest.mark.parametrize("node", [
    {"torch_dtype": "Tensor"},              # an attribute of torch that is not a dtype
    {"torch_dtype": "__class__"},
    {"torch_dtype": "float99"},
    {"torch_dtype": 3},
    {"torch_device": "nosuch:0"},
    {"torch_device": "cuda:-1"},
    {"torch_device": "cpu; rm -rf"},
    {"torch_size": ["1.5"]},
    {"torch_size": [1, 2]},
    {"torch_size": ["1"] * 65},
    {"torch_size": "12"},
    {"odict": [[[{"str": "a"}]], None]},
    {"odict": [[], None, None]},
    {"odict": {"a": 1}},
    {"odict": [[[{"str": "a"}, {"int": "1"}]], {"bogus": 1}]},
])
def test_malformed_torch_nodes_are_corrupt_file_errors(tmp_path, node):
    mithril_gpu.save({"w": torch.ones(2), "v": torch.float32}, tmp_path / "x.mth")
    data = (tmp_path / "x.mth").read_bytes()

    def edit(d):
        d["tree"]["dict"][1][1] = node
    (tmp_path / "bad.mth").write_bytes(resign(data, edit))
    assert index_of((tmp_path / "bad.mth").read_bytes())["tree"]["dict"][1][1] == node
    with pytest.raises(CorruptFileError, match="bad tree node"):
        mithril_gpu.load(tmp_path / "bad.mth")
    with mithril_gpu.open(tmp_path / "bad.mth") as f, pytest.raises(CorruptFileError, match="bad tree node"):
        f.check()


def test_a_reader_that_does_not_know_the_feature_refuses_the_file(tmp_path, monkeypatch):
    from mithril_gpu import container
    from mithril_gpu.errors import UnsupportedVersionError

    mithril_gpu.save({"d": torch.int8}, tmp_path / "x.mth")
    monkeypatch.setattr(container, "FEATURES", container.FEATURES - {"torch"})
    with pytest.raises(UnsupportedVersionError, match="torch"):
        mithril_gpu.load(tmp_path / "x.mth")


def test_cli_torch_file_round_trip_keeps_metadata_size_and_dtype(tmp_path):
    sd = _model().state_dict()
    state = {"model": sd, "shape": torch.Size([4, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu")}
    torch.save(state, tmp_path / "in.pt")
    run = [sys.executable, "-m", "mithril_gpu"]
    subprocess.run(run + ["compress", str(tmp_path / "in.pt"), str(tmp_path / "x.mth")], check=True,
                   env=subprocess_env(), capture_output=True)
    subprocess.run(run + ["decompress", str(tmp_path / "x.mth"), str(tmp_path / "out.pt")], check=True,
                   env=subprocess_env(), capture_output=True)
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert back["shape"] == state["shape"] and type(back["shape"]) is torch.Size
    assert back["dtype"] is torch.bfloat16 and back["device"] == torch.device("cpu")
    assert type(back["model"]) is collections.OrderedDict and back["model"]._metadata == sd._metadata
    for k in sd:
        assert torch.equal(back["model"][k], sd[k])


def test_a_one_element_tensor_with_a_stride_saves(tmp_path):
    # torch calls a one-element tensor contiguous whatever its stride; its bytes could not be viewed
    t = {"f32": torch.randn(7)[::3][1:2], "bf16": torch.randn(9).bfloat16()[::4][2:3], "b": torch.ones(5).bool()[::2][:1]}
    assert all(v.stride() != (1,) for v in t.values())
    mithril_gpu.save(t, tmp_path / "x.mth")
    back = mithril_gpu.load(tmp_path / "x.mth")
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in t.items())
