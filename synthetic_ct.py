"""Synthetic CT-like phantoms in the DeepLesion and MSD layouts, for the demo and tests.

    python synthetic_ct.py demo_data --kind deeplesion --n 3 --size 64 --seed 0
    python synthetic_ct.py demo_labels --kind labelled --n 6 --size 64 --n_slices 32

``--kind deeplesion`` writes ``OUT_DIR/Images_png/PPPPPP_SS_SS/NNN.png`` (16-bit,
value = HU + 32768) and ``OUT_DIR/DL_info.csv``, the input of ``DL_save_nifti.py``.
Each series is a phantom scan of which only some runs of contiguous slices are
released, with gaps between them, as in DeepLesion.
``--kind labelled`` writes ``OUT_DIR/imagesTr/case_XXX.nii.gz`` (int16 HU),
``OUT_DIR/labelsTr/case_XXX.nii.gz`` (uint8, values index ``LABEL_NAMES``) and a
minimal MSD ``dataset.json``, for fine-tuning and the probes.

What the phantoms are built to test. A phantom whose organs differ only in mean HU is
separated by any random convolution, so a probe on it cannot tell a pre-trained encoder
from a random one. Here the abdominal organs and the soft tissue around them share one
mean HU (drawn per series, so the absolute value carries no information either) and,
in distribution, one standard deviation; they differ in *texture* and *shape*:

* soft tissue (background label): smooth, large-grained variation (Gaussian random
  field, correlation ``SOFT_GRAIN_MM``);
* liver: fine, isotropic mottling (Gaussian random field, ``LIVER_GRAIN_MM``);
* spleen: oriented stripes (period ``SPLEEN_PERIOD_MM``, a direction drawn per series,
  phase-modulated so they bend), the same mean and standard deviation as the liver;
* kidney: a bean of mottled parenchyma whose outer rim (the cortex) enhances.

Every scale is in millimetres and at least about 2 mm, so the textures survive the
resampling to 1 mm and most of the pre-training blur (sigma up to 2 voxels). Each
series draws its own layout: a rotation of the whole anatomy in-plane, organ positions,
sizes and 3D orientations, texture scales and directions, and 0-4 lesions of varied
size and contrast (hypo- and hyper-dense, ``LESION_CONTRAST_HU``; lesions keep their
organ's label). Bone, lungs, fat and air keep their distinct HU, as in CT.

Everything is seeded and deterministic. The anatomy is defined in millimetres; when the
field of view is smaller than a torso (tiny test volumes) the layout is shrunk to fit,
so every organ is still present, while textures keep their physical scale.
"""
import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

LABEL_NAMES = ("background", "liver", "spleen", "kidney")

AIR_HU = -1000
FAT_HU = -100
LUNG_HU = -850
BONE_MARROW_HU = 400
BONE_CORTEX_HU = 1000
RIB_HU = 700
# Soft tissue, liver, spleen and kidney parenchyma share one mean, drawn per series.
TISSUE_HU = (30.0, 70.0)
ORGAN_HU_JITTER = 3.0          # per organ, around the series' mean (below the noise)
TEXTURE_STD_HU = (40.0, 70.0)  # per organ, the same range for every textured tissue
KIDNEY_CORTEX_HU = (60.0, 110.0)  # enhancement of the kidney's rim over its parenchyma
NOISE_STD_HU = (5.0, 15.0)

# Texture scales in physical mm (not shrunk with the layout).
SOFT_GRAIN_MM = (3.5, 7.0)     # Gaussian random field correlation (sigma)
LIVER_GRAIN_MM = (1.2, 2.5)
SPLEEN_PERIOD_MM = (4.5, 9.0)  # stripe period
KIDNEY_GRAIN_MM = (1.3, 2.0)
CORTEX_MM = 3.0                # thickness of the kidney's enhancing rim

LESIONS_PER_SERIES = (0, 4)
LESION_CONTRAST_HU = (15.0, 80.0)  # magnitude; the sign is drawn
LESION_RADIUS_MM = (3.0, 10.0)

