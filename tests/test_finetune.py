"""models.pretrained and models.unet (safe, loud loading; the network), finetune_example.py
(the loop), tools/export_backbone.py, and the README snippet (executed as written)."""
import argparse
import contextlib
import io
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

import export_backbone
import finetune_example as fe
from models import (ARCHS, PretrainedLoadError, ResNet3D, ResUNet3D, build_backbone,
                    load_pretrained_encoder)

REPO = Path(__file__).resolve().parents[1]

LINE = re.compile(r"\[pre_(\d+)/mod_(\d+)\]: (\d+) shared layers")


def _pretrained(arch="res3d10", seed=1):
    """A backbone state dict visibly different from a fresh default initialisation."""
    torch.manual_seed(seed)
    return {k: v + 0.5 if v.is_floating_point() else v
            for k, v in build_backbone(arch).state_dict().items()}


def _head(prefix="module.head."):
    return {prefix + "mlp.0.weight": torch.randn(8, 4),
            prefix + "last_layer.weight": torch.randn(5, 8)}


def _trainer_checkpoint(backbone):
    """The layout main_desd.py writes."""
    teacher = {"module.backbone." + k: v for k, v in backbone.items()} | _head()
    student = ({"module.backbone." + k: v.clone() for k, v in backbone.items()} | _head()
               | _head("module.deep_heads.stage1."))
    return {"teacher": teacher, "student": student,
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
            "args": {"arch": "res3d10", "lr": 5e-4}, "desd_loss": {"center": torch.zeros(1, 5)}}


def _published_checkpoint(backbone):
    """The released DeSD layout: `args` is an argparse.Namespace."""
    ckpt = _trainer_checkpoint(backbone)
    ckpt["args"] = argparse.Namespace(arch="resnet3d50", out_dim=60000, lr=0.0005)
    return ckpt


@pytest.fixture(scope="module")
def pretrained():
    return _pretrained()


def _assert_loaded(encoder, backbone, summary, out):
    n_model = len(encoder.state_dict())
    assert summary["n_loaded"] == summary["n_model"] == n_model
    assert summary["missing"] == []
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    m = LINE.search(out)
    assert m, out
    assert int(m.group(2)) == n_model and int(m.group(3)) == n_model
    assert summary["conv1_mean_after"] != pytest.approx(summary["conv1_mean_before"], abs=1e-3)
    assert "conv1.weight mean" in out


def test_full_match_trainer_checkpoint(tmp_path, pretrained, capsys):
    path = tmp_path / "checkpoint.pth"
    torch.save(_trainer_checkpoint(pretrained), path)
    encoder = ResUNet3D("res3d10", num_classes=2).encoder
    summary = load_pretrained_encoder(encoder, path)
    out = capsys.readouterr().out
    _assert_loaded(encoder, pretrained, summary, out)
    assert summary["source"] == "teacher"
    # N counts the teacher's tensors after stripping, heads included (published line).
    assert summary["n_pretrained"] == len(pretrained) + 2
    assert sorted(summary["unused"]) == ["head.last_layer.weight", "head.mlp.0.weight"]


def test_published_checkpoint_with_namespace(tmp_path, pretrained, capsys):
    path = tmp_path / "DeSD_Res50.pth"
    torch.save(_published_checkpoint(pretrained), path)
    with pytest.raises(pickle.UnpicklingError):  # the allow-list is what makes it load
        torch.load(path, weights_only=True)
    encoder = build_backbone("res3d10")
    summary = load_pretrained_encoder(encoder, path)
    _assert_loaded(encoder, pretrained, summary, capsys.readouterr().out)


@pytest.mark.parametrize("prefix", ["module.backbone.", "backbone.", "module.", ""])
def test_prefixes_and_bare_state_dicts(tmp_path, pretrained, capsys, prefix):
    path = tmp_path / "weights.pth"
    torch.save({prefix + k: v for k, v in pretrained.items()}, path)
    encoder = build_backbone("res3d10")
    summary = load_pretrained_encoder(encoder, path)
    assert summary["source"] == "state dict"
    _assert_loaded(encoder, pretrained, summary, capsys.readouterr().out)


def test_student_only_checkpoint(tmp_path, pretrained, capsys):
    ckpt = _trainer_checkpoint(pretrained)
    del ckpt["teacher"]
    torch.save(ckpt, tmp_path / "student.pth")
    encoder = build_backbone("res3d10")
    summary = load_pretrained_encoder(encoder, tmp_path / "student.pth")
    assert summary["source"] == "student"
    _assert_loaded(encoder, pretrained, summary, capsys.readouterr().out)


