"""tools/eval_probe.py (per-stage frozen-encoder probes) and tools/plot_log.py (curves)."""
import csv
import json
import math
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

import eval_probe
import plot_log
from common import listfile
from models import build_backbone

CLASS_HU = (-800, -200, 300, 900)  # label c has intensity CLASS_HU[c]: trivially separable
SIZE = (16, 96, 96)                # one probe patch covers a whole case


def _write_case(folder, name, hu, labels):
    for arr, sub in ((hu, "imagesTr"), (labels, "labelsTr")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 1.0))  # already at the probe's 1 mm: no resampling
        sitk.WriteImage(img, str(folder / sub / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def separable_set(tmp_path_factory):
    """Cases whose four in-plane quadrants each hold one class, at that class's intensity
    (the arrangement shuffled per case), so a linear read-out of any encoder that keeps
    intensity separates them."""
    folder = tmp_path_factory.mktemp("separable")
    rng = np.random.default_rng(0)
    half_y, half_x = SIZE[1] // 2, SIZE[2] // 2
    for i in range(3):
        labels = np.zeros(SIZE, np.uint8)
        for q, c in enumerate(rng.permutation(4)):
            labels[:, (q // 2) * half_y:(q // 2 + 1) * half_y,
                   (q % 2) * half_x:(q % 2 + 1) * half_x] = c
        hu = np.asarray(CLASS_HU, np.int16)[labels] + rng.integers(-10, 11, SIZE).astype(np.int16)
        _write_case(folder, f"case_{i}", hu, labels)
    names = ("background", "liver", "spleen", "kidney")
    (folder / "dataset.json").write_text(json.dumps({"labels": dict(enumerate(names))}))
    return folder


@pytest.fixture(scope="module")
def res3d10_files(tmp_path_factory):
    """A res3d10 checkpoint.pth in main_desd.py's layout and the same as .safetensors."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    state = build_backbone("res3d10").state_dict()
    (folder / "run").mkdir()
    torch.save({"teacher": {"module.backbone." + k: v for k, v in state.items()},
                "args": {"arch": "res3d10"}}, folder / "run" / "checkpoint.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "bare.safetensors"))
    return folder / "run" / "checkpoint.pth", folder / "bare.safetensors"


def _probe_args(data_dir, out_dir, *extra):
    return ["--data_dir", str(data_dir), "--output_dir", str(out_dir), "--patch_size", *map(str, SIZE),
            "--patches_per_case", "2", "--probe_voxels", "8192", "--probe_batch_size", "2048",
            "--epochs", "25", "--knn_k", "1", *extra]


def _numbers(results):
    return [st[c] for r in results["runs"] for st in r["stages"] for c in results["columns"][4:]]


# ----------------------------------------------------------------------------- k-NN, labels
def test_knn_identical_features_accuracy_one():
    torch.manual_seed(0)
    feats, labels = torch.randn(30, 16), torch.randint(0, 4, (30,))
    assert eval_probe.knn_accuracy(feats, labels, feats.clone(), labels, k=1) == 1.0
    # k > 1: every class is one point repeated, so the k nearest all carry its label.
    centres = torch.randn(4, 16)
    y = torch.arange(4).repeat_interleave(6)
    assert eval_probe.knn_accuracy(centres[y], y, centres[y], y, k=5) == 1.0
    # k beyond the training set is capped; a uniform vote over a majority wins.
    pred = eval_probe.knn_classify(centres[y], y, centres[:1], k=1000, num_classes=4)
    assert pred.shape == (1,)


def test_centre_label():
    labels = np.zeros((3, 4, 10, 10), np.uint8)
    labels[0, 2, 5, 5] = 2                # the centre voxel (4 // 2, 10 // 2, 10 // 2)
    labels[1, :, :4] = 1                  # lots of liver, but not at the centre
    labels[2, 1:3, 4:6, 4:6] = 3
    assert eval_probe.centre_label(labels).tolist() == [2, 0, 3]


def test_summary_spreads_and_comparison_by_hand():
    runs = [{"name": g, "stages": [{"stage": s, "m": v + s} for s in (1, 2, 3, 4)]}
            for g, v in (("random", 0.1), ("random", 0.3), ("DINO", 0.7), ("DINO", 0.9),
                         ("DeSD", 0.9), ("DeSD", 0.9))]
    summary = eval_probe.summarise(runs, ["m"])
    assert summary["random"][1]["m"] == {"mean": pytest.approx(1.2), "std": pytest.approx(0.1),
                                         "min": pytest.approx(1.1), "max": pytest.approx(1.3), "n": 2}
    rows = eval_probe.compare(summary, ["m"])
    assert [(r["group"], r["baseline"]) for r in rows[::4]] == [
        ("DINO", "random"), ("DeSD", "random"), ("DeSD", "DINO")]
    assert [r["stage"] for r in rows[:4]] == [1, 2, 3, 4]
    desd_random, desd_dino = rows[4], rows[8]
    assert desd_random["difference"] == pytest.approx(0.7) and desd_random["twice_spread"] == pytest.approx(0.2)
    assert desd_random["beyond"]
    assert desd_dino["difference"] == pytest.approx(0.1) and desd_dino["twice_spread"] == pytest.approx(0.2)
    assert not desd_dino["beyond"]


def test_sampled_training_equals_upsampled_logits():
    """The probe is trained on features gathered at voxels; that must be exactly the
    trilinear upsampling used at evaluation."""
    torch.manual_seed(0)
    feats, size = torch.randn(2, 5, 2, 3, 3), (16, 48, 40)
    x, idx = eval_probe.upsampled_at(feats, size, 300, torch.Generator().manual_seed(0))
    up = F.interpolate(feats, size=size, mode="trilinear", align_corners=False).flatten(2)
    expected = up.gather(2, idx[:, None].expand(-1, 5, -1)).transpose(1, 2).reshape(-1, 5)
    torch.testing.assert_close(x, expected)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_probe_separable_set_table_and_determinism(separable_set, res3d10_files, tmp_path,
                                                    capsys):
    ckpt, bare = res3d10_files
    args = _probe_args(separable_set, tmp_path / "a", "random", str(bare), "--names", "rand",
                       "bare")
    first = eval_probe.run(eval_probe.parse_args(args))
    out = capsys.readouterr().out

    cols = ["dice_liver", "dice_spleen", "dice_kidney", "dice_mean", "knn_acc"]
    assert first["columns"] == ["checkpoint", "path", "seed", "stage", *cols]
    assert [r["name"] for r in first["runs"]] == ["rand", "bare"]
    for r in first["runs"]:
        assert [st["stage"] for st in r["stages"]] == [1, 2, 3, 4]
        for st in r["stages"]:
            assert st["dice_mean"] == pytest.approx(np.mean([st[c] for c in cols[:3]]))
            assert 0 <= st["knn_acc"] <= 1
    best = max(st["dice_mean"] for st in first["runs"][0]["stages"])
    assert best > 0.9, first["runs"][0]["stages"]
    assert first["summary"]["rand"][2]["dice_mean"]["mean"] == first["runs"][0]["stages"][1]["dice_mean"]

    # The printed tables: a row per group, a column per stage, and the comparison
    assert "| rand (n=1) |" in out and "| bare (n=1) |" in out and "bare vs rand" in out
    with open(tmp_path / "a" / "probe_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == first["columns"] and len(rows) == 8
    assert float(rows[0]["dice_mean"]) == pytest.approx(first["runs"][0]["stages"][0]["dice_mean"])
    saved = json.loads((tmp_path / "a" / "probe_results.json").read_text())
    assert _numbers(saved) == pytest.approx(_numbers(first))
    assert (tmp_path / "a" / "probe_results.png").stat().st_size > 0  # .ci/run installs matplotlib

    # Same seed, fresh output folder: the same numbers, to the bit.
    # ('random' alone is built at the default depth unless --arch says otherwise)
    second = eval_probe.run(eval_probe.parse_args(_probe_args(separable_set, tmp_path / "b",
                                                              "random", "--arch", "res3d10")))
    assert _numbers(second) == _numbers(first)[:4 * 5]


@pytest.mark.slow
def test_retrieval_augment_and_seeds(separable_set, res3d10_files, tmp_path):
    """Grouped checkpoints, two probe seeds, augmented patches and the view retrieval on a
    held-out list: every column filled, spreads over checkpoints x seeds."""
    ckpt, bare = res3d10_files
    held = tmp_path / "held"
    held.mkdir()
    rng = np.random.default_rng(0)
    files = []
    for k in range(5):
        files.append(held / f"h{k}_dep0.npy")
        np.save(files[-1], rng.integers(-1000, 1000, (40, 40, 16)).astype(np.int16))
    listfile.write_list_file(held / "list.txt", files)
    res = eval_probe.run(eval_probe.parse_args(_probe_args(
        separable_set, tmp_path / "r", "random", str(ckpt), str(bare), "--names", "random",
        "trained", "trained", "--probe_seeds", "0", "1", "--augment", "--retrieval_list",
        str(held / "list.txt"), "--retrieval_crop", "16", "48", "48", "--epochs", "2")))
    assert [(r["name"], r["seed"]) for r in res["runs"]] == [
        ("random", 0), ("random", 1), ("trained", 0), ("trained", 1), ("trained", 0), ("trained", 1)]
    assert res["summary"]["trained"][1]["retrieval_top1"]["n"] == 4
    assert res["retrieval_chance"] == {"top1": pytest.approx(1 / 9), "top5": pytest.approx(5 / 9)}
    for r in res["runs"]:
        for st in r["stages"]:
            assert 0 <= st["retrieval_top1"] <= st["retrieval_top5"] <= 1
    # the same weights (checkpoint and its .safetensors) give the same numbers
    assert res["runs"][2]["stages"] == res["runs"][4]["stages"]
    assert res["summary_metrics"] == ["retrieval_top1", "retrieval_top5", "dice_mean", "knn_acc"]


# ----------------------------------------------------------------------------- refusals
def _refused(capsys, argv, pattern):
    """The tool exits with 1 and says `pattern` on stderr, as eval_probe.py: error: ..."""
    assert eval_probe.main(argv) == 1
    err = capsys.readouterr().err
    assert "eval_probe.py: error:" in err and re.search(pattern, err), err
    return err


def test_arch_mismatch_refused(res3d10_files, tmp_path, capsys):
    ckpt, bare = res3d10_files
    for path in (ckpt, bare):  # from the checkpoint's args, and from the weights alone
        err = _refused(capsys, [str(path), "--arch", "res3d18", "--output_dir", str(tmp_path)],
                       r"res3d10.*--arch is res3d18")
        assert str(path) in err


def test_empty_or_unlabelled_data_refused(tmp_path, separable_set, capsys):
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    _refused(capsys, ["random", "--data_dir", str(empty), "--output_dir", str(tmp_path / "o")],
             re.escape(str(empty)))
    _refused(capsys, ["--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path)],
             "not a folder")

    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "imagesTr").mkdir(parents=True)
    image = sorted((separable_set / "imagesTr").iterdir())[0]
    (unlabelled / "imagesTr" / image.name).write_bytes(image.read_bytes())
    _refused(capsys, ["--data_dir", str(unlabelled), "--output_dir", str(tmp_path / "o")],
             "has no label file")

    background = tmp_path / "background"
    for i in range(2):
        _write_case(background, f"c{i}", np.zeros(SIZE, np.int16), np.zeros(SIZE, np.uint8))
    _refused(capsys, ["--data_dir", str(background), "--output_dir", str(tmp_path / "o")],
             "all background")


# ----------------------------------------------------------------------------- plot_log
def _fake_log(folder, epochs=2, drop=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(epochs):
        rec = {"epoch": e, "train_total_loss": 9.0 - e, "train_loss_ssl": 9.1 - e,
               "train_deep_loss_1": 9.2 - e, "train_deep_loss_2": 9.3 - e,
               "train_deep_loss_3": 9.4 - e, "train_teacher_entropy": 6.0 - e,
               "train_teacher_batch_entropy": 6.5, "seconds": 1.0, "samples_per_s": 4.0,
               "lr": 1e-4 * (e + 1), "wd": 0.04, "momentum": 0.996,
               "teacher_temp": 0.04 + 0.01 * e, "ln_out_dim": math.log(1024)}
        rec.update({f"train_kl_stage{k}": 0.1 * k for k in range(1, 5)})
        for k in drop:
            rec.pop(k)
        lines.append(json.dumps(rec))
    (folder / "log.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_plot_log_two_runs_png(tmp_path):
    desd = _fake_log(tmp_path / "desd")
    dino = _fake_log(tmp_path / "dino", drop=("train_kl_stage1", "train_kl_stage2"))
    assert plot_log.main([str(desd), str(dino), "--labels", "DeSD", "DINO",
                          "--out", str(tmp_path / "curves.png")]) == 0
    out = tmp_path / "curves.png"
    assert out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_log_missing_or_empty_log_named(tmp_path, capsys):
    assert plot_log.main([str(tmp_path / "nothing")]) == 1
    assert str(tmp_path / "nothing" / "log.txt") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.*log\.txt is empty"):
        plot_log.read_log(tmp_path / "empty")
    records = plot_log.read_log(_fake_log(tmp_path / "ok"))
    assert [r["epoch"] for r in records] == [0, 1]
    assert plot_log.series(records, "kl_stage3") == ([0, 1], [pytest.approx(0.3)] * 2)
