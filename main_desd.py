"""DeSD pre-training: deep self-distillation on every stage of a 3D ResNet (SPEC.md §4-7).

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
import functools
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import utils
from models import ARCHS, DINOHead, ResNet3D, build_backbone

NUM_STAGES = 4


# ============================================================================ arguments

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeSD", add_help=False)
    b = utils.bool_flag

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="res3d18", choices=list(ARCHS),
                   help="Backbone. The published run uses res3d50 (46M parameters); res3d10 is "
                        "the smallest, for smoke tests.")
    g.add_argument("--out_dim", default=65536, type=int,
                   help="Prototypes of every DINO head (published run: 60000). Larger is slower "
                        "and needs more memory; DINO found 65536 works well.")
    g.add_argument("--norm_last_layer", default=True, type=b,
                   help="Fix the weight norm of the heads' last layer (True, as the published "
                        "code always ran; the release parsed this flag but never used it). "
                        "False can help quality but makes training less stable.")
    g.add_argument("--momentum_teacher", default=0.996, type=float,
                   help="Base EMA momentum of the teacher, raised to 1 by a cosine schedule. "
                        "0.996 is good for batch 256; use 0.9995 for small batches.")
    g.add_argument("--use_bn_in_head", default=False, type=b,
                   help="BatchNorm1d in the projection heads (published run: True). Synchronised "
                        "across GPUs when several GPUs are used.")
    g.add_argument("--head_hidden_dim", default=2048, type=int,
                   help="Hidden width of the projection heads (published: 2048); smaller only for "
                        "smoke tests.")
    g.add_argument("--head_bottleneck_dim", default=256, type=int,
                   help="Bottleneck width before the heads' last layer (published: 256).")
    g.add_argument("--stage_weights", default=[0.25] * 4, type=float, nargs=4, metavar="W",
                   help="Loss weights of stages 1-4. 0.25 0.25 0.25 0.25 is the published DeSD "
                        "loss; 0 0 0 1 is plain DINO on the same backbone. Stages with weight 0 "
                        "get no head.")

    g = p.add_argument_group("temperatures")
    g.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                   help="Teacher temperature at the start of the warm-up (0.04 is a safe start).")
    g.add_argument("--teacher_temp", default=0.04, type=float,
                   help="Teacher temperature after the warm-up (published run: 0.07). Above 0.07 "
                        "training tends to be unstable.")
    g.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                   help="Epochs of linear warm-up of the teacher temperature (published run: 20).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--use_fp16", default=True, type=b,
                   help="Mixed precision on GPU: bf16 autocast where the GPU supports it, else "
                        "fp16 with a gradient scaler. False trains in fp32 (published run). "
                        "--precision overrides this.")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: follow --use_fp16 on GPU and use fp32 on CPU. bf16/fp16 force "
                        "autocast (fp16 with a gradient scaler); fp32 disables it.")
    g.add_argument("--weight_decay", default=0.04, type=float,
                   help="Initial weight decay (published run: 1e-6).")
    g.add_argument("--weight_decay_end", default=0.4, type=float,
                   help="Final weight decay, reached by a cosine schedule (published run: 1e-6).")
    g.add_argument("--clip_grad", default=3.0, type=float,
                   help="Maximal gradient norm of each parameter; 0 disables clipping "
                        "(published run: 0).")
    g.add_argument("--batch_size_per_gpu", default=32, type=int,
                   help="Samples per process and iteration (published run: 32 on each of 6 GPUs).")
    g.add_argument("--epochs", default=100, type=int, help="Training epochs (published run: 300).")
    g.add_argument("--freeze_last_layer", default=1, type=int,
                   help="Epochs during which the heads' last layer is not updated (1 helps the "
                        "first epoch; raise it if the loss does not decrease).")
    g.add_argument("--lr", default=0.0005, type=float,
                   help="Peak learning rate for a total batch of 256, scaled linearly with the "
                        "total batch (published run: 0.3 with sgd).")
    g.add_argument("--warmup_epochs", default=10, type=int,
                   help="Epochs of linear learning-rate warm-up from 0.")
    g.add_argument("--min_lr", default=1e-6, type=float,
                   help="Learning rate at the end of the cosine schedule (published run: 0.048).")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"],
                   help="adamw (default), sgd with momentum 0.9 (published run), or lars.")

    g = p.add_argument_group("views and augmentation")
    g.add_argument("--local_crops_number", default=0, type=int,
                   help="Local views per sample besides the two global views (published: 0).")
    g.add_argument("--global_crop_size", default=[16, 96, 96], type=int, nargs=3, metavar=("D", "H", "W"),
                   help="Size of the global views (published: 16 96 96).")
    g.add_argument("--local_crop_size", default=[16, 48, 48], type=int, nargs=3, metavar=("D", "H", "W"),
                   help="Size of the local views (published: 16 48 48).")
    g.add_argument("--augment_on", default="device", choices=["device", "cpu"],
                   help="Where the intensity transforms run: 'device' = batched on the training "
                        "device (GPU when present), 'cpu' = per sample in the DataLoader workers "
                        "as the release did. Both are the same transform.")
    g.add_argument("--aug_per_volume", default=False, type=b,
                   help="Draw intensity-transform parameters once per view instead of once per "
                        "depth slice (the release, by a quirk, drew them per slice).")

    g = p.add_argument_group("data and output")
    g.add_argument("--data_path", default=".", type=str,
                   help="Data root; the entries of the list file are relative to it.")
    g.add_argument("--list_path", "--list_file", default="SSL_data_deeplesion.txt", type=str,
                   help="List file of sub-volumes (written by splitting_to_patches.py), relative "
                        "to --data_path unless absolute.")
    g.add_argument("--output_dir", default=".", type=str,
                   help="Where checkpoints and log.txt go; training resumes from its checkpoint.pth.")
    g.add_argument("--saveckp_freq", default=50, type=int,
                   help="Also keep checkpoint{epoch:04}.pth every this many epochs (0: never).")
    g.add_argument("--seed", default=0, type=int,
                   help="Seed; every process uses seed + rank and every sample its own stream.")
    g.add_argument("--num_workers", default=10, type=int,
                   help="DataLoader worker processes per GPU (published: 10).")
    g.add_argument("--max_iters_per_epoch", default=0, type=int,
                   help="Cap on iterations per epoch (0: the whole data set); for smoke tests.")

    g = p.add_argument_group("speed")
    g.add_argument("--channels_last", default=False, type=b,
                   help="Use the channels_last_3d memory format on GPU (measure: it can help "
                        "convolutions in bf16).")
    g.add_argument("--compile", default=False, type=b,
                   help="torch.compile the networks (slow first iterations, faster after).")
    g.add_argument("--print_freq", default=10, type=int,
                   help="Iterations between progress lines; losses are read from the device and "
                        "checked for NaN only this often.")

    g = p.add_argument_group("distributed and logging")
    g.add_argument("--dist_url", default="env://", type=str,
                   help="Process-group init method; env:// reads MASTER_ADDR/MASTER_PORT as set "
                        "by torchrun.")
    g.add_argument("--dist_timeout", default=30.0, type=float,
                   help="Minutes a collective may wait for the other processes before failing.")
    g.add_argument("--local_rank", "--local-rank", default=0, type=int,
                   help="Accepted for old launchers and ignored: LOCAL_RANK is read from the "
                        "environment.")
    g.add_argument("--tensorboard", default=False, type=b,
                   help="Also write TensorBoard scalars to <output_dir>/tb (needs the "
                        "tensorboard package).")
    return p


# ============================================================================ networks

class MultiStageNet(nn.Module):
    """A backbone with DINO heads on some of its four stages.

    The student has a head on stage 4 (`head`) and on every other stage with a non-zero
    loss weight (`deep_heads.stage{k}`); the teacher has only `head`. Both come from
    `build_network`, so teacher names are a subset of the student's and the EMA pairs
    parameters by name.
    """

    def __init__(self, backbone: ResNet3D, head: DINOHead, deep_heads: dict[int, DINOHead]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.deep_heads = nn.ModuleDict({f"stage{k}": h for k, h in sorted(deep_heads.items())})

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Run the backbone once per run of same-sized crops; returns one output per stage
        (None where the stage has no head), each `[len(crops) * B, out_dim]`."""
        feats: list[list[torch.Tensor]] = [[] for _ in range(NUM_STAGES)]
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-3:] == crops[start].shape[-3:]:
                end += 1
            for k, f in enumerate(self.backbone(torch.cat(crops[start:end]))):
                feats[k].append(f)
            start = end
        pooled = [torch.cat(f) for f in feats]
        out: list[torch.Tensor | None] = [None] * NUM_STAGES
        out[-1] = self.head(pooled[-1])
        for name, head in self.deep_heads.items():
            k = int(name.removeprefix("stage")) - 1
            out[k] = head(pooled[k])
        return out


