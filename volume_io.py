"""Volume formats side by side: NIfTI (``.nii.gz``/``.nii``), ``.npy`` and ``.b2nd``,
each with checked reading and atomic writing.

- ``read_nifti(path)`` reads a NIfTI with SimpleITK only after checking that the whole
  file is there (SimpleITK silently fills the missing voxels of a truncated ``.nii.gz``
  with zeros) and that its geometry is valid; ``parse_nifti_header`` is the one parser of
  NIfTI headers, also used by the dataset's fast int16 reader. Problems raise
  ``VolumeError`` naming the file.
- The writers (``write_sitk``, ``write_npy``, ``write_b2nd``) go through
  ``common.atomic.atomic_output`` and read their output back before it gets its name
  (SimpleITK does not raise on a short write to a full disk). ``output_complete`` is the
  cheap check a resumed run uses instead of mere existence.

No torch here: the preprocessing workers do not pay for importing it.
"""
from __future__ import annotations

import errno
import io
import math
import mmap
import os
import struct
import zlib
from collections import namedtuple
from pathlib import Path

import numpy as np

from common.atomic import WriteError, atomic_output, free_space

try:  # ISA-L's gzip: about 2x faster decompression of CT volumes (bench_loader.py); zlib otherwise
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - depends on the environment
    import gzip as _gzip


def gunzip(raw: bytes) -> bytes:
    """Whole gzip decompression with its CRC and length checks (a truncated stream raises)."""
    return _gzip.decompress(raw)


VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy", ".b2nd")
_CHUNK = 1 << 22


class VolumeError(ValueError):
    """An input file is unreadable, incomplete or has an invalid geometry."""


# ----------------------------------------------------------------------------- NIfTI headers

NiftiInfo = namedtuple("NiftiInfo", "shape dtype offset slope inter pixdim")


