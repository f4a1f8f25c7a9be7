import argparse
import math

import numpy as np
import pytest
import torch
from torch import nn

import utils
from common import checkpoints
from common.retrieval import view_retrieval
from models import PretrainedLoadError, read_checkpoint
from main_desd import build_network, parse_args
from utils import TeacherEMA


def test_cosine_schedule_length_and_end_points():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=5, niter_per_ep=4, warmup_epochs=2)
    assert len(s) == 20
    np.testing.assert_allclose(s[:8], np.linspace(0, 1.0, 8))
    assert s[8] == pytest.approx(1.0)                          # cosine starts at the base
    n = 12
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (n - 1) / n)))
    assert np.all(np.diff(s[8:]) <= 0)
    m = utils.cosine_scheduler(0.996, 1.0, 3, 5)
    assert m[0] == pytest.approx(0.996) and m[-1] < 1.0 and m[-1] > 0.9999


def small_args(*extra):
    """Arguments built by the trainer's own parser."""
    return parse_args(["--arch", "res3d10", "--out_dim", "16", "--head_hidden_dim", "32",
                       "--head_bottleneck_dim", "8", *extra])


def test_student_teacher_names_and_head_widths():
    student = build_network(small_args(), [1, 2, 3])
    teacher = build_network(small_args(), [])
    t_names = set(teacher.state_dict())
    assert t_names <= set(student.state_dict())
    assert any(k.startswith("head.") for k in t_names) and not any("deep_heads" in k for k in t_names)
    # head input widths follow the backbone (64..512 for res3d10), not hard-coded 256..2048
    assert student.deep_heads["stage1"].mlp[0].in_features == 64
    assert student.head.mlp[0].in_features == 512
    out = student([torch.randn(2, 1, 16, 64, 64)] * 2 + [torch.randn(2, 1, 16, 48, 48)] * 3)
    assert [tuple(o.shape) for o in out] == [(10, 16)] * 4


def test_ema_pairs_by_name_even_when_registration_order_differs():
    class Reordered(nn.Module):  # same names as the student, registered in another order
        def __init__(self, src):
            super().__init__()
            self.head = src.head
            self.backbone = src.backbone
    student = build_network(small_args(), [2])
    teacher = Reordered(build_network(small_args(), []))
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
    ema = TeacherEMA(student, teacher)
    ema.update(0.75)
    s = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        torch.testing.assert_close(t, 0.25 * s[name])


def test_ema_refuses_teacher_names_missing_from_student():
    student = build_network(small_args(), [])
    teacher = build_network(small_args(), [1])
    with pytest.raises(ValueError, match="deep_heads.stage1"):
        TeacherEMA(student, teacher)


def test_param_groups_and_clip_and_freeze():
    net = build_network(small_args(), [3])
    reg, noreg = utils.get_params_groups(net)
    assert all(p.ndim > 1 for p in reg["params"]) and all(p.ndim == 1 for p in noreg["params"])
    assert noreg["weight_decay"] == 0.0
    # the frozen weight_g is not optimised at all
    assert not any(p is net.head.last_layer.weight_g for p in reg["params"] + noreg["params"])
    lin = nn.Linear(3, 2)
    lin.weight.grad = torch.full((2, 3), 10.0)
    lin.bias.grad = torch.tensor([0.3, 0.4])
    utils.clip_gradients(lin, 3.0)
    assert float(lin.weight.grad.norm()) == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(lin.bias.grad, torch.tensor([0.3, 0.4]))    # norm 0.5 < 3
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    utils.cancel_gradients_last_layer(0, net, 1)
    assert net.head.last_layer.weight_v.grad is None
    assert net.backbone.conv1.weight.grad is not None


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))       # norm 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = utils.LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=0.1,
                     weight_decay=0.0, eta=0.001)
    w.grad = torch.tensor([[0.0, 2.0]])                # norm 2 -> trust 0.001 * 5 / 2
    b.grad = torch.tensor([0.5])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.1 * 2.0 * 0.0025]]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.95]))


def test_atomic_save_keeps_previous_and_falls_back(tmp_path, recwarn):
    path = tmp_path / "checkpoint.pth"
    checkpoints.atomic_save({"epoch": 1, "w": torch.ones(3)}, path, keep_previous=True)
    checkpoints.atomic_save({"epoch": 2, "w": torch.ones(3) * 2}, path, keep_previous=True)
    assert read_checkpoint(checkpoints.previous_path(path))["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp*"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])           # truncated by a crash or a full disk
    ckpt, source = checkpoints.load_checkpoint_with_fallback(path)
    assert ckpt["epoch"] == 1 and source == checkpoints.previous_path(path)
    assert any("checkpoint.pth" in str(w.message) for w in recwarn)
    assert checkpoints.load_checkpoint_with_fallback(tmp_path / "none.pth") == (None, None)


