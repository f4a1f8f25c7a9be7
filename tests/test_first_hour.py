"""A new user's first hour (issue 20): the README's small CPU run trains, the probe's
comparison is two-sided, a tiny held-out set warns, an invalid command creates nothing,
the tools read the depth from the checkpoint, the README's commands work as written."""
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_probe
import export_backbone
import finetune_example
import main_desd
import synthetic_ct
import utils
from common.listfile import read_list_file
from common.retrieval import MIN_HELD_OUT, retrieval_by_stage
from data_loader_ssl import retrieval_pairs
from models import ARCHS, build_backbone

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The tiny trainer settings of tests/test_train.py (seconds per epoch on 2 cores).
TINY = ["--arch", "res3d10", "--out_dim", "32", "--head_hidden_dim", "32",
        "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "2",
        "--global_crop_size", "8", "48", "48", "--local_crop_size", "8", "40", "40",
        "--warmup_epochs", "1", "--print_freq", "1", "--seed", "7", "--num_workers", "0",
        "--max_iters_per_epoch", "1"]


def readme_block(name: str) -> str:
    """The README text between `<!-- name:start -->` and `<!-- name:end -->`."""
    m = re.search(rf"<!-- {name}:start -->(.*?)<!-- {name}:end -->", README, re.S)
    assert m, f"README.md has no {name} block"
    return m.group(1)


def commands(block: str) -> list[list[str]]:
    """The shell commands of the block's ```bash fences, comments dropped, one per line
    (backslash continuations joined)."""
    out = []
    for fence in re.findall(r"```bash\n(.*?)```", block, re.S):
        for line in fence.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def write_phantoms(folder: Path, n: int, seed: int, list_name: str) -> Path:
    """`n` CT-like phantom sub-volumes (24 x 64 x 64 voxels at 1 mm, stored (x, y, z) as
    splitting_to_patches.py --format npy does) and a list file naming them."""
    sub = folder / "DL_patches_v2"
    sub.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        hu, _ = synthetic_ct.phantom((24, 64, 64), (1.0, 1.0, 1.0), np.random.default_rng([seed, i]))
        np.save(sub / f"p{seed}_{i}.npy", np.ascontiguousarray(hu.transpose(2, 1, 0)))
        names.append(f"DL_patches_v2/p{seed}_{i}.npy")
    (folder / list_name).write_text("\n".join(names) + "\n")
    return folder / list_name