def build_network(args, deep_stages: list[int]) -> MultiStageNet:
    backbone = build_backbone(args.arch)

    def head(k: int) -> DINOHead:
        return DINOHead(backbone.stage_channels[k - 1], args.out_dim, use_bn=args.use_bn_in_head,
                        norm_last_layer=args.norm_last_layer,
                        hidden_dim=getattr(args, "head_hidden_dim", 2048),
                        bottleneck_dim=getattr(args, "head_bottleneck_dim", 256))
    return MultiStageNet(backbone, head(NUM_STAGES), {k: head(k) for k in deep_stages})


def build_models(args, device: torch.device, world: int = 1) -> SimpleNamespace:
    """Student and teacher from one constructor, the teacher a copy of the student's
    backbone and last head, frozen; the EMA pairing; DDP/SyncBatchNorm with several
    processes; optional channels_last and torch.compile.

    Returns `student`, `teacher` (plain modules), `student_ddp` (what gets gradients),
    `student_fwd`/`teacher_fwd` (what is called: compiled or not) and `ema`.
    """
    deep_stages = [k for k in range(1, NUM_STAGES) if args.stage_weights[k - 1] != 0]
    student = build_network(args, deep_stages)
    crops = [args.global_crop_size] + ([args.local_crop_size] if args.local_crops_number else [])
    for size in crops:
        last = student.backbone.stage_shapes(size)[-1]
        if math.prod(last) < 2:  # instance norm needs more than one voxel
            raise SystemExit(f"crop size {list(size)} leaves a {last} map at stage 4 of "
                             f"{args.arch}; instance norm needs at least 2 voxels: use larger "
                             f"crops (e.g. 16 48 48 or more)")
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
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    compile_ = torch.compile if args.compile else (lambda m: m)
    return SimpleNamespace(student=student, teacher=teacher, student_ddp=student_ddp,
                           student_fwd=compile_(student_ddp), teacher_fwd=compile_(teacher),
                           ema=TeacherEMA(student, teacher))


