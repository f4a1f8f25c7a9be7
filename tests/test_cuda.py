"""The trainer's CUDA-only paths: the side-stream prefetch, autocast in every precision with
and without channels_last_3d, the gradient scaler, TF32, and the device augmentation drawn
from a CUDA generator. Skipped where there is no GPU (CI); `benchmarks/gpu_check.sh` runs
them on one."""
import math

import pytest
import torch

import main_desd
import utils
from data_loader_ssl import BatchIntensityAugment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
SMALL = ["--arch", "res3d10", "--out_dim", "256", "--head_hidden_dim", "64",
         "--head_bottleneck_dim", "32", "--batch_size_per_gpu", "4", "--global_crop_size", "16",
         "48", "48", "--local_crops_number", "2", "--local_crop_size", "16", "40", "40",
         "--optimizer", "sgd", "--lr", "0.3", "--epochs", "1", "--warmup_epochs", "0",
         "--augment_on", "device", "--print_freq", "1000", "--seed", "5"]


def test_side_stream_prefetch_delivers_every_batch_intact():
    """Each batch is copied on a side stream while the previous step runs; a missing
    stream sync or record_stream would show as a batch overwritten by later allocations."""
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randn((4, 1, 8, 64, 64), generator=g).pin_memory() for _ in range(3)]
               for _ in range(25)]
    work = torch.randn(1024, 1024, device=CUDA)
    seen = []
    for views in utils.to_device(batches, CUDA):
        for _ in range(8):  # keep the default stream busy while the next copy is queued
            work = torch.tanh(work @ work)
        seen.append([v.clone() for v in views])
        junk = [torch.full_like(v, float("nan")) for v in views]  # reuses freed blocks, if any
        del views, junk
    torch.cuda.synchronize()
    assert len(seen) == len(batches)
    for want, got in zip(batches, seen):
        for a, b in zip(want, got):
            assert b.device.type == "cuda"
            assert torch.equal(a, b.cpu())


