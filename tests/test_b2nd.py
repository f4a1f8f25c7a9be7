"""The .b2nd sub-volume format (issue 13): bit-exact round trips, windowed reads, views
identical to the other formats, split and convert, and damage reported by name."""
import os

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import data_loader_ssl as dl
import splitting_to_patches as stage3
import volume_io
from common import listfile


def ct_like(shape_xyz, seed=0):
    """int16 (x, y, z), Fortran order like nibabel's: a body, noise and the dtype's extremes."""
    rng = np.random.default_rng(seed)
    x, y, z = shape_xyz
    gx, gy = np.meshgrid(np.linspace(-1, 1, x), np.linspace(-1, 1, y), indexing="ij")
    vol = np.where(gx ** 2 + gy ** 2 < 0.8, 40.0, -1000.0)[:, :, None] + rng.normal(0, 25, shape_xyz)
    a = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    a.flat[0], a.flat[-1] = np.iinfo(np.int16).min, np.iinfo(np.int16).max
    return np.asfortranarray(a)


def chunk_spans(path):
    """(offset, length) of each compressed chunk in the file, found by content."""
    data = open(path, "rb").read()
    arr = blosc2.open(str(path), mode="r")  # kept alive while its schunk is used
    return [(data.find(arr.schunk.get_chunk(i)), len(arr.schunk.get_chunk(i)))
            for i in range(arr.schunk.nchunks)]


def damage(path, fn):
    path.write_bytes(bytes(fn(bytearray(path.read_bytes()))))


def reported(path, fn=lambda p: volume_io.B2ndVolume(p).read()):
    with pytest.raises(ValueError) as e:
        fn(path)
    assert str(path) in str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("shape", [(288, 288, 24), (97, 130, 13), (20, 30, 5), (1, 1, 1)])