# A torso of about 340 x 250 mm in-plane, 300 mm from the lung apex to the kidneys.
BODY_FOV_MM = 380.0
BODY_LENGTH_MM = 300.0

SLICE_INTERVALS_MM = (1.0, 1.25, 2.0, 2.5, 5.0)


def random_rotation(rng, max_deg):
    """A 3D rotation (rows: the organ's axes in (z, y, x) world coordinates): a spin of up
    to ``max_deg[0]`` degrees about z (in-plane) and tilts of up to ``max_deg[1]`` about
    y and x."""
    a, b, c = np.deg2rad(rng.uniform(-1, 1, 3) * np.array([max_deg[0], max_deg[1], max_deg[1]]))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Grid:
    """Voxel-centre coordinates of a volume, in two frames.

    ``anatomy(box)``: (z, y, x) in layout millimetres (shrunk to fit the field of view,
    rotated in-plane by the series' angle), over a box of voxels; ``physical(box)``: the
    same voxels in scanner millimetres, for textures.
    """

    def __init__(self, shape, spacing, shrink, angle_rad):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.shrink = shrink  # (z, in-plane)
        self.cos, self.sin = np.cos(angle_rad), np.sin(angle_rad)
        self.axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s)
                     for n, s in zip(self.shape, self.spacing)]

    def physical(self, box):
        return [a[b][sel] for a, b, sel in
                zip(self.axes, box, ((slice(None), None, None), (None, slice(None), None),
                                     (None, None, slice(None))))]

    def anatomy(self, box):
        z, y, x = self.physical(box)
        z = z / self.shrink[0]
        y, x = y / self.shrink[1], x / self.shrink[1]
        return z, self.cos * y - self.sin * x, self.sin * y + self.cos * x

    def box(self, centre, radius):
        """Voxel slices covering an anatomy-frame sphere (centre, radius) in every frame
        rotation; the whole volume when ``centre`` is None."""
        if centre is None:
            return tuple(slice(0, n) for n in self.shape)
        c = np.asarray(centre, dtype=float)
        # the in-plane rotation moves the centre; the radius bounds the rest
        cy, cx = self.cos * c[1] + self.sin * c[2], -self.sin * c[1] + self.cos * c[2]
        out = []
        for k, (cc, n, s) in enumerate(zip((c[0], cy, cx), self.shape, self.spacing)):
            sh = self.shrink[0] if k == 0 else self.shrink[1]
            lo = int(np.floor((cc - radius) * sh / s + (n - 1) / 2))
            hi = int(np.ceil((cc + radius) * sh / s + (n - 1) / 2)) + 1
            out.append(slice(max(lo, 0), max(min(hi, n), 0)))
        return tuple(out)


def _ellipsoid_r2(coords, centre, semi, rot=None):
    """Normalised squared radius of an (optionally rotated) ellipsoid, < 1 inside."""
    d = [c - float(o) for c, o in zip(coords, centre)]
    if rot is not None:
        d = [rot[k, 0] * d[0] + rot[k, 1] * d[1] + rot[k, 2] * d[2] for k in range(3)]
    return sum((dk / float(a)) ** 2 for dk, a in zip(d, semi))