def env():
    e = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def with_value(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag`'s value replaced (the flag must be there)."""
    assert flag in argv, f"the README command has no {flag}: {argv}"
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def backbone_of(ckpt_teacher: dict) -> dict:
    p = "module.backbone."
    return {k[len(p):]: v for k, v in ckpt_teacher.items() if k.startswith(p)}


# ----------------------------------------------------------------------------- item 1
@pytest.mark.slow
def test_readme_cpu_run_moves_the_teacher_and_its_retrieval(tmp_path):
    """The README's small-run command, as written (only the data, the output folder and
    the workers replaced), on 16 phantom sub-volumes: one iteration per epoch, so the
    preset's 8 epochs are 8 steps. The teacher moves well away from its initialisation
    (the issue's default-flag run: at most 2e-7) and so does its view retrieval."""
    train = [c for c in commands(readme_block("cpu-run")) if "main_desd.py" in " ".join(c)]
    assert len(train) == 1, train
    argv = train[0][train[0].index(next(w for w in train[0] if w.endswith("main_desd.py"))) + 1:]
    assert "--preset" in argv and "cpu_demo" in argv
    data = tmp_path / "data"
    write_phantoms(data, 16, seed=0, list_name="SSL_data_deeplesion.txt")
    held_out = write_phantoms(tmp_path / "held_out", 8, seed=1, list_name="retrieval.txt")
    out = tmp_path / "run"
    argv = with_value(with_value(argv, "--data_path", str(data)), "--output_dir", str(out))
    argv += ["--num_workers", "0", "--retrieval_list", str(held_out)]
    proc = subprocess.run([sys.executable, str(ROOT / "main_desd.py"), *argv], env=env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preset cpu_demo" in proc.stdout

    args = main_desd.parse_args(argv)
    assert args.lr == 0.03 and args.momentum_teacher == 0.98 and args.batch_size_per_gpu == 16
    with torch.random.fork_rng(devices=[]):
        initial = main_desd.build_models(args, torch.device("cpu")).teacher.backbone
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 8
    moved = max((v - initial.state_dict()[k]).abs().max().item()
                for k, v in backbone_of(ckpt["teacher"]).items() if v.is_floating_point())
    assert moved > 1e-4, moved  # 500x the default-flag run

    pairs = retrieval_pairs(read_list_file(held_out), args.global_crop_size, args.seed,
                            per_slice=True)
    before = retrieval_by_stage(initial, pairs, torch.device("cpu"))
    after = json.loads((out / "log.txt").read_text().splitlines()[-1])
    change = max(abs(after[f"retrieval_top{k}_stage{s}"] - before[f"retrieval_top{k}_stage{s}"])
                 for k in (1, 5) for s in range(1, 5))
    assert change >= 1 / 16, (before, after)  # at least one view of 16 found differently


def _schedules(argv, niter):
    args = main_desd.parse_args(argv)
    return args, main_desd.build_schedules(args, niter, 1)


def test_start_warning_when_the_weights_would_stay_still():
    scale = 0.01  # a typical initial conv weight of res3d10 (std about 0.005-0.03)
    # the run: default flags, batch 4, 2 epochs of 10 iterations
    args, sch = _schedules(["--batch_size_per_gpu", "4", "--epochs", "2", "--warmup_epochs", "1"], 10)
    warns = main_desd.stillness_warnings(args, sch, scale)
    assert len(warns) == 2, warns
    lr_warn, ema_warn = warns
    peak = 0.0005 * 4 / 256
    assert f"{peak:.3g}" in lr_warn and "--lr" in lr_warn
    assert "--momentum_teacher" in ema_warn
    # the share of the initial teacher left after 20 steps of momentum m_t (by hand)
    share = float(np.prod(sch.momentum))
    assert share > 0.9 and f"{share:.2f}" in ema_warn
    # the preset on a README-sized set (110 sub-volumes: 6 iterations per epoch): silent
    args, sch = _schedules(["--preset", "cpu_demo"], 6)
    assert main_desd.stillness_warnings(args, sch, scale) == []
    # SGD: the learning rate alone does not say how far a weight moves; the EMA still does
    args, sch = _schedules(["--optimizer", "sgd", "--epochs", "2", "--warmup_epochs", "1"], 10)
    warns = main_desd.stillness_warnings(args, sch, scale)
    assert len(warns) == 1 and "--momentum_teacher" in warns[0]


def test_preset_values_printed_and_explicit_flags_win():
    args = main_desd.parse_args(["--preset", "cpu_demo", "--epochs", "2", "--lr", "0.01"])
    assert (args.epochs, args.lr, args.arch, args.momentum_teacher) == (2, 0.01, "res3d10", 0.98)
    text = main_desd.describe_preset(args)
    assert "cpu_demo" in text and "--momentum_teacher 0.98" in text
    assert "--epochs 2" in text and "given" in text  # the explicit flags are named
    assert main_desd.describe_preset(main_desd.parse_args([])) == ""
    with pytest.raises(SystemExit):
        main_desd.parse_args(["--preset", "gpu_fast"])


# ----------------------------------------------------------------------------- item 2
def _summary(**groups):
    """summary[group][stage][metric] from (mean, std, n) per group, every stage alike."""
    return {g: {s: {"m": {"mean": mean, "std": std, "min": mean, "max": mean, "n": n}}
                for s in (1, 2, 3, 4)} for g, (mean, std, n) in groups.items()}


def test_probe_comparison_is_two_sided():
    rows = eval_probe.compare(_summary(random=(0.5, 0.01, 3), drop=(0.375, 0.01, 3),
                                       gain=(0.502, 0.01, 3), up=(0.6, 0.02, 3)), ["m"])
    by = {(r["group"], r["baseline"]): r for r in rows if r["stage"] == 1}
    drop = by["drop", "random"]
    assert drop["difference"] == pytest.approx(-0.125) and drop["twice_spread"] == pytest.approx(0.02)
    assert drop["verdict"] == "worse" and drop["beyond"]
    assert by["gain", "random"]["verdict"] == "within" and not by["gain", "random"]["beyond"]
    assert by["up", "random"]["verdict"] == "better" and by["up", "random"]["beyond"]
    assert by["up", "drop"]["verdict"] == "better" and by["gain", "drop"]["verdict"] == "better"
    table = eval_probe.format_tables({"summary_metrics": [], "comparisons": rows,
                                      "summary": {}, "settings": {"probe_seeds": [0, 1, 2]}})
    assert "-0.125 (worse, beyond 0.020)" in table
    assert "+0.002 (within 0.020)" in table
    assert "+0.100 (better, beyond 0.040)" in table


def test_probe_comparison_with_one_repetition_calls_nothing_beyond(capsys):
    rows = eval_probe.compare(_summary(random=(0.5, 0.0, 1), desd=(0.502, 0.0, 1),
                                       dino=(0.3, 0.0, 1)), ["m"])
    assert rows and all(not r["beyond"] and r["verdict"] == "unknown" for r in rows)
    table = eval_probe.format_tables({"summary_metrics": [], "comparisons": rows,
                                      "summary": {}, "settings": {"probe_seeds": [0]}})
    assert not re.search(r"\((better|worse), beyond", table)
    assert "+0.002 (n=1, no spread)" in table
    assert re.search(r"WARNING.*one repetition.*--probe_seeds", table)
    # two repetitions on one side only: still no spread to compare with on the other
    rows = eval_probe.compare(_summary(random=(0.5, 0.1, 1), desd=(0.9, 0.01, 3)), ["m"])
    assert all(r["verdict"] == "unknown" for r in rows)


# ----------------------------------------------------------------------------- item 3
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_phantoms(root, 4, seed=0, list_name="list.txt")
    write_phantoms(root / "held", 4, seed=1, list_name="held.txt")
    return root


def test_tiny_held_out_set_warns_and_resume_does_not_recompute_it(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data_path", str(tiny_data), "--list_path", "list.txt", "--output_dir", str(out),
            "--retrieval_list", "held/held.txt", *TINY]
    assert main_desd.main([*base, "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "view retrieval of the initial teacher" in text
    warn = next(ln for ln in text.splitlines() if "WARNING" in ln and "held-out" in ln)
    assert " 4 held-out" in warn and f"at least {MIN_HELD_OUT}" in warn
    assert MIN_HELD_OUT >= 32
    # resumed: the initial teacher is not evaluated again (its value is no longer the
    # network in memory), the epochs' retrieval goes on
    assert main_desd.main([*base, "--epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "initial teacher" not in text
    rows = [json.loads(ln) for ln in (out / "log.txt").read_text().splitlines()]
    assert [("retrieval_top1_stage4" in r) for r in rows] == [True, True]


# ----------------------------------------------------------------------------- item 4
@pytest.mark.slow
def test_smallest_crop_of_every_depth():
    """The README's minimum (depth 17, or 33 in height or width) works for every depth and
    one voxel less fails, in the network itself and in the trainer's check."""
    text = readme_block("min-crop")
    assert "17" in text and "33" in text
    for arch in ARCHS:
        with torch.device("meta"):
            shapes = build_backbone(arch).stage_shapes
        for good in ((17, 1, 1), (1, 33, 1), (1, 1, 33)):
            bad = tuple(n - 1 if n > 1 else n for n in good)
            assert math.prod(shapes(good)[-1]) == 2 and math.prod(shapes(bad)[-1]) == 1
        # the network itself, on one axis (a deep network's forward takes seconds on a CPU;
        # the weights' values do not matter here, so they are left uninitialised)
        good, bad = ((17, 1, 1), (16, 1, 1)) if ARCHS[arch][0] is ARCHS["res3d10"][0] else \
            ((1, 33, 1), (1, 32, 1))
        with torch.device("meta"):
            net = build_backbone(arch)
        net = net.to_empty(device="cpu")
        with torch.no_grad():
            assert [f.shape[1] for f in net(torch.zeros(1, 1, *good))] == net.stage_channels
            with pytest.raises(ValueError, match="more than 1"):
                net(torch.zeros(1, 1, *bad))
    for good in ((17, 1, 1), (1, 33, 1), (17, 32, 32), (16, 33, 32)):
        bad = tuple(n - 1 if n > 1 else n for n in good)
        if good == (16, 33, 32):
            bad = (16, 32, 32)
        crops = ["--arch", "res3d200", "--local_crop_size", "1", "1", "1"]
        main_desd.parse_args([*crops, "--global_crop_size", *map(str, good)])
        with pytest.raises(SystemExit):
            main_desd.parse_args([*crops, "--global_crop_size", *map(str, bad)])


def _deeplesion(folder: Path) -> Path:
    synthetic_ct.make_deeplesion_set(folder, n_series=1, size=64, seed=0, n_slices=(30, 30))
    return folder


def test_readme_preprocessing_from_the_data_folder(tmp_path):
    data = _deeplesion(tmp_path / "DeepLesion")
    cmds = commands(readme_block("preprocess-in-data"))
    assert [c[0] for c in cmds] == ["cd", "python", "python", "python"]
    for cmd in cmds[1:]:
        script = cmd[1].replace("/path/to/DeSD-3D", str(ROOT))
        proc = subprocess.run([sys.executable, script, *cmd[2:]], cwd=data, env=env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (data / "SSL_data_deeplesion.txt").read_text().split()
    assert lines and all((data / ln).is_file() for ln in lines)


def test_readme_preprocessing_from_the_repository(tmp_path):
    data = _deeplesion(tmp_path / "DeepLesion")
    cmds = commands(readme_block("preprocess-from-repo"))
    assert cmds[0][0].startswith("D=") and [c[0] for c in cmds[1:]] == ["python"] * 3
    for cmd in cmds[1:]:
        argv = [w.replace("$D", str(data)) for w in cmd[2:]]
        proc = subprocess.run([sys.executable, cmd[1], *argv], cwd=ROOT, env=env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (data / "SSL_data_deeplesion.txt").read_text().split()
    assert lines and all((data / ln).is_file() for ln in lines)
    assert not (ROOT / "Images_nifti").exists()


# ----------------------------------------------------------------------------- item 5
@pytest.fixture(scope="module")
def res3d10_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    state = build_backbone("res3d10").state_dict()
    path = folder / "checkpoint.pth"
    torch.save({"teacher": {"module.backbone." + k: v for k, v in state.items()},
                "args": {"arch": "res3d10"}}, path)
    return path


def test_one_default_architecture():
    assert utils.DEFAULT_ARCH == "res3d50"
    assert main_desd.parse_args([]).arch == utils.DEFAULT_ARCH
    for module in (finetune_example, eval_probe):
        assert module.get_args_parser().parse_args([]).arch is None  # from the checkpoint
    assert utils.resolve_arch(None, []) == utils.DEFAULT_ARCH
    assert "| `--arch` | res3d50 | res3d50 " in README


def test_tools_read_the_depth_from_the_checkpoint(res3d10_checkpoint, tmp_path, capsys):
    ckpt = str(res3d10_checkpoint)
    assert utils.checkpoint_arch(ckpt) == "res3d10"
    assert utils.resolve_arch(None, [ckpt, ckpt]) == "res3d10"
    assert utils.resolve_arch("res3d10", [ckpt]) == "res3d10"
    with pytest.raises(ValueError, match=r"res3d10.*--arch is res3d18"):
        utils.resolve_arch("res3d18", [ckpt])
    # a checkpoint whose args and weights disagree is refused, naming both
    bad = tmp_path / "bad.pth"
    torch.save({**torch.load(ckpt, weights_only=True), "args": {"arch": "res3d18"}}, bad)
    with pytest.raises(ValueError, match=r"res3d18.*res3d10|res3d10.*res3d18"):
        utils.checkpoint_arch(bad)
    assert export_backbone.main([str(bad), "--out", str(tmp_path / "bad.safetensors")]) == 1
    assert "export_backbone.py: error:" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()
    # the tools: an explicit mismatching --arch stops before any output folder exists
    out = tmp_path / "ft"
    assert finetune_example.main(["--pretrained", ckpt, "--arch", "res3d18",
                                  "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "finetune_example.py: error:" in err and "--arch is res3d18" in err
    assert not out.exists()
    out = tmp_path / "probe"
    assert eval_probe.main([ckpt, "--arch", "res3d18", "--output_dir", str(out)]) == 1
    assert "--arch is res3d18" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("layout", ["no folder", "empty folder", "image without label"])
def test_a_wrong_data_dir_creates_no_output_folder(layout, tmp_path, capsys):
    data = tmp_path / "data"
    if layout != "no folder":
        (data / "imagesTr").mkdir(parents=True)
    if layout == "image without label":
        (data / "imagesTr" / "case_0.nii.gz").write_bytes(b"")
    expected = {"no folder": "is not a folder", "empty folder": "no imagesTr/*.nii.gz",
                "image without label": "has no label file"}[layout]
    for name, call in (("finetune_example.py", lambda o: finetune_example.main(
                            ["--arch", "res3d10", "--data_dir", str(data), "--output_dir", o])),
                       ("eval_probe.py", lambda o: eval_probe.main(
                            ["random", "--arch", "res3d10", "--data_dir", str(data),
                             "--output_dir", o]))):
        out = tmp_path / name
        assert call(str(out)) == 1
        err = _last_line(capsys.readouterr().err)
        assert err.startswith(f"{name}: error: ") and expected in err and str(data) in err, err
        assert not out.exists(), name


# ----------------------------------------------------------------------------- item 6
def _last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


@pytest.mark.parametrize("case", ["missing list", "empty list", "missing entries",
                                  "missing retrieval list", "bad flag"])
def test_invalid_command_creates_nothing(case, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--data_path", str(tiny_data), "--list_path", "list.txt", "--output_dir", str(out),
            *TINY, "--epochs", "1"]
    if case == "missing list":
        argv = with_value(argv, "--list_path", "nope.txt")
    elif case == "empty list":
        (tmp_path / "empty.txt").write_text("\n")
        argv = with_value(argv, "--list_path", str(tmp_path / "empty.txt"))
    elif case == "missing entries":
        (tmp_path / "gone.txt").write_text("DL_patches_v2/gone.npy\n")
        argv = with_value(argv, "--list_path", str(tmp_path / "gone.txt"))
    elif case == "missing retrieval list":
        argv += ["--retrieval_list", "held/nope.txt"]
    else:
        argv += ["--lr", "-1"]
    try:
        code = main_desd.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert code != 0
    assert not out.exists()
    last = _last_line(captured.err)
    assert last.startswith("main_desd.py: error: "), captured.err
    expected = {"missing list": "nope.txt", "empty list": "empty.txt",
                "missing entries": "gone.npy", "missing retrieval list": "nope.txt",
                "bad flag": "--lr"}[case]
    assert expected in last
    assert "arguments:" not in captured.out and "lr: " not in captured.out


def test_invalid_command_last_line_in_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "main_desd.py"), "--data_path",
                           str(tmp_path), "--output_dir", str(out)], env=env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not out.exists()
    last = _last_line(proc.stderr)
    assert last.startswith("main_desd.py: error: ") and "SSL_data_deeplesion.txt" in last
    assert proc.stdout.strip() == ""


# ----------------------------------------------------------------------------- item 7
def checkpoint_bytes(argv: list[str], last_layer_trained: bool) -> int:
    """A training checkpoint's size from parameter counts: float32 student and teacher
    states, and AdamW's two (SGD's one) state tensors per trained parameter; the heads'
    last layers have no optimiser state while they are frozen (--freeze_last_layer); the
    loss's centre."""
    args = main_desd.parse_args(argv)
    deep = [k for k in (1, 2, 3) if args.stage_weights[k - 1]]
    with torch.device("meta"):
        student, teacher = main_desd.build_network(args, deep), main_desd.build_network(args, [])
    states = sum(v.numel() for net in (student, teacher) for v in net.state_dict().values())
    trained = sum(p.numel() for n, p in student.named_parameters()
                  if p.requires_grad and (last_layer_trained or "last_layer" not in n))
    center = args.out_dim  # DeSDLoss's running centre of the teacher's outputs
    return 4 * (states + center + {"adamw": 2, "sgd": 1, "lars": 1}[args.optimizer] * trained)


def test_checkpoint_sizes_and_the_readme_disk_figures(tiny_data, tmp_path):
    out = tmp_path / "run"
    argv = ["--data_path", str(tiny_data), "--list_path", "list.txt", "--output_dir", str(out),
            *TINY, "--epochs", "2", "--saveckp_freq", "1"]
    assert main_desd.main(argv) == 0
    for name, trained in (("checkpoint0000.pth", False), ("checkpoint0001.pth", True),
                          ("checkpoint.pth", True), ("checkpoint_prev.pth", False)):
        size, expected = (out / name).stat().st_size, checkpoint_bytes(argv, trained)
        assert expected <= size <= expected * 1.005 + 200_000, (name, size, expected)
    # the README's figures (MB) are the same formula at the trainer's defaults
    text = readme_block("disk")
    for arch in ("res3d10", "res3d50"):
        for trained in (False, True):
            mb = round(checkpoint_bytes(["--arch", arch], trained) / 1e6)
            assert f"{mb} MB" in text, (arch, trained, mb)
    for name in ("checkpoint.pth", "checkpoint_prev.pth", "checkpoint0000.pth", "--saveckp_freq"):
        assert name in text


def test_gitignore_has_the_readme_scratch_folders():
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert "my_set/" in gitignore and "runs/" in gitignore
