"""What the pipeline's scripts share: checked reading, one atomic write, the list-file rule,
the worker pool, labelled cases for fine-tuning and probes, and command-line conventions.

- ``read_nifti(path)`` reads a NIfTI with SimpleITK only after checking that the whole
  file is there (SimpleITK silently fills the missing voxels of a truncated ``.nii.gz``
  with zeros) and that its geometry is valid; ``parse_nifti_header`` is the one parser of
  NIfTI headers, also used by the dataset's fast int16 reader. Problems raise
  ``VolumeError`` naming the file.
- ``atomic_output(path)`` / ``atomic_write(path, mode)``: every file of the
  project is written under a temporary name in the same folder
  (``.<name>.tmp-<pid><ext>``), proved complete (the NIfTI and ``.npy``
  writers read their output back, because SimpleITK does not raise on a short write to
  a full disk), fsynced and renamed into place. A killed or failed write never leaves a
  file under its final name; ``remove_stale_temps`` deletes a dead run's leftovers.
  ``output_complete`` is the cheap check a resumed run uses instead of mere existence.
- The list file: one sub-volume per line, each path relative to the list file's own
  folder (absolute paths stay absolute). ``write_list_file`` and ``read_list_file`` are
  the only writer and reader of that rule.
- ``run_tasks(...)``: one function over many inputs with ``--num_workers`` processes;
  every result is collected, a tqdm bar advances on completions, a summary is printed and
  failed/excluded inputs are listed in ``<out_dir>/<script>_failures.txt``. Workers exit
  when their parent dies, even by SIGKILL.
- ``load_cases``/``random_patch``: an MSD-style labelled folder prepared like the
  pre-training data (1 mm, clipped HU) and cached, for the fine-tuning example and the
  probes.
- ``bool_flag``, ``int_at_least``, ``float_in``, ``add_batch_args``: one command-line
  convention for every script (booleans as ``--flag [True|False]``, ranges checked by
  argparse so that a bad value stops before any work).

No torch here: the preprocessing workers do not pay for importing it.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import math
import mmap
import multiprocessing as mp
import os
import shutil
import struct
import sys
import threading
import time
import zlib
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np

try:  # ISA-L's gzip: about 2x faster decompression of CT volumes (bench_loader.py); zlib otherwise
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - depends on the environment
    import gzip as _gzip


def gunzip(raw: bytes) -> bytes:
    """Whole gzip decompression with its CRC and length checks (a truncated stream raises)."""
    return _gzip.decompress(raw)

DONE, SKIPPED, EXCLUDED, FAILED = "done", "skipped", "excluded", "failed"
TEMP_MARK = ".tmp-"
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy", ".b2nd")
_CHUNK = 1 << 22


class VolumeError(ValueError):
    """An input file is unreadable, incomplete or has an invalid geometry."""


class Excluded(Exception):
    """An input that is valid but that the published recipe produces nothing from."""


class WriteError(OSError):
    """A file could not be written completely (a full disk, a quota, a size limit)."""


# ----------------------------------------------------------------------------- command line

def bool_flag(s: str) -> bool:
    """argparse type for the published `--flag True/False` style (on/off, 1/0, yes/no too)."""
    if s.lower() in {"off", "false", "0", "no"}:
        return False
    if s.lower() in {"on", "true", "1", "yes"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value {s!r} for a boolean flag (use True or False)")


# keyword arguments of every boolean flag: `--flag` alone means True, `--flag False` off
BOOL = dict(type=bool_flag, nargs="?", const=True, metavar="BOOL")


def int_at_least(low: int):
    """argparse type: an integer >= `low`."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False):
    """argparse type: a finite float in [low, high] (or (low, high] with `low_open`)."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
        if not ok:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {s}")
        return v
    parse.__name__ = "number"
    return parse


def add_batch_args(parser, compression=False):
    """The flags every preprocessing stage shares: --num_workers (alias --workers),
    --overwrite and, for stages that write gzip, --compression_level."""
    parser.add_argument("--num_workers", "--workers", type=int_at_least(1),
                        default=default_workers(),
                        help="Worker processes, each holding one volume at a time (default: "
                             "this machine's cores); 1 runs everything in this process.")
    parser.add_argument("--overwrite", default=False, **BOOL,
                        help="Redo outputs that already exist instead of skipping them.")
    if compression:
        parser.add_argument("--compression_level", type=int, default=1, choices=range(1, 10),
                            metavar="{1..9}",
                            help="gzip level of .nii.gz outputs: 1 is fastest, 9 a few %% smaller.")


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
    """The full extension of a volume file: '.nii.gz', '.nii', '.npy', or '' if none."""
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
                                    f"full? {_free_space(path)}") from None


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
    zyx = np.ascontiguousarray(a.transpose(2, 1, 0))
    d, h, w = zyx.shape
    chunks = (d, min(chunk_xy, h), min(chunk_xy, w))
    blocks = (d, min(block_xy, chunks[1]), min(block_xy, chunks[2]))

    def check(tmp):
        if not np.array_equal(B2ndVolume(tmp).read(), a):
            raise WriteError(errno.EIO, f"{tmp} reads back different from what was written")

    with atomic_output(path, check) as tmp:
        arr = blosc2.asarray(zyx, chunks=chunks, blocks=blocks, urlpath=str(tmp), mode="w",
                             cparams=blosc2.CParams(codec=blosc2.Codec[codec], clevel=clevel,
                                                    filters=[blosc2.Filter[f] for f in filters],
                                                    typesize=a.dtype.itemsize, nthreads=1))
        sc = arr.schunk
        arr.vlmeta[_B2ND_META] = {
            "version": _B2ND_VERSION, "shape_zyx": list(zyx.shape), "chunks_zyx": list(chunks),
            "blocks_zyx": list(blocks), "dtype": a.dtype.str,
            "spacing_xyz": [float(v) for v in spacing_xyz], "origin_xyz": [float(v) for v in origin],
            "direction": [float(v) for v in direction],
            "crc32": np.array([_crc32(sc.get_chunk(i)) for i in range(sc.nchunks)], "<u4").tobytes()}
        del arr, sc


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
            return np.asarray(self._arr[key]).transpose(2, 1, 0)
        except Exception as e:
            raise self._error(f"blosc2 cannot decode it ({e})") from e

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

def is_temp_name(name):
    """True for the temporary names that ``atomic_output`` uses."""
    return name.startswith(".") and TEMP_MARK in name


def temp_path(path):
    """``.<name>.tmp-<pid><ext>``: hidden, tied to this process, with the same extension
    (writers such as SimpleITK and matplotlib choose the format by it)."""
    path = Path(path)
    ext = volume_suffix(path) or path.suffix
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}{ext}")


def _free_space(path) -> str:
    try:
        return f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
    except OSError:
        return ""


def fsync_path(path, directory=False):
    """fsync a file (errors such as ENOSPC propagate) or a directory (best effort)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # e.g. directories on some platforms
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _disk_full_errno(e: BaseException) -> int | None:
    """The errno of a full disk, quota or size limit anywhere in `e`'s chain (torch.save
    replaces the OSError of its write by a RuntimeError of its zip writer)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def atomic_output(path, before_replace=None):
    """Yield a temporary path beside ``path``; when the block succeeds, fsync the file,
    run ``before_replace(tmp)`` (a check that raises if the file is incomplete, or
    keeping the file it replaces) and rename it to ``path``. On any exception the
    temporary file is removed and ``path`` is left untouched; a failed write (full disk,
    quota, size limit) raises ``WriteError`` naming ``path``.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, WriteError):
            raise WriteError(e.errno, str(e).replace(str(tmp), str(path))) from None
        full = _disk_full_errno(e)
        if full is not None:
            raise WriteError(full, f"no space left writing {path} ({os.strerror(full)}; "
                                   f"{_free_space(path)})") from e
        if isinstance(e, RuntimeError) and ("file write failed" in str(e)
                                            or "PytorchStreamWriter failed" in str(e)):
            # torch.save's own zip writer reports a failed write as a RuntimeError
            raise WriteError(errno.EIO, f"could not write {path}: is the disk full? "
                                        f"({_free_space(path)}; {str(e).splitlines()[0]})") from e
        raise
    fsync_path(path.parent, directory=True)


