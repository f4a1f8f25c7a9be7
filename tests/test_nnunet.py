"""nnU-Net v2 with a DeSD checkpoint: models/nnunet_net.py (the network nnU-Net builds from
its plans) and tools/nnunet.py (plans, weights), checked against nnU-Net's own code, then
the whole sequence through nnU-Net's own commands on a tiny synthetic CT dataset:
nnUNetv2_plan_and_preprocess, our plans, nnUNetv2_preprocess, our weights, training with
-pretrained_weights and from scratch (nnU-Net's training entry point, shortened by
tests/nnunet_short_train.py), nnUNetv2_predict; and the inputs the weights step refuses.
"""
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnunet as tool
import synthetic_ct
from models import build_backbone, hu_to_input
from models.nnunet_net import DeSDUNet, encoder_strides
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (
    DownsampleSegForDSTransform)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # nnU-Net's console scripts are installed beside python
DATASET_ID, DATASET = 501, "Dataset501_SynthCT"
ARCH = "res3d10"
PLANS = f"DeSDPlans_{ARCH}"


def _ds_scales(strides):
    """nnU-Net's own deep-supervision scales for these strides (its trainer's method)."""
    fake = SimpleNamespace(enable_deep_supervision=True,
                           configuration_manager=SimpleNamespace(pool_op_kernel_sizes=strides))
    return nnUNetTrainer._get_deep_supervision_scales(fake)


def _teacher(arch=ARCH, seed=1):
    """A backbone state dict visibly different from a fresh default initialisation."""
    torch.manual_seed(seed)
    return {k: v + 0.5 if v.is_floating_point() else v
            for k, v in build_backbone(arch).state_dict().items()}


def _trainer_checkpoint(backbone, arch=ARCH):
    """The layout main_desd.py writes (teacher and student under module.backbone.)."""
    return {"teacher": {"module.backbone." + k: v for k, v in backbone.items()}
            | {"module.head.last_layer.weight": torch.randn(5, 8)},
            "student": {"module.backbone." + k: v.clone() for k, v in backbone.items()},
            "epoch": 3, "args": {"arch": arch}}


# ----------------------------------------------------------------------------- the network
@pytest.mark.parametrize("arch", ["res3d10", "res3d50"])
def test_network_meets_nnunets_contract(arch):
    """Built by nnU-Net's get_network_from_plans from the dotted path; one output per
    deep-supervision scale with exactly the shape nnU-Net downsamples the labels to;
    the switch nnU-Net's trainer sets; published encoder names under `encoder.`."""
    strides = encoder_strides()
    torch.manual_seed(0)
    net = get_network_from_plans(tool.NETWORK_CLASS, {"arch": arch, "strides": strides}, [],
                                 1, 3, allow_init=True, deep_supervision=True)
    assert type(net) is DeSDUNet and tool.NETWORK_CLASS == "models.nnunet_net.DeSDUNet"
    patch = (32, 64, 32)
    x = torch.randn(2, 1, *patch) * 400
    with torch.no_grad():
        outs = net(x)
    seg = torch.randint(0, 3, (1, *patch), dtype=torch.int16)
    targets = DownsampleSegForDSTransform(_ds_scales(strides))(segmentation=seg)["segmentation"]
    assert len(outs) == len(targets) == len(strides) - 1 == 5
    for out, target in zip(outs, targets):
        assert out.shape == (2, 3, *target.shape[1:])
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 64, 32), (32, 32, 16), (16, 16, 8),
                                                  (8, 8, 4), (4, 4, 2)]
    net.decoder.deep_supervision = False  # what nnU-Net's validation and inference set
    with torch.no_grad():
        full = net(x)
    assert isinstance(full, torch.Tensor) and full.shape == (2, 3, *patch)
    torch.testing.assert_close(full, outs[0])

    names = net.state_dict().keys()
    encoder = {k[len("encoder."):] for k in names if k.startswith("encoder.")}
    assert encoder == set(build_backbone(arch).state_dict())
    assert {k.split(".")[0] for k in names} == {"encoder", "decoder"}
    seg_layers = [k for k in names if ".seg_layers." in k]
    assert len(seg_layers) == 10 and all(k.startswith("decoder.seg_layers.") for k in seg_layers)


