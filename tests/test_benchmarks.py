"""The GPU benchmarks' code paths, tiny and on the CPU: what produced the README's H100
figures must at least run, compare the right things and leave nothing switched."""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_norm  # noqa: E402
import bench_train  # noqa: E402
from models.res3d import InstanceNorm3d  # noqa: E402


def test_bench_norm_checks_every_route_against_pytorch(capsys):
    shapes = bench_norm.norm_shapes("res3d10", 2, (16, 48, 48))
    # stem, two per basic block, a projection on the first block of every stage (quirk)
    assert len(shapes) == 1 + 4 * 2 + 4
    assert len(bench_norm.norm_shapes("res3d50", 2, (16, 96, 96))) == 1 + 16 * 3 + 4
    assert shapes[0] == ((2, 64, 16, 24, 24), 64)
    bench_norm.main(["--device", "cpu", "--arch", "res3d10", "--batch", "1", "--crop", "16", "48",
                     "48", "--reps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    errs = dict(re.findall(r"(reference|group_norm) ([0-9.e+-]+)", out.split("\n")[2]))
    assert float(errs["reference"]) == 0.0
    assert float(errs["group_norm"]) < 1e-12  # float64 throughout
    row = [r for r in out.splitlines() if r.startswith("| fp32 | off |")]
    assert len(row) == 1 and all(float(v) > 0 for v in row[0].split("|")[3:5])
    assert InstanceNorm3d.impl == "auto"


def test_bench_train_times_each_norm_route_through_the_trainer(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench_train.main(["--device", "cpu", "--arch", "res3d10", "--out_dim", "64", "--crop", "16",
                      "48", "48", "--batch", "1", "--iters", "1", "--warmup", "0", "--threads", "1",
                      "--precision", "fp32", "tf32", "--norm_impl", "reference", "group_norm",
                      "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["norm"]) for r in rows] == [("fp32", "reference"), ("fp32", "group_norm")]
    assert all(float(r["median_ms"]) > 0 and r["mfu"] == "n/a" for r in rows)
    assert "tf32: skipped (TF32 is a GPU mode)" in capsys.readouterr().out
    assert InstanceNorm3d.impl == "auto"


def test_bench_epoch_rows_for_each_format_and_the_published_augmentation(capsys):
    import bench_epoch
    common = ["--device", "cpu", "--arch", "res3d10", "--out_dim", "64", "--batch", "1",
              "--files", "2", "--shape", "24", "56", "56", "--num_workers", "0", "--warmup", "1",
              "--iters", "2", "--threads", "1"]
    bench_epoch.main(common + ["--format", "npy", "nii.gz"])
    bench_epoch.main(common + ["--format", "b2nd", "--augment_on", "cpu"])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines() if r.startswith("| ")]
    rows = [r for r in rows if r[0] != "format"]
    assert [(r[0], r[2]) for r in rows] == [
        ("(cached batch)", "step only"), ("npy", "loader only"), ("npy", "end to end"),
        ("nii.gz", "loader only"), ("nii.gz", "end to end"),
        ("(cached batch)", "step only"), ("b2nd", "loader only"), ("b2nd", "end to end")]
    for r in rows:
        assert float(r[5]) > 0  # wall samples/s
        if r[2] == "loader only":
            assert r[3] == r[4] == "-"  # no median for prefetched batches
    assert "augmentation on cpu" in out and "augmentation on device" in out
