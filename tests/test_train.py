"""End-to-end trainer tests on CPU: a tiny res3d10 on tiny synthetic sub-volumes.

Covers the 2-epoch run and its outputs, exact resume in a fresh process (0 and 2 workers,
and 2 processes on gloo), fallback to the previous checkpoint, SIGKILL during saving, a
NaN on one rank, and a killed rank followed by a relaunch (issue 6).
"""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from common import atomic, checkpoints, listfile

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "res3d10", "--out_dim", "32", "--head_hidden_dim", "32",
        "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "2",
        "--global_crop_size", "8", "48", "48", "--local_crop_size", "8", "40", "40",
        "--warmup_epochs", "1", "--print_freq", "1", "--seed", "7"]


def make_subvolumes(root, n, seed):
    """`n` random int16 sub-volumes under root/DL_patches_v2 and root/list.txt naming them."""
    (root / "DL_patches_v2").mkdir()
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        vol = rng.normal(-200, 300, size=(50, 44, 12)).clip(-1024, 1024).astype(np.int16)
        np.save(root / "DL_patches_v2" / f"v{i}.npy", vol)
        names.append(f"DL_patches_v2/v{i}.npy")
    (root / "list.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_subvolumes(tmp_path_factory.mktemp("subvolumes"), 4, seed=0)


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(data, out, *extra, nproc=1, script=None, check=True, timeout=300):
    script = script or str(ROOT / "main_desd.py")
    args = ["--data_path", str(data), "--list_path", "list.txt", "--output_dir", str(out),
            *TINY, *extra]
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    proc.seconds = time.time() - t0
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def teacher(out, name="checkpoint.pth"):
    return torch.load(Path(out) / name, map_location="cpu", weights_only=True)["teacher"]


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def resume_from(src_out, dst_out, epoch_file):
    dst_out.mkdir(parents=True)
    shutil.copy(Path(src_out) / epoch_file, dst_out / "checkpoint.pth")


# ------------------------------------------------------------------------- single process

@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """3 epochs without interruption, checkpoints kept every epoch."""
    out = tmp_path_factory.mktemp("straight")
    run(data, out, "--epochs", "3", "--saveckp_freq", "1", "--num_workers", "0",
        "--local_crops_number", "2")
    return out


@pytest.mark.slow
def test_two_epoch_run_outputs(straight):
    log = [json.loads(line) for line in (straight / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [0, 1, 2]
    for row in log:
        for key in ("train_total_loss", "train_loss_ssl", "train_deep_loss_1", "train_deep_loss_2",
                    "train_deep_loss_3", "lr", "wd", "momentum", "teacher_temp", "seconds",
                    "train_teacher_entropy", "train_teacher_batch_entropy", "train_kl_stage1",
                    "train_kl_stage4"):
            assert np.isfinite(row[key]), key
        parts = [row[f"train_deep_loss_{k}"] for k in (1, 2, 3)] + [row["train_loss_ssl"]]
        assert row["train_total_loss"] == pytest.approx(0.25 * sum(parts), rel=1e-5)
    path = straight / "checkpoint.pth"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "args", "desd_loss", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and isinstance(ckpt["args"], dict) and ckpt["args"]["arch"] == "res3d10"
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["teacher"])
    assert "module.backbone.conv1.weight" in ckpt["teacher"]
    assert any(k.startswith("module.deep_heads.stage1.") for k in ckpt["student"])
    assert ckpt["desd_loss"]["center"].shape == (1, 32)
    assert {p.name for p in straight.glob("checkpoint0*.pth")} == {
        "checkpoint0000.pth", "checkpoint0001.pth", "checkpoint0002.pth"}
    assert (straight / "checkpoint_prev.pth").exists()
    from safetensors.torch import load_file
    bb = load_file(straight / "teacher_backbone.safetensors")
    assert_same(bb, {k[len("module.backbone."):]: v for k, v in ckpt["teacher"].items()
                     if k.startswith("module.backbone.")}, atol=0)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_exact_resume_in_fresh_process(straight, data, tmp_path, workers):
    out = tmp_path / "resumed"
    resume_from(straight, out, "checkpoint0001.pth")     # state after epochs 0 and 1
    proc = run(data, out, "--epochs", "3", "--saveckp_freq", "1", "--num_workers", str(workers),
               "--local_crops_number", "2")
    assert "at epoch 2" in proc.stdout
    assert_same(teacher(out), teacher(straight))
    # log.txt is rewritten from the checkpoint's own record: epochs 0-1 as they were, then 2
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    ref = [json.loads(line) for line in (straight / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[:2] == ref[:2]
    assert rows[2]["train_total_loss"] == pytest.approx(ref[2]["train_total_loss"], abs=1e-6)


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_previous(straight, data, tmp_path):
    out = tmp_path / "fallback"
    out.mkdir()
    shutil.copy(straight / "checkpoint0002.pth", out / "checkpoint.pth")
    shutil.copy(straight / "checkpoint0001.pth", out / "checkpoint_prev.pth")
    raw = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(raw[: len(raw) // 2])
    proc = run(data, out, "--epochs", "3", "--num_workers", "0", "--local_crops_number", "2")
    assert "checkpoint.pth" in proc.stderr and "previous" in proc.stderr
    assert "checkpoint_prev.pth at epoch 2" in proc.stdout
    assert_same(teacher(out), teacher(straight))


def train_here(data, out, *extra):
    """The trainer in this process (no interpreter start-up); errors propagate."""
    import main_desd
    args = ["--data_path", str(data), "--list_path", "list.txt", "--output_dir", str(out),
            *TINY, "--num_workers", "0", *extra]
    main_desd.train(main_desd.parse_args(args))


def test_bad_inputs_are_refused_before_training(data, tmp_path, capsys):
    (tmp_path / "list.txt").write_text("DL_patches_v2/missing_0.npy\nDL_patches_v2/missing_1.npy\n")
    with pytest.raises(FileNotFoundError, match="missing_0.npy"):
        train_here(tmp_path, tmp_path / "out", "--epochs", "1")
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_here(data, tmp_path / "out2", "--batch_size_per_gpu", "64")
    with pytest.raises(SystemExit):
        train_here(data, tmp_path / "out3", "--arch", "res3d11")
    assert "res3d50" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_here(data, tmp_path / "out4", "--global_crop_size", "8", "32", "32",
                   "--local_crop_size", "8", "32", "32")
    assert "instance norm" in capsys.readouterr().err
    assert not (tmp_path / "out4").exists()


@pytest.mark.slow
def test_bf16_and_fp32_steps_are_finite(data, tmp_path):
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        # bf16 convolutions are slow on CPUs without bf16 units: one small step only
        train_here(data, out, "--epochs", "1", "--precision", precision,
                   "--max_iters_per_epoch", "1", "--batch_size_per_gpu", "1",
                   "--global_crop_size", "8", "36", "36", "--local_crop_size", "8", "36", "36")
        row = json.loads((out / "log.txt").read_text().splitlines()[0])
        assert np.isfinite(row["train_total_loss"])


# ------------------------------------------------------------------------- saving under SIGKILL

def _save_forever(path, epoch):
    while True:
        epoch += 1
        # numpy-made tensor: no OpenMP work in a forked child (it can hang after fork)
        w = torch.from_numpy(np.full(2_000_000, epoch, np.float32))
        checkpoints.atomic_save({"epoch": epoch, "w": w}, path, keep_previous=True)


@pytest.mark.slow
def test_sigkill_during_saving_never_leaves_a_bad_checkpoint(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context("fork")                 # torch is already imported: starts at once
    path = tmp_path / "checkpoint.pth"
    rng = random.Random(0)
    last = 0
    for _ in range(24):
        proc = ctx.Process(target=_save_forever, args=(path, last))
        proc.start()
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        if not path.exists():           # killed before the first save completed
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] >= last                       # never goes backwards
        assert bool((ckpt["w"] == ckpt["epoch"]).all())    # complete, not a mix
        last = ckpt["epoch"]
    assert last > 0
    # some kills landed in the middle of a write: their temporary files are left behind,
    # and the next start (here: the cleaner every entry point calls) removes them
    assert list(tmp_path.glob(".checkpoint.pth.tmp-*"))
    stale = list(tmp_path.glob(".checkpoint*.tmp-*"))
    assert atomic.remove_stale_temps(tmp_path) == len(stale)
    assert not list(tmp_path.glob(".*tmp-*")) and path.exists()


# ------------------------------------------------------------------------- two processes (gloo)

WRAPPER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    import main_desd

    MODE, EPOCH = {mode!r}, {epoch}
    rank = int(os.environ.get("RANK", 0))
    orig_epoch, orig_terms = main_desd.train_one_epoch, main_desd.DeSDLoss.terms
    orig_build = main_desd.build_models

    def epoch_hook(epoch, *args, **kw):
        if MODE == "kill" and rank == 1 and epoch == EPOCH:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_epoch(epoch, *args, **kw)

    def terms_hook(self, s, t, epoch):
        out = orig_terms(self, s, t, epoch)
        if MODE == "nan" and rank == 1 and epoch == EPOCH:
            out["total_loss"] = out["total_loss"] * float("nan")
        return out

    def build_hook(args, device, world=1):  # the teacher every rank starts from
        nets = orig_build(args, device, world)
        if MODE == "dump":
            torch.save(nets.teacher.state_dict(), os.path.join(args.output_dir, f"teacher{{rank}}.pt"))
            raise SystemExit(0)
        return nets

    main_desd.train_one_epoch = epoch_hook
    main_desd.DeSDLoss.terms = terms_hook
    main_desd.build_models = build_hook
    sys.exit(main_desd.main(sys.argv[1:]))
""")


def wrapper(tmp_path, mode, epoch):
    script = tmp_path / f"wrap_{mode}.py"
    script.write_text(WRAPPER.format(root=str(ROOT), mode=mode, epoch=epoch))
    return str(script)


@pytest.fixture(scope="module")
def data12(tmp_path_factory):
    """12 sub-volumes: 3 iterations per epoch at 2 processes x batch 2."""
    return make_subvolumes(tmp_path_factory.mktemp("subvolumes12"), 12, seed=1)


# the published optimiser and learning rate, where a teacher difference between ranks shows
SGD = ["--epochs", "3", "--num_workers", "0", "--optimizer", "sgd", "--lr", "0.3",
       "--min_lr", "0.048", "--warmup_epochs", "0", "--clip_grad", "0"]


@pytest.fixture(scope="module")
def straight_ddp(data12, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_ddp")
    run(data12, out, *SGD, "--saveckp_freq", "1", nproc=2)
    return out


@pytest.mark.slow
def test_every_rank_starts_from_one_teacher(data12, tmp_path):
    """Rank 1 used to build its teacher from its own (seed + 1) student: 71 % apart."""
    out = tmp_path / "dump"
    out.mkdir()
    proc = run(data12, out, *SGD, nproc=2, script=wrapper(tmp_path, "dump", 0), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    t0 = torch.load(out / "teacher0.pt", weights_only=True)
    t1 = torch.load(out / "teacher1.pt", weights_only=True)
    assert_same(t0, t1, atol=0)
    # and the teacher is the student's copy: the same as a single process builds
    import main_desd
    args = main_desd.parse_args(["--data_path", str(data12), *TINY, *SGD])
    assert_same(main_desd.build_models(args, torch.device("cpu")).teacher.state_dict(), t0, atol=0)


@pytest.mark.slow
def test_killed_rank_stops_launcher_and_relaunch_recovers(straight_ddp, data12, tmp_path):
    """2 processes, sgd at the published lr, 3 iterations per epoch: a rank killed in the
    third epoch, the same command again, and the teacher equals the uninterrupted run's."""
    out = tmp_path / "killed"
    killer = wrapper(tmp_path, "kill", 2)
    proc = run(data12, out, *SGD, nproc=2, script=killer, check=False)
    assert proc.returncode != 0
    assert proc.seconds < 120
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    proc = run(data12, out, *SGD, nproc=2)   # the same command again
    assert "at epoch 2" in proc.stdout
    assert_same(teacher(out), teacher(straight_ddp), atol=0)


@pytest.mark.slow
def test_resume_after_one_epoch_is_exact_with_two_processes(straight_ddp, data12, tmp_path):
    out = tmp_path / "resumed"
    resume_from(straight_ddp, out, "checkpoint0000.pth")
    proc = run(data12, out, *SGD, nproc=2)
    assert "at epoch 1" in proc.stdout
    assert_same(teacher(out), teacher(straight_ddp), atol=0)


@pytest.mark.slow
def test_nan_on_one_rank_stops_all_ranks_and_keeps_checkpoint(straight_ddp, data12, tmp_path):
    out = tmp_path / "nan"
    resume_from(straight_ddp, out, "checkpoint0000.pth")     # the good state after epoch 0
    digest = hashlib.sha256((out / "checkpoint.pth").read_bytes()).hexdigest()
    script = wrapper(tmp_path, "nan", 1)
    proc = run(data12, out, *SGD, nproc=2, script=script, check=False)
    assert proc.returncode != 0
    assert proc.seconds < 60 + 30          # 60 s for the stop, plus start-up on a loaded CI box
    assert "non-finite loss at epoch 1, iteration 0" in proc.stderr
    assert proc.stderr.count("non-finite loss at epoch 1") >= 2     # both ranks say so
    assert digest == hashlib.sha256((out / "checkpoint.pth").read_bytes()).hexdigest()
    assert not (out / "teacher_backbone.safetensors").exists()


def test_every_torch_load_is_weights_only():
    """Every call of torch.load in the project passes weights_only=True (parsed, not grepped)."""
    import ast
    offenders, calls = [], 0
    for path in ROOT.rglob("*.py"):
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert calls >= 1 and not offenders, offenders


@pytest.mark.slow
def test_dino_mode_has_no_deep_heads_and_no_kl_for_headless_stages(data, tmp_path, capsys):
    out = tmp_path / "dino"
    train_here(data, out, "--epochs", "1", "--stage_weights", "0", "0", "0", "1",
               "--max_iters_per_epoch", "1")
    row = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert "train_kl_stage4" in row and not any(f"train_kl_stage{k}" in row for k in (1, 2, 3))
    assert not any(f"train_deep_loss_{k}" in row for k in (1, 2, 3))
    assert row["train_total_loss"] == row["train_loss_ssl"]
    student = torch.load(out / "checkpoint.pth", weights_only=True)["student"]
    assert not any("deep_heads" in k for k in student)
    assert "stage 1" not in capsys.readouterr().out


@pytest.mark.slow
def test_diverging_last_step_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    """An infinite learning rate on the last step of epoch 1: the loss of that step is
    still finite (it is computed before the update), the weights are not. The weights are
    checked before saving, so checkpoint.pth stays the one of epoch 0."""
    import main_desd
    out = tmp_path / "diverge"
    orig = main_desd.build_schedules

    def infinite_at_end_of_epoch_1(args, niter, world):
        s = orig(args, niter, world)
        s.lr[2 * niter - 1] = float("inf")
        return s
    monkeypatch.setattr(main_desd, "build_schedules", infinite_at_end_of_epoch_1)
    with pytest.raises(main_desd.NonFinite, match="non-finite weights after epoch 1"):
        train_here(data, out, "--epochs", "3", "--optimizer", "sgd", "--clip_grad", "0")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(bool(v.isfinite().all()) for v in ckpt["teacher"].values())
    assert [json.loads(ln)["epoch"] for ln in (out / "log.txt").read_text().splitlines()] == [0]


@pytest.mark.slow
def test_log_txt_follows_the_checkpoint_it_belongs_to(straight, data, tmp_path):
    """A kill between the checkpoint save and the log write lost a line; a fallback to the
    previous checkpoint duplicated lines. log.txt is now rewritten from the checkpoint."""
    out = tmp_path / "log"
    out.mkdir()
    shutil.copy(straight / "checkpoint0001.pth", out / "checkpoint.pth")
    (out / "log.txt").write_text((straight / "log.txt").read_text().splitlines()[0] + "\n")
    # a stale temporary file of a killed save, from a process that is gone
    (out / ".checkpoint.pth.tmp-999999999.pth").write_bytes(b"half")
    run(data, out, "--epochs", "3", "--num_workers", "0", "--local_crops_number", "2")
    rows = [json.loads(ln) for ln in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert not (out / ".checkpoint.pth.tmp-999999999.pth").exists()


@pytest.mark.slow
def test_published_checkpoint_is_mapped_and_resumed(data, tmp_path, capsys):
    """The release's training checkpoint: deep heads named head_1..3, an extra loss_center,
    a Namespace as args. Its heads are mapped by width, the optimizer state starts fresh."""
    import argparse
    out = tmp_path / "published"
    train_here(data, out, "--epochs", "1", "--max_iters_per_epoch", "1")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    renamed = {}
    for k, v in ckpt["student"].items():
        for stage in (1, 2, 3):
            k = k.replace(f"module.deep_heads.stage{stage}.", f"module.head_{stage}.")
        renamed[k] = v
    published = {"student": renamed, "teacher": ckpt["teacher"], "epoch": 1,
                 "optimizer": {"state": {}, "param_groups": [{"params": [0, 1]}]},
                 "desd_loss": {"center": ckpt["desd_loss"]["center"],
                               "loss_center": torch.zeros(1, 4)},
                 "args": argparse.Namespace(arch="res3d10")}
    (out / "checkpoint.pth").unlink()
    torch.save(published, out / "checkpoint.pth")
    capsys.readouterr()
    train_here(data, out, "--epochs", "2", "--max_iters_per_epoch", "1")
    text = capsys.readouterr().out
    assert "head_1 mapped to deep_heads.stage1" in text and "loss_center dropped" in text
    assert "optimizer starts fresh" in text and "at epoch 1" in text
    resumed = torch.load(out / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == 2 and set(resumed["student"]) == set(ckpt["student"])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs"), (["--warmup_epochs", "5", "--epochs", "3"], "--warmup_epochs"),
    (["--warmup_teacher_temp_epochs", "9", "--epochs", "3"], "--warmup_teacher_temp_epochs"),
    (["--print_freq", "0"], "--print_freq"), (["--out_dim", "0"], "--out_dim"),
    (["--lr", "-1"], "--lr"), (["--momentum_teacher", "2"], "--momentum_teacher"),
    (["--stage_weights", "0", "0", "0", "0"], "--stage_weights"),
    (["--stage_weights", "1", "-1", "0", "1"], "--stage_weights"),
    (["--head_hidden_dim", "0"], "--head_hidden_dim"), (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu"),
    (["--num_workers", "-1"], "--num_workers"), (["--teacher_temp", "0"], "--teacher_temp"),
    (["--teacher_temp", "nan"], "--teacher_temp"), (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--local_crop_size", "16", "128", "128"], "--local_crop_size"), (["--compile", "maybe"], "--compile"),
])
def test_invalid_arguments_are_refused_before_any_work(argv, message, capsys):
    import main_desd
    with pytest.raises(SystemExit) as e:
        main_desd.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_published_command_line_parses():
    """Every flag of the published run_ssl.sh, including the two the release parsed and
    never used (--global_crops_scale, --local_crops_scale), and the use_fp16 alias."""
    import main_desd
    args = main_desd.parse_args([
        "--arch", "res3d50", "--batch_size_per_gpu", "32", "--optimizer", "sgd", "--use_fp16",
        "False", "--momentum_teacher", "0.996", "--epochs", "300", "--out_dim", "60000",
        "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs",
        "20", "--weight_decay", "1e-6", "--weight_decay_end", "1e-6", "--clip_grad", "0",
        "--lr", "0.3", "--min_lr", "0.048", "--use_bn_in_head", "True", "--global_crops_scale",
        "0.4", "1.0", "--local_crops_scale", "0.05", "0.4", "--local_crops_number", "0",
        "--norm_last_layer", "True", "--saveckp_freq", "50", "--num_workers", "10"])
    assert args.precision == "fp32" and args.use_bn_in_head is True
    assert args.global_crops_scale == [0.4, 1.0]
    assert main_desd.parse_args(["--use_fp16", "True"]).precision == "auto"
    assert main_desd.parse_args(["--use_fp16", "False", "--precision", "bf16"]).precision == "bf16"


def test_list_file_in_a_sub_folder_trains(data, tmp_path):
    """splitting_to_patches.py --list_file lists/ssl.txt writes '../DL_patches_v2/...'; the
    trainer reads it by the same rule (relative to the list file's folder)."""
    files = sorted((data / "DL_patches_v2").glob("*.npy"))
    listfile.write_list_file(data / "lists" / "ssl.txt", files)
    assert (data / "lists" / "ssl.txt").read_text().startswith("../DL_patches_v2/")
    out = tmp_path / "sub"
    train_here(data, out, "--list_path", "lists/ssl.txt", "--epochs", "1", "--max_iters_per_epoch", "1")
    assert (out / "checkpoint.pth").is_file()
