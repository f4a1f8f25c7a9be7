"""DeSD pre-training: deep self-distillation on every stage of a 3D ResNet
(docs/method.md §4-7).

One GPU, or the CPU for a smoke test:
    python main_desd.py --arch res3d50 --data_path /data/DeepLesion \
        --list_path SSL_data_deeplesion.txt --output_dir runs/desd
Several GPUs / nodes (this is what run_ssl.sh does with the published settings):
    torchrun --nproc_per_node 6 main_desd.py --arch res3d50 --batch_size_per_gpu 32 ...
Under SLURM, `srun python main_desd.py ...` (one task per GPU) works as well.

The run resumes from `<output_dir>/checkpoint.pth` whenever it exists.
Method after DINO (Caron et al., 2021) and DeSD (Ye et al., MICCAI 2022).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import utils
from common import atomic, checkpoints, listfile, lock, speed
from common.cli import BOOL, float_in, int_at_least
from common.retrieval import held_out_warnings, retrieval_by_stage
from data_loader_ssl import BatchIntensityAugment, DeepLesionSSL, retrieval_pairs
from models import ARCHS, DINOHead, ResNet3D, build_backbone, save_backbone
from models.res3d import NORM_IMPLS, STEM_IMPLS
from utils import NonFinite

NUM_STAGES = 4
STAGES = tuple(range(1, NUM_STAGES + 1))

# Named sets of flag values (`--preset`); flags given on the command line win.
PRESETS: dict[str, dict[str, object]] = {
    # demo.sh's settings: a small run that learns on a CPU. At the defaults (lr 0.0005 per
    # 256 samples, teacher momentum 0.996) a few dozen iterations of a small batch leave
    # student and teacher where they started; a faster teacher, a sharper teacher, BatchNorm
    # in the heads (else the outputs stop depending on the input at batch 16), small heads
    # and crops make a few hundred CPU iterations move them. Not the published run.
    "cpu_demo": {"arch": "res3d10", "epochs": 8, "warmup_epochs": 1, "batch_size_per_gpu": 16,
                 "lr": 0.03, "momentum_teacher": 0.98, "teacher_temp": 0.02,
                 "warmup_teacher_temp": 0.02, "use_bn_in_head": True, "out_dim": 1024,
                 "head_hidden_dim": 256, "head_bottleneck_dim": 64,
                 "global_crop_size": [16, 48, 48], "num_workers": 1},
}


def _as_flags(values: dict, names) -> str:
    return " ".join(f"--{k} " + (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
                    for k, v in ((k, values[k]) for k in names))


def describe_preset(args) -> str:
    """The start-of-run line naming the preset's values and the flags given instead ('' without
    a preset)."""
    if not getattr(args, "preset", None):
        return ""
    values = PRESETS[args.preset]
    given = [k for k in values if getattr(args, k) != values[k]]
    text = f"preset {args.preset}: {_as_flags(values, values)}"
    return text + (f"; given on the command line instead: {_as_flags(vars(args), given)}"
                   if given else "")


# ============================================================================ arguments

class _UseFp16(argparse.Action):
    """The published `--use_fp16 True/False`: an alias of `--precision auto/fp32`."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.precision = "auto" if value else "fp32"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeSD", add_help=False)
    positive, nonneg = float_in(0.0, low_open=True), float_in(0.0)

    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="Start from a named set of flag values; flags given on the command line "
                        "win, and the start of the run prints what was used. cpu_demo: a small "
                        "run that learns on a CPU (demo.sh's settings, not the published run): "
                        + _as_flags(PRESETS["cpu_demo"], PRESETS["cpu_demo"]).replace("%", "%%"))

    g = p.add_argument_group("model")
    g.add_argument("--arch", default=utils.DEFAULT_ARCH, choices=list(ARCHS),
                   help="Backbone. res3d50 (46M parameters) is the published run's and the "
                        "released weights' (the release's parser defaulted to res3d18, which its "
                        "run never used); res3d10 is the smallest, for CPU runs.")
    g.add_argument("--out_dim", default=65536, type=int_at_least(1),
                   help="Prototypes of every DINO head (published run: 60000). Larger is slower "
                        "and needs more memory; DINO found 65536 works well.")
    g.add_argument("--norm_last_layer", default=True, **BOOL,
                   help="Fix the weight norm of the heads' last layer (True, as the published "
                        "code always ran; the release parsed this flag but never used it). "
                        "False can help quality but makes training less stable.")
    g.add_argument("--momentum_teacher", default=0.996, type=float_in(0.0, 1.0),
                   help="Base EMA momentum of the teacher, raised to 1 by a cosine schedule. "
                        "0.996 is good for batch 256; use 0.9995 for small batches.")
    g.add_argument("--use_bn_in_head", default=False, **BOOL,
                   help="BatchNorm1d in the projection heads (published run: True). Synchronised "
                        "across GPUs when several GPUs are used.")
    g.add_argument("--head_hidden_dim", default=2048, type=int_at_least(1),
                   help="Hidden width of the projection heads (published: 2048); smaller only for "
                        "smoke tests.")
    g.add_argument("--head_bottleneck_dim", default=256, type=int_at_least(1),
                   help="Bottleneck width before the heads' last layer (published: 256).")
    g.add_argument("--stage_weights", default=[0.25] * 4, type=nonneg, nargs=4, metavar="W",
                   help="Loss weights of stages 1-4. 0.25 0.25 0.25 0.25 is the published DeSD "
                        "loss; 0 0 0 1 is plain DINO on the same backbone. Stages with weight 0 "
                        "get no head.")

    g = p.add_argument_group("temperatures")
    g.add_argument("--warmup_teacher_temp", default=0.04, type=positive,
                   help="Teacher temperature at the start of the warm-up (0.04 is a safe start).")
    g.add_argument("--teacher_temp", default=0.04, type=positive,
                   help="Teacher temperature after the warm-up (published run: 0.07). Above 0.07 "
                        "training tends to be unstable.")
    g.add_argument("--warmup_teacher_temp_epochs", default=0, type=int_at_least(0),
                   help="Epochs of linear warm-up of the teacher temperature (published run: 20).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16", "fp16"],
                   help="auto: fp32 on a CPU; on a GPU the faster of fp32 and bf16 (fp16 with a "
                        "scaler without bf16), timed at start-up on a forward and backward of the "
                        "student. fp32: PyTorch's float32 defaults (cuDNN may use TF32 for "
                        "convolutions); tf32: TF32 for the heads' matrix products too.")
    g.add_argument("--use_fp16", action=_UseFp16, dest="precision", default=argparse.SUPPRESS,
                   **BOOL,
                   help="The published flag, an alias: True = --precision auto, False = "
                        "--precision fp32 (published run: False). The last of the two wins.")
    g.add_argument("--weight_decay", default=0.04, type=nonneg,
                   help="Initial weight decay (published run: 1e-6).")
    g.add_argument("--weight_decay_end", default=0.4, type=nonneg,
                   help="Final weight decay, reached by a cosine schedule (published run: 1e-6).")
    g.add_argument("--clip_grad", default=3.0, type=nonneg,
                   help="Maximal gradient norm of each parameter; 0 disables clipping "
                        "(published run: 0).")
    g.add_argument("--batch_size_per_gpu", default=32, type=int_at_least(1),
                   help="Samples per process and iteration (published run: 32 on each of 6 GPUs).")
    g.add_argument("--epochs", default=100, type=int_at_least(1),
                   help="Training epochs (published run: 300).")
    g.add_argument("--freeze_last_layer", default=1, type=int_at_least(0),
                   help="Epochs during which the heads' last layer is not updated (1 helps the "
                        "first epoch; raise it if the loss does not decrease).")
    g.add_argument("--lr", default=0.0005, type=nonneg,
                   help="Peak learning rate for a total batch of 256, scaled linearly with the "
                        "total batch (published run: 0.3 with sgd).")
    g.add_argument("--warmup_epochs", default=10, type=int_at_least(0),
                   help="Epochs of linear learning-rate warm-up from 0 (at most --epochs).")
    g.add_argument("--min_lr", default=1e-6, type=nonneg,
                   help="Learning rate at the end of the cosine schedule (published run: 0.048).")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"],
                   help="adamw (default), sgd with momentum 0.9 (published run), or lars.")

    g = p.add_argument_group("views and augmentation")
    g.add_argument("--local_crops_number", default=0, type=int_at_least(0),
                   help="Local views per sample besides the two global views (published: 0).")
    g.add_argument("--global_crop_size", default=[16, 96, 96], type=int_at_least(1), nargs=3,
                   metavar=("D", "H", "W"), help="Size of the global views (published: 16 96 96).")
    g.add_argument("--local_crop_size", default=[16, 48, 48], type=int_at_least(1), nargs=3,
                   metavar=("D", "H", "W"),
                   help="Size of the local views, at most the global size (published: 16 48 48).")
    g.add_argument("--global_crops_scale", default=[0.4, 1.0], type=float, nargs=2,
                   metavar=("MIN", "MAX"),
                   help="Accepted for the published command and ignored, as in the release (its "
                        "crop scales are fixed, docs/method.md §4).")
    g.add_argument("--local_crops_scale", default=[0.05, 0.4], type=float, nargs=2,
                   metavar=("MIN", "MAX"),
                   help="Accepted for the published command and ignored, as in the release.")
    g.add_argument("--augment_on", default="device", choices=["device", "cpu"],
                   help="Where the intensity transforms run: 'device' = batched on the training "
                        "device (GPU when present), 'cpu' = per sample in the DataLoader workers "
                        "as the release did. Both are the same transform.")
    g.add_argument("--aug_per_volume", default=False, **BOOL,
                   help="Draw intensity-transform parameters once per view instead of once per "
                        "depth slice (the release, by a quirk, drew them per slice).")

    g = p.add_argument_group("data and output")
    g.add_argument("--data_path", default=".", type=str,
                   help="Folder that a relative --list_path is found in.")
    g.add_argument("--list_path", "--list_file", default="SSL_data_deeplesion.txt", type=str,
                   help="List file of sub-volumes (written by splitting_to_patches.py), relative "
                        "to --data_path unless absolute. Its entries are relative to its own "
                        "folder.")
    g.add_argument("--output_dir", default=".", type=str,
                   help="Where checkpoints and log.txt go; training resumes from its checkpoint.pth.")
    g.add_argument("--saveckp_freq", default=50, type=int_at_least(0),
                   help="Also keep checkpoint{epoch:04}.pth every this many epochs (0: never).")
    g.add_argument("--seed", default=0, type=int,
                   help="Seed; every process uses seed + rank and every sample its own stream.")
    g.add_argument("--num_workers", default=10, type=int_at_least(0),
                   help="DataLoader worker processes per GPU (published: 10).")
    g.add_argument("--max_iters_per_epoch", default=0, type=int_at_least(0),
                   help="Cap on iterations per epoch (0: the whole data set); for smoke tests.")
    g.add_argument("--retrieval_list", default="", type=str,
                   help="List of held-out sub-volumes (found like --list_path): the teacher's "
                        "view retrieval per stage is logged every epoch, a label-free sign that "
                        "the run learns (the initial teacher's is printed first). Empty: off.")
    g.add_argument("--retrieval_n", default=64, type=int_at_least(2),
                   help="Held-out sub-volumes used for the view retrieval (the first N listed).")

    g = p.add_argument_group("speed")
    g.add_argument("--channels_last", default=False, **BOOL,
                   help="Use the channels_last_3d memory format on GPU (measure: it can help "
                        "convolutions in bf16).")
    g.add_argument("--compile", default=False, **BOOL,
                   help="torch.compile the networks (slow first iterations, faster after).")
    g.add_argument("--stem", default="conv3d", choices=list(STEM_IMPLS),
                   help="How the stem convolution is computed, the same function: conv3d "
                        "(default) or conv2d (depth taps folded into channels, for tensor-core "
                        "kernels; models.res3d.StemConv3d). Unmeasured on GPUs so far.")
    g.add_argument("--norm_impl", default="auto", choices=list(NORM_IMPLS),
                   help="How the instance norms are computed, the same function: auto (group "
                        "norm without autocast, PyTorch's with it), reference, group_norm, or "
                        "decomposed (keeps the layout, for --compile with --channels_last).")
    g.add_argument("--fused_optimizer", default=False, **BOOL,
                   help="sgd/adamw with fused=True: one kernel per optimiser step.")
    g.add_argument("--cuda_graph", default=False, **BOOL,
                   help="Capture the step as a CUDA graph once per epoch and replay it (one "
                        "process, sgd/adamw, no fp16; implies --fused_optimizer).")
    g.add_argument("--print_freq", default=10, type=int_at_least(1),
                   help="Iterations between progress lines; losses are read from the device and "
                        "checked for NaN only this often.")

    g = p.add_argument_group("distributed and logging")
    g.add_argument("--dist_url", default="env://", type=str,
                   help="Process-group init method; env:// reads MASTER_ADDR/MASTER_PORT as set "
                        "by torchrun.")
    g.add_argument("--dist_timeout", default=30.0, type=positive,
                   help="Minutes a collective may wait for the other processes before failing.")
    g.add_argument("--local_rank", "--local-rank", default=0, type=int,
                   help="Accepted for old launchers and ignored (LOCAL_RANK is read).")
    g.add_argument("--tensorboard", default=False, **BOOL,
                   help="Also write TensorBoard scalars to <output_dir>/tb (pip install tensorboard).")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments; a bad value or combination stops here, naming the
    flag, before any work (argparse exits with code 2)."""
    parser = argparse.ArgumentParser("main_desd.py", parents=[get_args_parser()],
                                     description="DeSD pre-training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:  # the preset's values become the defaults: given flags still win
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    for flag in ("warmup_epochs", "warmup_teacher_temp_epochs"):
        if getattr(args, flag) > args.epochs:
            parser.error(f"--{flag} {getattr(args, flag)} exceeds --epochs {args.epochs}")
    if not any(args.stage_weights):
        parser.error("--stage_weights are all 0: nothing would be trained (published: "
                     "0.25 0.25 0.25 0.25; DINO: 0 0 0 1)")
    if any(lc > gc for lc, gc in zip(args.local_crop_size, args.global_crop_size)):
        parser.error(f"--local_crop_size {args.local_crop_size} exceeds --global_crop_size "
                     f"{args.global_crop_size} in some dimension")
    if args.optimizer == "lars" and (args.fused_optimizer or args.cuda_graph):
        parser.error(f"--{'cuda_graph' if args.cuda_graph else 'fused_optimizer'} needs "
                     f"--optimizer sgd or adamw (lars has no fused step)")
    if args.cuda_graph and args.precision == "fp16":
        parser.error("--cuda_graph cannot run the fp16 gradient scaler (it reads back to the "
                     "host); use --precision bf16 or fp32")
    with torch.device("meta"):  # shapes only
        backbone = build_backbone(args.arch)
    for size in [args.global_crop_size] + [args.local_crop_size] * bool(args.local_crops_number):
        if math.prod(last := backbone.stage_shapes(size)[-1]) < 2:
            parser.error(f"crop size {list(size)} leaves a {last} map at stage 4 of {args.arch}; "
                         f"instance norm needs at least 2 voxels: use larger crops (e.g. 16 48 48)")
    return args


# ============================================================================ networks

class MultiStageNet(nn.Module):
    """A backbone with DINO heads on some of its four stages.

    The student has a head on stage 4 (`head`) and on every other stage with a non-zero
    loss weight (`deep_heads.stage{k}`); the teacher has only `head`. Both come from
    `build_network`, so teacher names are a subset of the student's and the EMA pairs
    parameters by name. `deep_stages` lists the stages (integers) with a deep head.
    """

    def __init__(self, backbone: ResNet3D, head: DINOHead, deep_heads: dict[int, DINOHead]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.deep_stages = sorted(deep_heads)
        self.deep_heads = nn.ModuleDict({f"stage{k}": deep_heads[k] for k in self.deep_stages})

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Run the backbone once per run of same-sized crops; returns one output per stage
        (None where the stage has no head), each `[len(crops) * B, out_dim]`."""
        feats: list[list[torch.Tensor]] = [[] for _ in STAGES]
        for _, same_size in itertools.groupby(crops, key=lambda c: c.shape[-3:]):
            for k, f in enumerate(self.backbone(torch.cat(list(same_size)))):
                feats[k].append(f)
        pooled = [torch.cat(f) for f in feats]
        out: list[torch.Tensor | None] = [None] * NUM_STAGES
        out[-1] = self.head(pooled[-1])
        for k in self.deep_stages:
            out[k - 1] = self.deep_heads[f"stage{k}"](pooled[k - 1])
        return out


