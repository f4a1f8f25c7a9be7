"""Shared I/O for the preprocessing scripts (and fine-tuning): checked reads, atomic
writes and the worker pool.

- ``read_nifti(path)`` reads a NIfTI with SimpleITK only after checking that the whole
  file is there: SimpleITK silently fills the missing voxels of a truncated ``.nii.gz``
  with zeros, so the gzip stream is decompressed to its end (CRC included) and the
  voxel bytes are counted against the header. It then validates the geometry: 3-D,
  spacing finite and > 0, direction orthonormal, no NaN voxels (SimpleITK reads them as
  0, so they are counted in the stored data). Any problem raises
  ``VolumeError`` with the file's name.
- ``atomic_output(path)`` gives a temporary name in the same folder
  (``.<name>.tmp-<pid><ext>``); on success the file is fsynced and renamed into place
  with ``os.replace``, so a killed run never leaves a half-written file under the final
  name. Names starting with ``.`` are never taken as outputs, and
  ``remove_stale_temps`` deletes the leftovers of a killed run.
- ``run_tasks(...)`` runs one function over many inputs with ``--workers`` processes
  (1 = in this process), collects every result so that an exception surfaces with its
  input's name, advances a tqdm bar on completions, prints a summary (done / skipped /
  excluded / failed) and writes every failed or excluded input with its reason to
  ``<out_dir>/<script>_failures.txt`` (tab separated: path, status, reason; removed when
  a run has nothing to report). The exit code it returns is 1 when anything failed,
  while the rest of the batch still ran.

No torch here: the preprocessing scripts must not pay for importing it.
"""
import math
import os
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
import multiprocessing as mp

import numpy as np

try:  # optional, about 3x faster gzip decompression; zlib otherwise
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - depends on the environment
    import gzip as _gzip

DONE, SKIPPED, EXCLUDED, FAILED = "done", "skipped", "excluded", "failed"
TEMP_MARK = ".tmp-"
_CHUNK = 1 << 22


class VolumeError(ValueError):
    """An input file is unreadable, incomplete or has an invalid geometry."""


class Excluded(Exception):
    """An input that is valid but that the published recipe produces nothing from."""


# ----------------------------------------------------------------------------- reading

def nifti_ext(path):
    """The full extension of a volume file: '.nii.gz', '.nii' or '.npy'."""
    name = str(path)
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def raw_pixdim(path):
    """``(ndim, pixdim[1:ndim+1])`` exactly as stored in a NIfTI-1/2 header.

    nibabel "fixes" a zero or negative pixdim while loading, so the bytes are parsed here.
    """
    path = Path(path)
    opener = _gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        block = f.read(540)
    for endian in "<>":
        size = struct.unpack(endian + "i", block[:4])[0]
        if size == 348:
            ndim = struct.unpack(endian + "h", block[40:42])[0]
            pix = struct.unpack(endian + "8f", block[76:108])
            break
        if size == 540:
            ndim = struct.unpack(endian + "q", block[16:24])[0]
            pix = struct.unpack(endian + "8d", block[104:168])
            break
    else:
        raise VolumeError(f"{path}: not a NIfTI header (sizeof_hdr is neither 348 nor 540)")
    return ndim, np.asarray(pix[1:1 + max(0, min(ndim, 7))], dtype=np.float64)


def check_nifti_complete(path):
    """Raise ``VolumeError`` unless ``path`` holds every voxel byte its header promises.

    For ``.nii.gz`` the whole gzip stream is decompressed (which also verifies its CRC);
    for ``.nii`` the file size is compared. Returns the header (a nibabel header).
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = img.header.get_data_shape()
        expected = int(img.dataobj.offset) + math.prod(shape) * img.get_data_dtype().itemsize
    except Exception as e:
        raise VolumeError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if str(path).endswith(".gz"):
        got = 0
        buf = bytearray(_CHUNK)
        try:
            with _gzip.open(path, "rb") as f:
                while n := f.readinto(buf):
                    got += n
        except EOFError as e:
            raise VolumeError(f"{path}: truncated gzip stream (the file was cut short; "
                              f"re-create or re-download it)") from e
        except Exception as e:
            raise VolumeError(f"{path}: corrupt gzip data ({type(e).__name__}: {e})") from e
    else:
        got = path.stat().st_size
    if got < expected:
        raise VolumeError(f"{path}: truncated: {got} bytes of image data where the header "
                          f"({'x'.join(map(str, shape))} {img.get_data_dtype()}) needs {expected}")
    if img.get_data_dtype().kind == "f":
        # SimpleITK reads NaN voxels as 0, so they are counted in the stored data.
        n_nan = int(np.isnan(np.asanyarray(img.dataobj)).sum())
        if n_nan:
            raise VolumeError(f"{path}: {n_nan} NaN voxels")
    return img.header


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
        check_nifti_complete(path)
        ndim, pix = raw_pixdim(path)
        pix = pix[:3]
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


# ----------------------------------------------------------------------------- writing

def is_temp_name(name):
    """True for the temporary names that ``atomic_output`` uses."""
    return name.startswith(".") and TEMP_MARK in name


def temp_path(path):
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}{nifti_ext(path)}")


def fsync_path(path, directory=False):
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent, directory=True)


def write_sitk(image, path, compression_level=1):
    """Atomically write a SimpleITK image; ``.nii.gz`` is gzip-compressed at that level."""
    import SimpleITK as sitk

    with atomic_output(path) as tmp:
        compress = str(path).endswith(".gz")
        sitk.WriteImage(image, str(tmp), compress, compression_level if compress else -1)


def write_npy(array, path):
    """Atomically write an array as ``.npy``."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()


def write_text(path, text):
    """Atomically write a text file."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()


def add_batch_args(parser, compression=False):
    """The flags every preprocessing stage shares: --workers, --overwrite and, for stages
    that write gzip, --compression_level."""
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="Worker processes (default: all cores); 1 runs in this process. "
                             "Each worker holds one volume at a time.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Redo outputs that already exist (default: skip them).")
    if compression:
        parser.add_argument("--compression_level", type=int, default=1, choices=range(1, 10),
                            metavar="{1..9}",
                            help="gzip level of .nii.gz outputs: 1 is fastest, 9 a few %% smaller.")


def input_volumes(in_dir, stage, previous_step):
    """The sorted ``*.nii.gz`` volumes of ``in_dir`` (names starting with "." skipped), or
    None after saying on stderr why there are none (``previous_step`` names what makes them)."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        print(f"{stage}: input folder {in_dir} does not exist", file=sys.stderr)
        return None
    inputs = sorted(p for p in in_dir.glob("*.nii.gz") if not p.name.startswith("."))
    if not inputs:
        print(f"{stage}: no *.nii.gz volumes in {in_dir} (run {previous_step} first?)",
              file=sys.stderr)
        return None
    return inputs


def remove_stale_temps(folder):
    """Delete temporary files left by a killed run in ``folder``; return how many."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if is_temp_name(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


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
        msg = str(e) if isinstance(e, VolumeError) else f"{type(e).__name__}: {e}"
        return name, FAILED, msg
    return name, (out if out in (DONE, SKIPPED) else DONE), ""


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
                    workers, mp_context=mp.get_context("spawn")) as pool:
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