def test_round_trip_bit_exact_with_geometry(tmp_path, shape):
    a = ct_like(shape)
    p = tmp_path / "v.b2nd"
    volume_io.write_b2nd(a, p, (0.8, 0.7, 1.0), (-10.5, 3.25, 100.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    v = volume_io.B2ndVolume(p)
    assert v.shape == shape and v.dtype == np.int16
    assert np.array_equal(v.read(), a)
    assert np.array_equal(dl.load_subvolume(str(p)), a)
    assert v.geometry == {"spacing": (0.8, 0.7, 1.0), "origin": (-10.5, 3.25, 100.0),
                          "direction": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)}
    assert volume_io.output_complete(p) and not list(tmp_path.glob(".*"))


def test_windows_equal_slices_and_decode_only_their_chunks(tmp_path):
    a = ct_like((288, 288, 24), seed=3)
    p = tmp_path / "v.b2nd"
    volume_io.write_b2nd(a, p)
    v = volume_io.B2ndVolume(p)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x0, y0 = rng.integers(0, 288, 2)
        key = (slice(x0, x0 + int(rng.integers(1, 180))), slice(y0, y0 + int(rng.integers(1, 180))),
               slice(int(rng.integers(0, 8)), int(rng.integers(8, 25))))
        assert np.array_equal(v.window(*key), a[key])
    assert v.window(slice(300, 310), slice(0, 5)).shape == (0, 5, 24)
    # a base-crop window of the published views touches a fraction of the chunks
    key = (slice(48, 48 + 160), slice(96, 96 + 150), slice(None))
    needed = blosc2.get_slice_nchunks(blosc2.open(str(p)), key[::-1])
    assert len(needed) < 0.5 * blosc2.open(str(p)).schunk.nchunks


@pytest.mark.parametrize("shape", [(288, 288, 24), (60, 70, 10)])
def test_views_are_bit_identical_across_formats(tmp_path, shape):
    """The same seed gives the same views from .nii.gz, .nii, .npy and .b2nd (a volume
    smaller than the crops, padded, included)."""
    a = ct_like(shape, seed=5)
    img = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
    views = {}
    for fmt in stage3.FORMATS:
        path = tmp_path / f"v_dep0.{fmt}"
        stage3.write_tile(np.ascontiguousarray(a.transpose(2, 1, 0)), path, fmt, img)
        for seed in range(4):
            rng = np.random.default_rng(seed)
            got = dl.make_views(dl.open_subvolume(str(path)), rng, local_crops_number=2)
            views.setdefault(seed, []).append(got)
    for seed, per_format in views.items():
        for other in per_format[1:]:
            assert all(torch.equal(x, y) for x, y in zip(per_format[0], other)), seed
    # and the in-memory path agrees with the reader path
    rng = np.random.default_rng(0)
    assert all(torch.equal(x, y) for x, y in zip(dl.make_views(a, rng, local_crops_number=2),
                                                   views[0][0]))


def test_split_convert_and_train_list(tmp_path):
    src = tmp_path / "Images_nifti_spacing"
    src.mkdir()
    arr = np.random.default_rng(1).integers(-1024, 1024, (30, 40, 36)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin((5.0, -2.0, 1.5))
    sitk.WriteImage(img, str(src / "a.nii.gz"))
    out, lst = tmp_path / "DL_patches_v2", tmp_path / "list.txt"
    assert stage3.main(["--in_dir", str(src), "--output_dir", str(out), "--list_file", str(lst),
                        "--format", "b2nd", "--num_workers", "1"]) == 0
    assert lst.read_text().split() == ["DL_patches_v2/a_dep0.b2nd", "DL_patches_v2/a_dep1.b2nd"]
    tile = volume_io.B2ndVolume(out / "a_dep1.b2nd")
    assert np.array_equal(tile.read(), arr[6:30].transpose(2, 1, 0))
    assert tile.geometry["origin"] == (5.0, -2.0, 1.5)
    # convert an existing nii.gz set: beside the originals, the list rewritten at the end
    lst_gz = tmp_path / "gz.txt"
    assert stage3.main(["--in_dir", str(src), "--output_dir", str(tmp_path / "gz"), "--list_file",
                        str(lst_gz), "--num_workers", "1"]) == 0
    assert stage3.main(["--convert_to", "b2nd", "--list_file", str(lst_gz), "--num_workers", "1"]) == 0
    assert lst_gz.read_text().split() == ["gz/a_dep0.b2nd", "gz/a_dep1.b2nd"]
    for k in (0, 1):
        assert np.array_equal(volume_io.B2ndVolume(tmp_path / "gz" / f"a_dep{k}.b2nd").read(),
                              dl.load_subvolume(str(tmp_path / "gz" / f"a_dep{k}.nii.gz")))
    # the converted list trains: the dataset reads it
    ds = dl.DeepLesionSSL(lst_gz, global_crop_size=(16, 32, 32), local_crop_size=(16, 32, 32))
    assert [tuple(v.shape) for v in ds[0]] == [(1, 16, 32, 32)] * 2


def test_convert_is_resumable_and_keeps_the_list_until_done(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for k in range(3):
        sitk.WriteImage(sitk.GetImageFromArray(ct_like((20, 20, 24), k).transpose(2, 1, 0).copy()),
                        str(folder / f"v_dep{k}.nii.gz"))
    lst = tmp_path / "l.txt"
    listfile.write_list_file(lst, sorted(folder.glob("*.nii.gz")))
    (folder / "v_dep2.nii.gz").write_bytes(b"\x1f\x8b" + bytes(50))    # one damaged original
    assert stage3.main(["--convert_to", "b2nd", "--list_file", str(lst), "--num_workers", "1"]) == 1
    assert lst.read_text().split()[-1] == "p/v_dep2.nii.gz"              # still the originals
    first = (folder / "v_dep0.b2nd").stat().st_mtime_ns
    sitk.WriteImage(sitk.GetImageFromArray(ct_like((20, 20, 24), 2).transpose(2, 1, 0).copy()),
                    str(folder / "v_dep2.nii.gz"))
    assert stage3.main(["--convert_to", "b2nd", "--list_file", str(lst), "--num_workers", "2"]) == 0
    assert (folder / "v_dep0.b2nd").stat().st_mtime_ns == first        # skipped, not redone
    assert lst.read_text().split() == [f"p/v_dep{k}.b2nd" for k in range(3)]


# ----------------------------------------------------------------------------- damage
@pytest.fixture
def written(tmp_path):
    a = ct_like((288, 288, 24), seed=7)
    p = tmp_path / "sub_dep3.b2nd"
    volume_io.write_b2nd(a, p)
    return a, p


@pytest.mark.parametrize("frac", [0.0, 0.01, 0.5, 0.999, -1])
def test_truncated_file_is_reported_by_name(written, frac):
    a, p = written
    size = os.path.getsize(p)
    damage(p, lambda d: d[:size - 1 if frac == -1 else int(size * frac)])
    reported(p)
    reported(p, lambda q: dl.load_subvolume(str(q)))
    assert not volume_io.output_complete(p)


@pytest.mark.parametrize("seed", range(3))
def test_flipped_bit_in_a_chunk_is_reported_not_garbage(written, seed):
    a, p = written
    spans = chunk_spans(p)
    rng = np.random.default_rng(seed)
    i = int(rng.integers(len(spans)))
    off, n = spans[i]
    pos = off + int(rng.integers(32, n))
    damage(p, lambda d: d.__setitem__(pos, d[pos] ^ (1 << int(rng.integers(8)))) or d)
    assert f"chunk {i}" in reported(p)


def test_chunk_turned_into_special_zeros_is_reported(written):
    """A header bit that makes plain blosc2 read a whole chunk as zeros, with no error."""
    a, p = written
    i = 4  # not chunk 0: blosc2 probes the first chunk when it opens a frame
    off, _ = chunk_spans(p)[i]
    arr = blosc2.open(str(p), mode="r")
    grid = [e // c for e, c in zip(arr.ext_shape, arr.chunks)]
    cz, cy, cx = (int(c) * s for c, s in zip(np.unravel_index(i, grid), arr.chunks))
    region = (slice(cx, cx + arr.chunks[2]), slice(cy, cy + arr.chunks[1]), slice(cz, cz + arr.chunks[0]))

    def special_zero(d):  # byte 31 of a chunk header: bits 4-6 = special value (1 = zeros)
        d[off + 31] = (d[off + 31] & ~0x70) | 0x10
        return d
    damage(p, special_zero)
    plain = blosc2.open(str(p), mode="r")[...].transpose(2, 1, 0)
    assert plain[region].max() == 0 and a[region].max() != 0  # plain blosc2: silent zeros
    assert f"chunk {i}" in reported(p)
    reported(p, lambda q: volume_io.B2ndVolume(q).window(region[0], region[1]))


@pytest.mark.parametrize("seed", range(10))
def test_random_bit_flip_anywhere_never_returns_wrong_data(written, seed):
    a, p = written
    rng = np.random.default_rng(100 + seed)
    size = os.path.getsize(p)
    pos = int(rng.integers(size)) if seed % 3 else int(rng.integers(min(size, 400)))
    damage(p, lambda d: d.__setitem__(pos, d[pos] ^ (1 << int(rng.integers(8)))) or d)
    try:
        back = volume_io.B2ndVolume(p).read()
    except ValueError as e:
        assert str(p) in str(e)
    else:
        assert np.array_equal(back, a)


def test_not_a_desd_b2nd_file(tmp_path):
    p = tmp_path / "plain.b2nd"
    blosc2.asarray(np.zeros((5, 6, 7), np.int16), urlpath=str(p), mode="w")
    reported(p)
    p.write_bytes(b"\x1f\x8b" + bytes(1000))
    reported(p)
    p.write_bytes(b"")
    reported(p)
