"""Stage 1 of the DeepLesion recipe: 16-bit PNG slices -> one NIfTI per run of slices.

    python DL_save_nifti.py --png_dir Images_png --info_csv DL_info.csv \
        --output_dir Images_nifti --num_workers 8

Every series folder ``PPPPPP_SS_SS`` of ``--png_dir`` holds slices ``NNN.png``; only
runs of contiguous slice indices were released, so each run becomes one volume
``{series}_{first:03d}-{last:03d}.nii.gz`` (docs/method.md §1): int16 HU
(PNG value - 32768), array ``(rows, cols, slices)``, the dataset demo's affine
``[[0, -sy, 0], [-sx, 0, 0], [0, 0, -sz]]`` with ``Spacing_mm_px_`` ("sx, sy, sz") from
the series' first row of ``DL_info.csv``. Existing outputs are skipped (``--overwrite``
redoes them); series that cannot be converted are listed with the reason in
``<output_dir>/DL_save_nifti_failures.txt`` and make the exit code 1.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np

import volume_io
from common import atomic, stages

PNG_OFFSET = 32768
# No CT has voxels this large; a spacing beyond it is a typo in DL_info.csv, refused
# before stage 2 would try to allocate a volume of absurd size.
MAX_SPACING_MM = 100.0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


# ----------------------------------------------------------------------------- pure arrays

def split_runs(indices):
    """Split slice indices into runs of contiguous integers: [1,2,3,7,8] -> [[1,2,3],[7,8]].

    Duplicates are dropped and the indices sorted first.
    """
    runs = []
    for i in sorted(set(int(i) for i in indices)):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def volume_name(series, first, last):
    """Output file name of one run: ``{series}_{first:03d}-{last:03d}.nii.gz``."""
    return f"{series}_{first:03d}-{last:03d}.nii.gz"


def deeplesion_affine(spacing_xyz):
    """The dataset demo's affine for spacing ``(sx, sy, sz)`` (docs/method.md §1)."""
    sx, sy, sz = (float(s) for s in spacing_xyz)
    return np.array([[0, -sy, 0, 0],
                     [-sx, 0, 0, 0],
                     [0, 0, -sz, 0],
                     [0, 0, 0, 1]], dtype=np.float64)


def png_to_hu(slices_u16):
    """Stack 2-D uint16 slices to ``(rows, cols, slices)`` int16 HU (value - 32768)."""
    vol = np.stack(slices_u16, axis=-1).astype(np.int32) - PNG_OFFSET
    return vol.astype(np.int16)


def parse_spacing(text):
    """``"0.78, 0.78, 5"`` -> ``(0.78, 0.78, 5.0)``; ValueError unless 3 finite values in
    (0, MAX_SPACING_MM] mm."""
    try:
        sp = tuple(float(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"spacing {text!r} is not three numbers") from None
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0 or max(sp) > MAX_SPACING_MM:
        raise ValueError(f"spacing {text!r} must be three finite values in (0, "
                         f"{MAX_SPACING_MM:g}] mm")
    return sp


# ----------------------------------------------------------------------------- file I/O

def read_info_csv(path):
    """``(spacing, bad_rows)``: ``spacing`` maps ``'PPPPPP_SS_SS'`` to the
    ``Spacing_mm_px_`` text of that series' first row; ``bad_rows`` lists
    ``(where, reason)`` for rows whose indices are not integers (the rest are used)."""
    spacing, bad_rows = {}, []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = ("Patient_index", "Study_index", "Series_ID", "Spacing_mm_px_")
        missing = set(need) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for row in reader:
            try:
                p, s, i = (int(str(row[c]).strip()) for c in need[:3])
            except (TypeError, ValueError):
                values = ", ".join(f"{c}={row[c]!r}" for c in need[:3])
                bad_rows.append((f"{path}:{reader.line_num}",
                                 f"DL_info.csv row has a non-integer index ({values}); row skipped"))
                continue
            spacing.setdefault(f"{p:06d}_{s:02d}_{i:02d}", row["Spacing_mm_px_"])
    return spacing, bad_rows


def read_png(path):
    """A 16-bit grayscale PNG as a 2-D uint16 array; VolumeError naming the file otherwise."""
    import SimpleITK as sitk

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 8))
        tail = f.read(8)
    # libpng may decode a file whose end is missing; the IEND chunk must close it.
    if head != _PNG_SIGNATURE:
        raise volume_io.VolumeError(f"{path}: not a PNG file")
    if tail != _PNG_IEND:
        raise volume_io.VolumeError(f"{path}: truncated PNG (no IEND chunk at the end)")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise volume_io.VolumeError(f"{path}: unreadable PNG: {str(e).strip().splitlines()[-1]}") from e
    if img.GetDimension() != 2 or img.GetNumberOfComponentsPerPixel() != 1:
        raise volume_io.VolumeError(f"{path}: expected a 2-D grayscale PNG, got "
                                    f"{img.GetDimension()}-D with "
                                    f"{img.GetNumberOfComponentsPerPixel()} components")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype != np.uint16:
        raise volume_io.VolumeError(f"{path}: expected 16-bit PNG (HU + 32768), got {arr.dtype}")
    return arr