def build_network(args, deep_stages: list[int]) -> MultiStageNet:
    backbone = build_backbone(args.arch, stem=args.stem, norm_impl=args.norm_impl)

    def head(k: int) -> DINOHead:
        return DINOHead(backbone.stage_channels[k - 1], args.out_dim, use_bn=args.use_bn_in_head,
                        norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                        bottleneck_dim=args.head_bottleneck_dim)
    return MultiStageNet(backbone, head(NUM_STAGES), {k: head(k) for k in deep_stages})


@dataclass
class Nets:
    """The two networks: `student`/`teacher` are the plain modules (checkpoints, EMA,
    clipping); `student_fwd`/`teacher_fwd` are what the step calls (DDP with several
    processes, compiled with --compile), the same modules underneath."""
    student: MultiStageNet
    teacher: MultiStageNet
    student_fwd: nn.Module
    teacher_fwd: nn.Module

    def __post_init__(self):
        self._ema = utils.TeacherEMA(self.student, self.teacher)

    def train(self) -> None:
        self.student_fwd.train()
        self.teacher.train()

    def update_teacher(self, momentum: float | torch.Tensor) -> None:
        self._ema.update(momentum)


def build_models(args, device: torch.device, world: int = 1) -> Nets:
    """Student and teacher from one constructor, the teacher a frozen copy of the student's
    backbone and last head. Every process builds the same initial weights (seeded with
    --seed alone) and takes rank 0's teacher, so all ranks start from one teacher and
    resuming is exact. DDP/SyncBatchNorm with several processes; optional channels_last
    and torch.compile."""
    deep_stages = [k for k in STAGES[:-1] if args.stage_weights[k - 1] != 0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        student = build_network(args, deep_stages)
    teacher = build_network(args, [])
    s_state = student.state_dict()
    teacher.load_state_dict({k: s_state[k] for k in teacher.state_dict()})
    teacher.requires_grad_(False)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only (heads' BN)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(device), teacher.to(device)
    if args.channels_last and device.type == "cuda":
        student = student.to(memory_format=torch.channels_last_3d)
        teacher = teacher.to(memory_format=torch.channels_last_3d)
    student_ddp = student
    if world > 1:
        student_ddp = nn.parallel.DistributedDataParallel(  # broadcasts rank 0's student
            student, device_ids=[device.index] if device.type == "cuda" else None)
        for t in [*teacher.parameters(), *teacher.buffers()]:
            torch.distributed.broadcast(t.data, src=0)
    compile_ = torch.compile if args.compile else (lambda m: m)
    return Nets(student, teacher, compile_(student_ddp), compile_(teacher))


def build_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    """adamw, sgd (momentum 0.9) or lars over the regularised / not regularised groups;
    learning rate and weight decay are set every iteration from the schedules (as device
    tensors with --cuda_graph, which needs the fused, capturable steps)."""
    groups = utils.get_params_groups(model)
    fast = {"fused": True} if args.fused_optimizer or args.cuda_graph else {}
    if args.cuda_graph:
        fast["lr"] = torch.zeros((), device=next(model.parameters()).device)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, capturable=args.cuda_graph, **fast)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, **({"lr": 0} | fast), momentum=0.9)
    return utils.LARS(groups)