def test_checkpoint_corrupted_inside_same_size_falls_back(tmp_path, recwarn):
    """Zeroed bytes inside a tensor record: torch.load alone reads garbage silently; the
    CRC check refuses the file, names it, and the previous checkpoint is used."""
    path = tmp_path / "checkpoint.pth"
    checkpoints.atomic_save({"epoch": 1, "w": torch.ones(100_000)}, path, keep_previous=True)
    checkpoints.atomic_save({"epoch": 2, "w": torch.full((100_000,), 2.0)}, path, keep_previous=True)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 65536] = bytes(65536)
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["epoch"] == 2  # what used to be trusted
    with pytest.raises(PretrainedLoadError, match="CRC"):
        read_checkpoint(path)
    ckpt, source = checkpoints.load_checkpoint_with_fallback(path)
    assert ckpt["epoch"] == 1 and source == checkpoints.previous_path(path)
    assert any(str(path) in str(w.message) and "CRC" in str(w.message) for w in recwarn)


def test_read_checkpoint_allows_namespace_only(tmp_path):
    p = tmp_path / "published.pth"
    torch.save({"teacher": {"a": torch.zeros(1)}, "args": argparse.Namespace(arch="res3d50")}, p)
    assert read_checkpoint(p)["args"].arch == "res3d50"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedLoadError, match="could run code"):
        read_checkpoint(tmp_path / "evil.pth")


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    utils.seed_everything(3)
    state = utils.rng_state()
    torch.save(state, tmp_path / "rng.pth")
    a = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    utils.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    b = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    assert a == b


def test_full_disk_during_a_checkpoint_save_is_named(tmp_path):
    """torch.save on a full disk used to end in 'RuntimeError: [enforce fail at
    inline_container.cc ...]'; the save now says which file and why, and the previous
    checkpoint stays as it was."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(root)!r})
        import torch
        from common import atomic, checkpoints
        path = {str(tmp_path / "checkpoint.pth")!r}
        checkpoints.atomic_save({{"epoch": 1, "w": torch.ones(10)}}, path, keep_previous=True)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            checkpoints.atomic_save({{"epoch": 2, "w": torch.ones(1_000_000)}}, path, keep_previous=True)
        except atomic.WriteError as e:
            print("WriteError:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "WriteError:" in proc.stdout, proc.stdout + proc.stderr
    assert str(tmp_path / "checkpoint.pth") in proc.stdout and "disk" in proc.stdout
    assert read_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp-*"))


def test_view_retrieval_known_answers():
    torch.manual_seed(0)
    a = torch.randn(50, 16)
    # identical views: every partner is the nearest (cosine 1, others below)
    r = view_retrieval(a, a.clone())
    assert r["top1"] == 1.0 and r["top5"] == 1.0
    assert r["chance1"] == pytest.approx(1 / 99) and r["chance5"] == pytest.approx(5 / 99)
    # a constant embedding: every other view ties with the partner: exactly chance
    c = torch.ones(50, 16)
    r = view_retrieval(c, c.clone())
    assert r["top1"] == pytest.approx(1 / 99) and r["top5"] == pytest.approx(5 / 99)
    # unrelated noise: about chance (mean over draws within a few standard errors)
    top1 = [view_retrieval(torch.randn(200, 32), torch.randn(200, 32))["top1"]
            for _ in range(20)]
    assert abs(np.mean(top1) - 1 / 399) < 0.003
    # by hand, cosines: a0.b0 0.994, a0.a1 0.8, a0.b1 0; a1.b1 0.6, a1.b0 0.861;
    # b0.b1 0.110. Partners ranked first: a0 (b0), b0 (a0), b1 (a1: 0.6 > 0.110 > 0);
    # a1's partner b1 (0.6) comes third, after b0 and a0: top1 = top2 = 3/4
    a = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    b = torch.tensor([[0.9, 0.1], [0.0, 1.0]])
    r = view_retrieval(a, b, ks=(1, 2))
    assert r["top1"] == pytest.approx(3 / 4) and r["top2"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        view_retrieval(a, b[:1])
