"""The synthetic CT generator: deterministic, CT-like, in the DeepLesion and MSD layouts,
with organs that mean HU alone does not separate but texture does."""
import csv

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from synthetic_ct import (LABEL_NAMES, TISSUE_HU, gaussian_field, make_deeplesion_set,
                          make_labelled_set, phantom, stripe_field)

SOFT = 9  # a label for the soft tissue around the organs (background label, soft-tissue HU)


def test_phantom_is_seeded_and_ct_like():
    a, la = phantom((12, 48, 48), (2.5, 0.8, 0.8), np.random.default_rng(3))
    b, lb = phantom((12, 48, 48), (2.5, 0.8, 0.8), np.random.default_rng(3))
    c, _ = phantom((12, 48, 48), (2.5, 0.8, 0.8), np.random.default_rng(4))
    assert a.dtype == np.int16 and la.dtype == np.uint8 and a.shape == la.shape == (12, 48, 48)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert set(np.unique(la)) == {0, 1, 2, 3} and len(LABEL_NAMES) == 4
    assert np.median(a[0, 0, :]) < -900  # air in the corner row
    for label in (1, 2, 3):
        assert 0 < np.median(a[la == label]) < 200, LABEL_NAMES[label]
    assert (a > 300).any() and (a < -700).sum() > (a < -950).sum()  # bone; lungs besides air


def test_phantom_tiny_shape():
    hu, labels = phantom((8, 24, 24), (5.0, 0.9, 0.9), np.random.default_rng(0))
    assert hu.shape == (8, 24, 24) and labels.max() >= 1