def build_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    """adamw, sgd (momentum 0.9) or lars over the regularised / not regularised groups;
    learning rate and weight decay are set every iteration from the schedules."""
    groups = utils.get_params_groups(model)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    return utils.LARS(groups)


class TeacherEMA:
    """`t <- m t + (1 - m) s` for every teacher parameter, paired with the student's
    parameter of the same name, in one fused `_foreach` call."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        s_params = dict(student.named_parameters())
        t_named = list(teacher.named_parameters())
        missing = [n for n, _ in t_named if n not in s_params]
        if missing:
            raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
        for n, t in t_named:
            if s_params[n].shape != t.shape:
                raise ValueError(f"shape mismatch for {n}: student {tuple(s_params[n].shape)}, "
                                 f"teacher {tuple(t.shape)}")
        self.t = [t for _, t in t_named]
        self.s = [s_params[n] for n, _ in t_named]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        torch._foreach_lerp_(self.t, self.s, 1.0 - momentum)  # one pass over memory


# ============================================================================ loss

class DeSDLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher (last stage, global views) and
    the student's output on every stage (SPEC.md §6).

    `forward(student_output, teacher_output, epoch)` takes the list of per-stage student
    outputs (`[ncrops * B, out_dim]`, None for a stage without head) and the teacher's
    `[2 * B, out_dim]`, and returns `(total, loss_ssl, deep_loss_1, deep_loss_2, deep_loss_3)`:
    `loss_ssl` is stage 4's term, `deep_loss_k` stage k's, `total` their weighted sum
    (published weights 0.25 each). After each call, `last_stats` holds device tensors for
    collapse monitoring: teacher entropy, entropy of the batch-mean teacher distribution,
    and KL(teacher || student) per stage.
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
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp))
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, student_output, teacher_output: torch.Tensor, epoch: int):
        temp = float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])
        t = teacher_output.float()
        q = F.softmax((t - self.center) / temp, dim=-1).detach()          # [2B, K]
        batch = q.shape[0] // 2
        q2 = q.reshape(2, batch * q.shape[1])
        # every (teacher view i, student view v != i) pair, averaged; a weighted sum rather
        # than boolean indexing, which would be a host sync on CUDA
        pair_w = 1.0 - torch.eye(2, self.ncrops, device=q.device)
        pair_w = pair_w / pair_w.sum()
        stage_terms: list[torch.Tensor] = []
        for s in student_output:
            if s is None:
                stage_terms.append(q.new_zeros(()))
                continue
            logp = F.log_softmax(s.float() / self.student_temp, dim=-1)
            ce = -(q2 @ logp.reshape(self.ncrops, -1).T) / batch      # [2, ncrops], batch means
            stage_terms.append((ce * pair_w).sum())
        total = sum(w * term for w, term in zip(self.stage_weights, stage_terms))

        with torch.no_grad():
            entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()
            mean_q = q.mean(0)
            self.last_stats = {
                "teacher_entropy": entropy,
                "teacher_batch_entropy": -(mean_q * torch.log(mean_q.clamp_min(1e-30))).sum(),
                # CE(q, p_v) - H(q) averaged over the same pairs = KL(teacher || student)
                **{f"kl_stage{k + 1}": term.detach() - entropy
                   for k, (term, s) in enumerate(zip(stage_terms, student_output)) if s is not None},
            }
        self.update_center(t)
        return total, stage_terms[3], stage_terms[0], stage_terms[1], stage_terms[2]

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        utils.all_reduce_(batch_center)
        batch_center = batch_center / (len(teacher_output) * utils.get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# ============================================================================ training

LOG_KEYS = ("total_loss", "loss_ssl", "deep_loss_1", "deep_loss_2", "deep_loss_3",
            "teacher_entropy", "teacher_batch_entropy",
            "kl_stage1", "kl_stage2", "kl_stage3", "kl_stage4")


def resolve_precision(args, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (None = fp32)."""
    choice = args.precision
    if choice == "auto":
        if device.type != "cuda" or not args.use_fp16:
            return None
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def prefixed(state: dict, prefix: str = "module.") -> dict:
    return {prefix + k: v for k, v in state.items()}


