"""Synthetic CT-like phantoms in the DeepLesion and MSD layouts, for the demo and tests.

    python synthetic_ct.py demo_data --kind deeplesion --n 3 --size 64 --seed 0
    python synthetic_ct.py demo_labels --kind labelled --n 6 --size 64 --n_slices 32

``--kind deeplesion`` writes ``OUT_DIR/Images_png/PPPPPP_SS_SS/NNN.png`` (16-bit,
value = HU + 32768) and ``OUT_DIR/DL_info.csv``, the input of ``DL_save_nifti.py``.
Each series is a phantom scan of which only some runs of contiguous slices are
released, with gaps between them, as in DeepLesion.
``--kind labelled`` writes ``OUT_DIR/imagesTr/case_XXX.nii.gz`` (int16 HU),
``OUT_DIR/labelsTr/case_XXX.nii.gz`` (uint8, values index ``LABEL_NAMES``) and a
minimal MSD ``dataset.json``, for fine-tuning.

Everything is seeded and deterministic. The anatomy is defined in millimetres, so
a phantom scales with the voxel spacing; when the field of view is smaller than a
torso (tiny test volumes) the whole anatomy is shrunk to fit, so every organ is
still present.
"""
import argparse
import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABEL_NAMES = ("background", "liver", "spleen", "kidney")

AIR_HU = -1000
FAT_HU = -100
SOFT_HU = 40
LUNG_HU = -850
LIVER_HU = 60
SPLEEN_HU = 50
KIDNEY_HU = 30
KIDNEY_CORTEX_HU = 150
BONE_MARROW_HU = 400
BONE_CORTEX_HU = 1000
RIB_HU = 700

# A torso of about 340 x 250 mm in-plane, 300 mm from the lung apex to the kidneys.
BODY_FOV_MM = 380.0
BODY_LENGTH_MM = 300.0

SLICE_INTERVALS_MM = (1.0, 1.25, 2.0, 2.5, 5.0)


