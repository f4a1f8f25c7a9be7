"""End-to-end throughput of a short real epoch: files -> DeepLesionSSL -> DataLoader -> step.

    python benchmarks/bench_epoch.py                       # GPU: res3d50, batch 32, out_dim 60000, 10 workers
    python benchmarks/bench_epoch.py --format nii.gz nii npy --num_workers 4 8 12
    python benchmarks/bench_epoch.py --device cpu          # CPU: res3d10, batch 2, out_dim 1024, 2 workers
    python benchmarks/bench_epoch.py --format npy b2nd --cold off on --dir /data/tmp  # disk too

Synthetic CT sub-volumes of 24x288x288 int16 (DeepLesion tiles after the central crop,
`synthetic_ct.phantom`) are written with `splitting_to_patches.write_tile` in each
`--format` into a temporary folder; a list file cycles over them. The
trainer's own `main_desd.build_loader` (DeepLesionSSL with augment_on device,
DistributedSampler, drop_last, pinned memory on CUDA, persistent workers, prefetch 4,
the trainer's worker seeding) feeds the training step of `bench_train.StepBench`, which
is `main_desd.train_one_epoch` itself. Three rates, so the bottleneck shows:

- loader only: the DataLoader iterated without the step, as samples/s over the whole
  interval ("wall"; prefetched batches arrive back to back, so a median interval would
  say nothing); per worker = wall / workers;
- step only: the step on one cached (pinned) batch, no loader;
- end to end: the step fed by the DataLoader.

Medians over `--iters` per-batch intervals after `--warmup`; "wall" is the mean over the
same interval (loader stalls are bursty, so both are shown). The files are in the page
cache unless `--cold`: then every worker evicts each file from the page cache just before
reading it (`bench_loader.cold_reads`), so the loader reads from the disk under `--dir`,
as it does when the data set is larger than the machine's memory.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_loader  # noqa: E402
import bench_train as bt  # noqa: E402
import main_desd  # noqa: E402
import splitting_to_patches  # noqa: E402
from common import cli  # noqa: E402
from models.res3d import NORM_IMPLS, STEM_IMPLS  # noqa: E402
from synthetic_ct import phantom  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_epoch", add_help=False)
    p.add_argument("--format", nargs="+", default=["nii.gz"], choices=["nii.gz", "nii", "npy", "b2nd"],
                   help="Storage formats to time (nii.gz is the published one; b2nd needs blosc2).")
    p.add_argument("--files", type=int, default=32, help="Distinct sub-volumes written (cycled).")
    p.add_argument("--crop", type=int, nargs=3, default=[16, 96, 96], metavar=("D", "H", "W"),
                   help="Global view size (published: 16 96 96; smaller only for smoke runs).")
    p.add_argument("--shape", type=int, nargs=3, default=[24, 288, 288], metavar=("D", "H", "W"),
                   help="Sub-volume size, (z, y, x) (published tile after the central crop).")
    p.add_argument("--num_workers", "--workers", type=int, nargs="+", default=None,
                   help="DataLoader worker counts to time (default: 10 on GPU as published, 2 on CPU).")
    p.add_argument("--arch", default=None, help="Backbone (default: res3d50 on GPU, res3d10 on CPU).")
    p.add_argument("--batch", type=int, default=None, help="Samples per step (default: 32 GPU, 2 CPU).")
    p.add_argument("--out_dim", type=int, default=None, help="Prototypes (default: 60000 GPU, 1024 CPU).")
    p.add_argument("--precision", default=None, choices=["fp32", "tf32", "bf16", "fp16"],
                   help="Step precision (default: bf16 on a GPU that supports it, else fp32).")
    p.add_argument("--channels_last", default=False, **cli.BOOL,
                   help="channels_last_3d (the trainer applies it on CUDA only).")
    p.add_argument("--compile", default=False, **cli.BOOL,
                   help="torch.compile the networks (give --warmup >= 3).")
    p.add_argument("--augment_on", default="device", choices=["device", "cpu"],
                   help="Where the intensity augmentation runs: 'device' (this trainer's default: "
                        "batched on the GPU) or 'cpu' (in the loader's workers, as published).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed batches (default: 5 GPU, 2 CPU).")
    p.add_argument("--iters", type=int, default=None, help="Timed batches (default: 30 GPU, 5 CPU).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default: torch's; on a shared CPU "
                        "1 avoids spinning threads; workers always use 1).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the dataset's draws.")
    p.add_argument("--cold", nargs="+", type=cli.bool_flag, default=[False], metavar="on|off",
                   help="Reads to time: off = files in the page cache, on = each file evicted "
                        "from the page cache before it is read (from the disk); e.g. 'off on'.")
    p.add_argument("--stem", default="conv3d", choices=list(STEM_IMPLS),
                   help="The trainer's --stem (conv2d: depth folded into channels).")
    p.add_argument("--norm_impl", default="auto", choices=list(NORM_IMPLS),
                   help="The trainer's --norm_impl (decomposed: layout-keeping, for compile).")
    p.add_argument("--fused_optimizer", default=False, **cli.BOOL,
                   help="The trainer's --fused_optimizer.")
    p.add_argument("--cuda_graph", default=False, **cli.BOOL,
                   help="The trainer's --cuda_graph (CUDA only).")
    p.add_argument("--dir", default=None,
                   help="Folder for the test files (default: the system's temporary folder); "
                        "with --cold give one on the disk the data set would live on.")
    return p


def write_volumes(folder: str, n: int, fmt: str, shape) -> list[str]:
    """`n` phantom sub-volumes in `fmt`, written as stage 3 writes them. Where SimpleITK is
    missing (a bare GPU machine) NIfTI files are written by nibabel instead (gzip level 1,
    like stage 3's default): the same bytes to decode, so the reading side timed is the same."""
    sitk_missing = importlib.util.find_spec("SimpleITK") is None
    names = []
    for k in range(n):
        hu, _ = phantom(tuple(shape), (1.0, 1.0, 1.0), np.random.default_rng(k))
        name = f"vol{k:03d}_dep0.{fmt}"
        if sitk_missing and fmt in ("nii", "nii.gz"):
            import nibabel as nib
            img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), np.eye(4))
            img.header.set_data_dtype(np.int16)
            nib.save(img, os.path.join(folder, name))
        else:
            splitting_to_patches.write_tile(hu, os.path.join(folder, name), fmt)
        names.append(name)
    return names


