"""Throughput of the pre-training dataset per DataLoader worker (one process, one thread),
and the bytes each sub-volume format takes on disk.

    python benchmarks/bench_loader.py                    # 8 files per format, 7 rounds
    python benchmarks/bench_loader.py --files 12 --rounds 11 --layouts

Sub-volumes: CT-like 24x288x288 int16 tiles made the way the pipeline makes them: a
phantom (`synthetic_ct.phantom`) at a native spacing (in-plane 0.70-0.85 mm, slices
1.25/2.5/5 mm) with 10-30 HU noise correlated in-plane as a reconstruction kernel leaves
it, resampled to 1 mm by stage 2's own `re_spacing_ITK.resample_array`, then cropped to
the published tile. Each is written in every format by stage 3's own
`splitting_to_patches.write_tile` (.nii.gz at gzip level 1, as the script writes it).

Per sample (two global views, the published setting), medians over rounds in which the
formats take turns on the same files (interleaved, so a busy machine slows all alike):

- read: `load_subvolume`, the whole sub-volume (.nii/.npy are memory maps);
- worker: `make_views(open_subvolume(path))`, what a DataLoader worker does with
  `--augment_on device` (the default): read (for .b2nd only the base crop's chunks),
  base crop, two views, flips, resize. The issue's goals apply to this column;
- + CPU aug: the same plus the intensity transforms in NumPy (`--augment_on cpu`);
- device aug: `BatchIntensityAugment` on a batch of 32 run on this CPU, per sample (on a
  GPU it runs beside the training step).

`--layouts` adds the .b2nd layout comparison that chose the default (bytes and worker
time of a few chunk/block/codec/filter choices). These columns read files in the page
cache. `--cold` adds the same read and worker times with each file evicted from the page
cache just before it is read (`posix_fadvise(POSIX_FADV_DONTNEED)` after an fsync; the
share of its pages still resident afterwards is printed, by `mincore`), i.e. from the disk
under `--dir`, and how many workers that rate needs for `--target` samples/s. A data set
of 125k sub-volumes (230-500 GB) does not fit in most machines' memory, so this is the
rate of a real epoch. On tmpfs eviction does nothing: the file system type is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gzip
import math
import mmap
import os
import statistics
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_loader_ssl as dl  # noqa: E402
import re_spacing_ITK  # noqa: E402
import splitting_to_patches  # noqa: E402
import utils  # noqa: E402
import volume_io  # noqa: E402
from common import cli  # noqa: E402
from synthetic_ct import phantom  # noqa: E402

FORMATS = ("nii.gz", "nii", "npy", "b2nd")
# (label, write_b2nd keyword arguments): the default first
LAYOUTS = (
    ("48x48 chunks, 24x24 blocks, LZ4HC5 bitshuffle (default)", {}),
    ("96x96 chunks, 32x32 blocks, LZ4HC5 bitshuffle", dict(chunk_xy=96, block_xy=32)),
    ("96x96 chunks, 32x32 blocks, LZ4HC9 shuffle", dict(chunk_xy=96, block_xy=32, clevel=9,
                                                        filters=("SHUFFLE",))),
    ("96x96 chunks, 32x32 blocks, ZSTD1 shuffle", dict(chunk_xy=96, block_xy=32, codec="ZSTD",
                                                       clevel=1, filters=("SHUFFLE",))),
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--files", type=cli.int_at_least(1), default=8,
                   help="distinct sub-volumes per format")
    p.add_argument("--rounds", type=cli.int_at_least(1), default=7,
                   help="timed rounds (formats interleaved in each); medians are reported")
    p.add_argument("--batch", type=cli.int_at_least(1), default=32,
                   help="batch size of the device-augmentation timing")
    p.add_argument("--threads", type=cli.int_at_least(1), default=1,
                   help="torch threads (a DataLoader worker uses one)")
    p.add_argument("--layouts", default=False, **cli.BOOL,
                   help="also compare .b2nd layouts (what chose the default)")
    p.add_argument("--cold", default=False, **cli.BOOL,
                   help="also time reads with each file evicted from the page cache first (disk)")
    p.add_argument("--dir", default=None,
                   help="folder for the test files (default: the system's temporary folder); "
                        "give one on the disk the data set would live on for --cold")
    p.add_argument("--target", type=float, default=1300.0,
                   help="samples/s the loader must deliver (issue 23's goal on one H100); "
                        "--cold prints the workers each format needs for it")
    return p


# ----------------------------------------------------------------------------- the page cache

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def evict(path: str) -> None:
    """Drop `path`'s pages from the page cache, so that its next read comes from the disk.
    Dirty pages are not dropped, so the file is written back first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str) -> float:
    """Share of `path`'s pages in the page cache (mincore on a mapping that is never read)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(v & 1 for v in vec) / pages
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


@contextlib.contextmanager
def cold_reads():
    """Inside: `data_loader_ssl.open_subvolume` and `load_subvolume` evict their file first,
    in this process and in DataLoader workers started inside (they are forked with it)."""
    saved = dl.open_subvolume, dl.load_subvolume
    inside = []  # open_subvolume reads through load_subvolume: evict once per read

    def cold(fn):
        def read(path):
            if inside:
                return fn(path)
            evict(path)
            inside.append(path)
            try:
                return fn(path)
            finally:
                inside.pop()
        return read
    dl.open_subvolume, dl.load_subvolume = cold(saved[0]), cold(saved[1])
    try:
        yield
    finally:
        dl.open_subvolume, dl.load_subvolume = saved


def filesystem_of(folder: str) -> str:
    """Type of the file system `folder` is on (the longest mount point of /proc/mounts)."""
    folder, best = os.path.realpath(folder), ("", "unknown")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mount, fstype = line.split()[:3]
                inside = folder == mount or folder.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best[0]):
                    best = (mount, fstype)
    except OSError:
        pass
    return best[1]


def ct_tile(seed: int, shape_zyx=(24, 288, 288)) -> np.ndarray:
    """One (z, y, x) int16 tile at 1 mm, made as the pipeline makes them (see the docstring)."""
    rng = np.random.default_rng(seed)
    sz, sxy = (1.25, 2.5, 5.0)[seed % 3], float(rng.uniform(0.70, 0.85))
    nz, nxy = int(np.ceil(shape_zyx[0] / sz)) + 2, int(np.ceil(shape_zyx[1] / sxy)) + 2
    hu, _ = phantom((nz, nxy, nxy), (sz, sxy, sxy), rng)
    noise = ndimage.gaussian_filter(rng.standard_normal((nz, nxy, nxy)).astype(np.float32),
                                    sigma=(0, *[float(rng.uniform(0.8, 1.5))] * 2))
    noise *= float(rng.uniform(10.0, 30.0)) / noise.std()
    vol = np.clip(np.rint(hu + noise), -32768, 32767).astype(np.int16)
    vol = re_spacing_ITK.resample_array(vol, (sz, sxy, sxy))
    start = [(n - s) // 2 for n, s in zip(vol.shape, shape_zyx)]
    return vol[tuple(slice(a, a + s) for a, s in zip(start, shape_zyx))]


def interleaved(fns: dict, items, rounds: int) -> dict[str, float]:
    """Median over rounds of the mean seconds per item of every fn, the fns taking turns
    within each round (one warm-up pass first)."""
    times = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k in (list(fns) if r % 2 else list(fns)[::-1]):
            t = time.perf_counter()
            for it in items:
                fns[k](it)
            if r:
                times[k].append((time.perf_counter() - t) / len(items))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tiles = [ct_tile(k) for k in range(args.files)]
        paths = {fmt: [] for fmt in FORMATS}
        for k, tile in enumerate(tiles):
            for fmt in FORMATS:
                paths[fmt].append(os.path.join(tmp, f"v{k}_dep0.{fmt}"))
                splitting_to_patches.write_tile(tile, paths[fmt][-1], fmt)
        size = {fmt: statistics.mean(os.path.getsize(p) for p in ps) for fmt, ps in paths.items()}
        idx = range(args.files)
        read = interleaved({f: (lambda i, f=f: dl.load_subvolume(paths[f][i])) for f in FORMATS},
                           idx, args.rounds)
        worker = interleaved({f: (lambda i, f=f: dl.make_views(dl.open_subvolume(paths[f][i]), rng))
                              for f in FORMATS}, idx, args.rounds)
        cold = None
        if args.cold:
            with cold_reads():  # the same calls, each file evicted just before it is read
                cold = (interleaved({f: (lambda i, f=f: dl.load_subvolume(paths[f][i]))
                                     for f in FORMATS}, idx, args.rounds),
                        interleaved({f: (lambda i, f=f: dl.make_views(dl.open_subvolume(paths[f][i]), rng))
                                     for f in FORMATS}, idx, args.rounds))
            for ps in paths.values():
                evict(ps[0])
            resident = {f: resident_fraction(ps[0]) for f, ps in paths.items()}
            fstype = filesystem_of(tmp)
        saved, volume_io._gzip = volume_io._gzip, gzip  # zlib's decoder
        try:
            zlib_worker = interleaved({"zlib": lambda i: dl.make_views(
                dl.open_subvolume(paths["nii.gz"][i]), rng)}, idx, args.rounds)["zlib"]
        finally:
            volume_io._gzip = saved
        published = interleaved({"p": lambda i: nib.load(paths["nii.gz"][i]).get_fdata()}, idx,
                                args.rounds)["p"]
        views = dl.make_views(tiles[0].transpose(2, 1, 0), rng)
        cpu_aug = interleaved({"a": lambda i: [dl.augment_view_numpy(
            v[0].numpy(), dl.VIEW_INTENSITY_PARAMS[k], rng) for k, v in enumerate(views)]},
            idx, args.rounds)["a"]
        batch = [torch.stack([v] * args.batch) for v in views]
        aug, gen = dl.BatchIntensityAugment(), torch.Generator().manual_seed(0)
        with torch.no_grad():
            dev_aug = interleaved({"d": lambda i: aug(batch, gen)}, range(2),
                                  max(3, args.rounds // 2))["d"] / args.batch
        layout_rows = []
        if args.layouts:
            lpaths = {}
            for n, (label, kw) in enumerate(LAYOUTS):
                lpaths[label] = [os.path.join(tmp, f"l{n}_{k}.b2nd") for k in idx]
                t0 = time.perf_counter()
                for tile, p in zip(tiles, lpaths[label]):
                    volume_io.write_b2nd(tile.transpose(2, 1, 0), p, **kw)
                write_ms = (time.perf_counter() - t0) / args.files * 1e3
                layout_rows.append([label, statistics.mean(map(os.path.getsize, lpaths[label])),
                                    write_ms])
            lt = interleaved({lb: (lambda i, lb=lb: dl.make_views(dl.open_subvolume(lpaths[lb][i]), rng))
                              for lb, _ in LAYOUTS}, idx, args.rounds)
            for row in layout_rows:
                row.append(lt[row[0]])

    print(f"machine: {utils.machine_description()}; torch threads {torch.get_num_threads()}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    cli = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python benchmarks/{os.path.basename(__file__)} {cli}".rstrip())
    print(f"{args.files} CT-like 24x288x288 int16 sub-volumes per format, medians of {args.rounds} "
          f"interleaved rounds; 2 global views (16x96x96) per sample; ms per sample")
    head = ("format", "MB per sub-volume", "vs nii.gz", "read", "worker", "worker samples/s",
            "vs npy", "+ CPU aug samples/s")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for fmt in FORMATS:
        print(f"| {fmt} | {size[fmt] / 1e6:.2f} | {size[fmt] / size['nii.gz']:.2f}x | "
              f"{read[fmt] * 1e3:.2f} | {worker[fmt] * 1e3:.2f} | {1 / worker[fmt]:.0f} | "
              f"{worker['npy'] / worker[fmt]:.2f} | {1 / (worker[fmt] + cpu_aug):.0f} |")
    print(f"| nii.gz (zlib, no isal) | {size['nii.gz'] / 1e6:.2f} | 1.00x | - | {zlib_worker * 1e3:.2f} | "
          f"{1 / zlib_worker:.0f} | {worker['npy'] / zlib_worker:.2f} | {1 / (zlib_worker + cpu_aug):.0f} |")
    print(f"b2nd: {1 / worker['b2nd']:.0f}/s = {worker['nii.gz'] / worker['b2nd']:.1f}x nii.gz and "
          f"{worker['npy'] / worker['b2nd']:.2f}x npy per worker, at "
          f"{size['b2nd'] / size['nii.gz']:.2f}x the nii.gz bytes")
    print(f"CPU intensity aug {cpu_aug * 1e3:.2f} ms per sample; device aug (B={args.batch}, this "
          f"CPU) {dev_aug * 1e3:.2f} ms per sample; published read (nibabel get_fdata, float64) "
          f"of .nii.gz {published * 1e3:.2f} ms")
    if cold:
        print(f"\nFrom the disk: every file evicted from the page cache just before its read "
              f"({fstype} under {args.dir or tempfile.gettempdir()}; pages still resident after "
              f"an eviction: " + ", ".join(f"{f} {100 * r:.0f}%" for f, r in resident.items())
              + "); ms per sample")
        print(f"| format | read | worker | worker samples/s | vs page cache | workers for "
              f"{args.target:g} samples/s |")
        print("|---|---|---|---|---|---|")
        for fmt in FORMATS:
            t = cold[1][fmt]
            print(f"| {fmt} | {cold[0][fmt] * 1e3:.2f} | {t * 1e3:.2f} | {1 / t:.0f} | "
                  f"{worker[fmt] / t:.2f} | {math.ceil(args.target * t)} |")
        print("workers needed assume reads in parallel do not slow each other (bench_epoch.py "
              "--cold measures the loader with its workers)")
    if layout_rows:
        print("\n.b2nd layouts (full-depth chunks and blocks):")
        print("| layout | bytes vs nii.gz | write ms | worker ms | worker samples/s |")
        print("|---|---|---|---|---|")
        for label, nbytes, write_ms, t in layout_rows:
            print(f"| {label} | {nbytes / size['nii.gz']:.3f} | {write_ms:.0f} | {t * 1e3:.2f} | "
                  f"{1 / t:.0f} |")


if __name__ == "__main__":
    main()