def gaussian_field(shape, spacing, grain_mm, rng):
    """Zero-mean, unit-std Gaussian random field with correlation ``grain_mm`` (sigma of
    the smoothing, in mm; converted to voxels per axis)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = [grain_mm / s for s in spacing]
    field = gaussian_filter(noise, sigma, mode="reflect", truncate=3.0)
    return _standardise(field)


def stripe_field(coords_mm, period_mm, direction, rng, shape, spacing):
    """Zero-mean, unit-std oriented stripes: ``cos`` along ``direction`` with the given
    period, the phase bent by a smooth random field so the stripes are not straight."""
    z, y, x = coords_mm
    u = np.asarray(direction, dtype=np.float32)
    phase = (u[0] * z + u[1] * y + u[2] * x) * np.float32(2 * np.pi / period_mm)
    bend = gaussian_field(shape, spacing, 2.0 * period_mm, rng) * np.float32(1.2)
    return _standardise(np.cos(phase + bend + np.float32(rng.uniform(0, 2 * np.pi))))


def _standardise(a):
    a = a.astype(np.float32, copy=False)
    sd = float(a.std())
    return (a - a.mean()) / (sd if sd > 0 else 1.0)


def phantom(shape_zyx, spacing_zyx, rng):
    """A CT-like torso phantom and its organ labels.

    Args:
        shape_zyx: array shape (slices, rows, cols).
        spacing_zyx: voxel size in mm along (z, y, x).
        rng: a ``numpy.random.Generator``; the layout, organ shapes, textures, lesions
            and noise are all drawn from it.

    Returns:
        ``(hu, labels)``: int16 Hounsfield units and uint8 labels (indices into
        ``LABEL_NAMES``; lesions keep their organ's label), both shaped ``shape_zyx``.
    """
    nz, ny, nx = (int(n) for n in shape_zyx)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    full = (nz, ny, nx)
    # Shrink the layout only when the field of view cannot hold a torso.
    s_plane = min(1.0, min(ny * sy, nx * sx) / BODY_FOV_MM)
    s_z = min(1.0, nz * sz / BODY_LENGTH_MM)
    grid = _Grid(full, (sz, sy, sx), (s_z, s_plane), np.deg2rad(rng.uniform(-20, 20)))
    everything = grid.box(None, None)
    z, y, x = grid.anatomy(everything)

    def jitter(v, mm):
        return v + rng.uniform(-mm, mm)

    def scale(v, frac=0.15):
        return v * rng.uniform(1 - frac, 1 + frac)

    hu = np.full(full, AIR_HU, dtype=np.float32)
    labels = np.zeros(full, dtype=np.uint8)
    tissue_hu = rng.uniform(*TISSUE_HU)

    def tissue_mean():
        return tissue_hu + rng.normal(0.0, ORGAN_HU_JITTER)

    def texture_std():
        return rng.uniform(*TEXTURE_STD_HU)

    # Body: an elliptic cylinder along z, a subcutaneous fat layer, soft tissue inside.
    bx, by = scale(165.0, 0.08), scale(120.0, 0.08)
    body = (y / by) ** 2 + (x / bx) ** 2 < 1.0
    fat_mm = rng.uniform(10.0, 20.0)
    inner2d = (y / (by - fat_mm)) ** 2 + (x / (bx - fat_mm)) ** 2 < 1.0
    hu[np.broadcast_to(body, full)] = FAT_HU
    inner = np.broadcast_to(inner2d, full)
    soft = tissue_mean() + texture_std() * gaussian_field(
        full, grid.spacing, rng.uniform(*SOFT_GRAIN_MM), rng)
    hu[inner] = soft[inner]

    # Lungs: two ellipsoids in the upper part of the volume.
    for side in (-1, 1):
        c = (jitter(70.0, 8.0), jitter(-5.0, 8.0), side * jitter(70.0, 8.0))
        m = _ellipsoid_r2((z, y, x), c, (scale(110.0), scale(70.0), scale(50.0))) < 1.0
        hu[m & inner] = LUNG_HU

    # Ribs: a thin shell inside the body wall, present in 8 mm bands every 25 mm in z.
    rib_shell = (y / (by - fat_mm - 8)) ** 2 + (x / (bx - fat_mm - 8)) ** 2
    rib_band = (np.mod(z - jitter(0.0, 10.0), 25.0) < 8.0) & (z > -60.0)
    ribs = (rib_shell > 0.88) & (rib_shell < 1.0) & rib_band & (y < 60.0)
    hu[np.broadcast_to(ribs, full)] = RIB_HU

    # Spine: a vertebral column behind the organs, cortex around marrow.
    spine_c = (jitter(75.0, 4.0), jitter(0.0, 4.0))
    spine_r = np.broadcast_to(np.sqrt((y - spine_c[0]) ** 2 + (x - spine_c[1]) ** 2), full)
    radius = scale(17.0, 0.1)
    hu[spine_r < radius] = BONE_CORTEX_HU
    hu[spine_r < radius - 3.0] = BONE_MARROW_HU + rng.uniform(0, 200)

    # Abdominal organs: (label, centre (z, y, x) mm, semi-axes mm), each rotated in 3D.
    organs = [
        (1, (jitter(-20.0, 12.0), jitter(0.0, 12.0), jitter(-60.0, 12.0)),
         (scale(80.0), scale(60.0), scale(70.0))),
        (2, (jitter(-10.0, 12.0), jitter(40.0, 12.0), jitter(85.0, 12.0)),
         (scale(50.0, 0.25), scale(40.0, 0.25), scale(28.0, 0.25))),
    ]
    for side in (-1, 1):
        organs.append((3, (jitter(-90.0, 12.0), jitter(55.0, 8.0), side * jitter(60.0, 8.0)),
                       (scale(50.0), scale(30.0), scale(22.0))))
    inside = []
    for label, centre, semi in organs:
        rot = random_rotation(rng, (35.0, 15.0))
        box = grid.box(centre, max(semi))
        if any(b.stop <= b.start for b in box):
            inside.append((label, box, None))
            continue
        r2 = _ellipsoid_r2(grid.anatomy(box), centre, semi, rot)
        m = (r2 < 1.0) & inner[box]
        shape = m.shape
        if label == 1:
            tex = gaussian_field(shape, grid.spacing, rng.uniform(*LIVER_GRAIN_MM), rng)
        elif label == 2:
            theta = rng.uniform(0, np.pi)  # in-plane direction, small tilt out of plane
            tilt = rng.uniform(-0.15, 0.15)
            u = np.array([tilt, np.cos(theta), np.sin(theta)])
            tex = stripe_field(grid.physical(box), rng.uniform(*SPLEEN_PERIOD_MM),
                               u / np.linalg.norm(u), rng, shape, grid.spacing)
        else:
            tex = gaussian_field(shape, grid.spacing, rng.uniform(*KIDNEY_GRAIN_MM), rng)
        value = tissue_mean() + texture_std() * tex
        if label == 3:  # enhancing cortex: the outer CORTEX_MM of the kidney
            rim = CORTEX_MM / (min(semi) * max(s_plane, s_z))
            value = value + rng.uniform(*KIDNEY_CORTEX_HU) * (r2 > (1.0 - min(rim, 0.6)) ** 2)
        sub_hu, sub_lab = hu[box], labels[box]
        sub_hu[m] = value[m]
        sub_lab[m] = label
        inside.append((label, box, m))

    # Lesions: ellipsoids inside organs, hypo- or hyper-dense; labels unchanged.
    for _ in range(int(rng.integers(LESIONS_PER_SERIES[0], LESIONS_PER_SERIES[1] + 1))):
        label, box, m = inside[int(rng.integers(len(inside)))]
        if m is None or not m.any():
            continue
        idx = np.argwhere(m)
        cz, cy, cx = idx[int(rng.integers(len(idx)))]
        r_mm = rng.uniform(*LESION_RADIUS_MM) * rng.uniform(0.7, 1.3, 3)
        pz, py, px = grid.physical(box)
        d2 = (((pz - pz[cz, 0, 0]) / r_mm[0]) ** 2 + ((py - py[0, cy, 0]) / r_mm[1]) ** 2
              + ((px - px[0, 0, cx]) / r_mm[2]) ** 2)
        contrast = rng.uniform(*LESION_CONTRAST_HU) * rng.choice([-1.0, 1.0])
        sub_hu = hu[box]
        sub_hu[(d2 < 1.0) & m] += contrast

    hu += rng.normal(0.0, rng.uniform(*NOISE_STD_HU), size=full).astype(np.float32)
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
    import SimpleITK as sitk  # only the writers need it: phantom() is numpy alone
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
    import SimpleITK as sitk  # only the writers need it: phantom() is numpy alone
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
