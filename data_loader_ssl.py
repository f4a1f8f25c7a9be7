"""The DeSD pre-training dataset: reading sub-volumes, making views, intensity augmentation.

docs/method.md §4. One sample is the list ``[global1, global2, local1, ...]`` of float32
tensors shaped ``(1, D, H, W)``. The work is split in three parts so that each can run
where it is cheapest:

* reading (:func:`open_subvolume`): int16 voxels as stored, from ``.nii.gz``, ``.nii``,
  ``.npy`` or ``.b2nd`` (chunked: only the base crop's chunks are decoded); never
  through float64;
* geometry (:func:`make_views`): pad, base crop, per-view crop, flips, bilinear in-plane
  resize; it crops the int16 array first and converts only the crop to float32;
* intensity (docs/method.md §4.5): either in the DataLoader worker with NumPy/SciPy
  (:func:`augment_view_numpy`, ``augment_on="cpu"``, as the release did through
  batchgenerators) or batched on the training device (:class:`BatchIntensityAugment`,
  ``augment_on="device"``). Both are the same random transform.

Randomness: every draw for sample ``i`` comes from
``np.random.default_rng([seed, rank, epoch, i])``, so views do not depend on the number
of workers or their order, differ across ranks and epochs (the release seeded every
rank alike, docs/method.md §7), and a resumed run reproduces them exactly.

Typical use (what main_desd.py does, through ``utils.StepRunner``)::

    ds = DeepLesionSSL(list_file, augment_on="device", seed=seed, rank=rank)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, drop_last=True)
    aug, gen = BatchIntensityAugment(), torch.Generator(device=device)
    for epoch in range(start, epochs):
        ds.set_epoch(epoch)                  # before iter(loader), also with persistent workers
        for i, views in enumerate(loader):
            gen.manual_seed(utils.sub_seed(seed, rank, epoch, i))   # one stream per step
            with torch.no_grad():
                views = aug([v.to(device, non_blocking=True) for v in views], gen)
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

import volume_io
from common import listfile
from models.contract import HU_SCALE

__all__ = [
    "IntensityParams",
    "VIEW_INTENSITY_PARAMS",
    "load_subvolume",
    "open_subvolume",
    "pad_volume",
    "make_views",
    "augment_view_numpy",
    "blur_slices",
    "BatchIntensityAugment",
    "retrieval_pairs",
    "DeepLesionSSL",
]

# Paper constants (docs/method.md §4).
BASE_SCALE = (1.4, 1.8)
GLOBAL_SCALE = (0.8, 1.2)
LOCAL_SCALE = (1.5, 2.0)
FLIP_P = 0.8  # quirk of the release: 0.8, not 0.5

NOISE_STD = (0.0, 0.1)
BLUR_SIGMA = (0.1, 2.0)
BLUR_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
MULT_RANGE = (0.75, 1.25)
ADD_STD = 0.4
CONTRAST_RANGE = (0.75, 1.25)
GAMMA_RANGE = (0.7, 1.5)
GAMMA_EPS = 1e-7  # batchgenerators: (v - min) / (range + 1e-7)
STD_EPS = 1e-8  # batchgenerators: v / (std + 1e-8) * sd when retaining stats


# --------------------------------------------------------------------------- reading

def _as_stored(data: np.ndarray, slope, inter) -> np.ndarray:
    """Voxels as stored; a real scaling (slope not 1 or an offset) is applied in float32."""
    if slope is not None and (slope != 1.0 or (inter or 0.0) != 0.0):
        return data.astype(np.float32) * np.float32(slope) + np.float32(inter or 0.0)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data


def _check_size(available: int, shape, dtype, offset: int) -> None:
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if available < need:
        raise ValueError(f"truncated: {available} bytes, the header needs {need}")


def _map_file(path: str) -> mmap.mmap:
    """Map a whole file read-only. MAP_POPULATE (Linux) maps every page in one call,
    about 0.4 ms per 4 MB sub-volume cheaper than faulting pages in one by one."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        if not hasattr(mmap, "MAP_SHARED"):  # Windows
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                         prot=mmap.PROT_READ)


