"""The demo, shortened through its environment variables, runs end to end."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), DEMO_SERIES="2", DEMO_SIZE="64",
               DEMO_EPOCHS="1", DEMO_FT_EPOCHS="1", DEMO_FT_ITERS="1", DEMO_FT_SIZE="48",
               DEMO_PROBE_ARGS="--n_synthetic 3 --synthetic_size 64 --patches_per_case 4 --epochs 2",
               DEMO_THREADS="2")
    proc = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "demo"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("fine-tuning from the DeSD teacher: Dice: 0.") for line in lines)
    assert any(line.startswith("fine-tuning from scratch:          Dice: 0.") for line in lines)
    assert "[pre_" in proc.stdout and "shared layers" in proc.stdout
    listed = (out / "deeplesion" / "SSL_data_deeplesion.txt").read_text().split()
    assert listed and all((out / "deeplesion" / p).is_file() for p in listed)
    for run in ("desd", "dino"):
        assert (out / run / "checkpoint.pth").is_file()
        assert (out / run / "teacher_backbone.safetensors").is_file()
    assert (out / "probe" / "probe_results.csv").read_text().startswith("checkpoint,stage,")
