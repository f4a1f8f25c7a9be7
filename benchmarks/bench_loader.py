"""Throughput of the pre-training dataset per DataLoader worker (one process, one thread).

    python benchmarks/bench_loader.py                 # defaults: 8 files per format, 5 repeats
    python benchmarks/bench_loader.py --files 16 --repeats 9

Writes synthetic CT-like 24x288x288 int16 sub-volumes (the published tile size) as
.nii.gz (gzip level 1, as splitting_to_patches.py writes), .nii and .npy into a
temporary folder, then times, per sample (two global views, the published setting):

- read: ``load_subvolume`` (for .nii/.npy a memory map: pages are read by the crop);
- crop/flip/resize: ``make_views`` on an in-memory array (base crop, 2 global views);
- CPU part: read + crop/flip/resize end to end (what a worker does with
  ``--augment_on device``), timed as such; the issue's targets apply to this column;
- CPU aug: the intensity transforms in NumPy/SciPy (``--augment_on cpu``);
- device aug: ``BatchIntensityAugment`` on a batch of 32 (both views) run on this CPU,
  per sample; on a GPU it runs asynchronously beside the training step.

Also, for reference: the gzip decoder without ISA-L (zlib) and the published read
(``nibabel.load(path).get_fdata()``, float64). Medians over repeats; the files are in
the page cache, so disk speed is not measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_loader_ssl as dl  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=8, help="distinct sub-volumes per format (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes; medians are reported (default 5)")
    p.add_argument("--batch", type=int, default=32, help="batch size for the device-aug timing (default 32)")
    p.add_argument("--shape", type=int, nargs=3, default=(24, 288, 288), metavar=("D", "H", "W"),
                   help="sub-volume size (default 24 288 288, the published tile)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: a DataLoader worker uses one)")
    return p


def ct_like(shape_dhw, seed):
    """A CT-like (z, y, x) int16 volume: air, body, lungs, bone, 20 HU noise."""
    rng = np.random.default_rng(seed)
    d, h, w = shape_dhw
    y, x = np.mgrid[:h, :w]
    y = y - h / 2
    x = x - w / 2
    plane = np.full((h, w), -1000.0)
    plane[(x / (0.45 * w)) ** 2 + (y / (0.35 * h)) ** 2 < 1] = 40
    for sx in (-1, 1):
        plane[((x - sx * 0.14 * w) / (0.12 * w)) ** 2 + (y / (0.17 * h)) ** 2 < 1] = -800
    plane[(x / (0.05 * w)) ** 2 + ((y + 0.24 * h) / (0.05 * h)) ** 2 < 1] = 700
    vol = np.repeat(plane[None], d, axis=0) + rng.normal(0, 20, (d, h, w))
    return np.clip(np.round(vol), -1024, 1024).astype(np.int16)


def write_files(folder, n, shape_dhw):
    paths = {"nii.gz": [], "nii": [], "npy": []}
    for k in range(n):
        zyx = ct_like(shape_dhw, k)
        xyz = zyx.transpose(2, 1, 0)  # nibabel's order, Fortran-contiguous as the pipeline stores it
        for fmt in paths:
            p = os.path.join(folder, f"vol{k}_dep0.{fmt}")
            if fmt == "npy":
                np.save(p, xyz)
            else:
                nib.save(nib.Nifti1Image(xyz, np.eye(4)), p)  # gzip level 1 (nibabel's default)
            paths[fmt].append(p)
    return paths


def per_sample(fn, items, repeats):
    """Median over repeats of the mean seconds per item."""
    fn(items[0])  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for it in items:
            fn(it)
        times.append((time.perf_counter() - t) / len(items))
    return statistics.median(times)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} thread)"


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(tmp, args.files, args.shape)

        views = dl.make_views(dl.load_subvolume(paths["npy"][0]), rng)
        def augment_on_cpu(_):
            return [dl.augment_view_numpy(v[0].numpy(), dl.VIEW_INTENSITY_PARAMS[k], rng) for k, v in enumerate(views)]

        cpu_aug = per_sample(augment_on_cpu, range(args.files), args.repeats)
        batch = [torch.stack([v] * args.batch) for v in views]
        aug = dl.BatchIntensityAugment()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            dev_aug = per_sample(lambda _: aug(batch, gen), range(2), max(3, args.repeats // 2)) / args.batch

        def run(fmt, label):
            files = paths[fmt]
            read = per_sample(dl.load_subvolume, files, args.repeats)
            arrays = {p: np.array(dl.load_subvolume(p)) for p in files}  # in memory, same layout
            crop = per_sample(lambda p: dl.make_views(arrays[p], rng), files, args.repeats)
            cpu_part = per_sample(lambda p: dl.make_views(dl.load_subvolume(p), rng), files, args.repeats)
            rows.append((label, read, crop, cpu_part, cpu_aug, dev_aug))

        for fmt in ("nii.gz", "nii", "npy"):
            run(fmt, fmt)
        saved = dl._igzip
        dl._igzip = None
        try:
            run("nii.gz", "nii.gz (zlib)")
        finally:
            dl._igzip = saved
        published = per_sample(lambda p: nib.load(p).get_fdata(), paths["nii.gz"], args.repeats)

    targets = {"nii.gz": 60, "nii": 400, "npy": 400}
    print(f"machine: {machine()}")
    cli = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python benchmarks/{os.path.basename(__file__)} {cli}".rstrip())
    print(f"{args.files} files of {args.shape[0]}x{args.shape[1]}x{args.shape[2]} int16 per format, "
          f"medians of {args.repeats} passes; 2 global views (16x96x96) per sample; ms per sample")
    head = ("format", "read", "crop/flip/resize", "CPU part", "CPU part /s", "target /s",
            "CPU aug", "with CPU aug /s", "device aug (B=32)")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for label, read, crop, cpu_part, caug, daug in rows:
        tgt = targets.get(label)
        print(f"| {label} | {read * 1e3:.2f} | {crop * 1e3:.2f} | {cpu_part * 1e3:.2f} | {1 / cpu_part:.0f} | "
              f"{tgt if tgt else '-'} | {caug * 1e3:.2f} | {1 / (cpu_part + caug):.0f} | {daug * 1e3:.2f} |")
    print("read: load_subvolume (.nii/.npy: memory map, pages are read by the crop); crop/flip/resize: "
          "make_views on an in-memory array; CPU part: both end to end, what a worker does with "
          "--augment_on device")
    print(f"published read (nibabel get_fdata, float64) of .nii.gz: {published * 1e3:.2f} ms per sample")


if __name__ == "__main__":
    main()