def convert_run(png_paths, spacing_xyz, out_path, overwrite=False):
    """Read one run's PNG slices (in order) and atomically write its NIfTI."""
    import nibabel as nib

    out_path = Path(out_path)
    if not overwrite and volume_io.output_complete(out_path):
        return stages.SKIPPED
    slices = []
    for p in png_paths:
        arr = read_png(p)
        if slices and arr.shape != slices[0].shape:
            raise volume_io.VolumeError(
                f"{p}: slice size {arr.shape} differs from the series' {slices[0].shape} "
                f"({Path(png_paths[0]).name})")
        slices.append(arr)
    img = nib.Nifti1Image(png_to_hu(slices), deeplesion_affine(spacing_xyz))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic.atomic_output(out_path, volume_io.verify_volume_file) as tmp:
        nib.save(img, str(tmp))
    return stages.DONE


def plan(png_dir, spacing_by_series, out_dir, overwrite=False):
    """List every run of every series folder: ``(tasks, failures)`` for ``run_tasks``."""
    tasks, failures = [], []
    for folder in sorted(p for p in Path(png_dir).iterdir()
                         if p.is_dir() and not p.name.startswith(".")):
        pngs = [p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")]
        if not pngs:
            failures.append((str(folder), "series folder has no PNG slices"))
            continue
        bad = [p.name for p in pngs if not p.stem.isdigit()]
        if bad:
            failures.append((str(folder), f"slice names must be NNN.png, found {bad[:3]}"))
            continue
        if folder.name not in spacing_by_series:
            failures.append((str(folder), f"series {folder.name} has no row in DL_info.csv "
                                          f"(Patient_index, Study_index, Series_ID)"))
            continue
        try:
            spacing = parse_spacing(spacing_by_series[folder.name])
        except ValueError as e:
            failures.append((str(folder), f"DL_info.csv: {e}"))
            continue
        by_index = {int(p.stem): p for p in pngs}
        for run in split_runs(by_index):
            out = Path(out_dir) / volume_name(folder.name, run[0], run[-1])
            tasks.append((str(folder / f"{run[0]:03d}-{run[-1]:03d}"),
                          ([by_index[i] for i in run], spacing, out, overwrite)))
    return tasks, failures


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--png_dir", default="Images_png",
                   help="DeepLesion's Images_png folder: one sub-folder of NNN.png per series.")
    p.add_argument("--info_csv", default="DL_info.csv",
                   help="DeepLesion's DL_info.csv (Patient_index, Study_index, Series_ID, "
                        "Spacing_mm_px_ are used).")
    p.add_argument("--output_dir", "--out_dir", default="Images_nifti",
                   help="Folder for the NIfTI volumes (created).")
    stages.add_batch_args(p)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    png_dir, out_dir = Path(args.png_dir), Path(args.output_dir)
    if not png_dir.is_dir():
        print(f"DL_save_nifti: PNG folder {png_dir} does not exist", file=sys.stderr)
        return 1
    try:
        spacing, bad_rows = read_info_csv(args.info_csv)
    except (OSError, ValueError, KeyError) as e:
        print(f"DL_save_nifti: cannot read {args.info_csv}: {e}", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out_dir)
    tasks, failures = plan(png_dir, spacing, out_dir, args.overwrite)
    if not tasks and not failures:
        print(f"DL_save_nifti: no series folders in {png_dir}", file=sys.stderr)
        return 1
    return stages.run_exclusive("DL_save_nifti", [out_dir], lambda: stages.run_tasks(
        convert_run, tasks, args.num_workers, "DL_save_nifti",
        out_dir / "DL_save_nifti_failures.txt", bad_rows + failures))


if __name__ == "__main__":
    sys.exit(main())