def check_collapse(stats: dict[str, float], out_dim: int) -> list[str]:
    """DINO's collapse signatures: a uniform or a one-hot teacher, a student equal to it."""
    warns = []
    ln_k = math.log(out_dim)
    h = stats.get("teacher_entropy")
    if h is not None and h > 0.99 * ln_k:
        warns.append(f"teacher entropy {h:.3f} > 0.99 ln(out_dim) = {0.99 * ln_k:.3f}: the teacher "
                     f"is uniform (collapse); lower --teacher_temp or check the centering")
    if h is not None and h < 0.01 * ln_k:
        warns.append(f"teacher entropy {h:.4f} < 0.01 ln(out_dim) = {0.01 * ln_k:.4f}: the teacher "
                     f"is one-hot (collapse to one prototype)")
    for k in range(1, NUM_STAGES + 1):
        kl = stats.get(f"kl_stage{k}")
        if kl is not None and kl < 1e-3:
            warns.append(f"KL(teacher || student) on stage {k} is {kl:.2e} < 1e-3: the student "
                         f"copies the teacher (collapse)")
    return warns


def train(args) -> None:
    # ------------------------------------------------------------------ set-up
    rank, world, device = utils.init_distributed(args.dist_url, args.dist_timeout)
    utils.seed_everything(args.seed + rank)
    out_dir = Path(args.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    amp_dtype = resolve_precision(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # crop sizes are fixed
    utils.print_rank0(f"DeSD: {world} process(es) on {device}, precision "
                      f"{amp_dtype or torch.float32}; arguments:\n"
                      + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))

    # ------------------------------------------------------------------ data
    from data_loader_ssl import BatchIntensityAugment, DeepLesionSSL
    list_path = Path(args.list_path)
    if not list_path.is_absolute():
        list_path = Path(args.data_path) / list_path
    dataset = DeepLesionSSL(args.data_path, list_path,
                            global_crop_size=tuple(args.global_crop_size),
                            local_crop_size=tuple(args.local_crop_size),
                            local_crops_number=args.local_crops_number,
                            augment_on=args.augment_on, per_slice=not args.aug_per_volume,
                            seed=args.seed, rank=rank)
    if len(dataset) < args.batch_size_per_gpu * world:
        raise SystemExit(f"the data set has {len(dataset)} sub-volumes, fewer than one batch of "
                         f"{args.batch_size_per_gpu} x {world} processes; lower --batch_size_per_gpu")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, drop_last=True,
        num_workers=args.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
        prefetch_factor=4 if args.num_workers > 0 else None,
        worker_init_fn=functools.partial(utils.seed_worker, base_seed=utils.sub_seed(args.seed, rank)))
    niter = len(loader) if not args.max_iters_per_epoch else min(len(loader), args.max_iters_per_epoch)
    augment = BatchIntensityAugment(per_slice=not args.aug_per_volume) if args.augment_on == "device" else None
    aug_gen = torch.Generator(device=device)
    utils.print_rank0(f"data: {len(dataset)} sub-volumes, {niter} iterations per epoch")

    # ------------------------------------------------------------------ networks
    nets = build_models(args, device, world)
    student_plain, teacher_plain = nets.student, nets.teacher
    n_params = sum(p.numel() for p in student_plain.parameters()) / 1e6
    utils.print_rank0(f"student {args.arch}: {n_params:.1f}M parameters, heads on stages "
                      f"{sorted(int(k[5:]) for k in student_plain.deep_heads) + [NUM_STAGES]}")

    # ------------------------------------------------------------------ loss
    ncrops = 2 + args.local_crops_number
    desd_loss = DeSDLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs,
                         stage_weights=args.stage_weights).to(device)

    # ------------------------------------------------------------------ optimiser
    optimizer = build_optimizer(args, student_plain)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ------------------------------------------------------------------ schedules
    total_batch = args.batch_size_per_gpu * world
    lr_schedule = utils.cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs,
                                         niter, warmup_epochs=args.warmup_epochs)
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter)

    # ------------------------------------------------------------------ resume
    ckpt_path = out_dir / "checkpoint.pth"
    ckpt, source = utils.load_checkpoint_with_fallback(ckpt_path)
    start_epoch = 0
    if ckpt is not None:
        student_plain.load_state_dict(utils.strip_prefix(ckpt["student"], "module."))
        teacher_plain.load_state_dict(utils.strip_prefix(ckpt["teacher"], "module."))
        optimizer.load_state_dict(ckpt["optimizer"])
        desd_loss.load_state_dict(ckpt["desd_loss"])
        if "fp16_scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["fp16_scaler"])
        rng = ckpt.get("rng")
        if rng and len(rng) == world:
            utils.set_rng_state(rng[rank])
        start_epoch = int(ckpt["epoch"])
        utils.print_rank0(f"resumed from {source} at epoch {start_epoch}")
        del ckpt

    writer = None
    if args.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            warnings.warn("--tensorboard given but the tensorboard package is not installed; "
                          "pip install tensorboard")

    # ------------------------------------------------------------------ loop
    ctx = dict(args=args, student=nets.student_ddp, teacher=teacher_plain,
               student_fwd=nets.student_fwd, teacher_fwd=nets.teacher_fwd, ema=nets.ema,
               loss_fn=desd_loss, optimizer=optimizer,
               scaler=scaler, lr_schedule=lr_schedule, wd_schedule=wd_schedule,
               momentum_schedule=momentum_schedule, loader=loader, niter=niter, device=device,
               amp_dtype=amp_dtype, augment=augment, aug_gen=aug_gen, rank=rank)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        t0 = time.time()
        stats = train_one_epoch(epoch=epoch, **ctx)
        seconds = time.time() - t0
        stats.update(epoch=epoch, seconds=round(seconds, 2),
                     samples_per_s=round(niter * total_batch / seconds, 2),
                     lr=float(lr_schedule[(epoch + 1) * niter - 1]),
                     wd=float(wd_schedule[(epoch + 1) * niter - 1]),
                     momentum=float(momentum_schedule[(epoch + 1) * niter - 1]),
                     teacher_temp=float(desd_loss.teacher_temp_schedule[min(epoch, args.epochs - 1)]),
                     ln_out_dim=math.log(args.out_dim))
        save = {
            "student": prefixed(student_plain.state_dict()),
            "teacher": prefixed(teacher_plain.state_dict()),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "args": utils.plain(vars(args)),
            "desd_loss": desd_loss.state_dict(),
            "rng": gather_rng_states(),
        }
        if scaler.is_enabled():
            save["fp16_scaler"] = scaler.state_dict()
        if rank == 0:
            utils.atomic_save(save, ckpt_path, keep_previous=True)
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                utils.atomic_save(save, out_dir / f"checkpoint{epoch:04}.pth")
            with open(out_dir / "log.txt", "a") as f:
                f.write(json.dumps(stats) + "\n")
            if writer is not None:
                for k, v in stats.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k, v, epoch)
                writer.flush()
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in stats.items() if k != "epoch"),
                  flush=True)
            for w in check_collapse({k.removeprefix("train_"): v for k, v in stats.items()},
                                    args.out_dim):
                print(f"WARNING (epoch {epoch}): {w}", flush=True)
        del save
        if utils.is_dist():  # no process runs ahead of the checkpoint that rank 0 is writing
            torch.distributed.barrier()

    if rank == 0:
        from safetensors.torch import save_file
        backbone = {k: v.detach().contiguous().cpu() for k, v in teacher_plain.backbone.state_dict().items()}
        tmp = out_dir / ".teacher_backbone.safetensors.tmp"
        save_file(backbone, str(tmp), metadata={"arch": args.arch, "source": "DeSD teacher"})
        os.replace(tmp, out_dir / "teacher_backbone.safetensors")
        print(f"done: {ckpt_path} and {out_dir / 'teacher_backbone.safetensors'}", flush=True)
    if writer is not None:
        writer.close()
    utils.cleanup_distributed()


