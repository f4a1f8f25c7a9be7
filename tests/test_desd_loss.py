import math

import numpy as np
import pytest
import torch

from main_desd import DeSDLoss
from utils import check_collapse


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_hand_computed_two_crops():
    """out_dim 3, batch 1, two global crops, centre 0: every number by hand."""
    t = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.0]]
    s = [[0.3, -0.2, 0.1], [0.0, 0.4, -0.1]]
    tau_t, tau_s = 0.04, 0.1
    q = [softmax([v / tau_t for v in row]) for row in t]
    logp = [[math.log(p) for p in softmax([v / tau_s for v in row])] for row in s]
    ce = lambda a, b: -sum(x * y for x, y in zip(q[a], logp[b]))
    expected = (ce(0, 1) + ce(1, 0)) / 2

    loss_fn = DeSDLoss(3, 2, 0.04, 0.04, 0, 10)
    S = torch.tensor(s)
    out = loss_fn([S, S, S, S], torch.tensor(t), epoch=0)
    total, ssl, d1, d2, d3 = out
    for term in (ssl, d1, d2, d3):
        assert float(term) == pytest.approx(expected, rel=1e-5)
    assert float(total) == pytest.approx(0.25 * 4 * expected, rel=1e-5)
    # centre: 0.9 * 0 + 0.1 * mean of the teacher rows
    expected_center = [0.1 * (a + b) / 2 for a, b in zip(*t)]
    np.testing.assert_allclose(loss_fn.center.numpy()[0], expected_center, rtol=1e-6)


def loop_reference(student, teacher, center, ncrops, tau_t, tau_s=0.1):
    q = torch.softmax((teacher - center) / tau_t, -1).chunk(2)
    terms = []
    for s in student:
        lp = torch.log_softmax(s / tau_s, -1).chunk(ncrops)
        acc, n = 0.0, 0
        for i, qi in enumerate(q):
            for v in range(ncrops):
                if v != i:
                    acc = acc + torch.sum(-qi * lp[v], -1).mean()
                    n += 1
        terms.append(acc / n)
    return terms


def test_multicrop_matches_loop_and_center_persists():
    torch.manual_seed(0)
    ncrops, B, K = 4, 3, 17
    loss_fn = DeSDLoss(K, ncrops, 0.04, 0.07, 3, 10, stage_weights=(0.1, 0.2, 0.3, 0.4))
    loss_fn.center.copy_(torch.randn(1, K) * 0.1)
    center0 = loss_fn.center.clone()
    student = [torch.randn(ncrops * B, K) for _ in range(4)]
    teacher = torch.randn(2 * B, K)
    total, ssl, d1, d2, d3 = loss_fn(student, teacher, epoch=1)
    ref = loop_reference(student, teacher, center0, ncrops, tau_t=float(np.linspace(0.04, 0.07, 3)[1]))
    for got, want in zip((d1, d2, d3, ssl), ref):
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(total) == pytest.approx(sum(w * float(r) for w, r in zip((0.1, 0.2, 0.3, 0.4), ref)), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.9 * center0 + 0.1 * teacher.mean(0, keepdim=True))


def test_teacher_temperature_schedule():
    loss_fn = DeSDLoss(4, 2, 0.04, 0.07, 20, 300)
    sched = loss_fn.teacher_temp_schedule
    assert len(sched) == 300
    assert sched[0] == pytest.approx(0.04) and sched[19] == pytest.approx(0.07)
    assert sched[10] == pytest.approx(0.04 + 10 * 0.03 / 19)
    assert np.all(sched[19:] == pytest.approx(0.07))


def test_dino_weights_reduce_to_dino_loss_and_weights_only_change_total():
    torch.manual_seed(1)
    K, B = 11, 2
    student = [torch.randn(2 * B, K) for _ in range(4)]
    teacher = torch.randn(2 * B, K)
    desd = DeSDLoss(K, 2, 0.04, 0.04, 0, 5)
    dino = DeSDLoss(K, 2, 0.04, 0.04, 0, 5, stage_weights=(0, 0, 0, 1))
    a = desd(student, teacher, 0)
    b = dino(student, teacher, 0)
    for x, y in zip(a[1:], b[1:]):            # per-stage terms unchanged by the weights
        assert float(x) == float(y)
    # DINO: total is the last stage's cross-entropy alone, computed by hand
    q = torch.softmax(teacher / 0.04, -1).chunk(2)
    lp = torch.log_softmax(student[3] / 0.1, -1).chunk(2)
    dino_by_hand = 0.5 * ((-q[0] * lp[1]).sum(-1).mean() + (-q[1] * lp[0]).sum(-1).mean())
    assert float(b[0]) == pytest.approx(float(dino_by_hand), rel=1e-6)
    # stages without a head (None) contribute zero
    c = dino([None, None, None, student[3]], teacher, 0)
    assert float(c[0]) == pytest.approx(float(dino_by_hand), rel=1e-6)
    assert float(c[2]) == 0.0


def test_collapse_statistics_and_warnings():
    K, B = 64, 4
    uniform = torch.zeros(2 * B, K)
    loss_fn = DeSDLoss(K, 2, 0.04, 0.04, 0, 5)
    st = {k: float(v) for k, v in loss_fn.terms([uniform] * 4, uniform, 0).items()}
    assert st["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert st["teacher_batch_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert abs(st["kl_stage4"]) < 1e-4
    warns = check_collapse(st, K)
    assert any("uniform" in w for w in warns) and any("stage 4" in w for w in warns)

    onehot = torch.full((2 * B, K), -100.0)
    onehot[:, 3] = 100.0
    loss_fn = DeSDLoss(K, 2, 0.04, 0.04, 0, 5)
    st = {k: float(v) for k, v in loss_fn.terms([torch.randn(2 * B, K)] * 4, onehot, 0).items()}
    assert st["teacher_entropy"] < 1e-6
    assert st["kl_stage1"] > 1e-3
    warns = check_collapse(st, K)
    assert any("one-hot" in w for w in warns)
    assert not any("copies" in w for w in warns)


def test_named_terms_match_the_published_tuple_and_skip_headless_stages():
    torch.manual_seed(3)
    K, B = 9, 3
    student = [torch.randn(4 * B, K) for _ in range(4)]
    teacher = torch.randn(2 * B, K)
    a, b = DeSDLoss(K, 4, 0.04, 0.04, 0, 5), DeSDLoss(K, 4, 0.04, 0.04, 0, 5)
    total, ssl, d1, d2, d3 = a(student, teacher, 0)
    terms = b.terms(student, teacher, 0)
    for name, value in (("total_loss", total), ("loss_ssl", ssl), ("deep_loss_1", d1),
                        ("deep_loss_2", d2), ("deep_loss_3", d3)):
        assert float(terms[name]) == float(value), name
    torch.testing.assert_close(a.center, b.center)
    # a stage without a head has no loss term and no KL; the others keep theirs
    dino = DeSDLoss(K, 4, 0.04, 0.04, 0, 5, stage_weights=(0, 0.5, 0, 0.5))
    terms = dino.terms([None, student[1], None, student[3]], teacher, 0)
    assert set(terms) == {"total_loss", "loss_ssl", "deep_loss_2", "teacher_entropy",
                          "teacher_batch_entropy", "kl_stage2", "kl_stage4"}
    assert float(terms["total_loss"]) == pytest.approx(
        0.5 * float(terms["deep_loss_2"]) + 0.5 * float(terms["loss_ssl"]), rel=1e-6)