def _nifti_voxels(buf, path: str) -> np.ndarray:
    info = volume_io.parse_nifti_header(bytes(buf[:540]), path)
    if len(info.shape) != 3:
        raise ValueError(f"expected a 3D image, got shape {info.shape}")
    _check_size(len(buf), info.shape, info.dtype, info.offset)
    data = np.frombuffer(buf, info.dtype, int(np.prod(info.shape)), info.offset)
    return _as_stored(data.reshape(info.shape, order="F"), info.slope, info.inter)


def load_subvolume(path: str) -> np.ndarray:
    """Read one sub-volume as stored: an array in nibabel's ``(x, y, z)`` order.

    ``.nii.gz``/``.nii`` (NIfTI-1 or -2) and ``.npy`` (as ``splitting_to_patches.py
    --format npy`` writes it). Voxels come back in their stored dtype (int16 for this
    pipeline), never through float64; a file with a real intensity scaling
    (``scl_slope`` not 0/1/NaN) comes back scaled in float32. The result may be
    read-only. A truncated or corrupt file, or a float one with NaN or inf voxels,
    raises ``ValueError`` naming the file.
    """
    suffix = volume_io.volume_suffix(path)
    try:
        if suffix == ".npy":
            buf = _map_file(path)
            shape, dtype, fortran, offset = volume_io.npy_header(buf[:65546], path)
            if len(shape) != 3 or dtype.kind not in "iuf":
                raise ValueError(f"expected a 3D numeric array, got shape {shape} of {dtype}")
            _check_size(len(buf), shape, dtype, offset)
            data = np.frombuffer(buf, dtype, int(np.prod(shape)), offset)
            data = data.reshape(shape, order="F" if fortran else "C")
        elif suffix == ".nii.gz":
            with open(path, "rb") as f:
                data = _nifti_voxels(volume_io.gunzip(f.read()), path)
        elif suffix == ".nii":
            data = _nifti_voxels(_map_file(path), path)
        elif suffix == ".b2nd":
            return volume_io.B2ndVolume(path).read()  # reports damage itself
        else:
            raise ValueError(f"unsupported file type (expected one of "
                             f"{volume_io.VOLUME_SUFFIXES})")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise ValueError(f"{int((~np.isfinite(data)).sum())} NaN or inf voxels")
        return data
    except (FileNotFoundError, volume_io.VolumeError):
        raise
    except Exception as e:  # truncated/corrupt files raise EOFError, zlib.error, ValueError...
        raise ValueError(
            f"cannot read sub-volume {path}: {type(e).__name__}: {e}. The file is truncated or "
            f"corrupt; re-create it with splitting_to_patches.py (delete it first) or drop it "
            f"from the list file."
        ) from e


