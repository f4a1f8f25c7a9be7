"""The synthetic CT generator: deterministic, CT-like, in the DeepLesion and MSD layouts."""
import csv

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from synthetic_ct import LABEL_NAMES, make_deeplesion_set, make_labelled_set, phantom


def test_phantom_is_seeded_and_ct_like():
    a, la = phantom((12, 48, 48), (2.5, 0.8, 0.8), np.random.default_rng(3))
    b, lb = phantom((12, 48, 48), (2.5, 0.8, 0.8), np.random.default_rng(3))
    c, _ = phantom((12, 48, 48), (2.5, 0.8, 0.8), np.random.default_rng(4))
    assert a.dtype == np.int16 and la.dtype == np.uint8 and a.shape == la.shape == (12, 48, 48)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert set(np.unique(la)) == {0, 1, 2, 3} and len(LABEL_NAMES) == 4
    assert np.median(a[0, 0, :]) < -900  # air in the corner row
    for label, lo, hi in ((1, 20, 110), (2, 10, 100), (3, 0, 200)):
        assert lo < np.median(a[la == label]) < hi, LABEL_NAMES[label]
    assert (a > 300).any() and (a < -700).sum() > (a < -950).sum()  # bone; lungs besides air


def test_phantom_tiny_shape():
    hu, labels = phantom((8, 24, 24), (5.0, 0.9, 0.9), np.random.default_rng(0))
    assert hu.shape == (8, 24, 24) and labels.max() >= 1


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
