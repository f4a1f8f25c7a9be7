"""Labelled cases for fine-tuning and the probes: an MSD-style folder (imagesTr/,
labelsTr/, optional dataset.json) prepared like the pre-training data (1 mm, clipped HU)
once into a cache and memory-mapped, with random (foreground-centred) patches."""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from common.cli import float_in, int_at_least
from common.resample import resample_array, resample_labels
from volume_io import VolumeError, output_complete, read_nifti, write_npy


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
    img, hu = read_nifti(image_path)
    _, labels = read_nifti(label_path)
    if hu.shape != labels.shape:
        raise VolumeError(f"{label_path} has shape {labels.shape}, its image {hu.shape}")
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    image = resample_array(hu, spacing, tuple(target_zyx))
    seg = resample_labels(labels, spacing, tuple(target_zyx))
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


def check_data_dir(args) -> None:
    """ValueError naming the folder when ``--data_dir`` is given but is no MSD-style folder
    (no folder, no ``imagesTr/*.nii.gz``, a label file missing): called before a program
    creates anything, so a wrong path leaves no empty output folder behind."""
    if args.data_dir is not None:
        if not Path(args.data_dir).is_dir():
            raise ValueError(f"--data_dir {args.data_dir} is not a folder")
        list_cases(args.data_dir)


def labelled_data(args, out_dir) -> tuple[Path, list[Case], list[str]]:
    """``(data folder, prepared cases, class names)`` for the flags of
    ``add_labelled_data_args``: ``--data_dir``, or a synthetic set generated once into
    ``out_dir`` (kept for the same settings). Cases are cached under
    ``out_dir/preprocessed``. Raises ValueError naming the folder when it cannot be used."""
    out_dir = Path(out_dir)
    check_data_dir(args)
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
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