# ============================================================================ loss

class DeSDLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher (last stage, global views) and
    the student's output on every stage (docs/method.md §6), next to DINO's loss: the same
    pair loop over (teacher view i, student view v != i), once per stage with a head.

    `forward(student_output, teacher_output, epoch)` takes the list of per-stage student
    outputs (`[ncrops * B, out_dim]`, None for a stage without head) and the teacher's
    `[2 * B, out_dim]`, and returns `(total, loss_ssl, deep_loss_1, deep_loss_2, deep_loss_3)`:
    `loss_ssl` is stage 4's term, `deep_loss_k` stage k's, `total` their weighted sum
    (published weights 0.25 each). `terms(...)` is the same computation returning every
    named term and the collapse statistics as a dict of device tensors.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, stage_weights=(0.25, 0.25, 0.25, 0.25)):
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"ncrops must be >= 2 (two global views), got {ncrops}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.stage_weights = [float(w) for w in stage_weights]
        self.register_buffer("center", torch.zeros(1, out_dim))
        # per epoch: linear warm-up, then constant
        self.teacher_temp_schedule = utils.cosine_scheduler(
            teacher_temp, teacher_temp, nepochs, 1, warmup_epochs=warmup_teacher_temp_epochs,
            start_warmup_value=warmup_teacher_temp)

    def forward(self, student_output, teacher_output: torch.Tensor, epoch: int):
        t = self.terms(student_output, teacher_output, epoch)
        zero = t["total_loss"].new_zeros(())
        return (t["total_loss"], t["loss_ssl"],
                *(t.get(f"deep_loss_{k}", zero) for k in STAGES[:-1]))

    def terms(self, student_output, teacher_output: torch.Tensor, epoch: int
              ) -> dict[str, torch.Tensor]:
        """`total_loss`, `loss_ssl`, `deep_loss_k` (stages with a head), and, without
        gradient, `teacher_entropy`, `teacher_batch_entropy` and `kl_stage{k}`. Updates
        the center. No host synchronisation."""
        temp = float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])
        t = teacher_output.float()
        q = F.softmax((t - self.center) / temp, dim=-1).detach()
        q_views = q.chunk(2)
        stage_loss: dict[int, torch.Tensor] = {}
        for k, s in zip(STAGES, student_output):
            if s is None:
                continue
            logp_views = F.log_softmax(s.float() / self.student_temp, dim=-1).chunk(self.ncrops)
            pairs = [-(q_views[i] * logp_views[v]).sum(-1).mean()
                     for i in range(2) for v in range(self.ncrops) if v != i]
            stage_loss[k] = torch.stack(pairs).mean()
        out = {"total_loss": sum(self.stage_weights[k - 1] * v for k, v in stage_loss.items()),
               "loss_ssl": stage_loss[NUM_STAGES]}
        out |= {f"deep_loss_{k}": v for k, v in stage_loss.items() if k != NUM_STAGES}
        with torch.no_grad():
            entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()
            mean_q = q.mean(0)
            out["teacher_entropy"] = entropy
            out["teacher_batch_entropy"] = -(mean_q * torch.log(mean_q.clamp_min(1e-30))).sum()
            # the cross-entropy averaged over pairs minus H(teacher) = KL(teacher || student)
            out |= {f"kl_stage{k}": v.detach() - entropy for k, v in stage_loss.items()}
        self.update_center(t)
        return out

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        utils.all_reduce_(batch_center)
        batch_center = batch_center / (len(teacher_output) * utils.get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def build_loss(args) -> DeSDLoss:
    return DeSDLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp,
                    args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs,
                    stage_weights=args.stage_weights)


