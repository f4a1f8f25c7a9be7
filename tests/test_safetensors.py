"""`.safetensors` in models/pretrained.py: read and written by the `safetensors` library,
with every crafted file a PretrainedLoadError naming it (never a traceback).

The files are built byte by byte here (8-byte little-endian header length, JSON header,
data), each crafted case one change away from `_VALID`, which reads back exactly."""
import json
import struct
import sys

import pytest
import torch

import export_backbone
from models import (PretrainedLoadError, build_backbone, load_pretrained_encoder,
                    load_safetensors, read_checkpoint, save_backbone, save_safetensors)

# two float32 tensors back to back: a = [1, 2] (bytes 0-8), b = [[3], [4], [5]] (bytes 8-20)
_DATA = struct.pack("<5f", 1, 2, 3, 4, 5)
_VALID = {"__metadata__": {"arch": "none"},
          "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [3, 1], "data_offsets": [8, 20]}}


def _file(header=None, data=_DATA, length=None, raw_header=None):
    """The bytes of a .safetensors file; `length` overrides the stated header length,
    `raw_header` the JSON text."""
    raw = raw_header if raw_header is not None else json.dumps(header or _VALID).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _with(name, **changes):
    """_VALID with the entry `name` changed."""
    header = json.loads(json.dumps(_VALID))
    header[name] = {**header[name], **changes}
    return header


def _valid_len():
    return len(json.dumps(_VALID).encode())


CRAFTED = {
    # b's bytes start inside a's: before the library, b silently read a's last float
    "overlap": lambda: _file(_with("b", data_offsets=[4, 16]), _DATA[:16]),
    # 4 bytes nobody owns between a and b
    "gap": lambda: _file(_with("b", data_offsets=[12, 24]), _DATA[:8] + bytes(4) + _DATA[8:]),
    "trailing_bytes": lambda: _file(data=_DATA + b"\0" * 8),
    "header_length_past_end": lambda: _file(length=_valid_len() + len(_DATA) + 1),
    "header_length_2_62": lambda: _file(length=2 ** 62),
    "metadata_list": lambda: _file({**_VALID, "__metadata__": ["arch", "none"]}),
    "negative_dimension": lambda: _file(_with("b", shape=[-3, -1])),
    "truncated": lambda: _file()[:-6],
    "truncated_in_length": lambda: _file()[:5],
    "bad_json": lambda: _file(raw_header=json.dumps(_VALID).encode()[:-1] + b",}"),
    "empty": lambda: b"",
}


def test_hand_built_file_reads_back_exactly(tmp_path):
    """The base of every crafted case is a correct file: the library reads our bytes."""
    path = tmp_path / "valid.safetensors"
    path.write_bytes(_file())
    tensors, meta = load_safetensors(path)
    assert meta == {"arch": "none"}
    assert sorted(tensors) == ["a", "b"]
    assert torch.equal(tensors["a"], torch.tensor([1.0, 2.0]))
    assert torch.equal(tensors["b"], torch.tensor([[3.0], [4.0], [5.0]]))
    assert tensors["b"].dtype == torch.float32
    assert read_checkpoint(path).keys() == tensors.keys()


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_file_is_a_clear_error_naming_it(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(CRAFTED[case]())
    for read in (load_safetensors, read_checkpoint):
        with pytest.raises(PretrainedLoadError) as err:
            read(path)
        assert str(path) in str(err.value)
        assert "not a valid .safetensors file" in str(err.value)
    encoder = torch.nn.Conv3d(1, 2, 1, bias=False)
    before = encoder.weight.detach().clone()
    with pytest.raises(PretrainedLoadError, match=case):
        load_pretrained_encoder(encoder, path)
    assert torch.equal(encoder.weight, before)


@pytest.mark.parametrize("case", ["overlap", "header_length_2_62", "metadata_list",
                                  "negative_dimension"])
def test_crafted_file_cli_prints_one_line(tmp_path, case, capsys):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(CRAFTED[case]())
    assert export_backbone.main([str(path), "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"export_backbone.py: error: {path}: not a valid .safetensors file")
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PretrainedLoadError, match="nothing.safetensors"):
        load_safetensors(tmp_path / "nothing.safetensors")


def test_writer_is_the_library_format(tmp_path):
    """save_safetensors writes what the library reads: values, dtypes, shapes, metadata;
    a tensor given twice (shared memory, which the library refuses) is written twice;
    non-contiguous and zero-size tensors are fine."""
    from safetensors import safe_open
    w = torch.randn(3, 4)
    tensors = {"w": w, "w_again": w, "t": w.t(), "h": torch.randn(5).half(),
               "bf": torch.randn(2, 2).bfloat16(), "i": torch.arange(6)[1:5],
               "u": torch.tensor([1, 255], dtype=torch.uint8), "e": torch.zeros(0, 3),
               "s": torch.tensor(3.5), "flag": torch.tensor([True, False])}
    path = tmp_path / "ours.safetensors"
    with open(path, "wb") as f:
        save_safetensors(tensors, f, {"arch": "res3d10", "epoch": 7})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"arch": "res3d10", "epoch": "7"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    ours, meta = load_safetensors(path)
    assert meta == {"arch": "res3d10", "epoch": "7"}
    assert all(torch.equal(ours[k], v) for k, v in tensors.items())


def test_backbone_round_trip_and_checks_on_top(tmp_path, capsys):
    """save_backbone -> load_pretrained_encoder, and our checks on top of the library:
    non-finite weights and wrong shapes are refused, nothing is loaded then."""
    torch.manual_seed(0)
    net = build_backbone("res3d10")
    path = tmp_path / "bb.safetensors"
    with open(path, "wb") as f:
        meta = save_backbone(net, f, {"source": "teacher"})
    assert meta == {"format": "pt", "source": "teacher", "arch": "res3d10"}
    assert load_safetensors(path)[1] == meta
    fresh = build_backbone("res3d10")
    summary = load_pretrained_encoder(fresh, path)
    assert summary["n_loaded"] == len(net.state_dict()) and summary["missing"] == []
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in fresh.state_dict().items())

    state = load_safetensors(path)[0]
    state["layer1.0.conv2.weight"][0, 0, 0, 0, 0] = float("inf")
    bad = tmp_path / "inf.safetensors"
    with open(bad, "wb") as f:
        save_safetensors(state, f)
    other = build_backbone("res3d10")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PretrainedLoadError, match=r"inf\.safetensors.*NaN or inf.*layer1\.0\.conv2"):
        load_pretrained_encoder(other, bad)
    state = load_safetensors(path)[0]
    state["conv1.weight"] = torch.zeros(64, 1, 3, 3, 3)
    wrong = tmp_path / "shape.safetensors"
    with open(wrong, "wb") as f:
        save_safetensors(state, f)
    with pytest.raises(PretrainedLoadError, match=r"shape\.safetensors.*conv1\.weight"):
        load_pretrained_encoder(other, wrong)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_missing_package_says_pip_install(tmp_path, monkeypatch):
    """Without safetensors, .pth checkpoints still load and .safetensors files say what to do."""
    path = tmp_path / "valid.safetensors"
    path.write_bytes(_file())
    torch.save({"weight": torch.ones(2, 1, 1, 1, 1)}, tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(PretrainedLoadError, match=r"valid\.safetensors.*pip install safetensors"):
        load_safetensors(path)
    with open(tmp_path / "x.safetensors", "wb") as f, \
            pytest.raises(PretrainedLoadError, match="pip install safetensors"):
        save_safetensors({"a": torch.ones(1)}, f)
    assert (tmp_path / "x.safetensors").stat().st_size == 0
    encoder = torch.nn.Conv3d(1, 2, 1, bias=False)
    assert load_pretrained_encoder(encoder, tmp_path / "w.pth")["n_loaded"] == 1
    assert torch.equal(encoder.weight, torch.ones(2, 1, 1, 1, 1))