@contextmanager
def atomic_write(path, mode="wb", before_replace=None):
    """Open a temporary file beside ``path`` for writing (``mode`` 'wb' or 'w'); on
    success it is flushed, fsynced and renamed to ``path`` (see ``atomic_output``)."""
    with atomic_output(path, before_replace) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()


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


def write_text(path, text):
    """Atomically write a text file."""
    with atomic_write(path, "w") as f:
        f.write(text)


def remove_stale_temps(folder):
    """Delete temporary files in ``folder`` left by processes that no longer run (a
    killed write); return how many. Files of a live process are left alone."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if is_temp_name(p.name) and p.is_file() and not _pid_alive(_temp_pid(p.name)):
                p.unlink(missing_ok=True)
                n += 1
    return n


def _temp_pid(name: str) -> int | None:
    digits = ""
    for ch in name.rsplit(TEMP_MARK, 1)[-1]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def _pid_alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return pid == os.getpid()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the list file

def write_list_file(list_file, paths) -> list[str]:
    """Write the list file (atomically): one line per path, each relative to the list
    file's folder, sorted. Returns the lines."""
    list_file = Path(list_file)
    base = list_file.resolve().parent
    base.mkdir(parents=True, exist_ok=True)
    lines = sorted(Path(os.path.relpath(Path(p).resolve(), base)).as_posix() for p in paths)
    write_text(list_file, "".join(f"{line}\n" for line in lines))
    return lines