# ============================================================================ data and schedules

def build_loader(args, rank: int, world: int, device: torch.device):
    """(dataset, sampler, loader, iterations per epoch). The list file is `--list_path`,
    relative to `--data_path` unless absolute; its entries are relative to its folder."""
    dataset = DeepLesionSSL(Path(args.data_path) / args.list_path,  # an absolute one stays
                            global_crop_size=tuple(args.global_crop_size),
                            local_crop_size=tuple(args.local_crop_size),
                            local_crops_number=args.local_crops_number,
                            augment_on=args.augment_on, per_slice=not args.aug_per_volume,
                            seed=args.seed, rank=rank)
    if len(dataset) < args.batch_size_per_gpu * world:
        raise ValueError(f"the data set has {len(dataset)} sub-volumes, fewer than one batch of "
                         f"{args.batch_size_per_gpu} x {world} processes; lower "
                         f"--batch_size_per_gpu")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, drop_last=True,
        num_workers=args.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
        prefetch_factor=4 if args.num_workers > 0 else None,
        worker_init_fn=functools.partial(utils.seed_worker, base_seed=utils.sub_seed(args.seed, rank)))
    niter = min(len(loader), args.max_iters_per_epoch or len(loader))
    return dataset, sampler, loader, niter


@dataclass
class Schedules:
    """Per-iteration values (DINO's schedules), indexed by epoch * niter + i."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    niter: int

    def apply(self, optimizer: torch.optim.Optimizer, it: int, device_values=None) -> None:
        """Set iteration `it`'s learning rate on every group and its weight decay on the
        regularised group (the first; see `utils.get_params_groups`); with `device_values`
        (--cuda_graph) write them, and the teacher momentum, into its device tensors."""
        if device_values is not None:
            device_values.set(optimizer, float(self.lr[it]), float(self.wd[it]),
                              float(self.momentum[it]))
            return
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(self.lr[it])
            if j == 0:
                group["weight_decay"] = float(self.wd[it])

    def at_end_of(self, epoch: int) -> dict[str, float]:
        it = (epoch + 1) * self.niter - 1
        return {"lr": float(self.lr[it]), "wd": float(self.wd[it]),
                "momentum": float(self.momentum[it])}


def build_schedules(args, niter: int, world: int) -> Schedules:
    """The learning rate scales with the total batch (lr per 256), warms up linearly and
    follows a cosine to --min_lr; weight decay and teacher momentum follow cosines."""
    peak = args.lr * args.batch_size_per_gpu * world / 256.0
    return Schedules(
        lr=utils.cosine_scheduler(peak, args.min_lr, args.epochs, niter,
                                  warmup_epochs=args.warmup_epochs),
        wd=utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter),
        momentum=utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter),
        niter=niter)


def stillness_warnings(args, schedules: Schedules, weight_scale: float) -> list[str]:
    """Why the run's weights would stay all but still, known before its first step (empty
    when nothing says so). AdamW moves a weight by about the learning rate per step at most,
    so the schedule's sum bounds how far any weight can travel: under a tenth of
    `weight_scale` (a typical initial weight) is nothing. (With SGD the step also scales
    with the gradient, so the learning rate alone does not tell.) The teacher is an EMA of
    the student: after the run, the share prod(m_t) of it is still its random
    initialisation; above three quarters it has hardly followed the student."""
    warns, n = [], len(schedules.lr)
    travel = float(np.sum(schedules.lr, dtype=np.float64))
    if args.optimizer == "adamw" and travel < 0.1 * weight_scale:
        warns.append(
            f"the learning rate (peak {float(np.max(schedules.lr)):.3g}: --lr {args.lr:g} per 256 "
            f"samples, scaled with the total batch) summed over the run's {n} iterations is "
            f"{travel:.2g}: AdamW cannot move a weight further than that, under a tenth of a "
            f"typical initial weight ({weight_scale:.2g}), so the networks will stay all but "
            f"still. Raise --lr or train longer (--preset cpu_demo is a CPU run that learns)")
    share = float(np.prod(schedules.momentum, dtype=np.float64))
    if share > 0.75:
        warns.append(
            f"the teacher is an EMA with momentum {args.momentum_teacher:g} rising to 1: after "
            f"the run's {n} iterations {share:.2f} of it is still its random initialisation, so "
            f"it will hardly follow the student. Lower --momentum_teacher (0.996 is for long "
            f"runs; --preset cpu_demo uses 0.98) or train longer")
    return warns


# ============================================================================ training

def resolve_precision(args, device: torch.device) -> str:
    """--precision auto: fp32 on a CPU, the faster by a short measurement on a GPU
    (`common.speed.pick_precision`, on a throwaway student at the run's view sizes)."""
    deep_stages = [k for k in STAGES[:-1] if args.stage_weights[k - 1] != 0]
    shapes = ([(args.batch_size_per_gpu, 1, *args.global_crop_size)] * 2
              + [(args.batch_size_per_gpu, 1, *args.local_crop_size)] * args.local_crops_number)
    return speed.pick_precision(args.precision, device, lambda: build_network(args, deep_stages),
                                shapes, fp16_ok=not args.cuda_graph)


def build_step(args, device: torch.device, rank: int) -> utils.StepRunner:
    augment = BatchIntensityAugment(not args.aug_per_volume) if args.augment_on == "device" else None
    return utils.StepRunner(args, device, rank, augment)


def train_one_epoch(epoch: int, nets: Nets, schedules: Schedules, loader, optimizer,
                    loss_fn: DeSDLoss, step: utils.StepRunner) -> dict[str, float]:
    """One epoch; returns the epoch means of every named loss term and statistic, averaged
    over all processes. Values stay on the device and are read every `print_freq` steps."""
    nets.train()
    meter = utils.Meter(schedules.niter, step.print_freq,
                        step.batch_size * utils.get_world_size(), step.device)
    for i, views in enumerate(utils.to_device(loader, step.device)):
        if i == schedules.niter:  # asked once more: bench_train stamps the last step's end
            break
        it = epoch * schedules.niter + i
        schedules.apply(optimizer, it, step.device_values)
        momentum = step.device_values.momentum if step.graph else float(schedules.momentum[it])
        views = step.views(views, epoch, i)

        def one_step(views):
            with step.autocast():
                teacher_out = nets.teacher_fwd(views[:2])[-1]
                student_out = nets.student_fwd(views)
                terms = loss_fn.terms(student_out, teacher_out, epoch)
            step.backward(terms["total_loss"], optimizer, nets.student, epoch)
            nets.update_teacher(momentum)
            return terms
        terms = step.run(epoch, one_step, views)

        meter.update(i, terms)
        meter.maybe_report(epoch, i, float(schedules.lr[it]), float(schedules.wd[it]))
    return meter.means()


def train(args, held: contextlib.ExitStack | None = None) -> None:
    """The run; `held` keeps rank 0's lock on --output_dir until its owner (`main`) closes
    it (without one, no lock is taken)."""
    # ------------------------------------------------------------------ inputs, checked first
    rank, world, device = utils.init_distributed(args.dist_url, args.dist_timeout)
    # a missing or empty list, a missing sub-volume: stop before anything is created
    dataset, sampler, loader, niter = build_loader(args, rank, world, device)
    held_out = (listfile.read_list_file(Path(args.data_path) / args.retrieval_list)
                [:args.retrieval_n] if args.retrieval_list else None)

    # ------------------------------------------------------------------ set-up
    out_dir = Path(args.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if held is not None:  # one run per folder: a second one stops here, naming this one
            held.enter_context(lock.hold_folder(out_dir, "main_desd.py",
                                                "or pass another --output_dir for a new run"))
        atomic.remove_stale_temps(out_dir)  # of a run killed while saving
    ckpt_path = out_dir / "checkpoint.pth"  # read now: a relaunch with other flags stops here
    ckpt, source = checkpoints.load_checkpoint_with_fallback(ckpt_path, set_aside=rank == 0)
    if ckpt is not None:
        checkpoints.check_same_run(ckpt, args, source)
    args.precision = resolve_precision(args, device)
    step = build_step(args, device, rank)
    if args.preset:
        utils.print_rank0(describe_preset(args))
    utils.print_rank0(f"DeSD: {world} process(es) on {device}, precision "
                      f"{step.amp_dtype or torch.float32}; arguments:\n"
                      + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))
    utils.print_rank0(f"data: {len(dataset)} sub-volumes, {niter} iterations per epoch")

    # ------------------------------------------------------------------ networks
    nets = build_models(args, device, world)
    utils.seed_everything(args.seed + rank)
    utils.print_rank0(f"student {args.arch}: "
                      f"{sum(p.numel() for p in nets.student.parameters()) / 1e6:.1f}M parameters, "
                      f"heads on stages {nets.student.deep_stages + [NUM_STAGES]}")

    retrieval = None
    if held_out is not None and rank == 0:  # a label-free learning signal, on rank 0
        retrieval = retrieval_pairs(held_out, args.global_crop_size, args.seed,
                                    per_slice=not args.aug_per_volume)

    # ------------------------------------------------------------------ loss, optimiser, schedules
    loss_fn = build_loss(args).to(device)
    optimizer = build_optimizer(args, nets.student)
    schedules = build_schedules(args, niter, world)
    convs = [w.detach().float().std() for w in nets.student.backbone.parameters() if w.ndim == 5]
    for w in stillness_warnings(args, schedules, float(torch.stack(convs).median())):
        utils.print_rank0(f"WARNING: {w}")

    # ------------------------------------------------------------------ resume
    start_epoch, log = 0, []
    if ckpt is not None:
        checkpoints.load_state(ckpt, nets, optimizer, loss_fn, step.scaler)
        if len(ckpt.get("rng") or []) == world:
            utils.set_rng_state(ckpt["rng"][rank])
        start_epoch, log = int(ckpt["epoch"]), checkpoints.earlier_log(ckpt, out_dir)
        utils.print_rank0(f"resumed from {source} at epoch {start_epoch}")
        del ckpt
    run_log = utils.RunLog(out_dir, args.out_dim, args.tensorboard) if rank == 0 else None
    if run_log and start_epoch:
        run_log.rewrite(log)
    if retrieval is not None:  # the initial teacher's only at the start, not on resume
        initial = (None if start_epoch else
                   retrieval_by_stage(nets.teacher.backbone, retrieval, device))
        if initial:
            print("view retrieval of the initial teacher:", initial, flush=True)
        for w in held_out_warnings(len(held_out), initial):
            print(f"WARNING: {w}", flush=True)

    # ------------------------------------------------------------------ loop
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        t0 = time.time()
        stats = train_one_epoch(epoch, nets, schedules, loader, optimizer, loss_fn, step)
        if not utils.all_finite(nets.student, nets.teacher):  # a diverging last step
            raise NonFinite(f"non-finite weights after epoch {epoch}; training stopped, the last "
                            f"good checkpoint is left untouched")
        seconds = time.time() - t0
        row = {"epoch": epoch, **stats, **schedules.at_end_of(epoch),
               "teacher_temp": float(loss_fn.teacher_temp_schedule[epoch]),
               "ln_out_dim": math.log(args.out_dim), "seconds": round(seconds, 2),
               "samples_per_s": round(niter * args.batch_size_per_gpu * world / seconds, 2)}
        if retrieval is not None:
            row |= retrieval_by_stage(nets.teacher.backbone, retrieval, device)
        log.append(row)
        save = checkpoints.checkpoint_state(args, nets, optimizer, loss_fn, step.scaler, epoch, log)
        with checkpoints.signals_deferred():  # SIGINT/SIGTERM: saved and logged, then stop
            if run_log:
                checkpoints.atomic_save(save, ckpt_path, keep_previous=True)
                if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                    checkpoints.atomic_save(save, out_dir / f"checkpoint{epoch:04}.pth")
                run_log.epoch_done(log)
        del save
        if utils.is_dist():  # no process runs ahead of the checkpoint that rank 0 is writing
            torch.distributed.barrier()

    # ------------------------------------------------------------------ export
    if run_log:
        backbone = out_dir / "teacher_backbone.safetensors"
        with atomic.atomic_write(backbone) as f:
            save_backbone(nets.teacher.backbone, f, {"source": "teacher",
                                                     "checkpoint": ckpt_path.name})
        print(f"done: {ckpt_path} and {backbone}", flush=True)
        run_log.close()
    utils.cleanup_distributed()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with checkpoints.stop_on_signals(), contextlib.ExitStack() as held:
            train(args, held)
    except checkpoints.Stopped as stop:  # one line: what was abandoned, what is kept
        if utils.is_main_process():
            line = checkpoints.stopped_message(stop, Path(args.output_dir) / "checkpoint.pth")
            print(f"main_desd.py: {line}", file=sys.stderr, flush=True)
        utils.cleanup_distributed()
        return 128 + stop.signum
    except (NonFinite, ValueError, FileNotFoundError, OSError) as err:
        utils.cleanup_distributed()
        print(f"main_desd.py: error: {err}", file=sys.stderr, flush=True)  # the last line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