class _InMemory:
    """An ``(x, y, z)`` array with the reader interface of ``volume_io.B2ndVolume``."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def window(self, xs: slice, ys: slice, zs: slice = slice(None)) -> np.ndarray:
        return self.array[xs, ys, zs]


def open_subvolume(path: str):
    """A reader of one sub-volume: ``shape`` (x, y, z) and ``window(xs, ys, zs)``. A
    ``.b2nd`` file decodes only the window's chunks; the other formats are read whole
    (``load_subvolume``; ``.nii``/``.npy`` memory-mapped, so a window touches its pages
    only)."""
    if volume_io.volume_suffix(path) == ".b2nd":
        return volume_io.B2ndVolume(path)
    return _InMemory(load_subvolume(path))


# --------------------------------------------------------------------------- geometry

def pad_volume(vol: np.ndarray, size_dhw: Sequence[int]) -> np.ndarray:
    """Zero-pad an ``(x, y, z)`` volume to at least ``(H, W, D)`` = size_dhw's (1, 2, 0).

    As published: x and y padded at the end, z split evenly (the extra slice after).
    Returns ``vol`` itself when it is large enough.
    """
    d, h, w = size_dhw
    mx, my, mz = max(h - vol.shape[0], 0), max(w - vol.shape[1], 0), max(d - vol.shape[2], 0)
    if not (mx or my or mz):
        return vol
    return np.pad(vol, ((0, mx), (0, my), (mz // 2, mz - mz // 2)), mode="constant")


def _scaled_size(n: int, lo: float, hi: float, limit: int, rng: np.random.Generator) -> int:
    """Crop size ``int(n * s)``, s ~ U(lo, hi); s = 1 when the scaled size reaches ``limit``."""
    size = int(n * rng.uniform(lo, hi))
    return n if size >= limit else size


def _one_view(base, size_dhw, scale, rng) -> torch.Tensor:
    """Crop one view from the (padded) base crop ``base`` (x, y, z); returns (1, D, H, W)."""
    d, h, w = size_dhw
    bh, bw, depth = base.shape
    sh = _scaled_size(h, *scale, bh, rng)
    sw = _scaled_size(w, *scale, bw, rng)
    z0 = int(rng.integers(0, depth - d + 1))
    x1 = int(rng.integers(0, bh - sh + 1))
    y1 = int(rng.integers(0, bw - sw + 1))
    flip = rng.random(3) < FLIP_P
    crop = base[x1:x1 + sh, y1:y1 + sw, z0:z0 + d].transpose(2, 0, 1)  # (z, x, y) = (D, H, W)
    crop = crop[tuple(slice(None, None, -1) if f else slice(None) for f in flip)]
    # Cast only the crop, straight into a (D, H, W) C-ordered array; dividing by 1024 is
    # exact in float32 (a power of two).
    arr = np.empty(crop.shape, dtype=np.float32)
    np.multiply(crop, np.float32(1.0 / HU_SCALE), out=arr)
    t = torch.from_numpy(arr).unsqueeze(0)
    if (sh, sw) != (h, w):
        # Every depth slice resized alike (depth as channels), half-pixel centres, no
        # anti-aliasing: OpenCV's INTER_LINEAR as the release used it. A size already
        # equal to the target is the identity under align_corners=False, so it is skipped.
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return t


def make_views(
    vol,
    rng: np.random.Generator,
    global_crop_size: Sequence[int] = (16, 96, 96),
    local_crop_size: Sequence[int] = (16, 48, 48),
    local_crops_number: int = 0,
) -> list[torch.Tensor]:
    """docs/method.md §4 steps 1-4 on an ``(x, y, z)`` volume: float32 views ``(1, D, H, W)``
    in HU/1024.

    ``vol`` is an array or a reader (``open_subvolume``). The base crop (full depth,
    in-plane ``H·s``, s ~ U(1.4, 1.8)) is drawn from the shape alone, then only its window
    is read and padded as the whole volume would have been (x, y at the end, z evenly), so
    every format gives the same views for the same draws.
    """
    src = vol if hasattr(vol, "window") else _InMemory(np.asarray(vol))
    nx, ny, nz = src.shape
    d, gh, gw = global_crop_size
    px, py, pz = max(nx, gh), max(ny, gw), max(nz, d)  # the padded volume's shape
    bh = _scaled_size(gh, *BASE_SCALE, px, rng)
    bw = _scaled_size(gw, *BASE_SCALE, py, rng)
    x0 = int(rng.integers(0, px - bh + 1))
    y0 = int(rng.integers(0, py - bw + 1))
    base = src.window(slice(x0, min(x0 + bh, nx)), slice(y0, min(y0 + bw, ny)), slice(None))
    base = pad_volume(base, (pz, bh, bw))  # the padded volume's window
    specs = [(global_crop_size, GLOBAL_SCALE)] * 2 + [(local_crop_size, LOCAL_SCALE)] * local_crops_number
    return [_one_view(base, size, scale, rng) for size, scale in specs]


# --------------------------------------------------------------------------- intensity

@dataclass(frozen=True)
class IntensityParams:
    """Per-view-type probabilities of docs/method.md §4.5 (noise and contrast are always
    applied)."""

    blur_p_sample: float
    blur_p_slice: float
    mult_p: float
    add_p_sample: float
    add_p_slice: float
    gamma_p: float


# Index 0: global view 1, 1: global view 2, 2: every local view.
VIEW_INTENSITY_PARAMS = (
    IntensityParams(blur_p_sample=0.8, blur_p_slice=0.8, mult_p=0.8, add_p_sample=0.8, add_p_slice=0.8, gamma_p=0.8),
    IntensityParams(blur_p_sample=0.8, blur_p_slice=0.5, mult_p=1.0, add_p_sample=0.5, add_p_slice=0.8, gamma_p=1.0),
    IntensityParams(blur_p_sample=0.5, blur_p_slice=0.8, mult_p=1.0, add_p_sample=0.8, add_p_slice=0.8, gamma_p=0.8),
)


def _params_for_view(k: int) -> IntensityParams:
    return VIEW_INTENSITY_PARAMS[min(k, 2)]


def _split_range_np(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """batchgenerators' contrast/gamma factor: half the time U(lo, 1), else U(1, hi)."""
    low = rng.random(n) < 0.5
    return np.where(low, rng.uniform(lo, 1.0, n), rng.uniform(1.0, hi, n))