def _ellipsoid(z, y, x, centre, semi):
    """Normalised squared radius of an axis-aligned ellipsoid (< 1 inside)."""
    return (((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
            + ((x - centre[2]) / semi[2]) ** 2)


def phantom(shape_zyx, spacing_zyx, rng):
    """A CT-like torso phantom and its organ labels.

    Args:
        shape_zyx: array shape (slices, rows, cols).
        spacing_zyx: voxel size in mm along (z, y, x).
        rng: a ``numpy.random.Generator``; organ positions, sizes, lesions and noise
            are drawn from it.

    Returns:
        ``(hu, labels)``: int16 Hounsfield units and uint8 labels (indices into
        ``LABEL_NAMES``; lesions keep their organ's label), both shaped ``shape_zyx``.
    """
    nz, ny, nx = (int(n) for n in shape_zyx)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    # Shrink the anatomy only when the field of view cannot hold a torso.
    s_plane = min(1.0, min(ny * sy, nx * sx) / BODY_FOV_MM)
    s_z = min(1.0, nz * sz / BODY_LENGTH_MM)
    # Voxel-centre coordinates in "anatomy millimetres", centred on the volume.
    z = ((np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz / s_z)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy / s_plane)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx / s_plane)[None, None, :]
    full = (nz, ny, nx)

    def jitter(v, mm=5.0):
        return v + rng.uniform(-mm, mm)

    def scale(v, frac=0.1):
        return v * rng.uniform(1 - frac, 1 + frac)

    hu = np.full(full, AIR_HU, dtype=np.float32)
    labels = np.zeros(full, dtype=np.uint8)

    # Body: an elliptic cylinder along z, a subcutaneous fat layer, soft tissue inside.
    bx, by = scale(165.0, 0.08), scale(120.0, 0.08)
    body_r = np.broadcast_to((y / by) ** 2 + (x / bx) ** 2, full)
    body = body_r < 1.0
    fat_mm = rng.uniform(10.0, 20.0)
    inner = np.broadcast_to((y / (by - fat_mm)) ** 2 + (x / (bx - fat_mm)) ** 2, full) < 1.0
    hu[body] = FAT_HU
    hu[inner] = SOFT_HU

    # Lungs: two ellipsoids in the upper part of the volume.
    for side in (-1, 1):
        c = (jitter(70.0), jitter(-5.0), side * jitter(70.0))
        m = _ellipsoid(z, y, x, c, (scale(110.0), scale(70.0), scale(50.0))) < 1.0
        hu[m & inner] = LUNG_HU

    # Ribs: a thin shell inside the body wall, present in 8 mm bands every 25 mm in z.
    rib_shell = np.broadcast_to(
        ((y / (by - fat_mm - 8)) ** 2 + (x / (bx - fat_mm - 8)) ** 2), full)
    rib_band = np.broadcast_to((np.mod(z - jitter(0.0, 10.0), 25.0) < 8.0) & (z > -60.0), full)
    ribs = (rib_shell > 0.88) & (rib_shell < 1.0) & rib_band & (np.broadcast_to(y, full) < 60.0)
    hu[ribs] = RIB_HU

    # Spine: a vertebral column behind the organs, cortex around marrow.
    spine_c = (jitter(75.0, 3.0), jitter(0.0, 3.0))
    spine_r = np.sqrt(np.broadcast_to((y - spine_c[0]) ** 2 + (x - spine_c[1]) ** 2, full))
    radius = scale(17.0)
    hu[spine_r < radius] = BONE_CORTEX_HU
    hu[spine_r < radius - 3.0] = BONE_MARROW_HU + rng.uniform(0, 200)

    # Abdominal organs: (label, HU, centre (z, y, x) mm, semi-axes mm).
    organs = [
        (1, LIVER_HU, (jitter(-20.0), jitter(0.0), jitter(-60.0)), (scale(80.0), scale(60.0), scale(70.0))),
        (2, SPLEEN_HU, (jitter(-10.0), jitter(40.0), jitter(85.0)), (scale(50.0), scale(40.0), scale(28.0))),
    ]
    for side in (-1, 1):
        organs.append((3, KIDNEY_HU, (jitter(-90.0), jitter(55.0), side * jitter(60.0)),
                       (scale(50.0), scale(30.0), scale(24.0))))
    organ_masks = []
    for label, value, centre, semi in organs:
        r = _ellipsoid(z, y, x, centre, semi)
        m = (r < 1.0) & inner
        hu[m] = value
        if label == 3:  # enhancing cortex: the outer ~5 mm of the kidney
            cortex = m & (r > (1.0 - 5.0 / min(semi)) ** 2)
            hu[cortex] = KIDNEY_CORTEX_HU
        labels[m] = label
        organ_masks.append((label, centre, semi))

    # Lesions: a few spheres inside organs, hypo- or hyper-dense; labels unchanged.
    for _ in range(int(rng.integers(1, 4))):
        label, centre, semi = organ_masks[int(rng.integers(len(organ_masks)))]
        c = tuple(centre[i] + rng.uniform(-0.4, 0.4) * semi[i] for i in range(3))
        radius = rng.uniform(5.0, 15.0)
        m = (_ellipsoid(z, y, x, c, (radius, radius, radius)) < 1.0) & (labels == label)
        hu[m] += rng.choice([-35.0, 40.0])

    hu += rng.normal(0.0, rng.uniform(8.0, 20.0), size=full).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return hu, labels


def _release_runs(n_slices, rng):
    """Split 1..n_slices into 2-3 released runs of contiguous indices, 1-4 slices apart.

    Every run keeps at least 5 slices (fewer when ``n_slices`` is too small for that).
    """
    n_runs = int(rng.integers(2, 4)) if n_slices >= 20 else 2
    max_gap = min(4, max(1, (n_slices - 2 * n_runs) // n_runs))
    gaps = rng.integers(1, max_gap + 1, size=n_runs - 1)
    kept = n_slices - int(gaps.sum())
    min_len = max(2, min(5, kept // n_runs))
    lengths = np.full(n_runs, min_len)
    extra = kept - min_len * n_runs
    lengths += rng.multinomial(extra, np.full(n_runs, 1.0 / n_runs))
    runs, start = [], 1
    for i, length in enumerate(lengths):
        runs.append((start, start + int(length) - 1))
        start += int(length) + (int(gaps[i]) if i < n_runs - 1 else 0)
    return runs


def _fmt(v):
    return f"{v:.6g}"


def make_deeplesion_set(out_dir, n_series=3, size=64, seed=0, n_slices=(30, 50)):
    """Write a small DeepLesion-format data set; return ``out_dir`` as a Path.

    Layout: ``out_dir/Images_png/PPPPPP_SS_SS/NNN.png`` (uint16 = HU + 32768,
    1-based 3-digit slice index) and ``out_dir/DL_info.csv`` with DeepLesion's
    columns, one row per "lesion" (one per released run; the first run of every
    other series gets a second row).

    Args:
        out_dir: destination folder (created).
        n_series: number of CT series.
        size: in-plane pixels (rows = cols = size).
        seed: seed of everything drawn.
        n_slices: (min, max) slices of each scanned series, before gaps are cut out.
    """
    out_dir = Path(out_dir)
    png_root = out_dir / "Images_png"
    png_root.mkdir(parents=True, exist_ok=True)
    lo, hi = (n_slices, n_slices) if np.isscalar(n_slices) else n_slices
    if lo < 10:
        raise ValueError(f"n_slices must be >= 10 to leave room for gaps, got {n_slices}")
    seeds = np.random.SeedSequence(seed).spawn(n_series)
    rows = []
    for i, ss in enumerate(seeds):
        rng = np.random.default_rng(ss)
        patient, study, series = i // 2 + 1, i % 2 + 1, int(rng.integers(1, 4))
        name = f"{patient:06d}_{study:02d}_{series:02d}"
        n = int(rng.integers(lo, hi + 1))
        pix = float(np.round(rng.uniform(0.6, 0.98), 6))
        if rng.random() < 0.7:
            dz = float(rng.choice(SLICE_INTERVALS_MM))
        else:
            dz = float(np.round(rng.uniform(1.0, 5.0), 4))
        hu, _ = phantom((n, size, size), (dz, pix, pix), rng)
        runs = _release_runs(n, rng)
        gender, age = ("M" if rng.random() < 0.5 else "F"), int(rng.integers(20, 90))
        folder = png_root / name
        folder.mkdir(exist_ok=True)
        for first, last in runs:
            for k in range(first, last + 1):
                img = sitk.GetImageFromArray((hu[k - 1].astype(np.int32) + 32768).astype(np.uint16))
                sitk.WriteImage(img, str(folder / f"{k:03d}.png"))
        for j, (first, last) in enumerate(runs):
            for _ in range(2 if (j == 0 and i % 2 == 0) else 1):
                key = int(rng.integers(first, last + 1))
                c = size / 2 + rng.uniform(-size / 8, size / 8, size=2)
                d = rng.uniform(size / 20, size / 8)
                rows.append({
                    "File_name": f"{name}_{key:03d}.png",
                    "Patient_index": patient,
                    "Study_index": study,
                    "Series_ID": series,
                    "Key_slice_index": key,
                    "Measurement_coordinates": ", ".join(_fmt(v) for v in (c[0] - d, c[1], c[0] + d, c[1])),
                    "Bounding_boxes": ", ".join(_fmt(v) for v in (c[0] - d, c[1] - d, c[0] + d, c[1] + d)),
                    "Lesion_diameters_Pixel_": f"{_fmt(2 * d)}, {_fmt(d)}",
                    "Normalized_lesion_location": f"{_fmt(c[0] / size)}, {_fmt(c[1] / size)}, 0.5",
                    "Coarse_lesion_type": -1,
                    "Possibly_noisy": 0,
                    "Slice_range": f"{first}, {last}",
                    "Spacing_mm_px_": f"{_fmt(pix)}, {_fmt(pix)}, {_fmt(dz)}",
                    "Image_size": f"{size}, {size}",
                    "DICOM_windows": "-175, 275",
                    "Patient_gender": gender,
                    "Patient_age": age,
                    "Train_Val_Test": int(rng.integers(1, 4)),
                })
    with open(out_dir / "DL_info.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out_dir


def make_labelled_set(out_dir, n_cases=6, size=64, n_slices=32, seed=0):
    """Write an MSD-layout labelled set; return ``out_dir`` as a Path.

    ``imagesTr/case_XXX.nii.gz`` (int16 HU) and ``labelsTr/case_XXX.nii.gz`` (uint8,
    values index ``LABEL_NAMES``), spacing set in the header: in-plane U(0.6, 0.98) mm,
    slice thickness one of 1.5, 2, 2.5, 3, 5 mm; plus a minimal ``dataset.json``.
    """
    out_dir = Path(out_dir)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i, ss in enumerate(np.random.SeedSequence(seed).spawn(n_cases)):
        rng = np.random.default_rng(ss)
        pix = float(np.round(rng.uniform(0.6, 0.98), 6))
        dz = float(rng.choice([1.5, 2.0, 2.5, 3.0, 5.0]))
        hu, labels = phantom((n_slices, size, size), (dz, pix, pix), rng)
        name = f"case_{i:03d}.nii.gz"
        for arr, sub in ((hu, "imagesTr"), (labels, "labelsTr")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((pix, pix, dz))
            sitk.WriteImage(img, str(out_dir / sub / name), useCompression=True)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "SyntheticCT",
        "modality": {"0": "CT"},
        "labels": {str(i): n for i, n in enumerate(LABEL_NAMES)},
        "numTraining": n_cases,
        "training": training,
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", help="Folder to write the data set into (created).")
    p.add_argument("--kind", choices=("deeplesion", "labelled"), default="deeplesion",
                   help="deeplesion: Images_png/ + DL_info.csv for pre-training; "
                        "labelled: MSD imagesTr/ + labelsTr/ for fine-tuning.")
    p.add_argument("--n", type=int, default=None,
                   help="Number of series (deeplesion, default 3) or cases (labelled, default 6).")
    p.add_argument("--size", type=int, default=64,
                   help="In-plane pixels; 512 is DeepLesion's size, 64 keeps tests fast.")
    p.add_argument("--n_slices", type=int, nargs="+", default=None,
                   help="Slices per scan: MIN MAX for deeplesion (default 30 50, before the "
                        "gaps are cut out), one number for labelled (default 32).")
    p.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives the same files.")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.kind == "deeplesion":
        n_slices = tuple(args.n_slices) if args.n_slices else (30, 50)
        if len(n_slices) == 1:
            n_slices = (n_slices[0], n_slices[0])
        out = make_deeplesion_set(args.out_dir, n_series=args.n or 3, size=args.size,
                                  seed=args.seed, n_slices=n_slices)
    else:
        n_slices = args.n_slices[0] if args.n_slices else 32
        out = make_labelled_set(args.out_dir, n_cases=args.n or 6, size=args.size,
                                n_slices=n_slices, seed=args.seed)
    print(f"wrote {args.kind} set to {out}")


if __name__ == "__main__":
    main()