def test_texture_fields_are_standardised_and_differ_in_structure():
    rng = np.random.default_rng(0)
    shape, spacing = (8, 64, 64), (1.0, 1.0, 1.0)
    fine = gaussian_field(shape, spacing, 1.5, rng)
    coarse = gaussian_field(shape, spacing, 5.0, rng)
    z, y, x = (np.arange(n, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
               for k, n in enumerate(shape))
    stripes = stripe_field((z, y, x), 6.0, (0.0, 1.0, 0.0), rng, shape, spacing)
    for f in (fine, coarse, stripes):
        assert f.shape == shape and f.dtype == np.float32
        assert abs(float(f.mean())) < 1e-4 and abs(float(f.std()) - 1) < 1e-4
    # finer grain: more gradient energy per unit variance
    assert _grad_energy(fine) > 4 * _grad_energy(coarse)
    # stripes along y vary along y far more than along x
    gy, gx = np.gradient(stripes, axis=(1, 2))
    assert (gy ** 2).mean() > 5 * (gx ** 2).mean()


def _grad_energy(f):
    gy, gx = np.gradient(f, axis=(1, 2))
    return float((gy ** 2 + gx ** 2).mean() / f.var())


def _region_stats(hu, mask):
    """Mean, std, in-plane structure-tensor coherence (0 isotropic .. 1 one orientation) and
    gradient energy per unit variance (large for fine grain) of a region, after a light
    in-plane smoothing that removes most of the white noise."""
    f = ndi.gaussian_filter(hu.astype(np.float32), (0, 1.0, 1.0))
    gy, gx = np.gradient(f, axis=(1, 2))
    jxx, jyy, jxy = (gx * gx)[mask].mean(), (gy * gy)[mask].mean(), (gx * gy)[mask].mean()
    tr, det = jxx + jyy, jxx * jyy - jxy ** 2
    root = np.sqrt(max(tr ** 2 / 4 - det, 0.0))
    v = hu[mask].astype(np.float64)
    return {"mean": v.mean(), "std": v.std(), "coherence": 2 * root / tr,
            "grain": tr / f[mask].var()}


@pytest.fixture(scope="module")
def organ_stats():
    """Per phantom (realistic size and spacing): statistics of each organ's interior and
    of the soft tissue around the organs."""
    out = []
    for seed in range(4):
        hu, lab = phantom((40, 128, 128), (2.5, 0.8, 0.8), np.random.default_rng(seed))
        # soft tissue: background voxels whose neighbourhood (not the voxel, which would
        # clip the texture's tails) has soft-tissue HU, away from every boundary
        local = ndi.gaussian_filter(hu.astype(np.float32), 3.0)
        far = (ndi.maximum_filter(hu, 9) < 400) & (ndi.minimum_filter(hu, 9) > -400)  # no bone, lung
        soft = ndi.binary_erosion((lab == 0) & (local > 0) & (local < 200) & far, iterations=4)
        regions = {c: ndi.binary_erosion(lab == c, iterations=2) for c in (1, 2, 3)}
        regions[SOFT] = soft
        assert all(m.sum() > 500 for m in regions.values())
        out.append({c: _region_stats(hu, m) for c, m in regions.items()})
    return out


def test_liver_spleen_and_soft_tissue_share_mean_and_spread(organ_stats):
    """One mean HU per series for all three (a few HU apart: texture samples, lesions), so
    mean HU says nothing about which tissue a voxel is; the shared mean varies by series."""
    liver, spleen, soft = (np.array([st[c]["mean"] for st in organ_stats]) for c in (1, 2, SOFT))
    assert np.abs(liver - spleen).max() < 25 and abs((liver - spleen).mean()) < 10
    assert abs((soft - liver).mean()) < 25
    assert all(25 < st[c]["std"] < 90 for st in organ_stats for c in (1, 2, SOFT))
    lo, hi = TISSUE_HU
    assert ((lo - 15 < liver) & (liver < hi + 15)).all()
    assert liver.max() - liver.min() > 10  # the shared mean itself varies from series to series


def test_organs_differ_in_texture(organ_stats):
    for st in organ_stats:
        # spleen: oriented stripes; liver and soft tissue: isotropic
        assert st[2]["coherence"] > 0.4 > 0.3 > max(st[1]["coherence"], st[SOFT]["coherence"]), st
        # liver: fine grain; soft tissue: smooth, large grain
        assert st[1]["grain"] > 1.5 * st[SOFT]["grain"], st
        # kidney: its enhancing rim raises the mean above the parenchyma of the others
        assert st[3]["mean"] > st[1]["mean"] + 20, st


def test_series_differ_in_layout():
    """Organ centres move from series to series (positions, sizes, orientations)."""
    centres = []
    for seed in range(5):
        _, lab = phantom((30, 96, 96), (2.5, 0.8, 0.8), np.random.default_rng(seed))
        centres.append([ndi.center_of_mass(lab == c) for c in (1, 2)])
    spread = np.asarray(centres).std(0)  # (organ, axis) in voxels
    assert (spread[:, 1:].sum(1) > 2.5).all(), spread  # voxels, in-plane


def test_deeplesion_set_layout(tmp_path):
    root = make_deeplesion_set(tmp_path, n_series=2, size=16, seed=1, n_slices=(20, 24))
    rows = list(csv.DictReader(open(root / "DL_info.csv")))
    for col in ("Patient_index", "Study_index", "Series_ID", "Spacing_mm_px_", "Image_size",
                "Slice_range"):
        assert col in rows[0]
    series = sorted(p.name for p in (root / "Images_png").iterdir())
    assert len(series) == 2 and len(rows) > 2
    for name in series:
        idx = sorted(int(p.stem) for p in (root / "Images_png" / name).glob("*.png"))
        assert np.any(np.diff(idx) > 1), "every series has a gap"
        sx, sy, sz = (float(v) for v in [r for r in rows if r["File_name"].startswith(name)][0]
                      ["Spacing_mm_px_"].split(","))
        assert 0.6 <= sx == sy <= 0.98 and 1 <= sz <= 5
        png = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "Images_png" / name / f"{idx[0]:03d}.png")))
        assert png.dtype == np.uint16 and png.shape == (16, 16)
        assert png.min() >= 32768 - 1024  # HU + 32768, HU >= -1024


def test_labelled_set(tmp_path):
    root = make_labelled_set(tmp_path, n_cases=2, size=20, n_slices=10, seed=0)
    img = nib.load(root / "imagesTr" / "case_001.nii.gz")
    lab = nib.load(root / "labelsTr" / "case_001.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert img.shape == lab.shape == (20, 20, 10)
    zx, zy, zz = img.header.get_zooms()
    assert zx == zy and zz > zx  # anisotropic
    assert np.asarray(lab.dataobj).max() <= 3
