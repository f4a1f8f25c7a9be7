"""Throughput of the full DeSD training step, timed through the trainer's own code.

    python benchmarks/bench_train.py                                   # GPU: res3d50, batch 32, fp32 and bf16
    python benchmarks/bench_train.py --precision bf16 --channels_last off on --compile off on
    python benchmarks/bench_train.py --flops --device cpu              # FLOP per step (FlopCounterMode)
    python benchmarks/bench_train.py --device cpu --iters 3 --warmup 1 # CPU: batch 2
    python benchmarks/bench_train.py --config precision=bf16 --config precision=bf16,stem=conv2d  # 2 rows

Each step is `main_desd.train_one_epoch` itself, fed a cached batch (pinned on CUDA) by an
iterable that stamps the time whenever the trainer asks for the next batch: device
augmentation of the two global views (`BatchIntensityAugment`), teacher forward on them,
student forward on all views, `DeSDLoss`, backward, optional clipping
(`utils.clip_gradients`), optimiser step, EMA (`TeacherEMA`). Everything is built by the
trainer's `build_models`, `build_loss`, `build_optimizer`, `build_schedules` and
`build_step` from its own argument parser with the published run's settings (sgd,
clip_grad 0, BatchNorm in the heads, out_dim 60000), so nothing of the step is copied here. The device is synchronised only when a time is stamped (CUDA).

Model FLOP utilisation = FLOP per step / median step time / the device's dense peak for the
precision (fp32 runs convolutions in TF32 on Ampere and later, cuDNN's default, so the TF32
peak is used). FLOP per step: the issue's 2.852 TFLOP per batch of 32 for the published
configuration, scaled with the batch; otherwise counted with `FlopCounterMode` on one
step at batch 1 (`--flops` prints the count and checks it against the published figure).
On a CPU no honest peak is known: MFU is n/a; the achieved FLOP/s is shown.

Rows are every combination of the list flags (`--precision`, `--norm_impl`, `--stem`,
`--channels_last`, `--compile`, `--fused_optimizer`, `--cuda_graph`), or, with `--config`,
exactly the rows given (each a comma-separated list of those settings; the unnamed ones
take the first value of their list flag, and `profile=N` profiles that row alone).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import shlex
import statistics
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import main_desd  # noqa: E402
import utils  # noqa: E402
from common import cli  # noqa: E402
from models.res3d import NORM_IMPLS, STEM_IMPLS  # noqa: E402

# The figure: res3d50, out_dim 60000, two 16x96x96 global views, no local views,
# teacher forward + student forward and backward, per batch of 32.
PUBLISHED_STEP_FLOP = 2.852e12
PUBLISHED_BATCH = 32
PUBLISHED = dict(arch="res3d50", out_dim=60000, crop=(16, 96, 96), local_crops=0)

# Dense tensor-core peaks in TFLOP/s (SXM parts); fp32 = TF32, which cuDNN uses for fp32
# convolutions by default.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5, "tf32": 494.5},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5, "tf32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0, "tf32": 156.0},
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_train", add_help=False)
    onoff = cli.bool_flag
    p.add_argument("--arch", default="res3d50", help="Backbone (published: res3d50).")
    p.add_argument("--batch", type=int, default=None,
                   help="Samples per device and step (default: 32 on GPU, as published; 2 on CPU).")
    p.add_argument("--out_dim", type=int, default=60000, help="Prototypes per head (published: 60000).")
    p.add_argument("--crop", type=int, nargs=3, default=[16, 96, 96], metavar=("D", "H", "W"),
                   help="Global view size (published: 16 96 96).")
    p.add_argument("--local_crops", type=int, default=0,
                   help="Local views (16x48x48) per sample (published: 0).")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                   choices=["fp32", "tf32", "bf16", "fp16"],
                   help="Precisions to time (the trainer's --precision); tf32 and fp16 are GPU-only, "
                        "bf16 is skipped on CPUs without native bf16.")
    p.add_argument("--channels_last", nargs="+", type=onoff, default=[False], metavar="on|off",
                   help="channels_last_3d variants to time, e.g. 'off on'. The trainer applies "
                        "it on CUDA only, so 'on' is skipped on a CPU.")
    p.add_argument("--compile", nargs="+", type=onoff, default=[False], metavar="on|off",
                   help="torch.compile variants (opt-in: 'off on'); compilation happens in the "
                        "warm-up steps, so give --warmup >= 3 with it.")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw", "lars"],
                   help="Optimiser (published run: sgd; the trainer's default is adamw).")
    p.add_argument("--clip_grad", type=float, default=0.0,
                   help="Per-parameter gradient clipping (published run: 0 = off; trainer default 3).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps (default: 5 GPU, 1 CPU).")
    p.add_argument("--iters", type=int, default=None,
                   help="Timed steps; the median is reported (default: 20 GPU, 3 CPU).")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a shared CPU use 1: spinning "
                        "OpenMP threads on busy cores made a CPU step 3x slower here.")
    p.add_argument("--force_cpu_bf16", action="store_true",
                   help="Time bf16 on a CPU without native bf16 (very slow: minutes per step).")
    p.add_argument("--norm_impl", nargs="+", default=["auto"], choices=list(NORM_IMPLS),
                   help="The trainer's --norm_impl (same function): auto (the default: "
                        "group_norm without autocast, reference with it), group_norm, reference "
                        "(PyTorch's own instance norm), decomposed (keeps the layout; for compile).")
    p.add_argument("--stem", nargs="+", default=["conv3d"], choices=list(STEM_IMPLS),
                   help="The trainer's --stem: conv3d (default) or conv2d (depth folded into "
                        "channels; the same function).")
    p.add_argument("--fused_optimizer", nargs="+", type=onoff, default=[False], metavar="on|off",
                   help="The trainer's --fused_optimizer variants (one fused kernel per step).")
    p.add_argument("--cuda_graph", nargs="+", type=onoff, default=[False], metavar="on|off",
                   help="The trainer's --cuda_graph variants (the step captured once and "
                        "replayed; CUDA only, skipped on a CPU).")
    p.add_argument("--config", action="append", default=None, metavar="K=V,K=V",
                   help="One row with these settings (keys: precision, norm_impl, stem, "
                        "channels_last, compile, fused_optimizer, cuda_graph, profile); "
                        "repeatable; replaces the combinations of the list flags.")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="After timing each variant, profile N more steps with torch.profiler and "
                        "print the operators and kernels that take the most device time.")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="Also write the timed rows to PATH as JSON (for scripts).")
    p.add_argument("--flops", action="store_true",
                   help="Only count FLOP per step with FlopCounterMode (at batch 1 and 2, scaled "
                        "to --batch) and compare with the published 2.852 TFLOP per batch of 32.")
    return p


# ----------------------------------------------------------------------------- pieces

def trainer_args(arch, batch, out_dim, crop, local_crops, precision="fp32", channels_last=False,
                 compile_=False, optimizer="sgd", clip_grad=0.0, niter=1,
                 augment_on="device", **speed) -> argparse.Namespace:
    """The trainer's own argument namespace with the published run's settings; `speed`:
    more of the trainer's speed flags by name (stem, norm_impl, fused_optimizer, cuda_graph)."""
    argv = ["--arch", arch, "--batch_size_per_gpu", str(batch), "--out_dim", str(out_dim),
            "--global_crop_size", *map(str, crop), "--local_crops_number", str(local_crops),
            "--precision", precision, "--channels_last", str(channels_last),
            "--compile", str(compile_), "--optimizer", optimizer, "--clip_grad", str(clip_grad),
            "--use_bn_in_head", "True", "--lr", "0.3", "--min_lr", "0.048",
            "--weight_decay", "1e-6", "--weight_decay_end", "1e-6", "--teacher_temp", "0.07",
            "--epochs", "1", "--warmup_epochs", "0", "--freeze_last_layer", "0",
            "--print_freq", str(10 ** 9), "--augment_on", augment_on]
    for key, value in speed.items():
        argv += [f"--{key}", str(value)]
    return main_desd.parse_args(argv)