def test_first_operation_is_the_pretraining_contract():
    """The encoder's first layer receives HU clipped to +-1024 and divided by 1024, bit
    for bit (nnU-Net's NoNormalization hands the network HU)."""
    net = DeSDUNet(1, 2, False, arch="res3d10")
    seen = []
    net.encoder.conv1.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
    x = torch.linspace(-3000, 3000, 32 * 64 * 64).reshape(1, 1, 32, 64, 64)
    with torch.no_grad():
        net(x)
    assert torch.equal(seen[0], hu_to_input(x))
    assert seen[0].min() == -1 and seen[0].max() == 1
    assert seen[0][0, 0, 16, 32, 32] == x[0, 0, 16, 32, 32] / 1024  # inside the range


def test_strides_and_input_sizes_are_checked():
    with pytest.raises(ValueError, match="do not match the encoder"):
        DeSDUNet(1, 2, True, arch="res3d10", strides=[[1, 1, 1]] + [[2, 2, 2]] * 5)
    net = DeSDUNet(1, 2, True, arch="res3d10", stem_stride=(2, 2, 2),
                   strides=encoder_strides((2, 2, 2)))
    assert net.size_multiple == (32, 32, 32)
    with pytest.raises(ValueError, match="multiples of"):
        net(torch.zeros(1, 1, 48, 64, 64))
    with pytest.raises(ValueError, match="more than one voxel"):
        net(torch.zeros(1, 1, 32, 32, 32))


def test_patch_and_batch_rule_by_hand():
    """Median (40, 100, 100) at 1 mm, multiples (16, 32, 32): start (48, 128, 128); a budget
    of 2 samples of (48, 96, 128) at 3 elements per voxel shrinks the first of the two
    most stretched axes (128/100) once; batch 2. Twice that budget keeps the start and
    fits 3 samples; a tiny dataset caps the batch at 2 (5% of its voxels)."""
    multiple, per_voxel = (16, 32, 32), 3.0
    budget = per_voxel * 48 * 96 * 128 * 2
    patch, batch = tool.choose_patch_and_batch((40, 100, 100), multiple, per_voxel, budget, 1e12)
    assert (patch, batch) == ([48, 96, 128], 2)
    big = per_voxel * 48 * 128 * 128 * 3
    assert tool.choose_patch_and_batch((40, 100, 100), multiple, per_voxel, big, 1e12) == (
        [48, 128, 128], 3)
    assert tool.choose_patch_and_batch((40, 100, 100), multiple, per_voxel, big, 1e6) == (
        [48, 128, 128], 2)
    # the deepest map keeps two voxels: (16, 32, 32) alone would leave one
    assert tool.choose_patch_and_batch((10, 20, 20), multiple, per_voxel, 1e12, 1e12)[0] == [
        32, 32, 32]
    with pytest.raises(tool.NnUNetToolError, match="no patch fits"):
        tool.choose_patch_and_batch((40, 100, 100), multiple, per_voxel, 100.0, 1e12)