def augment_view_numpy(
    view: np.ndarray,
    params: IntensityParams,
    rng: np.random.Generator,
    per_slice: bool = True,
) -> np.ndarray:
    """docs/method.md §4.5 on one view ``(D, H, W)`` float32, as the release ran it
    (batchgenerators).

    Order: noise, blur, multiplicative brightness, additive brightness, contrast, gamma.
    ``per_slice=True`` is the release's quirk: the depth slices were the library's
    *channels*, so each slice gets its own draws and statistics (only the noise std is
    one per view). ``per_slice=False``: one draw per view for every slice and statistics
    over the whole view (the blur stays a 2D in-plane blur with one σ for all slices;
    the additive offset is then gated by its per-sample probability only).
    Returns a new float32 array.
    """
    x = np.array(view, dtype=np.float32, copy=True)
    d = x.shape[0]
    n = d if per_slice else 1
    axes = (1, 2) if per_slice else (0, 1, 2)

    def per(v):  # broadcast per-slice (or per-view) values over (D, H, W)
        return np.asarray(v, dtype=np.float32).reshape(-1, 1, 1)

    # Gaussian noise: one std per view, per-voxel noise (the "variance" is used as std).
    std = rng.uniform(*NOISE_STD)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)

    # Gaussian blur: 2D in-plane, per slice σ (and p_slice), scipy's 'reflect', truncate 4.
    if rng.random() < params.blur_p_sample:
        sigma = np.broadcast_to(rng.uniform(*BLUR_SIGMA, n), d)
        do = rng.random(n) < params.blur_p_slice if per_slice else np.ones(1, bool)
        do = np.broadcast_to(do, d)
        for z in np.flatnonzero(do):
            x[z] = gaussian_filter(x[z], float(sigma[z]), mode="reflect", truncate=BLUR_TRUNCATE)

    if rng.random() < params.mult_p:
        x *= per(rng.uniform(*MULT_RANGE, n))

    if rng.random() < params.add_p_sample:
        offset = rng.normal(0.0, ADD_STD, n)
        if per_slice:
            offset = offset * (rng.random(n) < params.add_p_slice)
        x += per(offset)

    # Contrast around the mean, clipped to the pre-transform range (preserve_range).
    factor = per(_split_range_np(rng, *CONTRAST_RANGE, n))
    mn = x.mean(axis=axes, keepdims=True)
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    x = np.clip((x - mn) * factor + mn, lo, hi)

    # Gamma on (v - min)/range, rescaled, then mean and std restored (retain_stats).
    if rng.random() < params.gamma_p:
        gamma = per(_split_range_np(rng, *GAMMA_RANGE, n))
        mn = x.mean(axis=axes, keepdims=True)
        sd = x.std(axis=axes, keepdims=True)
        lo = x.min(axis=axes, keepdims=True)
        rnge = x.max(axis=axes, keepdims=True) - lo
        x = np.power((x - lo) / (rnge + np.float32(GAMMA_EPS)), gamma) * rnge + lo
        x = x - x.mean(axis=axes, keepdims=True)
        x = x / (x.std(axis=axes, keepdims=True) + np.float32(STD_EPS)) * sd + mn
    return x.astype(np.float32, copy=False)