class TimedBatches:
    """Feeds `train_one_epoch` and stamps the time each time it asks for a batch (the end of
    the previous step), synchronising the device first. `source` is a re-iterable (a
    DataLoader) or, with `repeat`, one batch served again and again."""

    def __init__(self, source, n_steps: int, device: torch.device, repeat: bool = False):
        self.source, self.n, self.device, self.repeat = source, n_steps, device, repeat
        self.stamps: list[float] = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: only to stamp a time

    def __iter__(self):
        self.stamps = []
        it = None if self.repeat else iter(self.source)
        last = None
        for k in range(self.n + 1):
            self._sync()
            self.stamps.append(time.perf_counter())
            if k == self.n:  # train_one_epoch asks once more, then stops: not a real batch
                yield last
                return
            last = self.source if self.repeat else next(it)
            yield last

    def step_seconds(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.stamps[skip:], self.stamps[skip + 1:])]


class StepBench:
    """Networks, loss, optimiser, schedules and step settings built by the trainer's own
    `build_*` functions, and `run(source)` = `main_desd.train_one_epoch` over a
    TimedBatches."""

    def __init__(self, targs: argparse.Namespace, device: torch.device, n_steps: int):
        self.args, self.device, self.n_steps = targs, device, n_steps
        self.nets = main_desd.build_models(targs, device)
        self.loss_fn = main_desd.build_loss(targs).to(device)
        self.optimizer = main_desd.build_optimizer(targs, self.nets.student)
        self.schedules = main_desd.build_schedules(targs, n_steps, world=1)
        self.step = main_desd.build_step(targs, device, rank=0)

    def run(self, batches: TimedBatches) -> None:
        assert batches.n <= self.n_steps
        self.schedules.niter = batches.n
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's one progress line
            main_desd.train_one_epoch(0, self.nets, self.schedules, batches, self.optimizer,
                                      self.loss_fn, self.step)


