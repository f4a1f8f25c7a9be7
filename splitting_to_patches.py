"""Stage 3 of the DeepLesion recipe: 24-slice sub-volumes and the pre-training list file.

    python splitting_to_patches.py --in_dir Images_nifti_spacing --output_dir DL_patches_v2 \
        --list_file SSL_data_deeplesion.txt --num_workers 8 [--format nii.gz]

Each resampled volume ``(d, w, h)`` = ``(z, y, x)`` is cut into tiles of depth 24 at
stride 12 (the last tile ends at the last slice; a volume of 13-23 slices gives one
shorter tile, one of 12 or fewer gives none and is reported as excluded), cropped
in-plane to the central 80 % when ``w > 320`` (docs/method.md §3), and written as
``{volume}_dep{k}.{format}`` with the volume's spacing, origin and direction:

- ``nii.gz`` (default, as published) or ``nii`` (uncompressed, faster to read):
  NIfTI-1, int16, no scaling;
- ``npy``: the int16 array in nibabel's ``(x, y, z)`` order, i.e. exactly what
  ``nibabel.load(...).get_fdata()`` gives for the NIfTI formats (as int16);
- ``b2nd``: a blosc2 NDArray (chunks of the full depth by 48 x 48, LZ4HC + bit-shuffle,
  CRC-32 per chunk, geometry in its metadata), which the loader reads window by window
  (``volume_io.write_b2nd``; ``pip install blosc2``).

``--convert_to b2nd --list_file L`` converts existing ``.nii.gz``/``.nii`` sub-volumes
beside them, only inside the list file's folder (or ``--convert_root``):
    python splitting_to_patches.py --convert_to b2nd --list_file SSL_data_deeplesion.txt

The list file gets one line per sub-volume of the chosen format found in ``--output_dir``,
sorted, each the path relative to the list file's folder (the defaults give
``DL_patches_v2/<name>``); the trainer reads it by the same rule. Existing complete
outputs are skipped (``--overwrite`` redoes them); volumes that cannot be used are
listed in ``<output_dir>/splitting_to_patches_failures.txt`` and make the exit code 1.
A second copy started on the same folder is refused at once (``common.lock``).
"""
import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

import volume_io
from common import atomic, listfile, stages

TILE_DEPTH = 24
TILE_STRIDE = 12
CROP_ABOVE = 320
FORMATS = ("nii.gz", "nii", "npy", "b2nd")


# ----------------------------------------------------------------------------- pure arrays

def tile_bounds(depth, tile=TILE_DEPTH, stride=TILE_STRIDE):
    """The published tiles along z: a list of ``(start, stop)``.

    ``ceil((d - 24) / 12) + 1`` tiles; tile k spans ``[12k, min(12k + 24, d))`` moved back
    to end at ``d`` when it would be short, never starting before 0. (**quirk**: 13-23
    slices give one tile shorter than 24; 12 or fewer give none.)
    """
    n = math.ceil((depth - tile) / stride) + 1
    bounds = []
    for k in range(max(n, 0)):
        d1 = k * stride
        d2 = min(d1 + tile, depth)
        if d2 - d1 < tile:
            d1 = d2 - tile
        bounds.append((max(d1, 0), d2))
    return bounds


def crop_inplane(w, h, limit=CROP_ABOVE):
    """In-plane slices: the central 80 % of y and x when ``w > limit``, else everything."""
    if w > limit:
        return slice(int(0.1 * w), int(0.9 * w)), slice(int(0.1 * h), int(0.9 * h))
    return slice(0, w), slice(0, h)


def split_volume(arr_zyx):
    """Yield ``(k, tile)`` int16 ``(z, y, x)`` sub-volumes of one resampled volume."""
    d, w, h = arr_zyx.shape
    ys, xs = crop_inplane(w, h)
    for k, (d1, d2) in enumerate(tile_bounds(d)):
        yield k, arr_zyx[d1:d2, ys, xs].astype(np.int16)


def stem(path):
    """A volume's name without its .nii.gz / .nii / .npy / .b2nd extension."""
    name = Path(path).name
    return name[: len(name) - len(volume_io.volume_suffix(name))]


# ----------------------------------------------------------------------------- file I/O