def _reflect_pad(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Pad ``dim`` by ``pad`` on both sides as scipy's 'reflect' (half-sample symmetric,
    edge repeated: ``d c b a | a b c d | d c b a``).

    torch's own 'reflect' is scipy's 'mirror' (edge not repeated), hence this. The
    general case gathers indices of period 2n (pads wider than the signal are handled
    as scipy does); the common case is the same gather written as two flipped slices,
    which is several times faster on CPU along the last dimension.
    """
    n = x.shape[dim]
    if pad <= n:
        return torch.cat([x.narrow(dim, 0, pad).flip(dim), x, x.narrow(dim, n - pad, pad).flip(dim)], dim)
    idx = torch.arange(-pad, n + pad, device=x.device) % (2 * n)
    return x.index_select(dim, torch.where(idx >= n, 2 * n - 1 - idx, idx))


def _gaussian_kernels(sigma: torch.Tensor, active: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-row 1-D Gaussian kernels ``(N, 2·radius+1)`` like scipy's (truncated at 4σ).

    Kernels of rows with ``active`` False are the identity (a centred one).
    """
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    sig = sigma.unsqueeze(-1)
    own_radius = torch.floor(BLUR_TRUNCATE * sig + 0.5)  # scipy: int(truncate * sd + 0.5)
    w = torch.exp(-0.5 * (taps / sig) ** 2) * (taps.abs() <= own_radius)
    w = w / w.sum(-1, keepdim=True)
    identity = (taps == 0).to(w.dtype)
    return torch.where(active.unsqueeze(-1), w, identity)