def synthetic_batch(batch: int, crop, local_crops: int, device: torch.device, seed: int = 0):
    """Views as the loader returns them (float32 HU/1024, before intensity augmentation);
    pinned on CUDA, as the trainer's DataLoader delivers them."""
    g = torch.Generator().manual_seed(seed)
    sizes = [tuple(crop)] * 2 + [(crop[0], 48, 48)] * local_crops
    views = [(torch.randn((batch, 1, *s), generator=g) * 0.3).clamp_(-1, 1) for s in sizes]
    return [v.pin_memory() for v in views] if device.type == "cuda" else views


def count_step_flops(targs: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(FLOP of one training step, FLOP of its device augmentation) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    bench = StepBench(targs, device, 1)
    views = synthetic_batch(targs.batch_size_per_gpu, targs.global_crop_size,
                            targs.local_crops_number, device)
    counter = FlopCounterMode(display=False)
    with counter:
        bench.run(TimedBatches(views, 1, device, repeat=True))
    total = counter.get_total_flops()
    aug = FlopCounterMode(display=False)
    with aug, torch.no_grad():
        bench.step.augment([v.to(device) for v in views],
                           torch.Generator(device=device).manual_seed(0))
    return float(total), float(aug.get_total_flops())


def is_published(arch, out_dim, crop, local_crops) -> bool:
    return (arch, out_dim, tuple(crop), local_crops) == (
        PUBLISHED["arch"], PUBLISHED["out_dim"], PUBLISHED["crop"], PUBLISHED["local_crops"])


def step_flop(arch, batch, out_dim, crop, local_crops, device) -> tuple[float, str]:
    """FLOP per step at `batch` and where the figure comes from."""
    if is_published(arch, out_dim, crop, local_crops):
        return PUBLISHED_STEP_FLOP * batch / PUBLISHED_BATCH, "issue figure, scaled"
    total, aug = count_step_flops(trainer_args(arch, 1, out_dim, crop, local_crops), device)
    return (total - aug) * batch, "FlopCounterMode, batch 1, scaled"


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name and "PCIe" not in name:  # PCIe parts have lower clocks: no figure
            return peaks[precision]
    return None


def precision_supported(device: torch.device, precision: str) -> tuple[bool, str]:
    if precision == "fp32":
        return True, ""
    if device.type == "cpu":
        if precision == "tf32":
            return False, "TF32 is a GPU mode"
        if precision == "fp16":
            return False, "fp16 autocast is not timed on CPU"
        if not cpu_has_native_bf16():
            return False, ("no avx512_bf16/amx_bf16 on this CPU: bf16 conv3d takes a reference path "
                           "(one 64-channel 3x3x3 conv on 2x64x8x24x24: 13.3 s in bf16 vs 0.054 s fp32); "
                           "--force_cpu_bf16 to time it anyway")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return False, "bf16 not supported by this GPU"
    return True, ""


def cpu_has_native_bf16() -> bool:
    if FORCE_CPU_BF16:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


FORCE_CPU_BF16 = False


def machine_line() -> str:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{utils.machine_description()}; load average {load}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    def fmt(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(f"\n{title}")
    print(f"machine: {machine_line()}")
    print(f"command: {command_line()}")
    print(fmt(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt(r))
    for n in notes:
        print(f"  {n}")
    sys.stdout.flush()


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return "-"


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------- modes

def run_flops(args, device) -> None:
    batch = args.batch
    rows, per_sample = [], []
    for b in (1, 2):
        t0 = time.perf_counter()
        total, aug = count_step_flops(trainer_args(args.arch, b, args.out_dim, args.crop,
                                                   args.local_crops), device)
        per_sample.append((total - aug) / b)
        rows.append([str(b), f"{total / 1e9:.2f}", f"{aug / 1e9:.3f}", f"{(total - aug) / 1e9:.2f}",
                     f"{time.perf_counter() - t0:.1f}"])
    scaled = per_sample[-1] * batch
    notes = [f"per sample (model): {per_sample[0] / 1e9:.3f} GFLOP at batch 1, {per_sample[1] / 1e9:.3f} "
             f"at batch 2 (linear in the batch: the ratio is {per_sample[1] / per_sample[0]:.5f})",
             f"scaled to batch {batch}: {scaled / 1e12:.4f} TFLOP per step"]
    if is_published(args.arch, args.out_dim, args.crop, args.local_crops):
        ref = PUBLISHED_STEP_FLOP * batch / PUBLISHED_BATCH
        notes.append(f"issue figure at batch {batch}: {ref / 1e12:.4f} TFLOP; measured/issue = {scaled / ref:.4f}")
    notes.append("counted: conv/matmul FLOP (2 per multiply-add) of augmentation blur, teacher forward, "
                 "student forward+backward and loss; norms, activations, optimiser and EMA are not counted")
    print_table(f"FLOP per training step, {args.arch}, out_dim {args.out_dim}, 2 views of "
                f"{'x'.join(map(str, args.crop))}, {args.local_crops} local views",
                ["batch", "total GFLOP", "augment GFLOP", "model GFLOP", "count s"], rows, notes)


def profile_steps(bench: StepBench, views, device: torch.device, steps: int) -> str:
    """Where a step's device time goes: torch.profiler over `steps` steps, the top entries by
    self device time (kernels and the operators that launch them), and the share of a few
    kernel families (matched by name), per step."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        bench.run(TimedBatches(views, steps, device, repeat=True))
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    if device.type != "cuda":
        key = "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=25, max_name_column_width=70)
    families = {"norm": ("norm", "bn_fw", "bn_bw"),
                "convolution": ("fprop", "dgrad", "wgrad", "implicit", "conv", "winograd", "cudnn"),
                "gemm (heads)": ("gemm", "nvjet", "cutlass", "matmul"),
                "layout/copy": ("copy", "nchwtonhwc", "nhwctonchw", "transpose", "contiguous"),
                "elementwise/reduce": ("elementwise", "reduce", "vectorized", "triton")}
    kernels = [e for e in events if e.device_type.name == "CUDA"] if device.type == "cuda" else []
    total = sum(getattr(e, key) for e in kernels) or 1.0
    shares = {}
    for e in kernels:
        name = e.key.lower()
        fam = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        shares[fam] = shares.get(fam, 0.0) + getattr(e, key)
    summary = "; ".join(f"{f} {100 * t / total:.1f}% ({t / steps / 1e3:.1f} ms/step)"
                        for f, t in sorted(shares.items(), key=lambda kv: -kv[1]))
    return f"kernel time per step {total / steps / 1e3:.1f} ms: {summary}\n{table}"


SETTINGS = ("precision", "norm_impl", "stem", "channels_last", "compile", "fused_optimizer",
            "cuda_graph")


def variants(args) -> list[dict]:
    """The rows to time: every combination of the list flags, or the `--config` rows."""
    lists = {k: getattr(args, k) for k in SETTINGS}
    if not args.config:
        return [dict(zip(SETTINGS, combo), profile=args.profile)
                for combo in itertools.product(*lists.values())]
    rows = []
    for text in args.config:
        row = {k: v[0] for k, v in lists.items()} | {"profile": args.profile}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in row:
                raise SystemExit(f"bench_train: --config {text!r}: {item!r} is not KEY=VALUE with "
                                 f"KEY one of {', '.join(row)}")
            if key == "profile":
                row[key] = int(value)
            elif key in ("channels_last", "compile", "fused_optimizer", "cuda_graph"):
                row[key] = cli.bool_flag(value)
            else:
                row[key] = value
        rows.append(row)
    return rows


def onoff_text(v: bool) -> str:
    return "on" if v else "off"


def run_timing(args, device) -> None:
    rows, notes, profiles = [], [], []
    flop, flop_src = step_flop(args.arch, args.batch, args.out_dim, args.crop, args.local_crops, device)
    n = args.warmup + args.iters
    for v in variants(args):
        ok, why = precision_supported(device, v["precision"])
        skip = None if ok else f"{v['precision']}: skipped ({why})"
        if v["channels_last"] and device.type != "cuda":
            skip = "channels_last on: skipped (the trainer applies it on CUDA only)"
        if v["cuda_graph"] and device.type != "cuda":
            skip = "cuda_graph on: skipped (CUDA graphs need a GPU)"
        if skip:
            if skip not in notes:
                notes.append(skip)
            continue
        speed = {k: v[k] for k in ("stem", "norm_impl", "fused_optimizer", "cuda_graph")}
        targs = trainer_args(args.arch, args.batch, args.out_dim, args.crop, args.local_crops,
                             v["precision"], v["channels_last"], v["compile"], args.optimizer,
                             args.clip_grad, n, **speed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bench = StepBench(targs, device, n)
        views = synthetic_batch(args.batch, args.crop, args.local_crops, device)
        timed = TimedBatches(views, n, device, repeat=True)
        bench.run(timed)
        secs = timed.step_seconds(args.warmup)
        med = statistics.median(secs)
        peak = peak_tflops(device, v["precision"])
        achieved = flop / med / 1e12
        label = [v["precision"], v["norm_impl"], v["stem"], onoff_text(v["channels_last"]),
                 onoff_text(v["compile"]), onoff_text(v["fused_optimizer"]), onoff_text(v["cuda_graph"])]
        rows.append(label + [f"{med * 1e3:.1f}", f"{min(secs) * 1e3:.1f}-{max(secs) * 1e3:.1f}",
                             f"{args.batch / med:.2f}", f"{achieved:.3f}",
                             f"{peak:g}" if peak else "n/a",
                             f"{100 * achieved / peak:.1f}%" if peak else "n/a", peak_memory(device)])
        print(f"  done: {' '.join(f'{k}={v[k]}' for k in SETTINGS)}: {med * 1e3:.1f} ms/step",
              file=sys.stderr, flush=True)
        if v["profile"]:
            try:
                text = profile_steps(bench, views, device, min(v["profile"], n))
            except Exception as err:  # a profiler failure must not cost the timings
                text = f"profiler failed: {err!r}"
            profiles.append((", ".join(f"{k} {v[k]}" for k in SETTINGS), text))
        del bench, views, timed
    notes.append(f"FLOP per step: {flop / 1e12:.4f} TFLOP ({flop_src}); medians over {args.iters} "
                 f"steps after {args.warmup} warm-up steps; range = fastest-slowest timed step")
    if device.type != "cuda":
        notes.append("MFU n/a on CPU: no honest peak for this shared, virtualised CPU")
    header = ["precision", "norm", "stem", "channels_last", "compile", "fused opt", "cuda graph",
              "median ms", "range ms", "samples/s", "TFLOP/s", "peak TFLOP/s", "MFU", "peak mem"]
    print_table(f"Training step: {args.arch}, batch {args.batch}, out_dim {args.out_dim}, "
                f"2 global views {'x'.join(map(str, args.crop))} + {args.local_crops} local, "
                f"optimizer {args.optimizer}, clip_grad {args.clip_grad:g}, device {device}",
                header, rows, notes)
    if args.json:
        keys = ["precision", "norm", "stem", "channels_last", "compile", "fused_optimizer",
                "cuda_graph", "median_ms", "range_ms", "samples_per_s", "tflops", "peak_tflops",
                "mfu", "peak_mem"]
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "command": command_line(), "notes": notes,
                       "rows": [dict(zip(keys, r)) for r in rows]}, f, indent=1)
    for title, text in profiles:
        print(f"\nprofile, {title}:\n{text}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser("bench_train", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (32 if gpu else 2)
    args.warmup = 5 if args.warmup is None and gpu else (1 if args.warmup is None else args.warmup)
    args.iters = args.iters or (20 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    global FORCE_CPU_BF16
    FORCE_CPU_BF16 = args.force_cpu_bf16
    torch.manual_seed(0)
    np.random.seed(0)
    if args.flops:
        run_flops(args, device)
    else:
        run_timing(args, device)


if __name__ == "__main__":
    main()