def write_tile(tile_zyx, path, fmt, reference=None, compression_level=1):
    """Atomically write one sub-volume in ``fmt``, geometry copied from ``reference`` (a
    SimpleITK image; .npy keeps none)."""
    if fmt == "npy":
        volume_io.write_npy(tile_zyx.transpose(2, 1, 0), path)  # nibabel's (x, y, z)
        return
    if fmt == "b2nd":
        geometry = {} if reference is None else dict(
            spacing_xyz=reference.GetSpacing(), origin=reference.GetOrigin(),
            direction=reference.GetDirection())
        volume_io.write_b2nd(tile_zyx.transpose(2, 1, 0), path, **geometry)
        return
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(tile_zyx)
    if reference is not None:
        img.SetSpacing(reference.GetSpacing())
        img.SetOrigin(reference.GetOrigin())
        img.SetDirection(reference.GetDirection())
    volume_io.write_sitk(img, path, compression_level)


def split_file(in_path, out_dir, fmt="nii.gz", overwrite=False, compression_level=1):
    """Cut one volume into its sub-volumes; DONE, SKIPPED, or raises Excluded/VolumeError."""
    base = stem(in_path)
    out_dir = Path(out_dir)

    def out(k):
        return out_dir / f"{base}_dep{k}.{fmt}"

    # Cheap resume check first: the tile count follows from the header alone, and every
    # tile must be complete (not merely exist).
    if not overwrite:
        try:
            n_tiles = len(tile_bounds(volume_io.read_nifti_header(in_path).shape[2]))
        except volume_io.VolumeError:
            n_tiles = 0  # read_nifti below says what is wrong
        if n_tiles and all(volume_io.output_complete(out(k)) for k in range(n_tiles)):
            return stages.SKIPPED
    img, arr = volume_io.read_nifti(in_path)
    if not tile_bounds(arr.shape[0]):
        raise stages.Excluded(f"{in_path}: only {arr.shape[0]} slices; the published tiling "
                                 f"gives no sub-volume below {TILE_STRIDE + 1}")
    for k, tile in split_volume(arr):
        if overwrite or not volume_io.output_complete(out(k)):
            write_tile(tile, out(k), fmt, img, compression_level)
    return stages.DONE


def convert_file(in_path, fmt, overwrite=False, compression_level=1):
    """Rewrite one sub-volume in ``fmt`` beside it (same name, new suffix); DONE or SKIPPED."""
    out = Path(in_path).with_name(stem(in_path) + f".{fmt}")
    if not overwrite and volume_io.output_complete(out):
        return stages.SKIPPED
    img, arr = volume_io.read_nifti(in_path)
    write_tile(arr, out, fmt, img, compression_level)
    return stages.DONE


def convert(args):
    """--convert_to: every sub-volume of --list_file rewritten in the new format beside
    it; the list file is rewritten to name them once all are done (until then it keeps
    naming the originals, which stay), each line in its own form (relative or absolute).
    Outputs and the clean-up of a killed conversion's temporary files stay inside
    --convert_root (default: the list file's folder): an entry outside it is refused by
    name before anything is written or deleted."""
    fmt, list_file = args.convert_to, Path(args.list_file)
    root = os.path.abspath(args.convert_root or list_file.parent)
    entries = listfile.read_list_entries(list_file)
    base = os.path.abspath(list_file.parent)
    outside = [e for e in entries if not os.path.normpath(os.path.join(base, e)).startswith(
        os.path.join(root, ""))]
    if outside:
        where = "--convert_root" if args.convert_root else "the list file's folder"
        print(f"splitting_to_patches: --convert_to writes beside each sub-volume, and only "
              f"inside {root} ({where}); {list_file} names {len(outside)} sub-volume(s) outside "
              f"it, e.g. {', '.join(outside[:5])}. Nothing was converted. If those folders are "
              f"yours, pass --convert_root with a folder that holds them all", file=sys.stderr)
        return 1
    paths = [Path(p) for p in listfile.read_list_file(list_file)]
    bad = [p for p in paths if volume_io.volume_suffix(p) not in (".nii.gz", ".nii")]
    if bad:
        print(f"splitting_to_patches: --convert_to reads NIfTI sub-volumes; {list_file} "
              f"lists {len(bad)} others, e.g. {bad[0]}", file=sys.stderr)
        return 1
    outputs: dict[Path, set[str]] = {}  # folder -> the names written there
    for p in paths:
        outputs.setdefault(p.parent, set()).add(stem(p) + f".{fmt}")

    def run():
        for folder, names in outputs.items():  # a killed conversion's, not anyone else's
            atomic.remove_stale_temps(folder, names)
        tasks = [(str(p), (p, fmt, args.overwrite, args.compression_level)) for p in paths]
        rc = stages.run_tasks(convert_file, tasks, args.num_workers, "splitting_to_patches",
                              list_file.parent / "splitting_to_patches_failures.txt")
        if rc:
            print(f"splitting_to_patches: {list_file} left unchanged (it still names the "
                  f"{len(paths)} originals); fix the failures and run again", file=sys.stderr)
            return rc
        listfile.write_list_entries(list_file, [e[:len(e) - len(volume_io.volume_suffix(e))]
                                                + f".{fmt}" for e in entries])
        print(f"splitting_to_patches: {len(paths)} sub-volumes converted to .{fmt}; "
              f"{list_file} now names them (the originals can be deleted)", file=sys.stderr)
        return 0

    return stages.run_exclusive("splitting_to_patches --convert_to", [root, *outputs], run,
                                advice="or convert another list file")


