"""The three preprocessing stages: exact recipe, resampling accuracy, formats, resume and
honest failure on bad inputs (issue 2, issue 5 items 1 and 3, issue 6 item 6)."""
import csv
import gzip
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

import DL_save_nifti as stage1
import re_spacing_ITK as stage2
import splitting_to_patches as stage3
import volume_io
from common import atomic
from synthetic_ct import make_deeplesion_set, phantom

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def write_volume(path, arr_zyx, spacing_xyz=(0.8, 0.8, 2.5), origin=(1.0, -2.0, 3.0)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def write_nifti_with_pixdim(path, arr_xyz, pixdim):
    """A .nii.gz whose header pixdim[1:4] is written as given (nibabel would 'fix' it)."""
    raw = path.with_suffix("")  # .nii
    nib.save(nib.Nifti1Image(arr_xyz, np.diag([1.0, 1.0, 1.0, 1.0])), str(raw))
    data = bytearray(raw.read_bytes())
    data[80:92] = struct.pack("<fff", *pixdim)  # pixdim[1..3]
    data[252:256] = struct.pack("<hh", 0, 0)  # qform_code, sform_code: spacing from pixdim
    path.write_bytes(gzip.compress(bytes(data)))
    raw.unlink()
    return path


def reference_resize(arr, shape_out):
    """skimage.transform.resize(order=3, mode='reflect', preserve_range, clip) through SciPy."""
    arr = np.asarray(arr, np.float64)
    sigma = [max(0.0, (a / b - 1) / 2) for a, b in zip(arr.shape, shape_out)]
    out = ndi.zoom(ndi.gaussian_filter(arr, sigma, mode="mirror"),
                   [b / a for a, b in zip(arr.shape, shape_out)], order=3, mode="mirror",
                   grid_mode=True)
    return np.clip(out, arr.min(), arr.max())


# ----------------------------------------------------------------------------- stage 1

def test_split_runs_and_names():
    assert stage1.split_runs([7, 1, 2, 3, 8, 10]) == [[1, 2, 3], [7, 8], [10]]
    assert stage1.split_runs([]) == []
    assert stage1.volume_name("000001_01_01", 103, 115) == "000001_01_01_103-115.nii.gz"
    assert stage1.parse_spacing("0.78125, 0.78125, 5") == (0.78125, 0.78125, 5.0)
    for bad in ("0, 0.7, 5", "nan, 0.7, 5", "0.7, 5"):
        with pytest.raises(ValueError):
            stage1.parse_spacing(bad)


def test_png_to_nifti_round_trip(tmp_path):
    root = make_deeplesion_set(tmp_path / "dl", n_series=2, size=12, seed=5, n_slices=(12, 14))
    rows = list(csv.DictReader(open(root / "DL_info.csv")))
    out = tmp_path / "nifti"
    rc = stage1.main(["--png_dir", str(root / "Images_png"), "--info_csv", str(root / "DL_info.csv"),
                      "--out_dir", str(out), "--workers", "1"])
    assert rc == 0
    expected = set()
    for r in rows:  # the generator records every released run as a Slice_range
        series = f"{int(r['Patient_index']):06d}_{int(r['Study_index']):02d}_{int(r['Series_ID']):02d}"
        first, last = (int(v) for v in r["Slice_range"].split(","))
        expected.add(f"{series}_{first:03d}-{last:03d}.nii.gz")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(expected)
    assert len(expected) >= 4  # two series, each with a gap
    name = sorted(expected)[1]
    series, span = name[:12], name[13:20]
    first, last = int(span[:3]), int(span[4:])
    img = nib.load(out / name)
    vol = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.int16 and vol.shape == (12, 12, last - first + 1)
    for i, k in enumerate(range(first, last + 1)):
        png = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "Images_png" / series / f"{k:03d}.png")))
        assert np.array_equal(vol[:, :, i], png.astype(np.int32) - 32768)
    sx, sy, sz = (float(v) for v in [r for r in rows if r["File_name"].startswith(series)][0]
                  ["Spacing_mm_px_"].split(","))
    want = np.array([[0, -sy, 0, 0], [-sx, 0, 0, 0], [0, 0, -sz, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.affine, want, rtol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms(), (sx, sy, sz), rtol=1e-6)
    # SimpleITK (stage 2's reader) sees the same spacing
    np.testing.assert_allclose(sitk.ReadImage(str(out / name)).GetSpacing(), (sx, sy, sz), rtol=1e-6)


def test_bad_pngs_are_reported_and_the_rest_written(tmp_path):
    root = make_deeplesion_set(tmp_path / "dl", n_series=1, size=10, seed=2, n_slices=(12, 12))
    png = root / "Images_png"
    good = next(png.iterdir())
    # a series missing from the CSV, a truncated PNG, a slice of another size, an empty folder
    for name in ("000009_01_01", "000010_01_01", "000011_01_01", "000012_01_01"):
        (png / name).mkdir()
    for k in (1, 2):
        (png / "000009_01_01" / f"{k:03d}.png").write_bytes((good / "001.png").read_bytes())
    with open(root / "DL_info.csv", "a") as f:
        for pid in (10, 11, 12):
            f.write(f"x.png,{pid},1,1,1,,,,,-1,0,\"1, 2\",\"0.7, 0.7, 2\",\"10, 10\",,M,50,1\n")
    data = (good / "001.png").read_bytes()
    (png / "000010_01_01" / "001.png").write_bytes(data)
    (png / "000010_01_01" / "002.png").write_bytes(data[: len(data) // 2])
    (png / "000011_01_01" / "001.png").write_bytes(data)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((10, 11), 32768, np.uint16)),
                    str(png / "000011_01_01" / "002.png"))
    out = tmp_path / "nifti"
    rc = stage1.main(["--png_dir", str(png), "--info_csv", str(root / "DL_info.csv"),
                      "--out_dir", str(out), "--workers", "1"])
    assert rc == 1
    assert len(list(out.glob(f"{good.name}_*.nii.gz"))) >= 2  # the good series is complete
    report = (out / "DL_save_nifti_failures.txt").read_text()
    assert "000009_01_01" in report and "no row in DL_info.csv" in report
    assert "000010_01_01/002.png" in report and "truncated PNG" in report
    assert "000011_01_01/002.png" in report and "differs" in report
    assert "000012_01_01" in report and "no PNG slices" in report
    assert not list(out.glob("00001[0-2]_*"))


def test_exit_code_and_message_from_the_command_line(tmp_path):
    png = tmp_path / "Images_png"
    (png / "000001_01_01").mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 4), 32768, np.uint16)),
                    str(png / "000001_01_01" / "001.png"))
    (tmp_path / "DL_info.csv").write_text("Patient_index,Study_index,Series_ID,Spacing_mm_px_\n")
    res = subprocess.run([sys.executable, str(ROOT / "DL_save_nifti.py"), "--workers", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "000001_01_01" in res.stderr and "no row in DL_info.csv" in res.stderr


# ----------------------------------------------------------------------------- stage 2

def test_output_shape_rule():
    # z: round(7 * 2.5 = 17.5) = 18 (half to even); y: int(33 * 0.7 = 23.1); x: int(35 * 0.77 = 26.95)
    assert stage2.output_shape((7, 33, 35), (2.5, 0.7, 0.77)) == (18, 23, 26)
    assert stage2.output_shape((5, 9, 9), (2.5, 1, 1)) == (12, 9, 9)  # 12.5 -> 12
    # r is rounded to 4 decimals before use: 0.99999 -> 1.0, so nothing is floored away
    assert stage2.output_shape((10, 51, 49), (1, 0.99999, 0.99999)) == (10, 51, 49)
    assert stage2.output_shape((3, 21, 21), (5, 0.5, 0.5), (1, 2, 2)) == (15, 5, 5)


@pytest.mark.parametrize("n_in,n_out", [(17, 40), (40, 17), (9, 9), (60, 300), (101, 70), (5, 2)])
def test_resize_matrix_matches_1d_cubic_spline(n_in, n_out):
    rng = np.random.default_rng(n_in * 100 + n_out)
    m = stage2.resize_matrix(n_in, n_out)
    sigma = max(0.0, (n_in / n_out - 1) / 2)
    coords = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5  # skimage's grid, edges aligned
    for _ in range(3):
        x = rng.normal(size=n_in) * 100
        smooth = ndi.gaussian_filter1d(x, sigma, mode="mirror") if sigma > 0 else x
        coef = ndi.spline_filter1d(smooth, order=3, mode="mirror")
        ref = ndi.map_coordinates(coef, coords[None], order=3, mode="mirror", prefilter=False)
        np.testing.assert_allclose(m @ x, ref, atol=1e-4 * 100)
    import skimage.transform as skimage  # installed by .ci/run: the fidelity tests always run
    x = rng.normal(size=n_in)
    ref = skimage.resize(x, (n_out,), order=3, mode="reflect", clip=False, preserve_range=True)
    np.testing.assert_allclose(m @ x, ref, atol=1e-4)


def test_resample_matches_published_resize():
    hu, _ = phantom((9, 40, 37), (5.0, 0.7, 0.7), np.random.default_rng(0))
    spacing = (5.0, 0.7, 0.7)
    out = stage2.resample_array(hu, spacing)
    assert out.dtype == np.int16 and out.shape == (45, 28, 25)
    clipped = np.clip(hu, -1024, 1024)
    ref = np.rint(reference_resize(clipped, out.shape))
    assert np.abs(out - ref).mean() <= 0.01 and np.abs(out - ref).max() <= 1
    assert out.min() >= clipped.min() and out.max() <= clipped.max()
    # and it is a cubic spline resize on that grid
    plain = ndi.zoom(clipped.astype(np.float64), [b / a for a, b in zip(hu.shape, out.shape)],
                     order=3, mode="mirror", grid_mode=True)
    assert np.corrcoef(out.ravel(), plain.ravel())[0, 1] >= 0.999
    import skimage.transform as skimage  # installed by .ci/run: the fidelity tests always run
    sk = np.rint(skimage.resize(clipped, out.shape, order=3, mode="reflect", clip=True,
                                preserve_range=True))
    assert np.abs(out - sk).mean() <= 0.01


def test_resample_labels_nearest_on_the_same_grid():
    labels = np.arange(4, dtype=np.uint8)[:, None, None] * np.ones((1, 6, 6), np.uint8)
    out = stage2.resample_labels(labels, (2.0, 1.0, 1.0))
    assert out.shape == (8, 6, 6) and out.dtype == np.uint8
    assert out[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    shrunk = stage2.resample_labels(np.arange(6)[None, None, :].repeat(2, 0).repeat(2, 1),
                                    (1.0, 1.0, 0.5))
    assert shrunk[0, 0].tolist() == [1, 3, 5]  # floor((i + 0.5) * 2)


def test_resample_file_geometry(tmp_path):
    arr = np.random.default_rng(0).integers(-2000, 2000, (6, 10, 12)).astype(np.int16)
    src = write_volume(tmp_path / "a.nii.gz", arr, spacing_xyz=(0.7, 0.7, 2.5))
    out_dir = tmp_path / "out"
    assert stage2.main(["--in_dir", str(tmp_path), "--out_dir", str(out_dir), "--workers", "1"]) == 0
    img = sitk.ReadImage(str(out_dir / "a.nii.gz"))
    assert img.GetSize() == (8, 7, 15) and img.GetSpacing() == (1.0, 1.0, 1.0)
    assert img.GetOrigin() == sitk.ReadImage(str(src)).GetOrigin()
    res = sitk.GetArrayFromImage(img)
    assert res.dtype == np.int16 and res.min() >= -1024 and res.max() <= 1024


def test_resume_ignores_a_stale_temp_file(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        write_volume(src / f"{name}.nii.gz", np.full((4, 8, 8), 100, np.int16))
    out = tmp_path / "out"
    args = ["--in_dir", str(src), "--out_dir", str(out), "--workers", "1"]
    assert stage2.main(args) == 0
    # simulate a run killed while writing b: only a temporary file is left behind
    (out / "b.nii.gz").unlink()
    stale = atomic.temp_path(out / "b.nii.gz")
    stale.write_bytes(b"half a file")
    assert atomic.is_temp_name(stale.name)
    mtime_a = (out / "a.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert stage2.main(args) == 0
    assert "1 done, 1 skipped" in capsys.readouterr().err
    assert not stale.exists() and (out / "a.nii.gz").stat().st_mtime_ns == mtime_a
    _, arr = volume_io.read_nifti(out / "b.nii.gz")
    assert np.all(arr == 100)
    assert stage2.main(args + ["--overwrite"]) == 0
    assert "2 done" in capsys.readouterr().err


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.npy"
    with pytest.raises(RuntimeError):
        with atomic.atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def make_bad_volumes(folder):
    """Issue 6 item 6 fixtures, plus a good volume; returns {name: expected message part}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = rng.integers(-1000, 1000, (12, 16, 16)).astype(np.int16)
    write_volume(folder / "good.nii.gz", good)
    big = write_volume(folder / "cut.nii.gz", rng.integers(-1000, 1000, (20, 40, 40)).astype(np.int16))
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])
    xyz = good.transpose(2, 1, 0)
    write_nifti_with_pixdim(folder / "zero_spacing.nii.gz", xyz, (0.0, 0.8, 2.0))
    write_nifti_with_pixdim(folder / "nan_spacing.nii.gz", xyz, (float("nan"), 0.8, 2.0))
    skew = np.diag([0.8, 0.8, 2.0, 1.0])
    skew[0, 1] = 0.3
    img = nib.Nifti1Image(xyz, skew)
    img.header.set_qform(None, code=0)
    nib.save(img, str(folder / "skewed.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), str(folder / "four_d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(folder / "two_d.nii.gz"))
    nan = good.astype(np.float32)
    nan[3, 4, 5] = np.nan
    write_volume(folder / "nan_voxels.nii.gz", nan)
    return {"cut": "truncated", "zero_spacing": "spacing", "nan_spacing": "spacing",
            "skewed": "orthonormal", "four_d": "4-D", "two_d": "2-D", "nan_voxels": "NaN"}


def test_read_nifti_rejects_bad_files(tmp_path):
    expected = make_bad_volumes(tmp_path)
    img, arr = volume_io.read_nifti(tmp_path / "good.nii.gz")
    assert arr.shape == (12, 16, 16)
    for name, message in expected.items():
        path = tmp_path / f"{name}.nii.gz"
        with pytest.raises(volume_io.VolumeError, match=message) as err:
            volume_io.read_nifti(path)
        assert str(path) in str(err.value)
    data = bytearray((tmp_path / "good.nii.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(data))
    with pytest.raises(volume_io.VolumeError, match="corrupt.nii.gz"):
        volume_io.read_nifti(tmp_path / "corrupt.nii.gz")
    # SimpleITK alone would have returned the half-zero volume
    assert sitk.ReadImage(str(tmp_path / "cut.nii.gz")).GetSize() == (40, 40, 20)


def test_bad_volumes_reported_while_good_ones_are_resampled(tmp_path):
    expected = make_bad_volumes(tmp_path / "in")
    out = tmp_path / "out"
    rc = stage2.main(["--in_dir", str(tmp_path / "in"), "--out_dir", str(out), "--workers", "2"])
    assert rc == 1
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good.nii.gz"]
    lines = (out / "re_spacing_ITK_failures.txt").read_text().splitlines()
    rows = {Path(line.split("\t")[0]).name: line for line in lines if not line.startswith("#")}
    assert len(rows) == len(expected)
    for name, message in expected.items():
        assert message in rows[f"{name}.nii.gz"] and "\tfailed\t" in rows[f"{name}.nii.gz"]


def test_empty_input_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert stage2.main(["--in_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")]) == 1
    assert str(tmp_path / "empty") in capsys.readouterr().err
    assert stage3.main(["--in_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")]) == 1


# ----------------------------------------------------------------------------- stage 3

def test_tile_bounds():
    assert stage3.tile_bounds(10) == [] and stage3.tile_bounds(12) == []
    assert stage3.tile_bounds(13) == [(0, 13)] and stage3.tile_bounds(23) == [(0, 23)]
    assert stage3.tile_bounds(24) == [(0, 24)]
    assert stage3.tile_bounds(25) == [(0, 24), (1, 25)]
    assert stage3.tile_bounds(36) == [(0, 24), (12, 36)]
    assert stage3.tile_bounds(37) == [(0, 24), (12, 36), (13, 37)]
    assert stage3.tile_bounds(61) == [(0, 24), (12, 36), (24, 48), (36, 60), (37, 61)]


def test_crop_rule():
    assert stage3.crop_inplane(320, 320) == (slice(0, 320), slice(0, 320))
    assert stage3.crop_inplane(321, 321) == (slice(32, 288), slice(32, 288))
    assert stage3.crop_inplane(321, 400) == (slice(32, 288), slice(40, 360))
    assert stage3.crop_inplane(300, 400) == (slice(0, 300), slice(0, 400))  # decided by w only


@pytest.mark.parametrize("depth", [30, 10])
def test_formats_give_identical_voxels_and_list_file(tmp_path, depth):
    arr = np.random.default_rng(1).integers(-1024, 1024, (depth, 9, 7)).astype(np.int16)
    src = tmp_path / "Images_nifti_spacing"
    src.mkdir()
    write_volume(src / "000001_01_01_001-030.nii.gz", arr, spacing_xyz=(1.0, 1.0, 1.0))
    got = {}
    for fmt in stage3.FORMATS:
        out = tmp_path / f"patches_{fmt.replace('.', '_')}"
        lst = tmp_path / f"list_{fmt}.txt"
        rc = stage3.main(["--in_dir", str(src), "--out_dir", str(out), "--list_file", str(lst),
                          "--format", fmt, "--workers", "1"])
        assert rc == 0
        lines = lst.read_text().splitlines()
        if depth == 10:  # the published tiling gives nothing: excluded and reported, not failed
            assert lines == []
            report = (out / "splitting_to_patches_failures.txt").read_text()
            assert "000001_01_01_001-030.nii.gz\texcluded\t" in report and "only 10 slices" in report
            continue
        assert lines == [f"{out.name}/000001_01_01_001-030_dep{k}.{fmt}" for k in range(2)]
        for line in lines:
            path = tmp_path / line
            if fmt == "npy":
                vox = np.load(path)
            elif fmt == "b2nd":
                vox = volume_io.B2ndVolume(path).read()
            else:
                img = nib.load(path)
                assert img.header["datatype"] == 4 and img.header["sizeof_hdr"] == 348
                raw = (gzip.open if fmt == "nii.gz" else open)(path, "rb").read(348)
                slope, inter = struct.unpack("<ff", raw[112:120])  # as stored, not as nibabel shows it
                assert slope in (0.0, 1.0) and inter == 0.0
                vox = np.asarray(img.dataobj)
                assert np.array_equal(img.get_fdata(), vox)
            assert vox.dtype == np.int16
            got.setdefault(line[-len(fmt) - 5:-len(fmt) - 1], []).append(vox)
    if depth == 30:
        for k, (d1, d2) in enumerate([(0, 24), (6, 30)]):
            want = arr[d1:d2].transpose(2, 1, 0)
            for vox in got[f"dep{k}"]:
                assert np.array_equal(vox, want)


def test_split_crops_large_volumes_and_lists_relative_to_list_folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    arr = np.arange(24 * 321 * 5, dtype=np.int32).reshape(24, 321, 5).astype(np.int16)
    write_volume(src / "v.nii.gz", arr)
    out = tmp_path / "data" / "DL_patches_v2"
    lst = tmp_path / "data" / "SSL_data_deeplesion.txt"
    assert stage3.main(["--in_dir", str(src), "--out_dir", str(out), "--list_file", str(lst),
                        "--workers", "1"]) == 0
    assert lst.read_text() == "DL_patches_v2/v_dep0.nii.gz\n"
    img = sitk.ReadImage(str(out / "v_dep0.nii.gz"))
    tile = sitk.GetArrayFromImage(img)
    assert np.array_equal(tile, arr[:, 32:288, 0:4])  # x: int(0.5) .. int(4.5)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.8, 2.5), rtol=1e-6)
    assert img.GetOrigin() == (1.0, -2.0, 3.0)


# ----------------------------------------------------------------------------- faults (issue 10)

FULL_DISK = textwrap.dedent("""
    # a file-size limit makes every write beyond LIMIT bytes fail as on a full disk; C++
    # writers (SimpleITK) see a short write and carry on, as they do on ENOSPC
    import resource, signal, sys
    sys.path.insert(0, {root!r})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    import {module} as stage
    sys.exit(stage.main({argv!r}))
""")


def run_with_full_disk(module, argv, limit=20_000):
    code = FULL_DISK.format(root=str(ROOT), limit=limit, module=module, argv=[str(a) for a in argv])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("stage", ["re_spacing_ITK", "splitting_to_patches nii.gz",
                                   "splitting_to_patches nii"])
def test_full_disk_is_a_failure_and_leaves_no_file(tmp_path, stage):
    """A short write used to be reported as '1 done, 0 failed' with a truncated file under
    its final name, which a re-run then skipped as complete."""
    module, *fmt = stage.split()
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    write_volume(src / "a.nii.gz", rng.integers(-1000, 1000, (30, 64, 64)).astype(np.int16),
                 spacing_xyz=(1.0, 1.0, 1.0))
    out = tmp_path / "out"
    argv = ["--in_dir", src, "--output_dir", out, "--num_workers", "1"]
    if fmt:
        argv += ["--format", fmt[0], "--list_file", tmp_path / "list.txt"]
    proc = run_with_full_disk(module, argv)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "0 done" in proc.stderr and "1 failed" in proc.stderr
    assert "not written completely" in proc.stderr or "no space left" in proc.stderr
    assert not [p for p in out.iterdir() if volume_io.volume_suffix(p)]  # nothing under a final name
    # an incomplete file under the final name (an older run's) is redone, not skipped
    stage_module = __import__(module)
    out_name = out / ("a.nii.gz" if module == "re_spacing_ITK" else f"a_dep0.{fmt[0]}")
    out_name.write_bytes(b"\x1f\x8b" + bytes(100))
    assert stage_module.main([str(a) for a in argv]) == 0
    assert volume_io.output_complete(out_name)
    assert volume_io.check_nifti_complete(out_name)


def test_output_complete_checks_the_data_not_the_name(tmp_path):
    arr = np.random.default_rng(0).integers(-1000, 1000, (6, 20, 20)).astype(np.int16)
    for name in ("v.nii.gz", "v.nii", "v.npy"):
        path = tmp_path / name
        if name.endswith(".npy"):
            volume_io.write_npy(arr, path)
        else:
            volume_io.write_sitk(sitk.GetImageFromArray(arr), path)
        assert volume_io.output_complete(path)
        raw = path.read_bytes()
        path.write_bytes(raw[:-7])
        assert not volume_io.output_complete(path)
        path.write_bytes(b"")
        assert not volume_io.output_complete(path)
    assert not volume_io.output_complete(tmp_path / "missing.nii.gz")


def test_absurd_spacing_and_malformed_csv_row_are_named(tmp_path, capsys):
    root = make_deeplesion_set(tmp_path / "dl", n_series=2, size=32, seed=0)
    rows = list(csv.DictReader(open(root / "DL_info.csv")))
    rows[0]["Spacing_mm_px_"] = "0.7, 0.7, 1e6"          # stage 2 would allocate 86 GiB
    rows.append(dict(rows[-1], Patient_index="x7"))      # one malformed row among good ones
    with open(root / "DL_info.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "nifti"
    rc = stage1.main(["--png_dir", str(root / "Images_png"), "--info_csv", str(root / "DL_info.csv"),
                      "--output_dir", str(out), "--num_workers", "1"])
    assert rc == 1
    report = (out / "DL_save_nifti_failures.txt").read_text()
    assert "1e6" in report and "(0, 100] mm" in report
    assert f"DL_info.csv:{len(rows) + 1}" in report and "'x7'" in report
    assert list(out.glob("*.nii.gz"))                    # the good series were converted
    # stage 2 refuses an absurd header spacing per file instead of allocating it
    (tmp_path / "z").mkdir()
    vol = write_volume(tmp_path / "z" / "huge.nii.gz", np.zeros((4, 64, 64), np.int16),
                       spacing_xyz=(0.7, 0.7, 1e6))
    rc = stage2.main(["--in_dir", str(vol.parent), "--output_dir", str(tmp_path / "z_out"),
                      "--num_workers", "1"])
    assert rc == 1
    assert "more than 2**30" in (tmp_path / "z_out" / "re_spacing_ITK_failures.txt").read_text()


@pytest.mark.parametrize("argv, flag", [
    (["--num_workers", "0"], "--num_workers"), (["--spacing", "1", "0", "1"], "--spacing"),
    (["--spacing", "1", "nan", "1"], "--spacing"), (["--compression_level", "0"], "--compression_level"),
    (["--overwrite", "maybe"], "--overwrite")])
def test_invalid_arguments_fail_before_any_work(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        stage2.main(argv + ["--in_dir", "does-not-matter"])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of a preprocessing run with 2 workers used to leave both workers running."""
    src = tmp_path / "in"
    src.mkdir()
    for k in range(6):
        write_volume(src / f"v{k}.nii.gz", np.zeros((60, 200, 200), np.int16))
    proc = subprocess.Popen([sys.executable, str(ROOT / "re_spacing_ITK.py"), "--in_dir", str(src),
                             "--output_dir", str(tmp_path / "out"), "--num_workers", "2",
                             "--spacing", "0.5", "0.5", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children():
        found = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    found.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
        return found
    deadline = time.time() + 60
    while len(children()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = children()
    assert workers, "the pool never started"
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()
                 and "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not alive, f"worker processes {alive} outlived their killed parent"
