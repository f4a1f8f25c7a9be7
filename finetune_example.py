"""Fine-tune a DeSD pre-trained 3D ResNet encoder for segmentation.

The part to copy into your own project is the network (`ResUNet3D`) and
`load_pretrained_encoder`; both need only PyTorch and `models/` (and `safetensors` for
`.safetensors` files). The command line adds a short fine-tuning loop with Dice.

    # from the pre-trained teacher (checkpoint.pth of main_desd.py, the released
    # DeSD_Res50 checkpoint, or a teacher_backbone.safetensors), on a synthetic set
    python finetune_example.py --pretrained checkpoint.pth --arch res3d50 --out_dir ft_teacher
    # the same from scratch, to compare
    python finetune_example.py --arch res3d50 --out_dir ft_scratch
    # on an MSD task (imagesTr/*.nii.gz, labelsTr/*.nii.gz), on a GPU
    python finetune_example.py --pretrained checkpoint.pth --data_dir Task09_Spleen \
        --epochs 50 --patch_size 64 128 128 --batch_size 2 --out_dir ft_spleen
    # a quick CPU run
    python finetune_example.py --arch res3d10 --epochs 2 --iters_per_epoch 10 \
        --patch_size 32 64 64 --n_synthetic 4 --synthetic_size 48 --out_dir ft_quick

Data as in pre-training: resampled to 1 mm (`re_spacing_ITK.resample_array`, labels by
nearest neighbour), HU clipped to [-1024, 1024] and divided by 1024; random patches
(half of them centred on a foreground voxel), padded where a volume is smaller. The last
third of the cases (sorted by name) is held out; they are segmented by sliding window
and the script prints the mean Dice per foreground class and overall (`Dice: 0.xxx`).
Preprocessed volumes are cached under `OUT_DIR/preprocessed_*` and reused.

Loading (SPEC.md §8): the release's own snippet unpickles the file, takes its `'teacher'`,
strips `module.backbone.`, keeps the names present in the encoder and prints
`[pre_N/mod_M]: K shared layers` and the mean of `conv1.weight` before and after, so a
silent non-load shows. Here loading is also safe (`weights_only=True`, with only
`argparse.Namespace` allowed, for the released checkpoint's `args`) and a checkpoint
that matches nothing, or matches with wrong shapes, is an error rather than a no-op.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import time
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import ARCHS, build_backbone

# Top-level module names of `ResNet3D` (SPEC.md §5): what a bare backbone holds.
BACKBONE_MODULES = ("conv1", "norm1", "layer1", "layer2", "layer3", "layer4")
# Tried in this order on every key; the first that matches is removed.
STRIP_PREFIXES = ("module.backbone.", "backbone.", "module.")
HU_MIN, HU_MAX, HU_SCALE = -1024.0, 1024.0, 1024.0


# ----------------------------------------------------------------------------- network
class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each with instance norm and LeakyReLU (as the encoder)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True))


class UpBlock(nn.Module):
    """Reduce the coarse map's channels (1x1x1, at low resolution, where it is cheap),
    upsample it to the skip's exact size (so odd sizes need no padding), concatenate and
    convolve."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.reduce = nn.Conv3d(cin, cout, 1, bias=False)
        self.conv = ConvBlock(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=skip.shape[2:], mode="trilinear",
                          align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


def deepest_stage_size(spatial: Sequence[int]) -> tuple[int, ...]:
    """Spatial size of the encoder's last stage for an input of size `spatial` (D, H, W)."""
    out = []
    for n, s in zip(spatial, (1, 2, 2)):
        n = (n + 6 - 7) // s + 1           # conv1: k7, p3, stride (1, 2, 2)
        for _ in range(4):                 # max-pool, then layer2..layer4: k3, p1, stride 2
            n = (n + 2 - 3) // 2 + 1
        out.append(n)
    return tuple(out)


class ResUNet3D(nn.Module):
    """U-Net on a DeSD 3D ResNet encoder.

    Args:
        arch: encoder depth, one of `models.ARCHS` (res3d10 ... res3d200).
        num_classes: output channels, background included.
        in_channels: image channels (1 for CT; the pre-trained stem expects 1).
        decoder_channels: widths of the five decoder levels, from the deepest (fed by
            layer4 + layer3) to full resolution (fed by the input image).
        **backbone_kwargs: passed to `models.build_backbone` (norm, act, stem_stride).

    The decoder is fed by the four un-pooled stage maps and the stem's output
    (`encoder.forward_features(x, include_stem=True)`) and by the input itself; every
    level is upsampled to its skip's size, so the output has exactly the input's size.
    The deepest stage must keep more than one voxel (instance norm cannot normalise a
    single one): at least 32 voxels in depth or 64 in-plane (D/16 x H/32 x W/32).
    """

    def __init__(self, arch: str = "res3d50", num_classes: int = 2, in_channels: int = 1,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), **backbone_kwargs):
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths, got {tuple(decoder_channels)}")
        self.encoder = build_backbone(arch, in_channels=in_channels, **backbone_kwargs)
        # Skips from deep to shallow: layer3, layer2, layer1, stem, the input image.
        skips = [*self.encoder.stage_channels[2::-1], self.encoder.stem_channels, in_channels]
        cin = self.encoder.stage_channels[3]
        self.decoder = nn.ModuleList()
        for cskip, cout in zip(skips, decoder_channels):
            self.decoder.append(UpBlock(cin, cskip, cout))
            cin = cout
        self.head = nn.Conv3d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deepest = deepest_stage_size(x.shape[2:])
        if math.prod(deepest) <= 1:
            raise ValueError(
                f"input of size {tuple(x.shape[2:])} is too small: the encoder's last stage "
                f"would be {deepest}, a single voxel that instance norm cannot normalise; use "
                f"at least 32 voxels in depth or 64 in height or width")
        stem, l1, l2, l3, l4 = self.encoder.forward_features(x, include_stem=True)
        y = l4
        for block, skip in zip(self.decoder, (l3, l2, l1, stem, x)):
            y = block(y, skip)
        return self.head(y)