def cycled_entries(folder: str, names: list[str], count: int) -> list[str]:
    """`count` list-file entries cycling over the files `names` in `folder`. A list file
    names each sub-volume once, so each reuse is a hard link under a new name: the same
    bytes (and page-cache pages) under another entry."""
    entries = []
    for k in range(max(count, len(names))):
        name = names[k % len(names)]
        if k >= len(names):
            alias = f"r{k // len(names)}_{name}"
            if not os.path.exists(os.path.join(folder, alias)):
                os.link(os.path.join(folder, name), os.path.join(folder, alias))
            name = alias
        entries.append(name)
    return entries


def rates(timed: bt.TimedBatches, skip: int, batch: int) -> tuple[float, float, float]:
    """(median seconds per batch, samples/s from it, samples/s over the whole interval)."""
    secs = timed.step_seconds(skip)
    med = statistics.median(secs)
    return med, batch / med, batch * len(secs) / sum(secs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser("bench_epoch", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    device = bt.resolve_device(args.device)
    gpu = device.type == "cuda"
    args.num_workers = args.num_workers or ([10] if gpu else [2])
    args.arch = args.arch or ("res3d50" if gpu else "res3d10")
    args.batch = args.batch or (32 if gpu else 2)
    args.out_dim = args.out_dim or (60000 if gpu else 1024)
    if args.precision is None:
        args.precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.iters = args.iters or (30 if gpu else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    crop = tuple(args.crop)
    n = args.warmup + args.iters
    speed = dict(stem=args.stem, norm_impl=args.norm_impl, fused_optimizer=args.fused_optimizer,
                 cuda_graph=args.cuda_graph)
    speed_text = ", ".join(f"{k} {v}" for k, v in speed.items())
    targs = bt.trainer_args(args.arch, args.batch, args.out_dim, crop, 0, args.precision,
                            args.channels_last, args.compile, niter=n, augment_on=args.augment_on,
                            **speed)
    # One step object for every row: the step-only and end-to-end rows time the same networks.
    bench = bt.StepBench(targs, device, n)
    flop, flop_src = bt.step_flop(args.arch, args.batch, args.out_dim, crop, 0, device)
    peak = bt.peak_tflops(device, args.precision)

    def mfu(med):
        return f"{100 * flop / med / 1e12 / peak:.1f}%" if peak else "n/a"

    rows, step_row = [], None
    with tempfile.TemporaryDirectory(prefix="bench_epoch_", dir=args.dir) as tmp:
        fstype = bench_loader.filesystem_of(tmp)
        for fmt in args.format:
            t0 = time.perf_counter()
            names = write_volumes(tmp, args.files, fmt, args.shape)
            need = (n + 2) * args.batch
            list_file = os.path.join(tmp, f"list_{fmt}.txt")
            entries = cycled_entries(tmp, names, need)
            with open(list_file, "w") as f:
                f.write("\n".join(entries) + "\n")
            print(f"  wrote {args.files} {fmt} files in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
            for cold, workers in itertools.product(args.cold, args.num_workers):
                reads = "disk" if cold else "page cache"
                largs = bt.trainer_args(args.arch, args.batch, args.out_dim, crop, 0,
                                        args.precision, niter=n, augment_on=args.augment_on)
                largs.list_path, largs.num_workers, largs.seed = list_file, workers, args.seed
                # workers start on the first batch, inside the context: they evict too
                with bench_loader.cold_reads() if cold else contextlib.nullcontext():
                    dataset, _, loader, _ = main_desd.build_loader(largs, 0, 1, device)
                    dataset.set_epoch(0)
                    timed = bt.TimedBatches(loader, n, device)
                    cached = None
                    for views in timed:
                        cached = cached if cached is not None else views
                    med, sps, wall = rates(timed, args.warmup, args.batch)
                    # prefetched batches arrive back to back: the median interval says
                    # nothing, the mean over the whole interval (wall) is the loader's rate
                    rows.append([fmt, str(workers), "loader only", "-", "-",
                                 f"{wall:.1f}", f"{wall / max(workers, 1):.1f}", "-", reads])
                    if step_row is None:
                        timed = bt.TimedBatches(cached, n, device, repeat=True)
                        bench.run(timed)
                        med, sps, wall = rates(timed, args.warmup, args.batch)
                        step_row = ["(cached batch)", "-", "step only", f"{med * 1e3:.1f}",
                                    f"{sps:.1f}", f"{wall:.1f}", "-", mfu(med), "-"]
                    timed = bt.TimedBatches(loader, n, device)
                    bench.run(timed)
                    med, sps, wall = rates(timed, args.warmup, args.batch)
                    rows.append([fmt, str(workers), "end to end", f"{med * 1e3:.1f}", f"{sps:.1f}",
                                 f"{wall:.1f}", "-", mfu(med), reads])
                    print(f"  done: {fmt}, {workers} workers, {reads}", file=sys.stderr, flush=True)
                    del loader  # ends its persistent workers
            for name in set(entries):
                os.remove(os.path.join(tmp, name))
    rows.insert(0, step_row)
    notes = [f"medians over {args.iters} batches after {args.warmup} warm-up batches; wall = mean over "
             f"the same batches; torch threads in the main process: {torch.get_num_threads()}",
             f"FLOP per step {flop / 1e12:.4f} TFLOP ({flop_src}); "
             + ("MFU vs the dense peak of the GPU" if peak else "MFU n/a (no honest peak for this device)"),
             "reads: page cache = files in memory; disk = every file evicted from the page "
             f"cache before each read ({fstype} under {args.dir or tempfile.gettempdir()})"]
    bt.print_table(f"Epoch throughput: {args.arch}, batch {args.batch}, out_dim {args.out_dim}, "
                   f"{args.precision}, channels_last {args.channels_last}, compile {args.compile}, "
                   f"augmentation on {args.augment_on}, {speed_text}, "
                   f"{'x'.join(map(str, args.shape))} int16 sub-volumes, {args.files} files, device {device}",
                   ["format", "workers", "what", "median ms/batch", "samples/s", "wall samples/s",
                    "per worker", "MFU", "reads"], rows, notes)


if __name__ == "__main__":
    main()