def subvolumes(out_dir, fmt):
    """Every ``*_dep*.{fmt}`` sub-volume in ``out_dir`` (temporary files left out)."""
    return [p for p in Path(out_dir).iterdir()
            if volume_io.volume_suffix(p.name) == f".{fmt}" and "_dep" in p.name
            and not p.name.startswith(".")]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--in_dir", default="Images_nifti_spacing",
                   help="Folder of resampled volumes (*.nii.gz) from re_spacing_ITK.py.")
    p.add_argument("--output_dir", "--out_dir", default="DL_patches_v2",
                   help="Folder for the sub-volumes (created).")
    p.add_argument("--list_file", default="SSL_data_deeplesion.txt",
                   help="List file written at the end: one sub-volume per line, relative to "
                        "the list file's folder.")
    p.add_argument("--format", default="nii.gz", choices=FORMATS,
                   help="Sub-volume format: nii.gz as published; b2nd (blosc2, chunked: smaller "
                        "than nii.gz and several times faster to read, needs pip install "
                        "blosc2); nii or npy (nibabel (x, y, z) order) fastest, 2-3x the disk. "
                        "See the README's Speed section.")
    p.add_argument("--convert_to", default=None, choices=[f for f in FORMATS if f != "nii.gz"],
                   help="Instead of splitting: rewrite every sub-volume that --list_file names "
                        "in this format, beside the original, then rewrite the list file. "
                        "Resumable and parallel like the split.")
    p.add_argument("--convert_root", default=None,
                   help="With --convert_to: the folder the conversion may write in (beside "
                        "each sub-volume) and clean up in; entries outside it are refused by "
                        "name. Default: the list file's folder.")
    stages.add_batch_args(p, compression=True)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if "b2nd" in (args.format, args.convert_to):
        try:
            volume_io.require_blosc2()
        except ValueError as e:
            print(f"splitting_to_patches: {e}", file=sys.stderr)
            return 2
    if args.convert_to:
        try:
            return convert(args)
        except (OSError, ValueError) as e:
            print(f"splitting_to_patches: {e}", file=sys.stderr)
            return 1
    out_dir = Path(args.output_dir)
    inputs = stages.stage_inputs(args.in_dir, out_dir, "splitting_to_patches", "re_spacing_ITK.py")
    if inputs is None:
        return 1
    tasks = [(str(p), (p, out_dir, args.format, args.overwrite, args.compression_level))
             for p in inputs]

    def run():
        rc = stages.run_tasks(split_file, tasks, args.num_workers, "splitting_to_patches",
                              out_dir / "splitting_to_patches_failures.txt")
        lines = listfile.write_list_file(args.list_file, subvolumes(out_dir, args.format))
        print(f"splitting_to_patches: {len(lines)} sub-volumes listed in {args.list_file}",
              file=sys.stderr)
        return rc

    return stages.run_exclusive("splitting_to_patches", [out_dir], run)


if __name__ == "__main__":
    sys.exit(main())
