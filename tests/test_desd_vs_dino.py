"""benchmarks/desd_vs_dino.py: the paired design (DeSD and DINO with one seed start from the
same weights and see the same batches), the statistics against hand-computed cases, and
the whole comparison end to end at a tiny size."""
import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import desd_vs_dino as dvd  # noqa: E402
import main_desd  # noqa: E402


# ------------------------------------------------------------------------- statistics

def test_paired_test_matches_closed_forms_for_one_and_two_degrees_of_freedom():
    # n = 2, differences 1 and 3: mean 2, sd sqrt(2), se 1, t = 2 on 1 df (Cauchy):
    # p = 1 - 2/pi atan(2); t_0.975(1) = tan(0.475 pi)
    r = dvd.paired_test([1.0, 4.0], [0.0, 1.0])
    assert (r["n"], r["mean_diff"]) == (2, 2.0)
    assert r["sd_diff"] == pytest.approx(math.sqrt(2))
    assert r["t"] == pytest.approx(2.0)
    assert r["p"] == pytest.approx(1 - 2 / math.pi * math.atan(2.0))
    half = math.tan(0.475 * math.pi) * 1.0
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((2 - half, 2 + half))
    assert (r["mean_a"], r["mean_b"]) == (2.5, 0.5)
    assert (r["sd_a"], r["sd_b"]) == pytest.approx((math.sqrt(4.5), math.sqrt(0.5)))
    # n = 3, differences 1, 2, 6: mean 3, sd sqrt(7), t = 3 / sqrt(7 / 3) on 2 df:
    # p = 1 - |t| / sqrt(2 + t^2); t_0.975(2) = 0.95 / sqrt(2 * 0.975 * 0.025)
    r = dvd.paired_test([1.0, 2.0, 6.0], [0.0, 0.0, 0.0])
    t = 3 / math.sqrt(7 / 3)
    assert r["t"] == pytest.approx(t)
    assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * math.sqrt(7 / 3)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((3 - half, 3 + half))
    # the pairing matters: a shared seed effect cancels in the differences
    r = dvd.paired_test([10.0, 20.0, 30.0], [9.0, 19.0, 29.0])
    assert (r["sd_diff"], r["p"], r["t"]) == (0.0, 0.0, math.inf)
    assert r["sd_a"] == pytest.approx(10.0)
    with pytest.raises(ValueError):
        dvd.paired_test([1.0], [2.0])


def test_holm_matches_a_hand_computed_case():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone
    assert dvd.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert dvd.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert dvd.holm([0.2]) == pytest.approx([0.2])


def test_power_agrees_with_the_normal_approximation_and_seed_counts_are_minimal():
    from scipy.stats import norm
    # large n: the t-test's power approaches Phi(delta sqrt(n) / sd - z_{1 - alpha/2})
    approx = norm.cdf(0.2 * math.sqrt(400) - norm.ppf(0.975))
    assert dvd.paired_power(400, 0.2, 1.0) == pytest.approx(approx, abs=0.003)
    # zero difference: power = alpha
    assert dvd.paired_power(7, 0.0, 1.0) == pytest.approx(0.05)
    n = dvd.seeds_needed(0.1, 0.1)
    assert dvd.paired_power(n, 0.1, 0.1) >= 0.8 > dvd.paired_power(n - 1, 0.1, 0.1)
    assert dvd.seeds_needed(0.1, 0.05) < n < dvd.seeds_needed(0.1, 0.1, alpha=0.0125)


# ------------------------------------------------------------------------- pairing

@pytest.fixture(scope="module")
def subvolumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("subvolumes")
    rng = np.random.default_rng(0)
    for i in range(4):
        vol = rng.normal(-200, 300, size=(50, 44, 12)).clip(-1024, 1024).astype(np.int16)
        np.save(root / f"v{i}.npy", vol)
    (root / "list.txt").write_text("".join(f"v{i}.npy\n" for i in range(4)))
    return root


def _start(subvolumes, weights, seed):
    """The initial networks and the first two augmented batches of a run."""
    args = main_desd.parse_args([
        "--arch", "res3d10", "--out_dim", "32", "--head_hidden_dim", "32",
        "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "2", "--use_bn_in_head", "True",
        "--global_crop_size", "8", "48", "48", "--local_crops_number", "1",
        "--local_crop_size", "8", "40", "40", "--num_workers", "0", "--seed", str(seed),
        "--data_path", str(subvolumes), "--list_path", "list.txt", "--stage_weights", *weights])
    device = torch.device("cpu")
    nets = main_desd.build_models(args, device)
    dataset, sampler, loader, _ = main_desd.build_loader(args, 0, 1, device)
    step = main_desd.build_step(args, device, 0)
    batches = []
    for epoch in (0, 1):  # what train() and train_one_epoch() do before the first step
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches.append([v.clone() for v in step.views(next(iter(loader)), epoch, 0)])
    return nets, batches


def test_desd_and_dino_with_one_seed_start_alike_and_see_the_same_batches(subvolumes):
    desd, desd_batches = _start(subvolumes, dvd.METHODS["DeSD"], seed=3)
    dino, dino_batches = _start(subvolumes, dvd.METHODS["DINO"], seed=3)
    assert desd.student.deep_stages == [1, 2, 3] and dino.student.deep_stages == []
    # the teacher (backbone + stage-4 head) and the student's shared parts: bit-identical
    t_desd, t_dino = desd.teacher.state_dict(), dino.teacher.state_dict()
    assert t_desd.keys() == t_dino.keys()
    for k in t_desd:
        assert torch.equal(t_desd[k], t_dino[k]), k
    s_desd, s_dino = desd.student.state_dict(), dino.student.state_dict()
    assert set(s_dino) < set(s_desd)
    for k in s_dino:
        assert torch.equal(s_desd[k], s_dino[k]), k
    for a, b in zip(desd_batches, dino_batches):
        assert len(a) == len(b) == 3
        for va, vb in zip(a, b):
            assert torch.equal(va, vb)
    # and the check can fail: another seed gives other weights and other batches
    other, other_batches = _start(subvolumes, dvd.METHODS["DINO"], seed=4)
    key = "backbone.conv1.weight"
    assert not torch.equal(other.teacher.state_dict()[key], t_dino[key])
    assert not torch.equal(other_batches[0][0], dino_batches[0][0])


