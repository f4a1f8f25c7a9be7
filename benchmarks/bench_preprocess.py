"""Preprocessing throughput on one synthetic DeepLesion-sized CT, and our resampling
against the published one (scikit-image ``resize``, benchmark-only dependency).

    python benchmarks/bench_preprocess.py [--repeats 3] [--size 512] [--slices 60] [--threads 1]

A 512x512x60 phantom at 0.7x0.7x5 mm is written as DeepLesion PNGs, then each stage
runs in this process (``--num_workers 1``) with ``--overwrite`` and is timed; the medians
over ``--repeats`` are printed in one table. The published resampling (read with
SimpleITK, clip to [-1024, 1024], ``skimage.transform.resize(order=3, mode='reflect',
clip=True, preserve_range=True)``, round, int16, write) runs side by side on the same
input; the table gives the computation and whole-script ratios and the HU difference.
``--threads`` caps BLAS/OpenMP threads (set before NumPy loads), so the default
measures one core, as scikit-image and SciPy's ndimage use one.
"""
import argparse
import os
import sys


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="Timed repeats; medians are reported.")
    p.add_argument("--size", type=int, default=512, help="In-plane pixels of the phantom.")
    p.add_argument("--slices", type=int, default=60, help="Slices of the phantom.")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS/OpenMP threads (1 = a per-core figure).")
    p.add_argument("--no_published", action="store_true",
                   help="Skip the scikit-image reference (it takes ~30 s per repeat).")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import platform
    import resource
    import shutil
    import tempfile
    import time
    import tracemalloc
    from pathlib import Path

    import numpy as np
    import SimpleITK as sitk

    import DL_save_nifti
    import re_spacing_ITK
    import splitting_to_patches
    import volume_io
    from synthetic_ct import phantom

    sx = sy = 0.7
    sz = 5.0
    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    series = "000001_01_01"
    hu, _ = phantom((args.slices, args.size, args.size), (sz, sy, sx), np.random.default_rng(0))
    (tmp / "Images_png" / series).mkdir(parents=True)
    for k in range(args.slices):
        sitk.WriteImage(sitk.GetImageFromArray((hu[k].astype(np.int32) + 32768).astype(np.uint16)),
                        str(tmp / "Images_png" / series / f"{k + 1:03d}.png"))
    (tmp / "DL_info.csv").write_text(
        "File_name,Patient_index,Study_index,Series_ID,Slice_range,Spacing_mm_px_,Image_size\n"
        f"{series}_001.png,1,1,1,\"1, {args.slices}\",\"{sx}, {sy}, {sz}\","
        f"\"{args.size}, {args.size}\"\n")
    d = {k: str(tmp / k) for k in ("Images_png", "Images_nifti", "Images_nifti_spacing", "DL_patches_v2")}
    name = f"{series}_001-{args.slices:03d}.nii.gz"
    nifti = Path(d["Images_nifti"]) / name
    ours_out = Path(d["Images_nifti_spacing"]) / name
    pub_out = tmp / "published.nii.gz"
    quiet = ["--num_workers", "1", "--overwrite"]

    def stage1():
        assert DL_save_nifti.main(["--png_dir", d["Images_png"], "--info_csv", str(tmp / "DL_info.csv"),
                                   "--output_dir", d["Images_nifti"]] + quiet) == 0

    def stage2():
        assert re_spacing_ITK.main(["--in_dir", d["Images_nifti"], "--output_dir",
                                    d["Images_nifti_spacing"]] + quiet) == 0

    def stage3(fmt):
        return lambda: splitting_to_patches.main(
            ["--in_dir", d["Images_nifti_spacing"], "--output_dir", d["DL_patches_v2"] + fmt,
             "--list_file", str(tmp / f"list_{fmt}.txt"), "--format", fmt] + quiet)

    def ours_compute():
        _, arr = volume_io.read_nifti(nifti)
        img = sitk.ReadImage(str(nifti))
        t = time.perf_counter()
        re_spacing_ITK.resample_array(arr, img.GetSpacing()[::-1])
        return time.perf_counter() - t

    def published():
        """The published stage 2 on one volume: (whole-script seconds, compute seconds, array)."""
        from skimage.transform import resize

        t0 = time.perf_counter()
        img = sitk.ReadImage(str(nifti))
        arr = np.clip(sitk.GetArrayFromImage(img), -1024, 1024)
        shape = re_spacing_ITK.output_shape(arr.shape, img.GetSpacing()[::-1])
        t1 = time.perf_counter()
        out = resize(arr, shape, order=3, mode="reflect", clip=True, preserve_range=True)
        out = np.round(out).astype(np.int16)
        t2 = time.perf_counter()
        o = sitk.GetImageFromArray(out)
        o.SetOrigin(img.GetOrigin())
        o.SetDirection(img.GetDirection())
        o.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(o, str(pub_out))
        return time.perf_counter() - t0, t2 - t1, out

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def peak_mb(fn):
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak / 2**20

    devnull = open(os.devnull, "w")
    real_stderr, sys.stderr = sys.stderr, devnull  # silence the bars and summaries
    try:
        stage1(), stage2(), stage3("nii.gz")(), ours_compute()  # warm-up: caches, imports
        rows = {}
        stages = [("1 PNG -> NIfTI", stage1), ("2 resample (ours, script)", stage2),
                  ("3 split, nii.gz", stage3("nii.gz")), ("3 split, nii", stage3("nii")),
                  ("3 split, npy", stage3("npy")), ("3 split, b2nd", stage3("b2nd"))]
        for label, fn in stages:
            rows[label] = (float(np.median([timed(fn) for _ in range(args.repeats)])), peak_mb(fn))
        compute = float(np.median([ours_compute() for _ in range(args.repeats)]))
        pub = None
        if not args.no_published:
            runs = [published() for _ in range(args.repeats)]
            pub = (float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs])))
            diff = np.abs(runs[-1][2].astype(np.int32) - sitk.GetArrayFromImage(
                sitk.ReadImage(str(ours_out))).astype(np.int32))
    finally:
        sys.stderr = real_stderr
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out_shape = sitk.ReadImage(str(ours_out)).GetSize()[::-1]
    print(f"machine: {cpu}, {os.cpu_count()} cores; BLAS threads {args.threads}; Python "
          f"{platform.python_version()}, NumPy {np.__version__}")
    print(f"command: python benchmarks/bench_preprocess.py --repeats {args.repeats} --size "
          f"{args.size} --slices {args.slices} --threads {args.threads}")
    print(f"volume: {args.slices}x{args.size}x{args.size} at {sx}x{sy}x{sz} mm -> "
          f"{'x'.join(map(str, out_shape))} at 1 mm; medians of {args.repeats}; workers 1")
    print(f"{'stage':<34}{'s/volume':>10}{'vol/min/core':>14}{'peak MB (numpy)':>17}")
    for label, (sec, mb) in rows.items():
        print(f"{label:<34}{sec:>10.3f}{60 / sec / args.threads:>14.1f}{mb:>17.0f}")
    print(f"{'2 resample (ours, computation)':<34}{compute:>10.3f}{60 / compute / args.threads:>14.1f}{'':>17}")
    if pub:
        print(f"{'2 published skimage (script)':<34}{pub[0]:>10.3f}{60 / pub[0]:>14.1f}{'':>17}")
        print(f"{'2 published skimage (computation)':<34}{pub[1]:>10.3f}{60 / pub[1]:>14.1f}{'':>17}")
        print(f"resampling speed-up vs published: computation {pub[1] / compute:.1f}x, "
              f"whole script {pub[0] / rows['2 resample (ours, script)'][0]:.1f}x; "
              f"|ours - published| HU: mean {diff.mean():.2e}, max {diff.max()}, "
              f"voxels differing {np.count_nonzero(diff)} of {diff.size}")
    print(f"peak resident memory of the whole benchmark process: {maxrss:.0f} MB")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
