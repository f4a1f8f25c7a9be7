"""The GPU benchmarks' code paths, tiny and on the CPU: what produced the README's H100
figures must at least run, compare the right things and leave nothing switched."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

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
    errs = dict(re.findall(r"(reference|group_norm|decomposed) ([0-9.e+-]+)", out.split("\n")[2]))
    assert float(errs["reference"]) == 0.0
    assert float(errs["group_norm"]) < 1e-12  # float64 throughout
    assert float(errs["decomposed"]) < 1e-12
    row = [r for r in out.splitlines() if r.startswith("| fp32 | off | off |")]
    assert len(row) == 1 and all(float(v) > 0 for v in row[0].split("|")[4:7])


def test_bench_train_times_each_norm_route_through_the_trainer(tmp_path, capsys, monkeypatch):
    """Each row's routes reach the networks the trainer builds (by argument, not by a
    process-wide switch)."""
    built = []
    real = bench_train.StepBench.__init__

    def spy(self, targs, device, n_steps):
        real(self, targs, device, n_steps)
        backbone = self.nets.student.backbone
        built.append(({m.impl for m in backbone.modules() if isinstance(m, InstanceNorm3d)},
                      backbone.conv1.impl))
    monkeypatch.setattr(bench_train.StepBench, "__init__", spy)
    out = tmp_path / "rows.json"
    bench_train.main(["--device", "cpu", "--arch", "res3d10", "--out_dim", "64", "--crop", "16",
                      "48", "48", "--batch", "1", "--iters", "1", "--warmup", "0", "--threads", "1",
                      "--precision", "fp32", "tf32", "--norm_impl", "reference", "group_norm",
                      "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["norm"]) for r in rows] == [("fp32", "reference"), ("fp32", "group_norm")]
    assert all(float(r["median_ms"]) > 0 and r["mfu"] == "n/a" for r in rows)
    assert "tf32: skipped (TF32 is a GPU mode)" in capsys.readouterr().out
    # the first build counts the FLOP of this (unpublished) configuration
    assert built[1:] == [({"reference"}, "conv3d"), ({"group_norm"}, "conv3d")]


def test_bench_train_config_rows_each_part_alone_and_together(tmp_path, capsys, monkeypatch):
    """--config gives exactly the rows named (the GPU call's parts), the others' settings
    from the list flags; CUDA-only settings are skipped on a CPU with a note."""
    built = []
    real = bench_train.StepBench.__init__

    def spy(self, targs, device, n_steps):
        real(self, targs, device, n_steps)
        built.append((targs.stem, targs.norm_impl, targs.fused_optimizer,
                      type(self.optimizer).__name__, self.optimizer.defaults.get("fused")))
    monkeypatch.setattr(bench_train.StepBench, "__init__", spy)
    out = tmp_path / "rows.json"
    bench_train.main(["--device", "cpu", "--arch", "res3d10", "--out_dim", "64", "--crop", "16",
                      "48", "48", "--batch", "1", "--iters", "1", "--warmup", "0", "--threads", "1",
                      "--config", "precision=fp32", "--config", "stem=conv2d",
                      "--config", "fused_optimizer=on,norm_impl=decomposed",
                      "--config", "cuda_graph=on", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stem"], r["norm"], r["fused_optimizer"], r["cuda_graph"]) for r in rows] == [
        ("conv3d", "auto", "off", "off"), ("conv2d", "auto", "off", "off"),
        ("conv3d", "decomposed", "on", "off")]
    assert built[1:] == [("conv3d", "auto", False, "SGD", None), ("conv2d", "auto", False, "SGD", None),
                         ("conv3d", "decomposed", True, "SGD", True)]
    assert "cuda_graph on: skipped (CUDA graphs need a GPU)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        bench_train.main(["--device", "cpu", "--config", "speed=fast"])


@pytest.mark.slow
def test_bench_epoch_rows_for_each_format_and_the_published_augmentation(capsys):
    import bench_epoch
    common = ["--device", "cpu", "--arch", "res3d10", "--out_dim", "64", "--batch", "1",
              "--files", "2", "--shape", "24", "56", "56", "--num_workers", "0", "--warmup", "1",
              "--iters", "2", "--threads", "1"]
    bench_epoch.main(common + ["--format", "npy", "nii.gz"])
    bench_epoch.main(common + ["--format", "b2nd", "--augment_on", "cpu", "--cold", "off", "on"])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines() if r.startswith("| ")]
    rows = [r for r in rows if r[0] != "format"]
    cache, disk = "page cache", "disk"
    assert [(r[0], r[2], r[8]) for r in rows] == [
        ("(cached batch)", "step only", "-"), ("npy", "loader only", cache), ("npy", "end to end", cache),
        ("nii.gz", "loader only", cache), ("nii.gz", "end to end", cache),
        ("(cached batch)", "step only", "-"), ("b2nd", "loader only", cache),
        ("b2nd", "end to end", cache), ("b2nd", "loader only", disk), ("b2nd", "end to end", disk)]
    for r in rows:
        assert float(r[5]) > 0  # wall samples/s
        if r[2] == "loader only":
            assert r[3] == r[4] == "-"  # no median for prefetched batches
    assert "augmentation on cpu" in out and "augmentation on device" in out


def test_evict_drops_a_file_from_the_page_cache(tmp_path):
    import bench_loader
    path = tmp_path / "v.npy"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, dirty in the page cache
    path.read_bytes()
    assert bench_loader.resident_fraction(str(path)) == 1.0
    bench_loader.evict(str(path))
    assert bench_loader.resident_fraction(str(path)) == 0.0
    path.read_bytes()
    assert bench_loader.resident_fraction(str(path)) == 1.0
    assert bench_loader.filesystem_of(str(tmp_path)) not in ("", "unknown")


def test_cold_reads_evict_each_file_before_the_dataset_reads_it(tmp_path, monkeypatch):
    """Inside cold_reads() every sub-volume the dataset opens is evicted first; outside,
    none is, and the reader is the module's own again."""
    import bench_epoch
    import bench_loader
    import data_loader_ssl as dl
    names = bench_epoch.write_volumes(str(tmp_path), 2, "npy", (24, 56, 56))
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    dataset = dl.DeepLesionSSL(tmp_path / "list.txt", global_crop_size=(16, 48, 48))
    evicted = []
    monkeypatch.setattr(bench_loader, "evict", evicted.append)
    reader = dl.open_subvolume
    with bench_loader.cold_reads():
        first = [dataset[i] for i in range(2)]
    assert [Path(p).name for p in evicted] == names
    assert dl.open_subvolume is reader
    again = [dataset[i] for i in range(2)]
    assert len(evicted) == 2
    for a, b in zip(first, again):  # the same views either way
        assert all(torch.equal(x, y) for x, y in zip(a, b))