def parse_nifti_header(raw: bytes, path) -> NiftiInfo:
    """The header of a NIfTI-1/2 file from its first bytes (at least 540 when available).

    Returns ``shape`` (trailing singleton dimensions beyond the third dropped), the stored
    ``dtype`` (with its byte order), the data ``offset``, the scaling ``slope``/``inter``
    (None when the file has none) and ``pixdim`` exactly as stored: nibabel would
    "fix" a zero or negative spacing while loading, so the header is read unchecked.
    """
    import nibabel as nib

    if len(raw) < 348:
        raise VolumeError(f"{path}: only {len(raw)} bytes, shorter than a NIfTI header")
    size = struct.unpack("<i", raw[:4])[0]
    if size not in (348, 540):
        size = struct.unpack(">i", raw[:4])[0]
    header_class = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
    if header_class is None or len(raw) < size:
        raise VolumeError(f"{path}: not a NIfTI header (sizeof_hdr is neither 348 nor 540)")
    try:
        hdr = header_class.from_fileobj(io.BytesIO(raw[:size]), check=False)
        shape = tuple(int(n) for n in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        slope, inter = hdr.get_slope_inter()  # (None, None) when scl_slope is 0 or NaN
    except Exception as e:  # nibabel raises HeaderDataError, ValueError ...
        raise VolumeError(f"{path}: invalid NIfTI header ({type(e).__name__}: {e})") from None
    ndim = len(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    pixdim = np.asarray(hdr["pixdim"][1:1 + max(0, min(ndim, 7))], dtype=np.float64)
    return NiftiInfo(shape, dtype, int(hdr.get_data_offset()), slope, inter, pixdim)


def read_nifti_header(path) -> NiftiInfo:
    """The header of a NIfTI file (``.nii`` or ``.nii.gz``) without reading its voxels."""
    try:
        with (_gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            return parse_nifti_header(f.read(540), path)
    except (OSError, EOFError) as e:
        raise VolumeError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _nifti_data_bytes(info: NiftiInfo) -> int:
    return info.offset + math.prod(info.shape) * info.dtype.itemsize


def check_nifti_complete(path) -> NiftiInfo:
    """Raise ``VolumeError`` unless ``path`` holds every voxel byte its header promises.

    For ``.nii.gz`` the whole gzip stream is decompressed (which also verifies its CRC);
    for ``.nii`` the file size is compared. Float volumes are checked for NaN voxels
    (SimpleITK reads them as 0). Returns the parsed header.
    """
    path = Path(path)
    gz = str(path).endswith(".gz")
    try:
        with (_gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(540)
            info = parse_nifti_header(head, path)
            got = len(head)
            if info.dtype.kind == "f":  # NaN check: read the voxels (float volumes are rare)
                data = head + f.read()
                got = len(data)
            elif gz:  # stream to the end: the CRC and the length are checked there
                buf = bytearray(_CHUNK)
                while n := f.readinto(buf):
                    got += n
            else:
                got = path.stat().st_size
    except VolumeError:
        raise
    except EOFError as e:
        raise VolumeError(f"{path}: truncated gzip stream (the file was cut short; "
                          f"re-create or re-download it)") from e
    except Exception as e:
        raise VolumeError(f"{path}: corrupt or unreadable ({type(e).__name__}: {e})") from e
    expected = _nifti_data_bytes(info)
    if got < expected:
        raise VolumeError(f"{path}: truncated: {got} bytes of image data where the header "
                          f"({'x'.join(map(str, info.shape))} {info.dtype}) needs {expected}")
    if info.dtype.kind == "f":
        n_nan = int(np.isnan(np.frombuffer(data, info.dtype, math.prod(info.shape),
                                           info.offset)).sum())
        if n_nan:
            raise VolumeError(f"{path}: {n_nan} NaN voxels")
    return info


def refuse_non_finite(array: np.ndarray, path) -> None:
    """Raise ``VolumeError`` naming ``path`` when a float array holds NaN or inf voxels
    (they would reach the network and surface only as a non-finite loss)."""
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise VolumeError(f"{path}: {bad} NaN or inf voxel{'s' if bad > 1 else ''}; a "
                              f"sub-volume must be finite (re-create it from a finite source)")


def validate_geometry(spacing, direction, dimension, path, n_components=1):
    """Raise ``VolumeError`` naming ``path`` unless the image is a valid 3-D scalar volume."""
    if dimension != 3:
        raise VolumeError(f"{path}: a {dimension}-D image; a 3-D volume is required")
    if n_components != 1:
        raise VolumeError(f"{path}: {n_components} components per voxel; a scalar image is required")
    sp = np.asarray(spacing, dtype=np.float64)
    if not (np.all(np.isfinite(sp)) and np.all(sp > 0)):
        raise VolumeError(f"{path}: invalid spacing {tuple(sp.tolist())}; every spacing must be "
                          f"finite and > 0")
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(d)) or not np.allclose(d @ d.T, np.eye(3), atol=1e-4):
        raise VolumeError(f"{path}: direction matrix {np.round(d, 4).tolist()} is not orthonormal")


def read_nifti(path, check=True):
    """Read a 3-D NIfTI with SimpleITK after checking it is complete and valid.

    Returns ``(image, array)``: the SimpleITK image (its spacing, origin, direction are
    the file's) and its voxels as a NumPy array in SimpleITK order ``(z, y, x)``.
    Raises ``VolumeError`` naming the file for a truncated/corrupt file, a header
    spacing that is zero, negative or not finite, a non-3-D or non-scalar image, a
    non-orthonormal direction, or NaN voxels.
    """
    import SimpleITK as sitk

    path = Path(path)
    if check:
        pix = check_nifti_complete(path).pixdim[:3]
        # SimpleITK quietly replaces a zero pixdim by 1 and a negative one by its absolute
        # value, so the header is checked as written.
        if not (np.all(np.isfinite(pix)) and np.all(pix > 0)):
            raise VolumeError(f"{path}: invalid spacing {tuple(pix.tolist())} in the header "
                              f"(pixdim); every spacing must be finite and > 0")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise VolumeError(f"{path}: SimpleITK cannot read it: {msg}") from e
    validate_geometry(img.GetSpacing(), img.GetDirection(), img.GetDimension(), path,
                      img.GetNumberOfComponentsPerPixel())
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise VolumeError(f"{path}: {int(np.isnan(arr).sum())} NaN voxels")
    return img, arr


def volume_suffix(path) -> str:
    """The full extension of a volume file (`VOLUME_SUFFIXES`, any case): '.nii.gz',
    '.nii', '.npy', '.b2nd', or '' if none."""
    name = str(path).lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def npy_header(raw: bytes, path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data offset)`` of a ``.npy`` file from its first bytes."""
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read(f)
    except ValueError as e:
        raise VolumeError(f"{path}: not a readable .npy file ({e})") from None
    return tuple(shape), dtype, fortran, f.tell()


def output_complete(path) -> bool:
    """True when ``path`` exists and holds all the data its header promises: the cheap
    check a resumed run uses instead of mere existence. ``.nii``/``.npy``: the size;
    ``.nii.gz``: the gzip trailer's length field against the header (no decompression;
    written files were fully read back before they got their name)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        suffix = volume_suffix(path)
        with open(path, "rb") as f:
            if suffix == ".npy":
                shape, dtype, _, offset = npy_header(f.read(65546), path)
                return size >= offset + math.prod(shape) * dtype.itemsize
            if suffix == ".nii":
                return size >= _nifti_data_bytes(parse_nifti_header(f.read(540), path))
            if suffix == ".b2nd":
                return b2nd_complete(path)
            if suffix == ".nii.gz":
                f.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", f.read(4))[0]  # uncompressed length mod 2**32
                return isize == _nifti_data_bytes(read_nifti_header(path)) % 2**32
        return size > 0
    except (OSError, EOFError, ValueError, struct.error):
        return False


def verify_volume_file(path) -> None:
    """Read a just-written volume back: raise ``WriteError`` unless it is complete."""
    path = Path(path)
    try:
        if volume_suffix(path) in (".nii", ".nii.gz"):
            check_nifti_complete(path)
        elif not output_complete(path):
            raise VolumeError(f"{path}: shorter than its header says")
    except VolumeError as e:
        raise WriteError(errno.EIO, f"{path} was not written completely ({e}); is the disk "
                                    f"full? {free_space(path)}") from None


# ----------------------------------------------------------------------------- .b2nd sub-volumes
#
# A sub-volume as a blosc2 NDArray (one contiguous frame per file): the voxels stored as a
# C-ordered (z, y, x) array, which is nibabel's (x, y, z) in Fortran order like the other
# formats; chunks of the full depth by 48 x 48 in-plane, blocks (what blosc2 decodes) of
# the full depth by 24 x 24, LZ4HC level 5 with bit-shuffle: the layout measured best for
# the published views (benchmarks/bench_loader.py --layouts), 0.8x the bytes of .nii.gz.
# A view reads only the chunks under its base crop. blosc2 stores no checksums (a flipped
# bit decodes silently to wrong voxels, a damaged chunk header can read as zeros), so the
# file carries a CRC-32 of every compressed chunk in its metadata, with the expected
# shape, layout, dtype and geometry; every read checks the chunks it decodes.

B2ND_CHUNK_XY, B2ND_BLOCK_XY, B2ND_CLEVEL = 48, 24, 5
_B2ND_META, _B2ND_VERSION = "desd", 1
_FRAME_MAGIC = b"b2frame\x00"


def require_blosc2():
    try:
        import blosc2
    except ImportError:
        raise ValueError("the .b2nd format needs the blosc2 package: pip install blosc2") from None
    return blosc2


try:  # ISA-L's CRC-32 is several times faster than zlib's (same polynomial, same values)
    from isal.isal_zlib import crc32 as _isal_crc32
except ImportError:  # pragma: no cover - depends on the environment
    _isal_crc32 = None
_AVX_CLEAR = np.zeros(16, np.float32)


def _crc32(data) -> int:
    if _isal_crc32 is None:
        return zlib.crc32(data)
    value = _isal_crc32(data)
    # ISA-L leaves the upper AVX-512 register state dirty, which made the bit-shuffle decode
    # that follows 0.25 ms slower on the benchmark's CPU; a tiny NumPy loop clears it.
    np.add(_AVX_CLEAR, _AVX_CLEAR, out=_AVX_CLEAR)
    return value


def _frame_length(head: bytes) -> int | None:
    """The length a blosc2 contiguous frame declares in its header (msgpack: fixarray,
    "b2frame\\0", int32 header length, uint64 frame length), or None."""
    if len(head) < 24 or head[2:10] != _FRAME_MAGIC or head[10] != 0xD2 or head[15] != 0xCF:
        return None
    return int.from_bytes(head[16:24], "big")


def write_b2nd(array_xyz, path, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), *, chunk_xy=B2ND_CHUNK_XY,
               block_xy=B2ND_BLOCK_XY, codec="LZ4HC", clevel=B2ND_CLEVEL,
               filters=("BITSHUFFLE",)) -> None:
    """Atomically write an ``(x, y, z)`` array as ``.b2nd`` with its geometry (as SimpleITK
    gives it: x, y, z order, direction row-major). The file is read back and compared
    before it gets its name. The layout arguments exist for the benchmark that chose them."""
    blosc2 = require_blosc2()
    a = np.asarray(array_xyz)
    if a.ndim != 3 or a.dtype.kind not in "iuf" or min(a.shape) < 1:
        raise ValueError(f"expected a non-empty 3D numeric array, got {a.shape} of {a.dtype}")
    refuse_non_finite(a, path)  # the readers would refuse the file
    zyx = np.ascontiguousarray(a.transpose(2, 1, 0))
    d, h, w = zyx.shape
    chunks = (d, min(chunk_xy, h), min(chunk_xy, w))
    blocks = (d, min(block_xy, chunks[1]), min(block_xy, chunks[2]))

    def check(tmp):
        if not np.array_equal(B2ndVolume(tmp).read(), a, equal_nan=a.dtype.kind == "f"):
            raise WriteError(errno.EIO, f"{tmp} reads back different from what was written")

    with atomic_output(path, check) as tmp:
        try:
            arr = blosc2.asarray(zyx, chunks=chunks, blocks=blocks, urlpath=str(tmp), mode="w",
                                 cparams=blosc2.CParams(codec=blosc2.Codec[codec], clevel=clevel,
                                                        filters=[blosc2.Filter[f] for f in filters],
                                                        typesize=a.dtype.itemsize, nthreads=1))
            sc = arr.schunk
            arr.vlmeta[_B2ND_META] = {
                "version": _B2ND_VERSION, "shape_zyx": list(zyx.shape), "chunks_zyx": list(chunks),
                "blocks_zyx": list(blocks), "dtype": a.dtype.str,
                "spacing_xyz": [float(v) for v in spacing_xyz],
                "origin_xyz": [float(v) for v in origin], "direction": [float(v) for v in direction],
                "crc32": np.array([_crc32(sc.get_chunk(i)) for i in range(sc.nchunks)],
                                  "<u4").tobytes()}
            del arr, sc
        except RuntimeError as e:  # blosc2 reports a failed write (ENOSPC, EFBIG) only so
            raise WriteError(errno.EIO, f"{tmp} was not written completely (blosc2: {e}); is the "
                                        f"disk full? {free_space(tmp)}") from None


class B2ndVolume:
    """An opened and checked ``.b2nd`` sub-volume: ``shape`` and ``geometry`` from its
    header, ``window(xs, ys, zs)`` decoding only the chunks under the window, ``read()``
    the whole array, both as ``(x, y, z)``. The file is memory-mapped and decoded by one
    thread (one DataLoader worker, one core). Every chunk is checked against its CRC-32
    before its first decode; damage raises VolumeError naming the file."""

    def __init__(self, path):
        blosc2 = require_blosc2()
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise ValueError("empty file")
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            declared = _frame_length(self._buf[:24])
            if declared != size:
                raise ValueError(f"{size} bytes where the frame header declares {declared}"
                                 if declared else "not a blosc2 frame")
            self._arr = blosc2.ndarray_from_cframe(self._buf, copy=False)
            self._arr.schunk.dparams = blosc2.DParams(nthreads=1)
            info = self._arr.vlmeta[_B2ND_META]
            layout_ok = (info["version"] == _B2ND_VERSION
                         and list(self._arr.shape) == list(info["shape_zyx"])
                         and list(self._arr.chunks) == list(info["chunks_zyx"])
                         and list(self._arr.blocks) == list(info["blocks_zyx"])
                         and self._arr.dtype == np.dtype(info["dtype"]))
            self._crcs = np.frombuffer(info["crc32"], dtype="<u4")
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated: blosc2 cannot find the frame's trailer
            raise self._error(f"cannot open it ({type(e).__name__}: {e})") from e
        if not layout_ok or len(self._crcs) != self._arr.schunk.nchunks:
            raise self._error("its array header does not match its metadata")
        self._checked: set[int] = set()
        self.shape = tuple(int(n) for n in self._arr.shape[::-1])
        self.dtype = self._arr.dtype
        self.geometry = {"spacing": tuple(info["spacing_xyz"]), "origin": tuple(info["origin_xyz"]),
                         "direction": tuple(info["direction"])}

    def _error(self, what: str) -> VolumeError:
        return VolumeError(f"cannot read sub-volume {self.path}: {what}. The file is truncated "
                           f"or corrupt; re-create it with splitting_to_patches.py (delete it first)")

    def _decode(self, key, nchunks) -> np.ndarray:
        sc = self._arr.schunk
        for i in map(int, nchunks):
            if i not in self._checked:
                if _crc32(sc.get_chunk(i)) != int(self._crcs[i]):
                    raise self._error(f"chunk {i} of {sc.nchunks} fails its CRC-32 check")
                self._checked.add(i)
        try:
            out = np.asarray(self._arr[key]).transpose(2, 1, 0)
        except Exception as e:
            raise self._error(f"blosc2 cannot decode it ({e})") from e
        refuse_non_finite(out, self.path)
        return out

    def window(self, xs: slice, ys: slice, zs: slice = slice(None)) -> np.ndarray:
        """Voxels ``[xs, ys, zs]`` (step 1) as a new ``(x, y, z)`` array."""
        key = tuple(slice(*s.indices(n)[:2]) for s, n in zip((zs, ys, xs), self._arr.shape))
        if any(k.stop <= k.start for k in key):
            return np.zeros([max(k.stop - k.start, 0) for k in key][::-1], self.dtype)
        return self._decode(key, require_blosc2().get_slice_nchunks(self._arr, key))

    def read(self) -> np.ndarray:
        return self._decode((slice(None),) * 3, range(self._arr.schunk.nchunks))


def b2nd_complete(path) -> bool:
    """Cheap resume check: the file is as long as its frame header declares."""
    try:
        with open(path, "rb") as f:
            return _frame_length(f.read(24)) == os.fstat(f.fileno()).st_size
    except OSError:
        return False


# ----------------------------------------------------------------------------- writing

def write_sitk(image, path, compression_level=1):
    """Atomically write a SimpleITK image; ``.nii.gz`` is gzip-compressed at that level.
    The file is read back before it gets its name: SimpleITK does not raise when a full
    disk cuts its write short."""
    import SimpleITK as sitk

    with atomic_output(path, verify_volume_file) as tmp:
        compress = str(path).endswith(".gz")
        sitk.WriteImage(image, str(tmp), compress, compression_level if compress else -1)


def write_npy(array, path):
    """Atomically write an array as ``.npy``."""
    with atomic_output(path, verify_volume_file) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()

