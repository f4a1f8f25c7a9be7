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
