"""DeSD pre-training: deep self-distillation on every stage of a 3D ResNet
(docs/method.md §4-7).

One GPU, or the CPU for a smoke test:
    python main_desd.py --arch res3d50 --data_path /data/DeepLesion \
        --list_path SSL_data_deeplesion.txt --output_dir runs/desd
Several GPUs / nodes (this is what run_ssl.sh does with the published settings):
    torchrun --nproc_per_node 6 main_desd.py --arch res3d50 --batch_size_per_gpu 32 ...
Under SLURM, `srun python main_desd.py ...` (one task per GPU) works as well.

The run resumes from `<output_dir>/checkpoint.pth` whenever it exists. The flags, their
checks and `--preset` are in common/desd_args.py (`python main_desd.py --help`).
Method after DINO (Caron et al., 2021) and DeSD (Ye et al., MICCAI 2022).
"""
from __future__ import annotations

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
from common.desd_args import (PRESETS, describe_preset, get_args_parser,  # noqa: F401 (re-exported)
                              parse_args, stillness_warnings)
from common.retrieval import held_out_warnings, retrieval_by_stage
from data_loader_ssl import BatchIntensityAugment, DeepLesionSSL, retrieval_pairs
from models import DINOHead, ResNet3D, build_backbone, save_backbone
from utils import NonFinite

NUM_STAGES = 4
STAGES = tuple(range(1, NUM_STAGES + 1))

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

    def apply(self, optimizer: torch.optim.Optimizer, it: int, device_values=None):
        """Set iteration `it`'s learning rate on every group and its weight decay on the
        regularised group (the first; see `utils.get_params_groups`); returns the teacher
        momentum. With `device_values` (--cuda_graph) all three go into its device tensors
        and the momentum returned is its tensor."""
        if device_values is not None:
            device_values.set(optimizer, float(self.lr[it]), float(self.wd[it]),
                              float(self.momentum[it]))
            return device_values.momentum
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(self.lr[it])
            if j == 0:
                group["weight_decay"] = float(self.wd[it])
        return float(self.momentum[it])

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

    def one_step(views):  # run eagerly, or captured once per epoch and replayed (--cuda_graph)
        with step.autocast():
            teacher_out = nets.teacher_fwd(views[:2])[-1]
            student_out = nets.student_fwd(views)
            terms = loss_fn.terms(student_out, teacher_out, epoch)
        step.backward(terms["total_loss"], optimizer, nets.student, epoch)
        nets.update_teacher(momentum)
        return terms

    for i, views in enumerate(utils.to_device(loader, step.device)):
        if i == schedules.niter:  # asked once more: bench_train stamps the last step's end
            break
        it = epoch * schedules.niter + i
        momentum = schedules.apply(optimizer, it, step.device_values)
        terms = step.run(epoch, one_step, step.views(views, epoch, i))
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