def gather_rng_states() -> list[dict]:
    state = utils.rng_state()
    if not utils.is_dist():
        return [state]
    states: list = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


class NonFiniteLoss(RuntimeError):
    pass


def to_device(loader, device: torch.device):
    """Yield the loader's batches on `device`. On CUDA the next batch is copied on a side
    stream while the current step runs (same-stream copies would wait for the step)."""
    if device.type != "cuda":
        for views in loader:
            yield [v.to(device) for v in views]
        return
    stream = torch.cuda.Stream(device)
    batches = iter(loader)

    def copy_next():
        views = next(batches, None)
        if views is None:
            return None
        with torch.cuda.stream(stream):
            return [v.to(device, non_blocking=True) for v in views]

    nxt = copy_next()
    while nxt is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for v in nxt:
            v.record_stream(current)  # the caching allocator must not reuse it early
        views, nxt = nxt, copy_next()
        yield views


def train_one_epoch(*, epoch, args, student, teacher, student_fwd, teacher_fwd, ema, loss_fn,
                    optimizer, scaler, lr_schedule, wd_schedule, momentum_schedule, loader, niter,
                    device, amp_dtype, augment, aug_gen, rank) -> dict:
    """One epoch; returns the epoch means of the losses and collapse statistics, averaged over
    all processes. Losses stay on the device and are read once every `print_freq` steps."""
    student.train()
    teacher.train()
    sums = torch.zeros(len(LOG_KEYS), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    memory_format = (torch.channels_last_3d if args.channels_last and device.type == "cuda"
                     else torch.contiguous_format)
    world = utils.get_world_size()
    t_last, done_since = time.time(), 0
    for i, views in enumerate(to_device(loader, device)):
        if i >= niter:
            break
        it = epoch * niter + i
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(lr_schedule[it])
            if j == 0:  # only the regularised group gets weight decay
                group["weight_decay"] = float(wd_schedule[it])
        if augment is not None:
            aug_gen.manual_seed(utils.sub_seed(args.seed, rank, epoch, i))
            with torch.no_grad():
                views = augment(views, aug_gen)
        views = [v.contiguous(memory_format=memory_format) for v in views]

        with autocast:
            teacher_out = teacher_fwd(views[:2])[-1]
            student_out = student_fwd(views)
            loss, *terms = loss_fn(student_out, teacher_out, epoch)
        finite = torch.isfinite(loss)
        first_bad = torch.where(~finite & (first_bad < 0), torch.full_like(first_bad, i), first_bad)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            utils.clip_gradients(student, args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        scaler.step(optimizer)
        scaler.update()
        ema.update(float(momentum_schedule[it]))

        with torch.no_grad():
            st = loss_fn.last_stats
            row = [loss, *terms] + [st.get(k, loss.new_zeros(())) for k in LOG_KEYS[5:]]
            sums += torch.stack([r.detach().float() for r in row])
        done_since += 1

        if (i + 1) % args.print_freq == 0 or i + 1 == niter:
            # host sync: once per print interval, agreed by all processes
            flag = utils.all_reduce_(first_bad.clone(), torch.distributed.ReduceOp.MAX
                                     if utils.is_dist() else None)
            bad_at = int(flag.item())
            if bad_at >= 0:
                raise NonFiniteLoss(
                    f"non-finite loss at epoch {epoch}, iteration {bad_at} (on at least one "
                    f"process); training stopped, the last good checkpoint is left untouched")
            if rank == 0:
                now = time.time()
                rate = done_since * args.batch_size_per_gpu * world / max(now - t_last, 1e-9)
                print(f"epoch {epoch} [{i + 1}/{niter}] loss {sums[0].item() / (i + 1):.4f} "
                      f"lr {lr_schedule[it]:.3g} wd {wd_schedule[it]:.3g} {rate:.1f} samples/s",
                      flush=True)
                t_last, done_since = now, 0

    utils.all_reduce_(sums)
    means = (sums / (niter * world)).tolist()
    # a stage without a head (loss weight 0) has no loss term or KL to report
    skip = {f"{name}{k}" for k in range(1, NUM_STAGES) if f"kl_stage{k}" not in loss_fn.last_stats
            for name in ("deep_loss_", "kl_stage")}
    return {f"train_{k}": v for k, v in zip(LOG_KEYS, means) if k not in skip}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser("DeSD pre-training", parents=[get_args_parser()],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    try:
        train(args)
    except NonFiniteLoss as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        utils.cleanup_distributed()
        raise SystemExit(1)


if __name__ == "__main__":
    main()
