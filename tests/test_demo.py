"""The demo, shortened through its environment variables, runs end to end, and what it
prints is what its runs measured: the trainer's logged view retrieval and the probes'
agree on the same networks, and every table row is recomputed here from the files."""
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_backbone, load_safetensors

ROOT = Path(__file__).resolve().parents[1]
STAGES = (1, 2, 3, 4)


def _cells(by_stage: dict, metric: str) -> str:
    """A row's cells as eval_probe prints them (JSON null was NaN)."""
    def f(v):
        return f"{np.nan if v is None else v:.3f}"
    return " | ".join(f"{f(by_stage[str(s)][metric]['mean'])} ± {f(by_stage[str(s)][metric]['std'])}"
                      for s in STAGES)


@pytest.mark.slow
def test_short_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), DEMO_SERIES="2", DEMO_HELDOUT="2",
               DEMO_SIZE="64", DEMO_EPOCHS="1", DEMO_BATCH="4", DEMO_SEEDS="0 1",
               DEMO_LABELLED="3", DEMO_FT_SIZE="64", DEMO_FT_EPOCHS="1", DEMO_FT_ITERS="1", DEMO_UPPER_STEPS="2",
               DEMO_PROBE_ARGS="--patches_per_case 4 --epochs 2", DEMO_THREADS="2")
    proc = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "demo"
    text = proc.stdout
    # the comparison tables, with spreads, and the fine-tuning summary
    for table in ("retrieval_top1 (mean ± std", "dice_mean (mean ± std", "knn_acc (mean ± std",
                  "DeSD vs random", "DINO vs random", "DeSD vs DINO", "fine-tuning Dice on the held-out cases"):
        assert table in text, table
    for name in ("scratch", "DINO", "DeSD"):
        assert f"| {name} | 0." in text and f"  {name}, seed 1: Dice: 0." in text
    listed = (out / "deeplesion" / "SSL_data_deeplesion.txt").read_text().split()
    assert listed and all((out / "deeplesion" / p).is_file() for p in listed)
    res = json.loads((out / "probe" / "probe_results.json").read_text())
    summary, runs = res["summary"], res["runs"]
    assert list(summary) == ["random", "DINO", "DeSD", "supervised"]
    assert res["summary_metrics"] == ["retrieval_top1", "retrieval_top5", "dice_mean", "knn_acc"]
    n_held_out = len((out / "heldout" / "retrieval.txt").read_text().split())
    assert res["retrieval_chance"]["top1"] == pytest.approx(1 / (2 * n_held_out - 1))

    # The random and trained networks of the tables are the ones the trainer measured, on
    # the same held-out views (seed 0): its last log row is the probes' DeSD / DINO of seed
    # 0 (the checkpoint's teacher), and its "initial teacher" line (cut at 150 characters
    # by demo.sh: the complete pairs) the probes' random network of seed 0.
    probed = {(r["name"], r["seed"]): {st["stage"]: st for st in r["stages"]} for r in runs}
    for name, run in (("DINO", "dino_s0"), ("DeSD", "desd_s0")):
        assert (out / run / "teacher_backbone.safetensors").is_file()
        rows = [json.loads(line) for line in (out / run / "log.txt").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0]  # DEMO_EPOCHS=1
        assert rows[-1]["retrieval_chance1"] == pytest.approx(1 / (2 * n_held_out - 1))
        for s in STAGES:
            for k in (1, 5):
                assert probed[name, 0][s][f"retrieval_top{k}"] == pytest.approx(
                    rows[-1][f"retrieval_top{k}_stage{s}"], abs=1e-9), (name, s, k)
    # Pre-training moved both teachers away from that network (seed 0), and differently in
    # stage 1: DeSD's deep losses reach it.
    torch.manual_seed(0)
    init = build_backbone("res3d10").state_dict()
    teachers = {run: load_safetensors(out / run / "teacher_backbone.safetensors")[0]
                for run in ("desd_s0", "dino_s0")}
    for run, state in teachers.items():
        assert state.keys() == init.keys() and not all(torch.equal(state[k], init[k]) for k in init)
    assert not all(torch.equal(teachers["desd_s0"][k], teachers["dino_s0"][k])
                   for k in init if k.startswith("layer1."))
    initial = re.findall(r"^view retrieval of the initial teacher: (.*)$", text, re.M)
    assert len(initial) == 2 and initial[0] == initial[1]  # DeSD and DINO start alike
    pairs = re.findall(r"'retrieval_top(\d)_stage(\d)': ([0-9.e-]+)[,}]", initial[0])
    assert ("1", "1") in {(k, s) for k, s, _ in pairs}
    for k, s, value in pairs:
        assert probed["random", 0][int(s)][f"retrieval_top{k}"] == pytest.approx(float(value), abs=1e-9)

    # Each table row: the group's mean ± std over its runs, as printed.
    for name, by_stage in summary.items():
        seeds = sorted(seed for n, seed in probed if n == name)
        assert seeds == [0, 1]
        for m in res["summary_metrics"]:
            for s in STAGES:
                values = [np.nan if v is None else v for v in  # JSON null: NaN, no class
                          (probed[name, seed][s][m] for seed in seeds)]
                for stat, ref in (("mean", np.nanmean(values)), ("std", np.nanstd(values))):
                    got = by_stage[str(s)][m][stat]
                    got = np.nan if got is None else got
                    assert got == pytest.approx(ref, abs=1e-12, nan_ok=True), (name, m, s, stat)
                assert by_stage[str(s)][m]["n"] == 2
            assert f"| {name} (n=2) | {_cells(by_stage, m)} |" in text, (name, m)
    for c in res["comparisons"]:  # differences of the means, as printed
        a, b = summary[c["group"]][str(c["stage"])], summary[c["baseline"]][str(c["stage"])]
        assert c["difference"] == pytest.approx(a[c["metric"]]["mean"] - b[c["metric"]]["mean"])
    assert {(c["group"], c["baseline"]) for c in res["comparisons"]} == {
        ("DINO", "random"), ("DeSD", "random"), ("DeSD", "DINO"), ("supervised", "random"),
        ("supervised", "DINO"), ("supervised", "DeSD")}
    aug = json.loads((out / "probe_augmented" / "probe_results.json").read_text())
    assert aug["settings"]["augment"] and list(aug["summary"]) == list(summary)

    # Fine-tuning: each printed Dice is its run's results.json, each row their mean ± std.
    dice = {}
    for f in sorted((out / "ft").glob("*/seed*/results.json")):
        name, seed = f.parts[-3].rsplit("_", 1)[0], int(f.parts[-2].removeprefix("seed"))
        dice.setdefault(name, []).append(json.loads(f.read_text())["dice"])
        assert f"  {name}, seed {seed}: Dice: {dice[name][-1]:.3f}" in text
    assert sorted(dice) == ["DINO", "DeSD", "scratch"]
    for name, d in dice.items():
        assert len(d) == 2 and f"| {name} | {np.mean(d):.3f} ± {np.std(d):.3f} | 2 |" in text
    assert (out / "curves.png").stat().st_size > 0