def read_list_file(list_file) -> list[str]:
    """The sub-volumes a list file names, as paths: each line resolved against the list
    file's folder (absolute lines as they are). Raises FileNotFoundError for a missing
    list file or entries, ValueError for an empty list or entries of an unsupported
    type; the message names the first few and the count."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(
            f"list file {list_file} does not exist; write it with splitting_to_patches.py "
            f"(one sub-volume per line, relative to the list file's folder) or pass the "
            f"right path")
    entries = [ln.strip() for ln in list_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not entries:
        raise ValueError(f"list file {list_file} names no sub-volumes; re-run "
                         f"splitting_to_patches.py or check that the preprocessing produced files")
    bad_type = [e for e in entries if not volume_suffix(e)]
    if bad_type:
        raise ValueError(f"list file {list_file} has {len(bad_type)} entries that are not "
                         f"{'/'.join(VOLUME_SUFFIXES)} files, e.g. {', '.join(bad_type[:3])}")
    base = list_file.parent
    paths = [os.path.join(base, e) for e in entries]
    # One directory listing per folder instead of one stat per file (125k files).
    listing: dict[str, set[str]] = {}
    missing = []
    for entry, p in zip(entries, paths):
        folder, name = os.path.split(p)
        if folder not in listing:
            try:
                listing[folder] = set(os.listdir(folder or "."))
            except OSError:
                listing[folder] = set()
        if name not in listing[folder]:
            missing.append(entry)
    if missing:
        raise FileNotFoundError(
            f"list file {list_file} names {len(missing)} of {len(entries)} sub-volumes that do "
            f"not exist, e.g. {', '.join(missing[:5])}; its entries are relative to its own "
            f"folder {base.resolve()}. Re-run splitting_to_patches.py to rewrite the list.")
    return paths


# ----------------------------------------------------------------------------- inputs

def stage_inputs(in_dir, out_dir, stage, previous_step):
    """The sorted ``*.nii.gz`` volumes of ``in_dir`` (names starting with "." skipped),
    with ``out_dir`` created and cleared of a dead run's temporary files; or None after
    saying on stderr why there are none (``previous_step`` names what makes them)."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        print(f"{stage}: input folder {in_dir} does not exist", file=sys.stderr)
        return None
    inputs = sorted(p for p in in_dir.glob("*.nii.gz") if not p.name.startswith("."))
    if not inputs:
        print(f"{stage}: no *.nii.gz volumes in {in_dir} (run {previous_step} first?)",
              file=sys.stderr)
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    return inputs


# ----------------------------------------------------------------------------- the pool

def default_workers():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _call(fn, name, args):
    """Run one task; turn its outcome into ``(name, status, reason)`` (picklable)."""
    try:
        out = fn(*args)
    except Excluded as e:
        return name, EXCLUDED, str(e)
    except Exception as e:  # reported with the input's name; the batch goes on
        msg = str(e) if isinstance(e, (VolumeError, WriteError)) else f"{type(e).__name__}: {e}"
        return name, FAILED, msg
    return name, (out if out in (DONE, SKIPPED) else DONE), ""


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit as soon as the parent is gone (a SIGKILLed parent
    cannot tell its pool to stop). Linux's PR_SET_PDEATHSIG acts at once; a watchdog
    thread polling the parent covers other systems."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


