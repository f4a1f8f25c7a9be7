"""Resampling as the published stage 2 did it, as pure array functions (no I/O): the
output shape with its quirk, the separable cubic resize equal to scikit-image's, and the
nearest-neighbour label resampling on the same grid. Used by ``re_spacing_ITK.py`` (the
stage) and by the labelled cases of fine-tuning (``common.cases``)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from models.contract import HU_MAX, HU_MIN, SPACING_MM

CLIP_HU = (HU_MIN, HU_MAX)
TARGET_SPACING = SPACING_MM
# A resampled volume larger than this (4 GiB as float32) is refused rather than attempted:
# it comes from a spacing no CT has (e.g. 1e6 mm between slices).
MAX_OUTPUT_VOXELS = 2**30


# ----------------------------------------------------------------------------- pure arrays

def output_shape(shape_zyx, spacing_zyx, target_zyx=TARGET_SPACING):
    """The published output shape: ``(round(z*r_z), int(y*r_y), int(x*r_x))``.

    ``r = spacing / target`` rounded to 4 decimals first (**quirk**: z is rounded, y and
    x are floored).
    """
    r = np.round(np.asarray(spacing_zyx, np.float64) / np.asarray(target_zyx, np.float64), 4)
    nz, ny, nx = shape_zyx
    return int(np.round(nz * r[0])), int(ny * r[1]), int(nx * r[2])


@lru_cache(maxsize=64)
def resize_matrix(n_in, n_out):
    """The ``(n_out, n_in)`` float64 matrix of skimage's 1-D cubic resize along one axis.

    The published ``resize`` is, per axis: a Gaussian pre-smoothing with
    ``sigma = (n_in/n_out - 1)/2`` when the axis shrinks (``gaussian_filter1d``,
    ``mode='mirror'``, truncate 4), then ``ndimage.zoom(order=3, mode='mirror',
    grid_mode=True)``: the cubic B-spline prefilter and sampling at input position
    ``(i + 0.5) * n_in / n_out - 0.5``. Applying those very calls to each unit vector
    gives the matrix columns, boundary handling included.
    """
    from scipy import ndimage as ndi

    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resize {n_in} samples to {n_out}")
    sigma = max(0.0, (n_in / n_out - 1) / 2)
    eye = np.eye(n_in)
    if sigma > 0:
        eye = ndi.gaussian_filter1d(eye, sigma, axis=0, mode="mirror", truncate=4.0)
    if n_in == n_out:  # zoom by 1 is the identity (SciPy returns its input unchanged)
        return np.ascontiguousarray(eye)
    cols = [ndi.zoom(eye[:, j], n_out / n_in, order=3, mode="mirror", grid_mode=True)
            for j in range(n_in)]
    m = np.stack(cols, axis=1)
    assert m.shape == (n_out, n_in), (m.shape, n_in, n_out)
    return m


def resize_array(arr, shape_out, dtype=np.float32):
    """Separable cubic resize of a 3-D array to ``shape_out`` (float ``dtype``, unclipped).

    Equal to ``skimage.transform.resize(arr, shape_out, order=3, mode='reflect',
    preserve_range=True, clip=False)`` up to floating-point rounding. Shrinking axes are
    done first so the products stay small.
    """
    out = np.ascontiguousarray(arr, dtype=dtype)
    for a in sorted(range(3), key=lambda a: shape_out[a] / out.shape[a]):
        n_in, n_out = out.shape[a], shape_out[a]
        if n_in == n_out:
            continue
        m = resize_matrix(n_in, n_out).astype(dtype)
        # Each axis as one (batched) GEMM on contiguous memory.
        if a == 0:
            out = (m @ out.reshape(n_in, -1)).reshape((n_out,) + out.shape[1:])
        elif a == 1:
            out = np.matmul(m, out)
        else:
            out = (out.reshape(-1, n_in) @ m.T).reshape(out.shape[:2] + (n_out,))
    return np.ascontiguousarray(out)


def resample_array(arr_zyx, spacing_zyx, target_zyx=TARGET_SPACING, dtype=np.float32):
    """Resample a ``(z, y, x)`` volume to ``target_zyx`` mm the published way.

    The input is clipped to [-1024, 1024] first (as the recipe does); the cubic resize
    output is clipped to the clipped input's min/max, rounded, and cast back to the
    input's integer dtype (int16 for HU). Returns the new array.
    """
    arr = np.asarray(arr_zyx)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D (z, y, x) array, got shape {arr.shape}")
    out_dtype = arr.dtype if arr.dtype.kind == "i" else np.dtype(np.int16)
    if arr.dtype.kind == "u":  # so that the lower clip bound is representable
        arr = arr.astype(np.int32)
    clipped = np.clip(arr, *CLIP_HU)
    shape_out = output_shape(arr.shape, spacing_zyx, target_zyx)
    if min(shape_out) < 1 or np.prod(shape_out, dtype=np.float64) > MAX_OUTPUT_VOXELS:
        raise ValueError(f"volume {arr.shape} at spacing {tuple(spacing_zyx)} mm gives an output "
                         f"of {shape_out} voxels at {tuple(target_zyx)} mm, "
                         f"{'empty' if min(shape_out) < 1 else 'more than 2**30'}: check the "
                         f"spacing in the file's header")
    out = resize_array(clipped, shape_out, dtype)
    np.clip(out, clipped.min(), clipped.max(), out=out)
    np.rint(out, out=out)
    return out.astype(out_dtype)


def resample_labels(labels_zyx, spacing_zyx, target_zyx=TARGET_SPACING):
    """Nearest-neighbour resampling of a label map onto the grid of ``resample_array``.

    Output voxel ``i`` takes the input voxel nearest to ``(i + 0.5) * n_in / n_out - 0.5``,
    i.e. index ``floor((i + 0.5) * n_in / n_out)``.
    """
    labels = np.asarray(labels_zyx)
    shape_out = output_shape(labels.shape, spacing_zyx, target_zyx)
    idx = [np.minimum(np.floor((np.arange(m) + 0.5) * n / m).astype(np.intp), n - 1)
           for n, m in zip(labels.shape, shape_out)]
    return labels[np.ix_(*idx)]
