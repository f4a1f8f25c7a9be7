"""Pre-trained DeSD backbones: read a checkpoint safely, take its backbone, load it into an
encoder, and write a backbone as `.safetensors`. PyTorch and the standard library only;
`.safetensors` files also need the `safetensors` package (`pip install safetensors`).

    from models import ResUNet3D, load_pretrained_encoder
    net = ResUNet3D("res3d50", num_classes=4)
    load_pretrained_encoder(net.encoder, "checkpoint.pth")   # prints [pre_N/mod_M]: K shared layers

Accepted files: `checkpoint.pth` of main_desd.py, the released DeSD_Res50 checkpoint, any
(prefixed) backbone state dict, and `.safetensors` backbones. Reading never runs code:
`torch.load(weights_only=True)` with `argparse.Namespace` as the one extra class (the
released checkpoint stores its `args` that way), and a zip checkpoint's CRCs are verified
first, because `torch.load` reads a corrupted record without complaint. As published
(docs/method.md §8) the loader strips `module.backbone.`, keeps the names present in the
encoder and prints `[pre_N/mod_M]: K shared layers` and the mean of `conv1.weight` before
and after; here a checkpoint that matches nothing, matches with wrong shapes or holds
non-finite weights is an error, and nothing is loaded then.

`.safetensors` files are read (memory-mapped) and written by the `safetensors` library,
which validates the whole header; it is imported only when such a file is read or
written, so `models/` copied alone loads `.pth` checkpoints with PyTorch only. The checks
above (CRCs of zip checkpoints, names, shapes, non-finite weights) apply to both kinds.
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

import torch
from torch import nn

from .res3d import ARCHS, build_backbone

__all__ = ["PretrainedLoadError", "read_checkpoint", "verify_checkpoint_file",
           "extract_backbone_state", "strip_prefixes", "backbone_only", "infer_arch",
           "declared_arch", "load_pretrained_encoder", "save_backbone", "save_safetensors",
           "load_safetensors", "BACKBONE_MODULES", "STRIP_PREFIXES"]

# Top-level module names of `ResNet3D` (docs/method.md §5): what a bare backbone holds.
BACKBONE_MODULES = ("conv1", "norm1", "layer1", "layer2", "layer3", "layer4")
# Tried in this order on every key; the first that matches is removed ("encoder." is
# ResUNet3D's: a fine-tuned segmentation network's encoder loads too).
STRIP_PREFIXES = ("module.backbone.", "backbone.", "module.", "encoder.")


class PretrainedLoadError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the encoder."""