# ----------------------------------------------------------------------------- the pipeline
def _run(cmd, env, cwd, timeout=900):
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _make_raw_dataset(raw: Path) -> Path:
    """synthetic_ct's MSD-layout set written as an nnU-Net raw dataset (one CT channel)."""
    msd = synthetic_ct.make_labelled_set(raw.parent / "msd", n_cases=6, size=32, n_slices=12)
    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for image in sorted((msd / "imagesTr").glob("*.nii.gz")):
        case = image.name[:-len(".nii.gz")]
        shutil.copy(image, folder / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(msd / "labelsTr" / image.name, folder / "labelsTr" / image.name)
    labels = json.loads((msd / "dataset.json").read_text())["labels"]
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {n: int(i) for i, n in labels.items()},
        "numTraining": 6, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """nnU-Net's planning, our plans, nnU-Net's preprocessing, our weights."""
    root = tmp_path_factory.mktemp("nnunet")
    env_vars = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "preprocessed",
                "nnUNet_results": root / "results",
                "nnUNet_def_n_proc": "1",     # one export worker
                "PYTHONPATH": REPO,           # nnU-Net imports models.nnunet_net by its path
                "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_vars.items():
            mp.setenv(k, str(v))
        env = dict(os.environ)
        raw = _make_raw_dataset(root / "raw")
        _run([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "--no_pp",
              "--verify_dataset_integrity", "-npfp", "1"], env, root)
        assert tool.main(["plans", "-d", str(DATASET_ID), "--arch", ARCH]) == 0
        _run([BIN / "nnUNetv2_preprocess", "-d", DATASET_ID, "-plans_name", PLANS,
              "-c", "3d_fullres", "-np", "1"], env, root)
        # nnU-Net's manual splits (splits_final.json): one small validation case per fold,
        # so its final validation stays short
        cases = [f"case_{i:03d}" for i in range(6)]
        splits = [{"train": [c for c in cases if c != v], "val": [v]}
                  for v in ("case_003", "case_000")]
        pre = root / "preprocessed" / DATASET
        (pre / "splits_final.json").write_text(json.dumps(splits))
        teacher = _teacher()
        torch.save(_trainer_checkpoint(teacher), root / "checkpoint.pth")
        assert tool.main(["weights", "-d", str(DATASET_ID), "-p", PLANS,
                          "--checkpoint", str(root / "checkpoint.pth")]) == 0
        yield SimpleNamespace(root=root, env=env, raw=raw, pre=pre, teacher=teacher,
                              weights=pre / f"{PLANS}__pretrained.pth",
                              plans=json.loads((pre / f"{PLANS}.json").read_text()),
                              source=json.loads((pre / "nnUNetPlans.json").read_text()),
                              dataset_json=json.loads((pre / "dataset.json").read_text()))


@pytest.mark.slow
def test_plans_use_desd_at_1mm_in_hu(pipeline):
    config = pipeline.plans["configurations"]
    assert list(config) == ["3d_fullres"] and pipeline.plans["plans_name"] == PLANS
    c = config["3d_fullres"]
    assert c["spacing"] == [1.0, 1.0, 1.0]
    assert c["normalization_schemes"] == ["NoNormalization"]
    assert c["data_identifier"] == f"{PLANS}_3d_fullres"
    arch = c["architecture"]
    assert arch["network_class_name"] == "models.nnunet_net.DeSDUNet"
    assert arch["arch_kwargs"]["arch"] == ARCH
    assert arch["arch_kwargs"]["strides"] == encoder_strides()
    assert all(p % m == 0 for p, m in zip(c["patch_size"], (16, 32, 32)))
    assert math.prod(p // m for p, m in zip(c["patch_size"], (16, 32, 32))) >= 2
    assert c["batch_size"] >= 2
    # the memory nnU-Net planned (its network x its batch) is not exceeded
    src = pipeline.source["configurations"]["3d_fullres"]
    with torch.device("meta"):
        a = src["architecture"]
        ref = get_network_from_plans(a["network_class_name"], a["arch_kwargs"],
                                     a["_kw_requires_import"], 1, 4, allow_init=False,
                                     deep_supervision=True)
        ours = DeSDUNet(1, 4, True, arch=ARCH)
    budget = ref.compute_conv_feature_map_size(src["patch_size"]) * src["batch_size"]
    assert tool.conv_output_voxels(ref, src["patch_size"], 1) * src["batch_size"] == budget
    assert tool.conv_output_voxels(ours, c["patch_size"], 1) * c["batch_size"] <= budget
    # nnU-Net's own plans are untouched, and its preprocessing wrote HU at 1 mm
    assert pipeline.source["plans_name"] == "nnUNetPlans"
    assert len(list((pipeline.pre / f"{PLANS}_3d_fullres").glob("*.pkl"))) == 6


@pytest.mark.slow
def test_weights_file_has_every_key_and_the_teacher(pipeline, capsys):
    saved = torch.load(pipeline.weights, weights_only=True)
    weights = saved["network_weights"]
    net = tool.build_network(pipeline.plans, pipeline.dataset_json, seed=5)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        k: tuple(v.shape) for k, v in net.state_dict().items()}
    for k, v in pipeline.teacher.items():
        assert torch.equal(weights["encoder." + k], v), k
    assert all(bool(v.isfinite().all()) for v in weights.values() if v.is_floating_point())
    assert not [k for k in weights if k.startswith("module.") or "_orig_mod" in k]
    # nnU-Net's own loader accepts it and puts the teacher in the encoder
    load_pretrained_weights(net, str(pipeline.weights))
    for k, v in pipeline.teacher.items():
        assert torch.equal(net.state_dict()["encoder." + k], v), k
    # the decoder comes from the seed: the same seed, the same tensors; another, others
    again = tool.pretrained_network(pipeline.plans, pipeline.dataset_json,
                                    pipeline.root / "checkpoint.pth", seed=0)[0].state_dict()
    other = tool.pretrained_network(pipeline.plans, pipeline.dataset_json,
                                    pipeline.root / "checkpoint.pth", seed=1)[0].state_dict()
    key = "decoder.stages.0.reduce.weight"
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    assert not torch.equal(other[key], weights[key])
    assert torch.equal(other["encoder.conv1.weight"], weights["encoder.conv1.weight"])


@pytest.mark.slow
def test_weights_from_each_kind_of_checkpoint(pipeline, tmp_path):
    """main_desd.py's checkpoint.pth (the fixture's), the released layout (`args` an
    argparse.Namespace, arch spelled 'resnet3d50') and a .safetensors backbone (what
    tools/export_backbone.py writes) give the same file; `--which student` takes the
    student."""
    import argparse
    from models import save_backbone
    released = _trainer_checkpoint(pipeline.teacher)
    released["args"] = argparse.Namespace(arch="resnet3d50", out_dim=60000)
    torch.save(released, tmp_path / "DeSD_released.pth")
    with open(tmp_path / "teacher.safetensors", "wb") as f:
        save_backbone(pipeline.teacher, f)
    student = _trainer_checkpoint(pipeline.teacher)
    student["student"] = {"module.backbone." + k: v * 2 for k, v in pipeline.teacher.items()}
    torch.save(student, tmp_path / "student.pth")
    reference = torch.load(pipeline.weights, weights_only=True)["network_weights"]
    for name in ("DeSD_released.pth", "teacher.safetensors"):
        out = tmp_path / f"{name}.weights.pth"
        assert tool.main(["weights", "-d", str(DATASET_ID), "-p", PLANS, "--checkpoint",
                          str(tmp_path / name), "-o", str(out)]) == 0
        weights = torch.load(out, weights_only=True)["network_weights"]
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], v) for k, v in reference.items()), name
    out = tmp_path / "student.weights.pth"
    assert tool.main(["weights", "-d", str(DATASET_ID), "-p", PLANS, "--checkpoint",
                      str(tmp_path / "student.pth"), "--which", "student", "-o", str(out)]) == 0
    weights = torch.load(out, weights_only=True)["network_weights"]
    assert torch.equal(weights["encoder.conv1.weight"], pipeline.teacher["conv1.weight"] * 2)