@contextmanager
def _threads_per_worker(n):
    """Cap BLAS/OpenMP threads in the worker processes (they read it when they start)."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.setdefault(k, str(n))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_tasks(fn, tasks, workers, desc, report_path, prior_failures=()):
    """Run ``fn(*args)`` for every ``(name, args)`` in ``tasks`` and report.

    Args:
        fn: a module-level function returning ``DONE`` or ``SKIPPED``; it raises
            ``Excluded`` for an input the recipe produces nothing from and any other
            exception for a failure (its message should name the file).
        tasks: list of ``(name, args)``; ``name`` identifies the input in messages.
        workers: processes; 1 runs everything in this process.
        desc: the progress bar's label (the script's name).
        report_path: where failed/excluded inputs are listed with their reasons.
        prior_failures: ``(name, reason)`` pairs found before any task ran (e.g. a
            series folder missing from the CSV); reported as failures.

    Returns:
        The exit code: 1 when any input failed, else 0.
    """
    from tqdm import tqdm

    results = [(name, FAILED, reason) for name, reason in prior_failures]
    for name, _, reason in results:
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    workers = max(1, min(int(workers), len(tasks))) if tasks else 1
    t0 = time.time()
    with tqdm(total=len(tasks), desc=desc, unit="vol", dynamic_ncols=True) as bar:
        def collect(res):
            results.append(res)
            if res[1] == FAILED:
                tqdm.write(f"FAILED {res[0]}: {res[2]}", file=sys.stderr)
            bar.update(1)

        if workers == 1:
            for name, args in tasks:
                collect(_call(fn, name, args))
        else:
            threads = max(1, default_workers() // workers)
            with _threads_per_worker(threads), ProcessPoolExecutor(
                    workers, mp_context=mp.get_context("spawn"), initializer=_die_with_parent,
                    initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(_call, fn, name, args): name for name, args in tasks}
                for fut in as_completed(futures):
                    try:
                        collect(fut.result())
                    except Exception as e:  # the worker process itself died (e.g. OOM kill)
                        collect((futures[fut], FAILED, f"worker process died: {type(e).__name__}: {e}"))
    counts = {s: sum(1 for r in results if r[1] == s) for s in (DONE, SKIPPED, EXCLUDED, FAILED)}
    print(f"{desc}: {counts[DONE]} done, {counts[SKIPPED]} skipped (already complete), "
          f"{counts[EXCLUDED]} excluded, {counts[FAILED]} failed in {time.time() - t0:.1f} s",
          file=sys.stderr)
    write_report(report_path, desc, results)
    return 1 if counts[FAILED] else 0


def write_report(report_path, desc, results):
    """Write the failed/excluded inputs with reasons to ``report_path`` (or remove it)."""
    report_path = Path(report_path)
    bad = sorted((r for r in results if r[1] in (FAILED, EXCLUDED)), key=lambda r: (r[1], r[0]))
    if not bad:
        report_path.unlink(missing_ok=True)
        return
    report_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {desc}: {len(bad)} of {len(results)} inputs not processed "
             f"({time.strftime('%Y-%m-%d %H:%M:%S')})",
             "# path\tstatus\treason"]
    lines += [f"{name}\t{status}\t{' '.join(reason.split())}" for name, status, reason in bad]
    write_text(report_path, "\n".join(lines) + "\n")
    print(f"{desc}: the {len(bad)} inputs not processed are listed with reasons in {report_path}",
          file=sys.stderr)


# ----------------------------------------------------------------------------- labelled cases

class Case:
    """One preprocessed labelled case: int16 HU and uint8 labels (memory-mapped), and a
    sample of foreground voxel coordinates per class for foreground-centred patches."""

    def __init__(self, name: str, image: np.ndarray, labels: np.ndarray, seed: int):
        self.name, self.image, self.labels = name, image, labels
        rng = np.random.default_rng(seed)
        self.fg: dict[int, np.ndarray] = {}
        for c in np.unique(labels):
            if c == 0:
                continue
            coords = np.argwhere(labels == c)
            if len(coords) > 5000:
                coords = coords[rng.choice(len(coords), 5000, replace=False)]
            self.fg[int(c)] = coords


def list_cases(data_dir) -> list[tuple[str, Path, Path]]:
    """(name, image, label) for every ``imagesTr/*.nii.gz`` of an MSD-style folder (macOS
    ``._*`` files skipped); ValueError naming what is missing."""
    data_dir = Path(data_dir)
    images = sorted(p for p in (data_dir / "imagesTr").glob("*.nii.gz")
                    if not p.name.startswith("._"))
    if not images:
        raise ValueError(f"no imagesTr/*.nii.gz under {data_dir}: the MSD layout is expected "
                         f"(imagesTr/ and labelsTr/ with the same file names)")
    cases = []
    for img in images:
        lab = data_dir / "labelsTr" / img.name
        if not lab.is_file():
            raise ValueError(f"{img} has no label file {lab}")
        cases.append((img.name[:-len(".nii.gz")], img, lab))
    return cases


def prepare_case(image_path, label_path, target_zyx) -> tuple[np.ndarray, np.ndarray]:
    """Read a labelled case and prepare it as the pre-training data were (stage 2):
    resampled to ``target_zyx`` mm (cubic for the image, nearest neighbour for the labels,
    on the same grid) and clipped to the HU range; int16 image, uint8 labels."""
    import re_spacing_ITK  # stage 2 imports this module: imported here, not at the top

    img, hu = read_nifti(image_path)
    _, labels = read_nifti(label_path)
    if hu.shape != labels.shape:
        raise VolumeError(f"{label_path} has shape {labels.shape}, its image {hu.shape}")
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    image = re_spacing_ITK.resample_array(hu, spacing, tuple(target_zyx))
    seg = re_spacing_ITK.resample_labels(labels, spacing, tuple(target_zyx))
    return image.astype(np.int16), seg.astype(np.uint8)


def load_cases(data_dir, cache_dir, target_zyx, seed) -> list[Case]:
    """Prepare every case of ``data_dir`` once into ``cache_dir`` (reused while newer
    than the source) and memory-map it."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (name, img_path, lab_path) in enumerate(tqdm(list_cases(data_dir), desc="preprocess")):
        img_npy, seg_npy = cache_dir / f"{name}_img.npy", cache_dir / f"{name}_seg.npy"
        source_time = max(img_path.stat().st_mtime, lab_path.stat().st_mtime)
        if not (output_complete(img_npy) and output_complete(seg_npy)
                and min(img_npy.stat().st_mtime, seg_npy.stat().st_mtime) >= source_time):
            image, seg = prepare_case(img_path, lab_path, target_zyx)
            write_npy(seg, seg_npy)
            write_npy(image, img_npy)
        cases.append(Case(name, np.load(img_npy, mmap_mode="r"), np.load(seg_npy, mmap_mode="r"),
                          seed + i))
    return cases


def add_labelled_data_args(p, patch_size, synthetic_size, fg_fraction):
    """The data flags of the fine-tuning example and the probes (defaults differ)."""
    p.add_argument("--data_dir", default=None, type=str,
                   help="MSD-style folder (imagesTr/*.nii.gz, labelsTr/*.nii.gz, optional "
                        "dataset.json); without it a synthetic labelled set is generated into "
                        "OUTPUT_DIR")
    p.add_argument("--num_classes", default=None, type=int_at_least(2),
                   help="classes including background (default: from dataset.json, else the "
                        "largest label + 1)")
    p.add_argument("--patch_size", default=tuple(patch_size), type=int_at_least(1), nargs=3,
                   metavar=("D", "H", "W"),
                   help="patch in voxels at 1 mm; the encoder's last stage (D/16 x H/32 x W/32) "
                        "must keep more than one voxel; e.g. 64 128 128 on a GPU")
    p.add_argument("--fg_fraction", default=fg_fraction, type=float_in(0.0, 1.0),
                   help="fraction of patches centred on a foreground voxel of a random class, "
                        "so small organs are seen (0: uniform)")
    p.add_argument("--spacing", default=(1.0, 1.0, 1.0), type=float_in(0.0, 100.0, low_open=True),
                   nargs=3, metavar=("Z", "Y", "X"),
                   help="voxel size in mm the cases are resampled to (pre-training used 1 mm)")
    p.add_argument("--val_fraction", default=1 / 3, type=float_in(0.0, 1.0, low_open=True),
                   help="fraction of the cases (the last ones by name) held out for evaluation")
    p.add_argument("--n_synthetic", default=6, type=int_at_least(2),
                   help="cases in the synthetic set (without --data_dir)")
    p.add_argument("--synthetic_size", default=synthetic_size, type=int_at_least(16),
                   help="in-plane size of the synthetic cases in voxels")
    p.add_argument("--synthetic_slices", default=32, type=int_at_least(8),
                   help="slices per synthetic case")


def labelled_data(args, out_dir) -> tuple[Path, list[Case], list[str]]:
    """``(data folder, prepared cases, class names)`` for the flags of
    ``add_labelled_data_args``: ``--data_dir``, or a synthetic set generated once into
    ``out_dir`` (kept for the same settings). Cases are cached under
    ``out_dir/preprocessed``. Raises ValueError naming the folder when it cannot be used."""
    out_dir = Path(out_dir)
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"--data_dir {data_dir} is not a folder")
    else:
        from synthetic_ct import make_labelled_set
        data_dir = out_dir / (f"synthetic_labelled_n{args.n_synthetic}_s{args.synthetic_size}"
                              f"_z{args.synthetic_slices}_seed{args.seed}")
        if not (data_dir / "dataset.json").is_file():  # written last: its presence means complete
            print(f"no --data_dir: generating {args.n_synthetic} synthetic labelled cases "
                  f"into {data_dir}")
            make_labelled_set(data_dir, n_cases=args.n_synthetic, size=args.synthetic_size,
                              n_slices=args.synthetic_slices, seed=args.seed)
    key = f"{zlib.crc32(str(data_dir.resolve()).encode()):08x}"
    cache = out_dir / "preprocessed" / "_".join([data_dir.name, key, *(f"{s:g}" for s in args.spacing)])
    cases = load_cases(data_dir, cache, args.spacing, args.seed)
    if len(cases) < 2:
        raise ValueError(f"{data_dir} has {len(cases)} case(s); at least 2 are needed "
                         f"(training + held out)")
    max_label = max(int(np.max(c.labels)) for c in cases)
    if max_label == 0:
        raise ValueError(f"the labels in {data_dir / 'labelsTr'} are all background")
    labels = {}
    meta = data_dir / "dataset.json"
    if meta.is_file():
        labels = {int(k): str(v) for k, v in json.loads(meta.read_text()).get("labels", {}).items()
                  if str(k).isdigit()}
    num_classes = args.num_classes or (max(labels) + 1 if labels else 0) or max_label + 1
    if max_label >= num_classes:
        raise ValueError(f"labels in {data_dir} go up to {max_label} but there are "
                         f"{num_classes} classes; pass --num_classes {max_label + 1}")
    return data_dir, cases, [labels.get(c, f"class{c}").replace(",", " ") for c in range(num_classes)]


def split_cases(cases: list, val_fraction: float) -> tuple[list, list]:
    """(training, held out): the last ``val_fraction`` of the cases (at least one each)."""
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    return cases[:-n_val], cases[-n_val:]


def crop_pad(arr: np.ndarray, start: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    """``arr[start : start + size]``, filled with ``fill`` where the window leaves the array."""
    out = np.full(tuple(size), fill, dtype=arr.dtype)
    src = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, size, arr.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out[dst] = arr[src]
    return out


def random_patch(case: Case, patch: Sequence[int], fg_fraction: float, fill: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``(image, labels)`` patch; with probability ``fg_fraction`` centred on a
    voxel of a random foreground class (so small organs are seen). A volume smaller than
    the patch lands at a random place inside it, padded with ``fill`` (image) and 0."""
    bounds = [(min(0, n - p), max(0, n - p)) for n, p in zip(case.image.shape, patch)]
    if case.fg and rng.random() < fg_fraction:
        coords = case.fg[list(case.fg)[rng.integers(len(case.fg))]]
        centre = coords[rng.integers(len(coords))]
        start = [int(np.clip(c - p // 2, lo, hi)) for c, p, (lo, hi) in zip(centre, patch, bounds)]
    else:
        start = [int(rng.integers(lo, hi + 1)) for lo, hi in bounds]
    return crop_pad(case.image, start, patch, fill), crop_pad(case.labels, start, patch, 0)