# ------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_tiny_comparison_end_to_end(tmp_path, capsys):
    out = tmp_path / "dvd"
    assert dvd.main(["--tiny", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    with open(out / "comparison.csv", newline="") as f:
        comparisons = list(csv.DictReader(f))
    assert list(comparisons[0]) == dvd.COMPARISON_COLUMNS
    repr_rows = [c for c in comparisons if c["family"] == "representation"]
    assert sorted({c["metric"] for c in repr_rows}) == sorted(m for m, _, _ in dvd.REPR_METRICS)
    for metric in {c["metric"] for c in repr_rows}:
        rows = [c for c in repr_rows if c["metric"] == metric]
        assert [int(c["stage"]) for c in rows] == [1, 2, 3, 4]
        assert {(c["a"], c["b"], c["n"]) for c in rows} == {("DeSD", "DINO", "2")}
        adjusted = dvd.holm([float(c["p"]) for c in rows])  # Holm over the four stages
        assert [float(c["p_holm"]) for c in rows] == pytest.approx(adjusted)
    ft_rows = [c for c in comparisons if c["family"] == "finetune"]
    assert {(c["a"], c["b"]) for c in ft_rows} == set(dvd.FT_PAIRS)
    assert sorted({int(c["steps"]) for c in ft_rows}) == [1, 2]

    with open(out / "measurements.csv", newline="") as f:
        measurements = list(csv.DictReader(f))
    assert list(measurements[0]) == dvd.MEASUREMENT_COLUMNS
    # every statistic is recomputed from the measurements it summarises
    top1 = {(m["method"], m["seed"], m["stage"]): float(m["value"]) for m in measurements
            if m["metric"] == "retrieval_top1"}
    row = next(c for c in repr_rows if c["metric"] == "retrieval_top1" and c["stage"] == "2")
    again = dvd.paired_test([top1[("DeSD", s, "2")] for s in ("0", "1")],
                            [top1[("DINO", s, "2")] for s in ("0", "1")])
    for k in ("mean_diff", "sd_diff", "ci_low", "ci_high"):
        assert float(row[k]) == pytest.approx(again[k])
    assert all(0 <= v <= 1 for v in top1.values())
    ft = [m for m in measurements if m["metric"] == "finetune_dice"]
    assert {m["method"] for m in ft} == {"scratch", "DINO", "DeSD"}
    assert len(ft) == 3 * 2 * 2  # inits x seeds x steps, one label setting

    table = (out / "results.md").read_text()
    assert "| metric | stage | DeSD | DINO | random | DeSD − DINO |" in table
    assert "| labels | seeds | steps | scratch | DeSD | DINO |" in table
    assert f"{float(row['mean_diff']):+.3f}" in table
    assert "Power: " in table and "Wall time: " in table
    for png in ("representations.png", "finetune.png"):
        assert (out / png).stat().st_size > 1000
    assert "written: " in printed
    # --report_only remakes the same statistics from the runs, starting none
    before = (out / "comparison.csv").read_text()
    (out / "comparison.csv").unlink()
    assert dvd.main(["--tiny", "--output_dir", str(out), "--report_only"]) == 0
    assert (out / "comparison.csv").read_text() == before
    assert dvd.main(["--tiny", "--output_dir", str(tmp_path / "empty"), "--report_only"]) == 1
    assert "run without --report_only" in capsys.readouterr().err
    # a fine-tuning variant into the same folder: no pre-training or probe runs again, its
    # runs beside the others, its own report files, the first report left as it was
    kept = {p: p.stat().st_mtime_ns for p in [*out.glob("pretrain/*/checkpoint.pth"),
                                              *out.glob("probe_*/probe_results.csv")]}
    report = (out / "results.md").read_text()
    assert dvd.main(["--tiny", "--output_dir", str(out), "--ft_freeze_epochs", "1",
                     "--report_name", "fixed1"]) == 0
    assert kept and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (out / "results.md").read_text() == report
    folders = sorted(p.parent.name for p in (out / "finetune").glob("*/settings.json"))
    assert len(folders) == 2 and folders[0].startswith("2x1_lr0.0003_fix0_enc1_"), folders
    fixed = (out / "finetune" / folders[1])
    assert fixed.name.startswith("2x1_lr0.0003_fix1_enc1_")
    logs = list(fixed.glob("n1/*/stdout.txt"))
    assert len(logs) == 3 * 2 and all("(encoder fixed)" in p.read_text() for p in logs)
    assert "| labels | seeds | steps |" in (out / "fixed1_results.md").read_text()
    assert (out / "fixed1_finetune.png").is_file() and (out / "fixed1_comparison.csv").is_file()
    # the pre-trained pairs really are pairs: the same initial retrieval in both logs
    logs = {m: (out / "pretrain" / f"{m}_s0" / "stdout.txt").read_text() for m in ("desd", "dino")}
    initial = [next(line for line in text.splitlines() if line.startswith("view retrieval of the initial"))
               for text in logs.values()]
    assert initial[0] == initial[1]