def _flip_byte_in_largest_record(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_bad_inputs_are_errors_naming_the_file_and_write_nothing(pipeline, tmp_path, capsys):
    good = _trainer_checkpoint(_teacher())
    cases = {}
    torch.save(_trainer_checkpoint(_teacher("res3d18"), "res3d18"), tmp_path / "depth.pth")
    cases["depth.pth"] = "res3d18 backbone .*res3d10"
    nan = _trainer_checkpoint(_teacher())
    nan["teacher"]["module.backbone.layer2.0.conv1.weight"][0, 0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    cases["nan.pth"] = "NaN or inf"
    torch.save(good, tmp_path / "flipped.pth")
    _flip_byte_in_largest_record(tmp_path / "flipped.pth")
    cases["flipped.pth"] = "CRC-32"
    torch.save(good, tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    cases["cut.pth"] = "corrupt|truncated|cut short"
    marker = tmp_path / "pwned"
    evil = dict(good, args=_Payload(marker))
    torch.save(evil, tmp_path / "code.pth")
    cases["code.pth"] = "refused"
    cases["missing.pth"] = "does not exist"
    for name, message in cases.items():
        out = tmp_path / f"out_{name}"
        code = tool.main(["weights", "-d", str(DATASET_ID), "-p", PLANS,
                          "--checkpoint", str(tmp_path / name), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 1, name
        assert str(tmp_path / name) in err, err
        assert re.search(message, err), (name, err)
        assert not out.exists(), name
    assert not marker.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # plans that are not ours, and a dataset that is not one CT channel
    assert tool.main(["weights", "-d", str(DATASET_ID), "-p", "nnUNetPlans", "--checkpoint",
                      str(pipeline.root / "checkpoint.pth"), "-o", str(tmp_path / "x.pth")]) == 1
    assert "do not build models.nnunet_net.DeSDUNet" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
    two = dict(pipeline.dataset_json, channel_names={"0": "CT", "1": "PET"})
    with pytest.raises(tool.NnUNetToolError, match="exactly one channel named CT"):
        tool.derive_plans(pipeline.source, {}, two, ARCH, "X")
    with pytest.raises(tool.NnUNetToolError, match="multiple of"):
        tool.derive_plans(pipeline.source, json.loads(
            (pipeline.pre / "dataset_fingerprint.json").read_text()), pipeline.dataset_json,
            ARCH, "X", patch_size=(24, 32, 32))


def _train(pipeline, fold, snapshot, *extra, epochs=2, iterations=2):
    cmd = [sys.executable, REPO / "tests" / "nnunet_short_train.py", "--epochs", epochs,
           "--iterations", iterations, "--snapshot", snapshot, "--",
           DATASET_ID, "3d_fullres", fold, "-p", PLANS, "-device", "cpu", *extra]
    # data augmentation in the main process (not set for planning: nnU-Net's planner
    # passes this number to torch.set_num_threads)
    log = _run(cmd, dict(pipeline.env, nnUNet_n_proc_DA="0"), pipeline.root)
    folder = (pipeline.root / "results" / DATASET / f"nnUNetTrainer__{PLANS}__3d_fullres"
              / f"fold_{fold}")
    losses = [float(line.split("train_loss")[1]) for line in log.splitlines()
              if "train_loss" in line]
    return folder, losses


@pytest.mark.slow
def test_train_from_desd_then_predict(pipeline, tmp_path):
    """nnU-Net's training entry point with -pretrained_weights: the encoder is the teacher
    bit for bit when training starts; the loss is finite and moves; checkpoints are
    written; nnUNetv2_predict writes a segmentation on the input's grid."""
    snap = tmp_path / "start.pt"
    folder, losses = _train(pipeline, 0, snap, "-pretrained_weights", pipeline.weights)
    start = torch.load(snap, weights_only=True)
    for k, v in pipeline.teacher.items():
        assert torch.equal(start["encoder." + k], v), k
    weights = torch.load(pipeline.weights, weights_only=True)["network_weights"]
    assert all(torch.equal(start[k], v) for k, v in weights.items() if ".seg_layers." not in k)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[0] != losses[1]
    final = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert final["network_weights"].keys() == start.keys()
    assert not torch.equal(final["network_weights"]["encoder.conv1.weight"],
                           pipeline.teacher["conv1.weight"])  # it trained the encoder too
    assert all(bool(v.isfinite().all()) for v in final["network_weights"].values()
               if v.is_floating_point())

    # a case on a grid with an origin and a flipped axis, predicted by nnU-Net's command
    image = sitk.ReadImage(str(pipeline.raw / "imagesTr" / "case_001_0000.nii.gz"))
    image.SetOrigin((12.5, -30.25, 7.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(image, str(tmp_path / "in" / "case_001_0000.nii.gz"))
    _run([BIN / "nnUNetv2_predict", "-i", tmp_path / "in", "-o", tmp_path / "out", "-d",
          DATASET_ID, "-c", "3d_fullres", "-p", PLANS, "-f", 0, "-device", "cpu",
          "--disable_tta", "-npp", 1, "-nps", 1, "--disable_progress_bar"],
         pipeline.env, pipeline.root)
    seg = sitk.ReadImage(str(tmp_path / "out" / "case_001.nii.gz"))
    assert seg.GetSize() == image.GetSize()
    assert np.allclose(seg.GetSpacing(), image.GetSpacing())
    assert np.allclose(seg.GetOrigin(), image.GetOrigin())
    assert np.allclose(seg.GetDirection(), image.GetDirection())
    labels = np.unique(sitk.GetArrayFromImage(seg))
    assert set(labels.tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_train_from_scratch_with_the_same_plans(pipeline, tmp_path):
    """The baseline: the same command without -pretrained_weights."""
    snap = tmp_path / "start.pt"
    folder, losses = _train(pipeline, 1, snap, epochs=1, iterations=1)
    start = torch.load(snap, weights_only=True)
    assert not torch.equal(start["encoder.conv1.weight"], pipeline.teacher["conv1.weight"])
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert (folder / "checkpoint_final.pth").is_file()