def test_safetensors_backbone(tmp_path, pretrained, capsys):
    from safetensors.torch import save_file
    save_file(pretrained, str(tmp_path / "teacher_backbone.safetensors"))
    encoder = build_backbone("res3d10")
    summary = load_pretrained_encoder(encoder, tmp_path / "teacher_backbone.safetensors")
    _assert_loaded(encoder, pretrained, summary, capsys.readouterr().out)


def test_nothing_matches_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"teacher": {"module.encoder.stem.weight": torch.zeros(3)}}, path)
    encoder = build_backbone("res3d10")
    with pytest.raises(PretrainedLoadError, match="no tensor"):
        load_pretrained_encoder(encoder, path)


def test_example_reports_a_bad_checkpoint_by_name(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"teacher": {"module.encoder.stem.weight": torch.zeros(3)}}, path)
    assert fe.main(["--pretrained", str(path), "--arch", "res3d10",
                    "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("finetune_example.py: error:") and "no tensor" in err and "other.pth" in err


def test_wrong_shape_is_an_error_and_loads_nothing(tmp_path, pretrained):
    bad = dict(pretrained)
    bad["conv1.weight"] = torch.zeros(64, 2, 7, 7, 7)
    torch.save({"teacher": {"module.backbone." + k: v for k, v in bad.items()}}, tmp_path / "a.pth")
    encoder = build_backbone("res3d10")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(ValueError, match=r"conv1.weight: checkpoint \(64, 2, 7, 7, 7\)"):
        load_pretrained_encoder(encoder, tmp_path / "a.pth")
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    # Another depth: named as such in the error.
    torch.save(_pretrained("res3d50"), tmp_path / "r50.pth")
    with pytest.raises(PretrainedLoadError, match="looks like res3d50"):
        load_pretrained_encoder(encoder, tmp_path / "r50.pth")


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_payload_is_refused_and_never_runs(tmp_path, pretrained):
    # The payload is live: plain pickle runs it.
    pickle.loads(pickle.dumps(_Payload(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()

    marker = tmp_path / "pwned"
    ckpt = _trainer_checkpoint(pretrained)
    ckpt["args"] = _Payload(marker)
    torch.save(ckpt, tmp_path / "evil.pth")  # zip format
    with open(tmp_path / "evil_legacy.pth", "wb") as f:  # a bare pickle
        pickle.dump({"teacher": _Payload(marker)}, f, protocol=2)
    encoder = build_backbone("res3d10")
    for name in ("evil.pth", "evil_legacy.pth"):
        with pytest.raises(PretrainedLoadError, match="refused"):
            load_pretrained_encoder(encoder, tmp_path / name)
        with pytest.raises(PretrainedLoadError, match="refused"):
            export_backbone.export_backbone(tmp_path / name, tmp_path / "x.safetensors")
        assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_network_output_matches_odd_input_sizes(arch):
    size = (15, 37, 41)
    if arch in ("res3d101", "res3d152", "res3d200"):
        # Same code path as res3d50, only deeper: shapes checked on the meta device,
        # which runs no arithmetic (a real forward takes 5-10 s each on 2 cores).
        with torch.device("meta"):
            net = ResUNet3D(arch, num_classes=3)
            out = net(torch.empty(1, 1, *size))
    else:
        torch.manual_seed(0)
        net = ResUNet3D(arch, num_classes=3)
        with torch.no_grad():
            out = net(torch.randn(1, 1, *size))
        assert torch.isfinite(out).all()
    assert isinstance(net.encoder, ResNet3D)
    assert out.shape == (1, 3, *size)


def test_too_small_input_is_a_clear_error():
    net = ResUNet3D("res3d10", num_classes=2)
    with pytest.raises(ValueError, match="too small") as err:
        net(torch.randn(1, 1, 16, 32, 32))
    # the message names the exact minimum: one voxel more on any axis is enough
    assert "more than 16 voxels in depth or more than 32 in height or 32 in width" in str(err.value)
    for size in ((17, 32, 32), (16, 33, 32), (16, 32, 33)):
        net.check_input_size(size)
    deep = ResUNet3D("res3d10", stem_stride=(2, 2, 2))
    with pytest.raises(ValueError, match="more than 32 voxels in depth or more than 32"):
        deep.check_input_size((32, 32, 32))
    deep.check_input_size((33, 32, 32))
    assert net.encoder.stage_shapes((15, 37, 41))[-1] == (1, 2, 2)
    assert ResUNet3D("res3d10", stem_stride=(2, 2, 2)).encoder.stage_shapes((32, 64, 64))[-1] \
        == (1, 2, 2)
    with pytest.raises(SystemExit):  # refused by the parser, before any work
        fe.main(["--patch_size", "16", "32", "32", "--output_dir", "unused"])


def _tiny_run(tmp_path, name, *extra):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert fe.main(["--arch", "res3d10", "--epochs", "1", "--iters_per_epoch", "2",
                        "--batch_size", "1", "--patch_size", "32", "32", "32",
                        "--decoder_channels", "64", "32", "16", "8", "8",
                        "--n_synthetic", "3", "--synthetic_size", "32",
                        "--synthetic_slices", "16", "--eval_overlap", "0",
                        "--threads", "1", "--output_dir", str(tmp_path / name), *extra]) == 0
    return json.loads((tmp_path / name / "results.json").read_text()), buf.getvalue()


def test_one_epoch_on_synthetic_data(tmp_path, pretrained):
    from safetensors.torch import save_file
    save_file(pretrained, str(tmp_path / "bb.safetensors"))
    results, out = _tiny_run(tmp_path, "a", "--pretrained", str(tmp_path / "bb.safetensors"))
    assert LINE.search(out)
    assert re.search(r"^Dice per class \(held-out\): liver \d\.\d{3}  spleen \d\.\d{3}  "
                     r"kidney \d\.\d{3}$", out, re.M), out
    m = re.search(r"^Dice: (\d\.\d{3})$", out, re.M)
    assert m and 0.0 <= float(m.group(1)) <= 1.0, out
    assert (tmp_path / "a" / "finetuned_model.pth").is_file()
    assert (tmp_path / "a" / "results.json").is_file()
    # the fine-tuned network's encoder loads as a backbone (its 'encoder.' prefix stripped)
    net = torch.load(tmp_path / "a" / "finetuned_model.pth", weights_only=True)
    encoder = build_backbone("res3d10")
    summary = load_pretrained_encoder(encoder, tmp_path / "a" / "finetuned_model.pth")
    assert summary["n_loaded"] == summary["n_model"]
    assert all(torch.equal(v, net["encoder." + k]) for k, v in encoder.state_dict().items())
    # Deterministic for a seed (the preprocessing cache is reused on the second run).
    again, _ = _tiny_run(tmp_path, "a", "--pretrained", str(tmp_path / "bb.safetensors"))
    assert again["dice_per_class"] == results["dice_per_class"]


def test_curve_fixed_encoder_and_encoder_learning_rate(tmp_path, pretrained, capsys):
    from safetensors.torch import save_file
    save_file(pretrained, str(tmp_path / "bb.safetensors"))
    bb = ["--pretrained", str(tmp_path / "bb.safetensors")]
    # two epochs, the encoder fixed in both: only the decoder moved, and the held-out Dice
    # was measured after each epoch (the last point is the final Dice)
    results, out = _tiny_run(tmp_path, "fixed", *bb, "--epochs", "2", "--eval_every", "1",
                             "--freeze_encoder_epochs", "2")
    assert [(p["epoch"], p["step"]) for p in results["curve"]] == [(1, 2), (2, 4)]
    assert results["curve"][-1]["dice"] == results["dice"]
    assert all(0.0 <= p["dice"] <= 1.0 for p in results["curve"])
    assert re.search(r"^epoch 1/2  held-out Dice \d\.\d{3}$", out, re.M), out
    assert out.count("(encoder fixed)") == 2
    net = torch.load(tmp_path / "fixed" / "finetuned_model.pth", weights_only=True)
    for k, v in pretrained.items():
        assert torch.equal(net["encoder." + k], v), k
    fresh = ResUNet3D("res3d10", num_classes=4, decoder_channels=(64, 32, 16, 8, 8)).state_dict()
    moved = [k for k in fresh if not k.startswith("encoder.")
             and fresh[k].is_floating_point() and not torch.equal(net[k], fresh[k])]
    assert moved  # the decoder trained
    # fixed for the first of two epochs: the encoder moves in the second
    part, out = _tiny_run(tmp_path, "part", *bb, "--epochs", "2", "--freeze_encoder_epochs", "1")
    assert out.count("(encoder fixed)") == 1
    assert [p["step"] for p in part["curve"]] == [4]  # no --eval_every: the end only
    net = torch.load(tmp_path / "part" / "finetuned_model.pth", weights_only=True)
    assert not torch.equal(net["encoder.conv1.weight"], pretrained["conv1.weight"])
    # --encoder_lr_scale: the encoder's group steps at that fraction of the schedule
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append([(g["scale"], g["lr"]) for g in self.param_groups])
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        _tiny_run(tmp_path, "scaled", *bb, "--encoder_lr_scale", "0.1", "--lr", "0.001")
    finally:
        torch.optim.AdamW.step = real_step
    assert len(seen) == 2
    for (enc_scale, enc_lr), (dec_scale, dec_lr) in seen:
        assert (enc_scale, dec_scale) == (0.1, 1.0)
        assert enc_lr == pytest.approx(0.1 * dec_lr) and dec_lr <= 0.001
    assert seen[0][1][1] == pytest.approx(0.001)


def test_export_backbone_round_trip(tmp_path, pretrained, capsys):
    from safetensors.torch import load_file
    torch.save(_published_checkpoint(pretrained), tmp_path / "published.pth")
    summary = export_backbone.export_backbone(tmp_path / "published.pth")
    out_path = tmp_path / "teacher_backbone.safetensors"
    assert summary["out"] == str(out_path) and summary["arch"] == "res3d10"
    exported = load_file(str(out_path))
    assert exported.keys() == build_backbone("res3d10").state_dict().keys()
    assert all(torch.equal(v, pretrained[k]) for k, v in exported.items())
    encoder = build_backbone("res3d10")
    capsys.readouterr()
    _assert_loaded(encoder, pretrained, load_pretrained_encoder(encoder, out_path),
                   capsys.readouterr().out)
    # The student of a trainer checkpoint, deep heads left out.
    torch.save(_trainer_checkpoint(pretrained), tmp_path / "checkpoint.pth")
    summary = export_backbone.export_backbone(tmp_path / "checkpoint.pth", tmp_path / "s.safetensors",
                                              "student")
    assert summary["n_dropped"] == 4 and summary["source"] == "student"
    assert load_file(str(tmp_path / "s.safetensors")).keys() == exported.keys()


@pytest.mark.slow
def test_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- finetune-snippet:start -->")[1]
    section = section.split("<!-- finetune-snippet:end -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "load_pretrained_encoder(net.encoder" in code
    torch.manual_seed(2)
    backbone = {k: v + 0.5 for k, v in build_backbone("res3d50").state_dict().items()}
    torch.save(_published_checkpoint(backbone), tmp_path / "checkpoint.pth")
    del backbone
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    n = len(namespace["net"].encoder.state_dict())
    assert LINE.search(out).groups() == (str(n + 2), str(n), str(n))
    assert namespace["summary"]["n_loaded"] == n
    size = tuple(int(v) for v in re.search(r"torch\.randn\(1, 1, (\d+), (\d+), (\d+)\)",
                                           code).groups())
    assert namespace["logits"].shape == (1, 4, *size)


def test_export_refuses_a_backbone_that_is_no_res3d(tmp_path, pretrained):
    """A conv1 of another shape under res3d10's block counts used to be exported with a
    res3d10 label; now the export names the mismatch and writes nothing."""
    bad = dict(pretrained)
    bad["conv1.weight"] = torch.zeros(64, 2, 7, 7, 7)
    torch.save({"teacher": {"module.backbone." + k: v for k, v in bad.items()}}, tmp_path / "b.pth")
    with pytest.raises(PretrainedLoadError, match="not a complete res3d"):
        export_backbone.export_backbone(tmp_path / "b.pth", tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    assert export_backbone.main([str(tmp_path / "b.pth")]) == 1


def test_nan_weights_are_refused_on_load_and_on_export(tmp_path, pretrained):
    from safetensors.torch import save_file
    nan = dict(pretrained)
    nan["layer2.0.conv1.weight"] = nan["layer2.0.conv1.weight"].clone()
    nan["layer2.0.conv1.weight"][0, 0, 0, 0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    encoder = build_backbone("res3d10")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(PretrainedLoadError, match="NaN.*layer2.0.conv1.weight"):
        load_pretrained_encoder(encoder, tmp_path / "nan.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(PretrainedLoadError, match="NaN"):
        export_backbone.export_backbone(tmp_path / "nan.safetensors", tmp_path / "o.safetensors")


def test_own_safetensors_writer_and_reader_agree_with_the_library(tmp_path):
    from safetensors.torch import load_file, save_file
    from models import load_safetensors, save_safetensors
    tensors = {"f": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(6, dtype=torch.int64)[1:5], "u": torch.tensor([1, 2], dtype=torch.uint8),
               "e": torch.zeros(0, 3), "s": torch.tensor(3.5)}
    with open(tmp_path / "ours.safetensors", "wb") as f:
        save_safetensors(tensors, f, {"arch": "x"})
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert theirs.keys() == tensors.keys()
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "lib.safetensors"),
              metadata={"arch": "y"})
    ours, meta = load_safetensors(tmp_path / "lib.safetensors")
    assert meta == {"arch": "y"} and all(torch.equal(ours[k], v) for k, v in tensors.items())
    raw = (tmp_path / "lib.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(PretrainedLoadError, match="cut.safetensors.*truncated"):
        load_safetensors(tmp_path / "cut.safetensors")
