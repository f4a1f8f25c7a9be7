"""The demo, shortened through its environment variables, runs end to end."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    for run in ("desd_s0", "dino_s0"):
        assert (out / run / "teacher_backbone.safetensors").is_file()
        row = json.loads((out / run / "log.txt").read_text().splitlines()[-1])
        assert 0 <= row["retrieval_top1_stage1"] <= 1     # logged during training
    res = json.loads((out / "probe" / "probe_results.json").read_text())
    assert list(res["summary"]) == ["random", "DINO", "DeSD", "supervised"]
    assert res["summary"]["DeSD"]["1"]["retrieval_top1"]["n"] == 2
    assert json.loads((out / "probe_augmented" / "probe_results.json").read_text())["settings"]["augment"]
    assert (out / "curves.png").stat().st_size > 0