def _one_run(precision: str, channels_last: bool, iters: int = 3):
    args = main_desd.parse_args([*SMALL, "--precision", precision,
                                 "--channels_last", str(channels_last)])
    nets = main_desd.build_models(args, CUDA)
    loss_fn = main_desd.build_loss(args).to(CUDA)
    optimizer = main_desd.build_optimizer(args, nets.student)
    schedules = main_desd.build_schedules(args, iters, world=1)
    step = main_desd.build_step(args, CUDA, rank=0)
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 1, 16, 48, 48)] * 2 + [(4, 1, 16, 40, 40)] * 2
    batches = [[(torch.randn(s, generator=g) * 0.3).clamp(-1, 1) for s in shapes]
               for _ in range(iters)]
    before = {k: v.detach().clone() for k, v in nets.teacher.state_dict().items()}
    stats = main_desd.train_one_epoch(0, nets, schedules, batches, optimizer, loss_fn, step)
    return nets, step, stats, before


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_training_steps_on_cuda(precision, channels_last):
    # fp16: the scaler starts at 2**16 and skips the steps whose gradients overflow while it
    # backs off, so it gets more steps to move the weights
    nets, step, stats, before = _one_run(precision, channels_last, iters=8 if precision == "fp16" else 3)
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert step.scaler.is_enabled() == (precision == "fp16")
    assert step.amp_dtype == {"fp32": None, "tf32": None, "bf16": torch.bfloat16,
                              "fp16": torch.float16}[precision]
    assert torch.backends.cuda.matmul.allow_tf32 == (precision == "tf32")
    assert utils.all_finite(nets.student, nets.teacher)
    moved = [k for k, v in nets.teacher.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head") for k in moved)
    conv = nets.student.backbone.layer1[0].conv1.weight  # 64 -> 64: the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    assert conv.dtype == torch.float32  # master weights stay fp32 under autocast


def test_first_loss_agrees_across_precisions():
    """Same weights, batch and augmentation draw: the first step's loss in tf32/bf16/fp16
    is the fp32 one up to the format's rounding."""
    ref = _one_run("fp32", False, iters=1)[2]["train_total_loss"]
    for precision, rtol in (("tf32", 5e-3), ("bf16", 5e-2), ("fp16", 1e-2)):
        got = _one_run(precision, True, iters=1)[2]["train_total_loss"]
        assert abs(got - ref) <= rtol * abs(ref), (precision, got, ref)


def test_device_augmentation_from_a_cuda_generator_is_reproducible():
    g = torch.Generator().manual_seed(2)
    views = [(torch.randn((8, 1, 16, 48, 48), generator=g) * 0.3).to(CUDA) for _ in range(2)]
    aug = BatchIntensityAugment()
    with torch.no_grad():
        a = aug(views, torch.Generator(device="cuda").manual_seed(3))
        b = aug(views, torch.Generator(device="cuda").manual_seed(3))
        c = aug(views, torch.Generator(device="cuda").manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    assert all(x.device.type == "cuda" and x.shape == v.shape for x, v in zip(a, views))


# ----------------------------------------------------------------------------- issue 23's routes

def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_stem_on_cuda_matches_conv3d(dtype, channels_last):
    """The stem folded into a 2D convolution on cuDNN: the published conv3d's output and
    weight gradient up to the format's rounding (cuDNN may use TF32 for fp32), and the
    model's layout kept without a copy."""
    import torch.nn.functional as F
    from models.res3d import StemConv3d
    torch.manual_seed(0)
    conv = StemConv3d(1, 64, 7, stride=(1, 2, 2), padding=3, bias=False, impl="conv2d").to(CUDA)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=fmt)
    x = torch.randn(4, 1, 16, 96, 96, device=CUDA).contiguous(memory_format=fmt)
    gy = torch.randn(4, 64, 16, 48, 48, device=CUDA)
    grads = []
    for fn in (conv, lambda t: F.conv3d(t, conv.weight, None, conv.stride, conv.padding)):
        conv.weight.grad = None
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = fn(x)
        y.backward(gy.to(y.dtype))
        grads.append((y.detach(), conv.weight.grad.clone()))
        if fn is conv:
            assert y.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    tol = 5e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(*grads):
        assert _rel(a, b) < tol


def test_decomposed_norm_compiles_to_one_layout():
    """The layout-keeping instance norm + residual + LeakyReLU under torch.compile in
    bf16 and channels_last_3d: the output stays channels_last_3d and equals PyTorch's
    instance norm (float32) up to bf16 rounding, gradients included."""
    import torch.nn.functional as F
    from models.res3d import InstanceNorm3d
    torch.manual_seed(0)
    norm = InstanceNorm3d(64, affine=True, impl="decomposed").to(CUDA)
    fused = torch.compile(lambda x, r: F.leaky_relu(norm(x) + r, 0.01))
    fmt = torch.channels_last_3d
    x = (torch.randn(4, 64, 8, 24, 24, device=CUDA) * 3 + 1).to(memory_format=fmt)
    r = torch.randn_like(x)
    gy = torch.randn_like(x)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused(xb, r.bfloat16())
    y.backward(gy.bfloat16())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
    xr = x.bfloat16().float().requires_grad_()
    want = F.leaky_relu(F.instance_norm(xr, weight=norm.weight, bias=norm.bias)
                        + r.bfloat16().float(), 0.01)
    want.backward(gy.bfloat16().float())
    assert _rel(y.detach(), want.detach()) < 2e-2
    assert _rel(xb.grad, xr.grad) < 5e-2


class _Snapshot:
    """Batches for train_one_epoch that copy the student's and the teacher's weights when
    batch `at + 2` is asked for: utils.to_device asks for batch j right after step j - 2
    was queued, so the copies are the state after step `at`."""

    def __init__(self, batches, nets, at):
        self.batches, self.nets, self.at, self.saved = batches, nets, at, None

    def __iter__(self):
        for j, b in enumerate(self.batches):
            if j == self.at + 2:
                self.saved = {net: {k: v.detach().clone()
                                    for k, v in getattr(self.nets, net).state_dict().items()}
                              for net in ("student", "teacher")}
            yield b


def _graph_run(cuda_graph: bool, iters: int = 7, frozen_from: int | None = None):
    args = main_desd.parse_args([*SMALL, "--precision", "fp32", "--fused_optimizer", "True",
                                 "--cuda_graph", str(cuda_graph), "--clip_grad", "3",
                                 "--freeze_last_layer", "0"])
    nets = main_desd.build_models(args, CUDA)
    loss_fn = main_desd.build_loss(args).to(CUDA)
    optimizer = main_desd.build_optimizer(args, nets.student)
    schedules = main_desd.build_schedules(args, iters, world=1)
    step = main_desd.build_step(args, CUDA, rank=0)
    if frozen_from is not None:  # no learning rate and a still teacher from this step on
        schedules.lr[frozen_from:] = 0.0
        schedules.momentum[frozen_from:] = 1.0
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 1, 16, 48, 48)] * 2 + [(4, 1, 16, 40, 40)] * 2
    batches = [[(torch.randn(s, generator=g) * 0.3).clamp(-1, 1).pin_memory() for s in shapes]
               for _ in range(iters + 1)]
    snap = _Snapshot(batches, nets, frozen_from - 1) if frozen_from else batches
    stats = main_desd.train_one_epoch(0, nets, schedules, snap, optimizer, loss_fn, step)
    return nets, step, stats, snap


def test_cuda_graph_step_trains_like_the_eager_step():
    """Two eager warm-up steps, the capture, replays: the losses and the weights after 7
    steps agree with the eager trainer's (cuDNN's algorithms may differ between runs)."""
    eager, _, stats_e, _ = _graph_run(False)
    graphed, step, stats_g, _ = _graph_run(True)
    assert step.graph is not None and step.graph.graph is not None  # it was captured
    for k in stats_e:
        assert abs(stats_g[k] - stats_e[k]) <= 1e-3 * max(1.0, abs(stats_e[k])), k
    for net in ("student", "teacher"):
        a, b = getattr(graphed, net).state_dict(), getattr(eager, net).state_dict()
        worst = max(_rel(a[k], b[k]) for k in a if a[k].is_floating_point())
        assert worst < 1e-3, (net, worst)


def test_cuda_graph_replays_read_the_schedules_from_the_device():
    """Learning rate 0 and teacher momentum 1 from step 4 on (the graph was captured at
    step 2 with other values): the replays leave student and teacher exactly as they were
    after step 3, which a graph holding the capture's floats would not."""
    nets, step, stats, snap = _graph_run(True, frozen_from=4)
    assert step.graph.graph is not None and snap.saved is not None
    for net in ("student", "teacher"):
        for k, v in getattr(nets, net).state_dict().items():
            if v.is_floating_point() and "running" not in k:
                assert torch.equal(v, snap.saved[net][k]), (net, k)