# ----------------------------------------------------------------------------- loading
class PretrainedLoadError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the encoder."""


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """Read a checkpoint without running code from it.

    `.safetensors` files hold only tensors. Anything else goes through
    `torch.load(weights_only=True)`, which refuses every Python object except tensors and
    plain values; `argparse.Namespace` is allowed explicitly because the released DeSD
    checkpoint stores its `args` that way. There is no fallback to `weights_only=False`.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedLoadError(f"pre-trained checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise PretrainedLoadError(f"{path}: not a readable .safetensors file ({e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise PretrainedLoadError(
            f"{path}: refused: it holds Python objects other than tensors, plain values and "
            f"argparse.Namespace ({detail}); unpickling it could run code, so it was not "
            f"loaded. Export the weights from a trusted copy (export_backbone.py) or as "
            f".safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise PretrainedLoadError(f"{path}: cannot be read as a PyTorch checkpoint "
                                  f"(truncated or not a checkpoint?): {e}") from e


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.backbone.`, `backbone.` or `module.` (the first that matches)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = next((key[len(p):] for p in STRIP_PREFIXES if key.startswith(p)), key)
        if name in out:
            raise PretrainedLoadError(f"two checkpoint entries become {name!r} once the "
                                      f"prefixes {STRIP_PREFIXES} are stripped")
        out[name] = value
    return out


def extract_backbone_state(checkpoint: Mapping | str | os.PathLike, which: str | None = None
                           ) -> tuple[dict[str, torch.Tensor], str]:
    """The network state of a checkpoint with its prefixes stripped, and where it came from.

    `checkpoint` is a path or an already-read checkpoint. `which` picks `'teacher'` or
    `'student'`; by default the teacher if present, else the student, else the
    checkpoint itself when it is a bare state dict. Head tensors (`head.*`,
    `deep_heads.*`) stay in the result; `backbone_only` drops them.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise PretrainedLoadError(f"expected a dict, got {type(checkpoint).__name__}")
    if which is not None:
        if which not in checkpoint:
            raise PretrainedLoadError(f"the checkpoint has no {which!r} entry; its entries: "
                                      f"{', '.join(map(str, checkpoint))}")
        state, source = checkpoint[which], which
    elif "teacher" in checkpoint:
        state, source = checkpoint["teacher"], "teacher"
    elif "student" in checkpoint:
        state, source = checkpoint["student"], "student"
    else:
        state, source = checkpoint, "state dict"
    if not _is_state_dict(state):
        keys = ", ".join(map(str, list(state)[:8])) if isinstance(state, Mapping) else ""
        raise PretrainedLoadError(
            f"the checkpoint's {source} is not a state dict of tensors (entries: {keys}); "
            f"expected 'teacher', 'student' or a bare state dict")
    return strip_prefixes(state), source


def backbone_only(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries that belong to the backbone (`conv1`, `norm1`, `layer1..4`)."""
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in BACKBONE_MODULES}


def infer_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The `res3d*` depth whose block type and block counts the state's names show."""
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    expansion = 4 if any(k.endswith(".conv3.weight") for k in state) else 1
    return next((name for name, (block, layers) in ARCHS.items()
                 if tuple(layers) == counts and block.expansion == expansion), None)


def _brief(names: Sequence[str]) -> str:
    """Names grouped by their first component: 'head (8), deep_heads (24)'."""
    groups = Counter(n.split(".", 1)[0] for n in names)
    return ", ".join(f"{g} ({c})" for g, c in groups.most_common())


def load_pretrained_encoder(encoder: nn.Module, path: str | os.PathLike,
                            which: str | None = None) -> dict:
    """Load the pre-trained backbone at `path` into `encoder` by name and shape.

    `path`: `checkpoint.pth` of main_desd.py, the released DeSD checkpoint, any bare
    backbone state dict, or a `.safetensors` backbone. Prints the published line
    `[pre_N/mod_M]: K shared layers` (N: tensors in the checkpoint's network state after
    stripping prefixes, heads included; M: tensors in the encoder's state dict; K: loaded)
    and the mean of `conv1.weight` before and after. Raises `PretrainedLoadError` (a
    `ValueError`) when nothing matches or when a name matches with another shape; nothing
    is loaded then. Returns a summary dict.
    """
    pre, source = extract_backbone_state(path, which)
    model = encoder.state_dict()
    wrong = [k for k in pre if k in model and pre[k].shape != model[k].shape]
    if wrong:
        arch = infer_arch(pre)
        hint = (f"; the checkpoint looks like {arch}: build the encoder with that depth "
                f"(--arch {arch})" if arch else "")
        shown = "; ".join(f"{k}: checkpoint {tuple(pre[k].shape)} vs encoder "
                          f"{tuple(model[k].shape)}" for k in wrong[:5])
        raise PretrainedLoadError(f"{path}: {len(wrong)} tensors match by name but not by "
                                  f"shape ({shown}{' ...' if len(wrong) > 5 else ''}){hint}")
    shared = {k: v for k, v in pre.items() if k in model}
    if not shared:
        raise PretrainedLoadError(
            f"{path}: no tensor of its {source} ({len(pre)} tensors, e.g. "
            f"{', '.join(list(pre)[:3])}) matches the encoder's names (e.g. "
            f"{', '.join(list(model)[:3])}), even after stripping {', '.join(STRIP_PREFIXES)}; "
            f"is it a DeSD checkpoint?")
    conv1 = "conv1.weight" in model
    before = model["conv1.weight"].float().mean().item() if conv1 else float("nan")
    encoder.load_state_dict(shared, strict=False)
    after = encoder.state_dict()["conv1.weight"].float().mean().item() if conv1 else float("nan")
    missing = [k for k in model if k not in shared]
    unused = [k for k in pre if k not in model]
    print(f"[pre_{len(pre)}/mod_{len(model)}]: {len(shared)} shared layers")
    print(f"conv1.weight mean: {before:.6f} before, {after:.6f} after loading {path} ({source})")
    arch_pre, arch_enc = infer_arch(pre), infer_arch(model)
    if arch_pre and arch_enc and arch_pre != arch_enc:
        print(f"  warning: the checkpoint's backbone looks like {arch_pre}, the encoder is "
              f"{arch_enc}: only the blocks they share were loaded")
    if missing:
        print(f"  not in the checkpoint, left as initialised: {len(missing)}: {_brief(missing)}")
    if unused:
        print(f"  in the checkpoint, not in the encoder (unused): {len(unused)}: {_brief(unused)}")
    return {"path": str(path), "source": source, "n_pretrained": len(pre),
            "n_model": len(model), "n_loaded": len(shared), "loaded": sorted(shared),
            "missing": missing, "unused": unused,
            "conv1_mean_before": before, "conv1_mean_after": after}


# ----------------------------------------------------------------------------- data
class Case:
    """One preprocessed case: int16 HU and uint8 labels (memory-mapped), and a sample of
    foreground voxel coordinates per class for foreground-centred patches."""

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


def list_cases(data_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, label) for every `imagesTr/*.nii.gz` (macOS `._*` files skipped)."""
    images = sorted(p for p in (data_dir / "imagesTr").glob("*.nii.gz")
                    if not p.name.startswith("._"))
    if not images:
        raise SystemExit(f"no imagesTr/*.nii.gz under {data_dir}: --data_dir expects the MSD "
                         f"layout (imagesTr/ and labelsTr/ with the same file names)")
    cases = []
    for img in images:
        lab = data_dir / "labelsTr" / img.name
        if not lab.is_file():
            raise SystemExit(f"{img} has no label file {lab}")
        cases.append((img.name[:-len(".nii.gz")], img, lab))
    return cases


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(array z,y,x, spacing z,y,x), through the project's checked reader: a truncated
    file (which SimpleITK would fill with zeros) or a bad geometry is an error naming it."""
    from volume_io import VolumeError
    from volume_io import read_nifti as checked_read
    try:
        img, arr = checked_read(path)
    except VolumeError as e:
        raise SystemExit(f"finetune_example.py: error: {e}") from None
    return arr, tuple(float(s) for s in img.GetSpacing()[::-1])


def preprocess_case(hu: np.ndarray, labels: np.ndarray, spacing_zyx: Sequence[float],
                    target_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Resample to `target_zyx` mm as the pre-training data were (cubic for the image,
    nearest neighbour for the labels, on the same grid) and clip HU to [-1024, 1024]."""
    from re_spacing_ITK import resample_array, resample_labels
    image = resample_array(hu, tuple(spacing_zyx), tuple(target_zyx))
    seg = resample_labels(labels, tuple(spacing_zyx), tuple(target_zyx))
    if image.shape != seg.shape:
        raise ValueError(f"resampled image {image.shape} and labels {seg.shape} differ")
    return np.clip(image, HU_MIN, HU_MAX).astype(np.int16), seg.astype(np.uint8)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def load_cases(data_dir: Path, cache_dir: Path, target_zyx: Sequence[float],
               seed: int) -> list[Case]:
    """Preprocess every case once into `cache_dir` (reused while newer than the source)
    and memory-map it."""
    from tqdm import tqdm
    cache_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (name, img_path, lab_path) in enumerate(tqdm(list_cases(data_dir), desc="preprocess")):
        img_npy, seg_npy = cache_dir / f"{name}_img.npy", cache_dir / f"{name}_seg.npy"
        source_time = max(img_path.stat().st_mtime, lab_path.stat().st_mtime)
        if not (img_npy.is_file() and seg_npy.is_file()
                and min(img_npy.stat().st_mtime, seg_npy.stat().st_mtime) >= source_time):
            hu, spacing = read_nifti(img_path)
            labels, _ = read_nifti(lab_path)
            if hu.shape != labels.shape:
                raise SystemExit(f"{lab_path} has shape {labels.shape}, its image {hu.shape}")
            image, seg = preprocess_case(hu, labels, spacing, target_zyx)
            _save_npy_atomic(seg_npy, seg)
            _save_npy_atomic(img_npy, image)
        cases.append(Case(name, np.load(img_npy, mmap_mode="r"), np.load(seg_npy, mmap_mode="r"),
                          seed + i))
    return cases


def crop_pad(arr: np.ndarray, start: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    """`arr[start : start + size]`, filled with `fill` where the window leaves the array."""
    out = np.full(tuple(size), fill, dtype=arr.dtype)
    src = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, size, arr.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out[dst] = arr[src]
    return out


def random_patch(case: Case, patch: Sequence[int], fg_fraction: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random patch; with probability `fg_fraction` centred on a voxel of a random
    foreground class (so small organs are seen). A volume smaller than the patch lands
    at a random place inside it."""
    bounds = [(min(0, n - p), max(0, n - p)) for n, p in zip(case.image.shape, patch)]
    if case.fg and rng.random() < fg_fraction:
        coords = case.fg[list(case.fg)[rng.integers(len(case.fg))]]
        centre = coords[rng.integers(len(coords))]
        start = [int(np.clip(c - p // 2, lo, hi)) for c, p, (lo, hi) in zip(centre, patch, bounds)]
    else:
        start = [int(rng.integers(lo, hi + 1)) for lo, hi in bounds]
    return crop_pad(case.image, start, patch, HU_MIN), crop_pad(case.labels, start, patch, 0)


def to_input(hu: np.ndarray) -> torch.Tensor:
    """int16 HU (already clipped) -> float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(hu, dtype=np.float32) / HU_SCALE)


# ----------------------------------------------------------------------------- loss, metric
def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice over the foreground classes, batch-wise)."""
    logits = logits.float()
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 4, 1, 2, 3).to(probs.dtype)
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return F.cross_entropy(logits, target) + 1 - dice[1:].mean()


def dice_per_class(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class; NaN where the class is in neither volume."""
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        total = p.sum() + g.sum()
        if total:
            out[c - 1] = 2.0 * np.logical_and(p, g).sum() / total
    return out


@torch.no_grad()
def predict_volume(net: nn.Module, hu: np.ndarray, patch: Sequence[int], num_classes: int,
                   device: torch.device, overlap: float = 0.5) -> np.ndarray:
    """Sliding-window segmentation (softmax averaged where windows overlap)."""
    shape = hu.shape
    padded = crop_pad(np.asarray(hu), (0, 0, 0), [max(n, p) for n, p in zip(shape, patch)], HU_MIN)
    starts = []
    for n, p in zip(padded.shape, patch):
        step = max(1, int(p * (1 - overlap)))
        starts.append(sorted(set(list(range(0, n - p, step)) + [n - p])))
    probs = torch.zeros((num_classes, *padded.shape))
    counts = torch.zeros(padded.shape)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                win = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                inp = to_input(padded[win])[None, None].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16,
                                    enabled=device.type == "cuda"):
                    logits = net(inp)
                probs[(slice(None), *win)] += logits.float().softmax(1)[0].cpu()  # GPU->CPU sync
                counts[win] += 1
    pred = (probs / counts).argmax(0).numpy().astype(np.uint8)
    return pred[: shape[0], : shape[1], : shape[2]]


# ----------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeSD fine-tuning example", add_help=False)
    p.add_argument("--pretrained", default=None, type=str,
                   help="checkpoint to initialise the encoder from: main_desd.py's checkpoint.pth, "
                        "the released DeSD checkpoint, or a backbone .safetensors; omit to train "
                        "from scratch (to compare)")
    p.add_argument("--which", default=None, choices=("teacher", "student"),
                   help="network of the checkpoint to load (default: the teacher, the one DeSD "
                        "evaluates; the student if there is no teacher)")
    p.add_argument("--arch", default="res3d50", choices=list(ARCHS),
                   help="encoder depth; must be the pre-trained one (DeSD_Res50: res3d50)")
    p.add_argument("--data_dir", default=None, type=str,
                   help="MSD-style folder with imagesTr/*.nii.gz and labelsTr/*.nii.gz; without it "
                        "a small synthetic labelled set is generated into OUT_DIR")
    p.add_argument("--num_classes", default=None, type=int,
                   help="classes including background (default: from dataset.json, else the "
                        "largest label + 1)")
    p.add_argument("--epochs", default=20, type=int, help="training epochs")
    p.add_argument("--iters_per_epoch", default=50, type=int,
                   help="iterations (batches of random patches) per epoch")
    p.add_argument("--batch_size", default=2, type=int, help="patches per iteration")
    p.add_argument("--patch_size", default=(32, 64, 64), type=int, nargs=3, metavar=("D", "H", "W"),
                   help="training and sliding-window patch in voxels at 1 mm; needs D >= 32 or "
                        "H or W >= 64; e.g. 64 128 128 on a GPU, smaller for a CPU")
    p.add_argument("--decoder_channels", default=(256, 128, 64, 32, 16), type=int, nargs=5,
                   metavar="C",
                   help="decoder widths from the deepest level to full resolution; the last "
                        "two dominate the cost on a CPU (e.g. 128 64 32 16 8 is twice as fast)")
    p.add_argument("--lr", default=3e-4, type=float,
                   help="AdamW peak learning rate (cosine decay to 1%% of it)")
    p.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    p.add_argument("--fg_fraction", default=0.5, type=float,
                   help="fraction of patches centred on a foreground voxel (0: uniform)")
    p.add_argument("--spacing", default=(1.0, 1.0, 1.0), type=float, nargs=3,
                   metavar=("Z", "Y", "X"),
                   help="target voxel size in mm (pre-training used 1 mm)")
    p.add_argument("--val_fraction", default=1 / 3, type=float,
                   help="fraction of the cases (the last ones by name) held out for evaluation")
    p.add_argument("--eval_overlap", default=0.5, type=float,
                   help="sliding-window overlap at evaluation (0 is fastest)")
    p.add_argument("--n_synthetic", default=6, type=int,
                   help="cases in the synthetic set (without --data_dir)")
    p.add_argument("--synthetic_size", default=64, type=int,
                   help="in-plane size of the synthetic cases in voxels")
    p.add_argument("--synthetic_slices", default=32, type=int,
                   help="slices per synthetic case")
    p.add_argument("--out_dir", default="finetune_output", type=str,
                   help="where the synthetic set, the preprocessing cache, the model and "
                        "results.json go")
    p.add_argument("--seed", default=0, type=int,
                   help="seed for the network, the synthetic set and the patches (runs repeat)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; bf16 autocast is used on CUDA")
    p.add_argument("--num_threads", default=0, type=int,
                   help="CPU threads for PyTorch (0: PyTorch's default)")
    return p


def _class_names(data_dir: Path, num_classes: int) -> list[str]:
    names = [f"class{c}" for c in range(num_classes)]
    meta = data_dir / "dataset.json"
    if meta.is_file():
        for k, v in json.loads(meta.read_text()).get("labels", {}).items():
            if k.isdigit() and int(k) < num_classes:
                names[int(k)] = str(v)
    return names


def _nanmean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _cosine_schedule(peak: float, total: int) -> np.ndarray:
    t = np.arange(total) / max(1, total)
    return peak * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t)))


def train_one_epoch(net: nn.Module, cases: list[Case], optimizer: torch.optim.Optimizer,
                    lr_schedule: np.ndarray, epoch: int, args, device: torch.device) -> float:
    from tqdm import tqdm
    net.train()
    rng = np.random.default_rng([args.seed, epoch])  # patches depend on seed and epoch only
    total = torch.zeros((), device=device)
    for it in tqdm(range(args.iters_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule[epoch * args.iters_per_epoch + it]
        patches = [random_patch(cases[rng.integers(len(cases))], args.patch_size,
                                args.fg_fraction, rng) for _ in range(args.batch_size)]
        x = torch.stack([to_input(img) for img, _ in patches])[:, None].to(device)
        y = torch.stack([torch.from_numpy(seg.astype(np.int64)) for _, seg in patches]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        loss = dice_ce_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    mean = (total / args.iters_per_epoch).item()  # the epoch's one CPU-GPU sync
    if not math.isfinite(mean):
        raise SystemExit(f"non-finite loss in epoch {epoch + 1}; lower --lr")
    return mean


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser("DeSD fine-tuning example", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if math.prod(deepest_stage_size(args.patch_size)) <= 1:
        parser.error(f"--patch_size {args.patch_size} is too small for the encoder (its last "
                     f"stage would be one voxel); use D >= 32 or H or W >= 64")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- encoder
    # Loaded before the data are prepared, so a wrong checkpoint fails in seconds.
    encoder = build_backbone(args.arch)
    if args.pretrained:
        try:
            load_pretrained_encoder(encoder, args.pretrained, args.which)
        except PretrainedLoadError as e:
            raise SystemExit(f"finetune_example.py: error: {e}") from None
    else:
        print("no --pretrained: training from scratch")

    # ---------------------------------------------------------------- data
    if args.data_dir is None:
        from synthetic_ct import make_labelled_set
        print(f"no --data_dir: generating {args.n_synthetic} synthetic labelled cases")
        data_dir = Path(make_labelled_set(out_dir / "synthetic_labelled", n_cases=args.n_synthetic,
                                          size=args.synthetic_size,
                                          n_slices=args.synthetic_slices, seed=args.seed))
    else:
        data_dir = Path(args.data_dir)
    cache_dir = out_dir / ("preprocessed_" + "x".join(f"{s:g}" for s in args.spacing))
    cases = load_cases(data_dir, cache_dir, args.spacing, args.seed)
    if len(cases) < 2:
        raise SystemExit(f"{data_dir} has {len(cases)} case(s); need at least 2 (train + held out)")
    n_val = min(len(cases) - 1, max(1, round(len(cases) * args.val_fraction)))
    train_cases, val_cases = cases[:-n_val], cases[-n_val:]
    max_label = max(int(c.labels.max()) for c in cases)
    meta = data_dir / "dataset.json"
    num_classes = args.num_classes or (len(json.loads(meta.read_text()).get("labels", {}))
                                       if meta.is_file() else 0) or max_label + 1
    if max_label >= num_classes:
        raise SystemExit(f"labels go up to {max_label} but --num_classes is {num_classes}")
    names = _class_names(data_dir, num_classes)
    print(f"{len(train_cases)} training and {len(val_cases)} held-out cases "
          f"({', '.join(c.name for c in val_cases)}); {num_classes} classes: {', '.join(names)}")

    # ---------------------------------------------------------------- network
    net = ResUNet3D(args.arch, num_classes=num_classes, decoder_channels=args.decoder_channels)
    net.encoder = encoder
    net.to(device)

    # ---------------------------------------------------------------- optimiser, schedule
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_schedule = _cosine_schedule(args.lr, args.epochs * args.iters_per_epoch)

    # ---------------------------------------------------------------- loop
    start = time.time()
    for epoch in range(args.epochs):
        loss = train_one_epoch(net, train_cases, optimizer, lr_schedule, epoch, args, device)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  ({time.time() - start:.0f} s)")

    # ---------------------------------------------------------------- evaluation
    net.eval()
    scores = np.stack([dice_per_class(
        predict_volume(net, c.image, args.patch_size, num_classes, device, args.eval_overlap),
        np.asarray(c.labels), num_classes) for c in val_cases])
    # A class absent from a case in both prediction and truth does not count for it.
    per_class = [_nanmean(scores[:, c]) for c in range(num_classes - 1)]
    overall = _nanmean(np.asarray(per_class))
    print("Dice per class (held-out): "
          + "  ".join(f"{n} {v:.3f}" for n, v in zip(names[1:], per_class)))
    print(f"Dice: {overall:.3f}")

    results = {"dice": overall, "dice_per_class": dict(zip(names[1:], per_class)),
               "pretrained": args.pretrained, "arch": args.arch, "epochs": args.epochs,
               "held_out": [c.name for c in val_cases]}
    torch.save(net.state_dict(), out_dir / "finetuned_model.pth.tmp")
    os.replace(out_dir / "finetuned_model.pth.tmp", out_dir / "finetuned_model.pth")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"model and results.json written to {out_dir}")
    return results


if __name__ == "__main__":
    main()