# ----------------------------------------------------------------------------- safetensors
def _safetensors(action: str):
    """The `safetensors` package (imported here, where the format is needed, so that
    `models/` imports without it), or PretrainedLoadError saying how to install it."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise PretrainedLoadError(f"{action} needs the safetensors package: "
                                  f"pip install safetensors") from None
    return safetensors


def save_safetensors(tensors: Mapping[str, torch.Tensor], f: BinaryIO,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to the binary file object `f` in the `.safetensors` format (by the
    `safetensors` library).

    Use it with a file opened for writing through an atomic writer (temporary file, then
    rename), so a crash leaves no half file. The tensors are moved to the CPU and made
    contiguous; tensors that share memory are written as separate copies.
    """
    st = _safetensors("writing a .safetensors file")
    flat, storages = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # the library refuses tensors that share memory: give it a copy
        storages.add(t.untyped_storage().data_ptr())
        flat[str(name)] = t
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    try:
        raw = st.torch.save(flat, metadata=meta)
    except (st.SafetensorError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"cannot write these tensors as .safetensors: {e}") from None
    f.write(raw)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a `.safetensors` file, memory-mapped by the `safetensors` library: (tensors on
    the CPU, metadata). The library checks the whole header (tensors that overlap, leave
    gaps or run past the data, trailing bytes, a header length past the end, malformed
    JSON, negative or overflowing shapes); any such file raises PretrainedLoadError naming
    it."""
    path = Path(path)
    st = _safetensors(f"reading {path}")
    try:
        with st.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except OSError as e:
        raise PretrainedLoadError(f"{path}: cannot be opened ({e})") from None
    except (st.SafetensorError, ValueError, TypeError, RuntimeError) as e:
        raise PretrainedLoadError(f"{path}: not a valid .safetensors file: the file is "
                                  f"truncated, damaged or in another format ({e})") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


# ----------------------------------------------------------------------------- reading
def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise PretrainedLoadError naming `path` unless every record of a zip checkpoint
    (torch.save's format) matches its CRC-32. Files in the legacy format are not zips and
    pass unchecked. `torch.load` itself does not check the CRCs: a flipped byte inside a
    tensor loads as garbage."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
        raise PretrainedLoadError(f"{path}: corrupt zip container ({e}); the file was cut "
                                  f"short or damaged") from None
    if bad is not None:
        raise PretrainedLoadError(f"{path}: record {bad} fails its CRC-32 check: the file is "
                                  f"corrupt (damaged on disk or in transfer)")


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """Read a checkpoint without running code from it, after checking its integrity.

    `.safetensors` files hold only tensors. Anything else goes through
    `torch.load(weights_only=True)`, which refuses every Python object except tensors and
    plain values; `argparse.Namespace` is allowed explicitly because the released DeSD
    checkpoint stores its `args` that way. There is no fallback to `weights_only=False`.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedLoadError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    verify_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise PretrainedLoadError(
            f"{path}: refused: it holds Python objects other than tensors, plain values and "
            f"argparse.Namespace ({detail}); unpickling it could run code, so it was not "
            f"loaded. Export the weights from a trusted copy as .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise PretrainedLoadError(f"{path}: cannot be read as a PyTorch checkpoint "
                                  f"(truncated or not a checkpoint?): {e}") from e


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the first of `STRIP_PREFIXES` that matches from each key: `module.backbone.`,
    `backbone.`, `module.` or `encoder.`. Two keys that become the same name are an error."""
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


def _reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {k: tuple(v.shape) for k, v in build_backbone(arch).state_dict().items()}


def infer_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The `res3d*` depth whose block counts, block type and every tensor shape the
    backbone entries of `state` show exactly; None when no depth fits (e.g. a
    `conv1` of another shape)."""
    backbone = backbone_only(state)
    counts = tuple(len({k.split(".")[1] for k in backbone if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    expansion = 4 if any(k.endswith(".conv3.weight") for k in backbone) else 1
    for name, (block, layers) in ARCHS.items():
        if tuple(layers) == counts and block.expansion == expansion:
            ref = _reference_shapes(name)
            if ref.keys() == backbone.keys() and all(
                    tuple(v.shape) == ref[k] for k, v in backbone.items()):
                return name
            return None
    return None


def declared_arch(checkpoint: Mapping, metadata: Mapping[str, str] | None = None) -> str | None:
    """The depth a checkpoint says it is: `args['arch']` of a trainer checkpoint (a dict,
    or the released checkpoint's Namespace) or the `arch` of a .safetensors' metadata.
    Names outside `ARCHS` (the release says "resnet3d50") count as unknown."""
    arch = (metadata or {}).get("arch")
    if arch is None and isinstance(checkpoint, Mapping):
        args = checkpoint.get("args")
        arch = args.get("arch") if isinstance(args, Mapping) else getattr(args, "arch", None)
    return arch if arch in ARCHS else None


def _non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` that hold NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]


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
    `ValueError`) when nothing matches, when a name matches with another shape, or when
    a matching tensor holds NaN/inf; nothing is loaded then. Returns a summary dict.
    """
    pre, source = extract_backbone_state(path, which)
    model = encoder.state_dict()
    wrong = [k for k in pre if k in model and pre[k].shape != model[k].shape]
    if wrong:
        arch = infer_arch(pre)
        hint = (f"; the checkpoint looks like {arch}: build the encoder with that depth"
                if arch else "")
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
    bad = _non_finite(shared)
    if bad:
        raise PretrainedLoadError(f"{path}: {len(bad)} of its tensors hold NaN or inf (e.g. "
                                  f"{', '.join(bad[:3])}); a diverged run? Use an earlier "
                                  f"checkpoint")
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


# ----------------------------------------------------------------------------- writing
def save_backbone(state: Mapping[str, torch.Tensor] | nn.Module, f: BinaryIO,
                  metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write a backbone's weights to the file object `f` as `.safetensors`.

    `state`: a `ResNet3D` or a (prefixed) state dict with or without heads; only the
    backbone entries are written, under `ResNet3D`'s names. It must be a complete
    `res3d*` backbone (every name and shape of one depth) with finite weights, so the file
    always loads into that depth; the depth goes into the metadata as `arch`. Returns the
    metadata written. Open `f` through an atomic writer so a crash leaves no half file.
    """
    if isinstance(state, nn.Module):
        state = state.state_dict()
    backbone = backbone_only(strip_prefixes(state))
    arch = infer_arch(backbone)
    if arch is None:
        raise PretrainedLoadError(
            f"not a complete res3d* backbone ({len(backbone)} backbone tensors, e.g. "
            f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in list(backbone.items())[:2])}); "
            f"its names or shapes match none of {', '.join(ARCHS)}")
    bad = _non_finite(backbone)
    if bad:
        raise PretrainedLoadError(f"{len(bad)} backbone tensors hold NaN or inf (e.g. "
                                  f"{', '.join(bad[:3])}); refusing to export them")
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}, "arch": arch}
    save_safetensors(backbone, f, meta)
    return meta