def blur_slices(x: torch.Tensor, sigma: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """2D Gaussian blur of every slice of ``x`` ``(N, S, H, W)`` with its own σ ``(N, S)``.

    Equal to ``scipy.ndimage.gaussian_filter(slice, σ, mode='reflect', truncate=4)`` for
    slices with ``active`` True; others pass through. Separable grouped convolutions with
    kernels padded to the largest radius σ's range allows (fixed, so no host sync).
    """
    n, s, h, w = x.shape
    radius = int(BLUR_TRUNCATE * BLUR_SIGMA[1] + 0.5)
    k = _gaussian_kernels(sigma.reshape(-1).to(x.dtype), active.reshape(-1), radius)
    groups = n * s
    y = x.reshape(1, groups, h, w)
    y = _reflect_pad(y, 2, radius)
    y = F.conv2d(y, k.view(groups, 1, -1, 1), groups=groups)
    y = _reflect_pad(y, 3, radius)
    y = F.conv2d(y, k.view(groups, 1, 1, -1), groups=groups)
    return y.view(n, s, h, w)


def _std_mean(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Population std and mean over ``dims`` (two passes; faster than std_mean on CPU)."""
    mn = x.mean(dims, keepdim=True)
    return (x - mn).square_().mean(dims, keepdim=True).sqrt_(), mn


class BatchIntensityAugment:
    """docs/method.md §4.5 as vectorised tensor operations over a whole batch, on the
    batch's device.

    ``aug(views, generator)``: ``views[k]`` is the batched view k, shape (B, 1, D, H, W)
    (k = 0 global 1, k = 1 global 2, k >= 2 local views); every random draw comes from
    ``generator`` (a ``torch.Generator`` on the views' device). The same transform as
    :func:`augment_view_numpy` (same order, probabilities, per-slice draws and
    statistics); no Python loop over samples or slices and no host synchronisation, so
    it can run asynchronously on a GPU. Keeps float32; use under ``torch.no_grad()``.
    """

    def __init__(self, per_slice: bool = True):
        self.per_slice = per_slice

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        return [self.augment(v, _params_for_view(k), generator) for k, v in enumerate(views)]

    def augment(self, x: torch.Tensor, params: IntensityParams, g: torch.Generator) -> torch.Tensor:
        """One batched view (B, C, D, H, W); channels and depth slices are all 'slices'."""
        shape = x.shape
        b, h, w = shape[0], shape[-2], shape[-1]
        x = x.reshape(b, -1, h, w).float()
        s = x.shape[1]
        n = s if self.per_slice else 1
        dims = (2, 3) if self.per_slice else (1, 2, 3)
        dev = x.device

        def rand(*size):
            return torch.rand(size, generator=g, device=dev)

        def uniform(lo, hi, *size):
            return lo + (hi - lo) * rand(*size)

        def split_range(lo, hi):
            return torch.where(rand(b, n) < 0.5, uniform(lo, 1.0, b, n), uniform(1.0, hi, b, n))

        def per(v):  # (B, n) -> broadcastable over (B, S, H, W)
            return v.view(b, n, 1, 1)

        # After the first operation x is a fresh tensor, so in-place updates are safe;
        # they save a full-batch allocation each (these ops are memory-bound).
        std = uniform(*NOISE_STD, b, 1, 1, 1)
        x = torch.randn(x.shape, generator=g, device=dev).mul_(std).add_(x)

        blur = rand(b, 1) < params.blur_p_sample
        if self.per_slice:
            blur = blur & (rand(b, n) < params.blur_p_slice)
        sigma = uniform(*BLUR_SIGMA, b, n)
        x = blur_slices(x, sigma.expand(b, s), blur.expand(b, s))

        mult = torch.where(rand(b, 1) < params.mult_p, uniform(*MULT_RANGE, b, n), 1.0)
        x.mul_(per(mult))

        add = rand(b, 1) < params.add_p_sample
        if self.per_slice:
            add = add & (rand(b, n) < params.add_p_slice)
        offset = torch.randn((b, n), generator=g, device=dev) * ADD_STD * add
        x.add_(per(offset))

        factor = per(split_range(*CONTRAST_RANGE))
        mn = x.mean(dims, keepdim=True)
        lo = x.amin(dims, keepdim=True)
        hi = x.amax(dims, keepdim=True)
        x.sub_(mn).mul_(factor).add_(mn).clamp_(lo, hi)

        apply = (rand(b, 1) < params.gamma_p).view(b, 1, 1, 1)
        gamma = per(split_range(*GAMMA_RANGE))
        sd, mn = _std_mean(x, dims)
        lo = x.amin(dims, keepdim=True)
        rnge = x.amax(dims, keepdim=True) - lo
        # v ** gamma as exp(gamma * log v): vectorised on CPU (a tensor exponent is not);
        # v = 0 gives exp(-inf) = 0 as the power does.
        y = (x - lo).div_(rnge + GAMMA_EPS).log_().mul_(gamma).exp_().mul_(rnge).add_(lo)
        y_sd, y_mn = _std_mean(y, dims)
        y.sub_(y_mn).div_(y_sd + STD_EPS).mul_(sd).add_(mn)
        x = torch.where(apply, y, x)
        return x.reshape(shape)


# --------------------------------------------------------------------------- view retrieval

def retrieval_pairs(paths: Sequence[str], crop_size: Sequence[int] = (16, 96, 96), seed: int = 0,
                    per_slice: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of every sub-volume for the view-retrieval signal (`common.retrieval.view_retrieval`):
    one global view made as in training (base crop, crop, flips, resize) and two
    independent draws of the training's intensity augmentation on it (the view-1 and
    view-2 parameters). Deterministic: sample i draws from ``default_rng([seed, i])``.
    Returns two float32 tensors ``[N, 1, D, H, W]``.

    The same crop for both, because what a short pre-training learns first is invariance
    to the intensity augmentation: with the trainer's two differently cropped and flipped
    views, random and trained encoders both sit near chance after a few hundred steps.
    """
    out_a, out_b = [], []
    for i, path in enumerate(paths):
        rng = np.random.default_rng([seed, i])
        view = make_views(open_subvolume(path), rng, crop_size, crop_size, 0)[0][0].numpy()
        for k, out in enumerate((out_a, out_b)):
            out.append(torch.from_numpy(augment_view_numpy(view, VIEW_INTENSITY_PARAMS[k], rng,
                                                           per_slice))[None])
    return torch.stack(out_a), torch.stack(out_b)


# --------------------------------------------------------------------------- dataset

class DeepLesionSSL(torch.utils.data.Dataset):
    """Sub-volumes named by a list file; each item is ``[global1, global2, local1, ...]``.

    Args:
        list_file: one sub-volume per line (``.nii.gz``, ``.nii`` or ``.npy``), each
            relative to the list file's folder (``listfile.read_list_file``).
        global_crop_size: (D, H, W) of the two global views; the volume is padded to it.
        local_crop_size: (D, H, W) of the local views (not larger than the global size).
        local_crops_number: number of local views (0 in the published run).
        augment_on: "cpu" applies the intensity transforms here (in the worker);
            "device" returns the geometric views only, for :class:`BatchIntensityAugment`.
        per_slice: per-depth-slice intensity draws as published (False: per view).
        seed, rank: sample i of epoch e draws from ``default_rng([seed, rank, e, i])``.
    """

    def __init__(
        self,
        list_file: str,
        global_crop_size: Sequence[int] = (16, 96, 96),
        local_crop_size: Sequence[int] = (16, 48, 48),
        local_crops_number: int = 0,
        augment_on: str = "cpu",
        per_slice: bool = True,
        seed: int = 0,
        rank: int = 0,
    ):
        if augment_on not in ("cpu", "device"):
            raise ValueError(f"augment_on must be 'cpu' or 'device', got {augment_on!r}")
        self.global_crop_size = tuple(int(v) for v in global_crop_size)
        self.local_crop_size = tuple(int(v) for v in local_crop_size)
        if len(self.global_crop_size) != 3 or len(self.local_crop_size) != 3:
            raise ValueError("crop sizes are (D, H, W)")
        if any(lc > gc for lc, gc in zip(self.local_crop_size, self.global_crop_size)):
            raise ValueError(
                f"local crop size {self.local_crop_size} must not exceed the global crop size "
                f"{self.global_crop_size} in any dimension"
            )
        self.paths = listfile.read_list_file(list_file)
        self.local_crops_number = int(local_crops_number)
        self.augment_on = augment_on
        self.per_slice = per_slice
        self.seed = int(seed)
        self.rank = int(rank)
        # Shared memory, so set_epoch reaches persistent DataLoader workers too.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draws; call before ``iter(loader)`` of that epoch."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, int(i)])
        vol = open_subvolume(self.paths[i])
        views = make_views(vol, rng, self.global_crop_size, self.local_crop_size, self.local_crops_number)
        if self.augment_on == "cpu":
            views = [
                torch.from_numpy(augment_view_numpy(v[0].numpy(), _params_for_view(k), rng, self.per_slice))[None]
                for k, v in enumerate(views)
            ]
        return views
