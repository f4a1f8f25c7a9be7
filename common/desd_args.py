"""The trainer's command line: every published flag of main_desd.py with its meaning, the
additions, `--preset`, the checks that stop a bad command before any work, and the
start-up warnings about what the chosen values imply.

`main_desd.py --help` prints it; `get_args_parser()` is built with `add_help=False` so
other scripts (the benchmarks) reuse it through `parents=`.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import utils
from common.cli import BOOL, float_in, int_at_least
from models import ARCHS, build_backbone
from models.res3d import NORM_IMPLS, STEM_IMPLS

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


def stillness_warnings(args, schedules, weight_scale: float) -> list[str]:
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
