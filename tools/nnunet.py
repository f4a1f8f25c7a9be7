"""Fine-tune a DeSD checkpoint in nnU-Net v2: plans for `models.nnunet_net.DeSDUNet`, and
the file for `nnUNetv2_train -pretrained_weights`. Two steps between nnU-Net's own commands:

    nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres --no_pp          # nnU-Net: fingerprint, plans
    python tools/nnunet.py plans -d 501 --arch res3d50                   # ours: DeSDPlans_res3d50
    nnUNetv2_preprocess -d 501 -plans_name DeSDPlans_res3d50 -c 3d_fullres
    python tools/nnunet.py weights -d 501 -p DeSDPlans_res3d50 --checkpoint checkpoint.pth
    nnUNetv2_train 501 3d_fullres 0 -p DeSDPlans_res3d50 \\
        -pretrained_weights $nnUNet_preprocessed/Dataset501_X/DeSDPlans_res3d50__pretrained.pth

`plans` reads the plans and the fingerprint that nnU-Net wrote for the dataset and writes a
new plans identifier with one configuration, 3d_fullres: spacing 1 mm, `NoNormalization`
(the data stay in HU; `DeSDUNet` clips to +-1024 HU and divides by 1024 as its first
operation, the pre-training contract), the network `DeSDUNet` by dotted path, and a patch
and batch size that are multiples of the encoder's total stride, keep more than one voxel
in the deepest map and fit the memory nnU-Net planned (its network's convolution outputs
at its patch and batch size, counted by nnU-Net's own rule).

`weights` builds the network exactly as nnU-Net's trainer will (from these plans and the
dataset's dataset.json), initialises it from `--seed`, loads the teacher's backbone into
the encoder (`models.load_pretrained_encoder`: a `main_desd.py` checkpoint.pth, the
released DeSD_Res50 checkpoint or a `.safetensors` backbone), and writes
`{'network_weights': state_dict}`: every key of the network with its shape, as
nnU-Net requires. A depth that differs from the plans, non-finite weights, a corrupt file
or one that would run code when unpickled stop it with an error naming the file, and
nothing is written.

The environment variables nnUNet_raw, nnUNet_preprocessed and nnUNet_results must be set
as for nnU-Net, and the folder holding `models/` (this repository) must be on PYTHONPATH
so that nnU-Net finds the network. Tested with nnU-Net 2.8.1; 3d_fullres only (no 2D, no
cascade).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
import torch  # noqa: E402

from common import atomic  # noqa: E402
from common.cli import int_at_least  # noqa: E402
from models import (ARCHS, extract_backbone_state, infer_arch,  # noqa: E402
                    load_pretrained_encoder, read_checkpoint, verify_checkpoint_file)
from models.nnunet_net import DECODER_CHANNELS, DeSDUNet, encoder_strides  # noqa: E402

CONFIGURATION = "3d_fullres"
NETWORK_CLASS = f"{DeSDUNet.__module__}.{DeSDUNet.__qualname__}"  # models.nnunet_net.DeSDUNet
MIN_BATCH = 2                 # nnU-Net's smallest batch size
MAX_DATASET_COVERED = 0.05    # nnU-Net: a batch sees at most 5% of the dataset's voxels


class NnUNetToolError(ValueError):
    """A dataset, plans file or checkpoint that this tool cannot use (the message says why)."""


# ----------------------------------------------------------------------------- nnU-Net
def _nnunet():
    """nnU-Net's modules this tool uses (imported here: only the tool needs nnU-Net)."""
    try:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError as e:
        raise NnUNetToolError(f"nnU-Net v2 is not installed ({e}); pip install nnunetv2==2.8.1 "
                              f"(the tested version)") from None
    return argparse.Namespace(dataset_name=maybe_convert_to_dataset_name,
                              get_network=get_network_from_plans,
                              input_channels=determine_num_input_channels,
                              PlansManager=PlansManager)


def dataset_folder(dataset: str) -> Path:
    """`$nnUNet_preprocessed/DatasetXXX_Name` for an id (`501`) or a name."""
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise NnUNetToolError("nnUNet_preprocessed is not set: export nnUNet_raw, "
                              "nnUNet_preprocessed and nnUNet_results as for nnU-Net")
    nn = _nnunet()
    try:
        name = nn.dataset_name(dataset if dataset.startswith("Dataset") else int(dataset))
    except (RuntimeError, ValueError) as e:
        raise NnUNetToolError(f"dataset {dataset!r}: {str(e).splitlines()[0]}") from None
    folder = Path(root) / name
    if not folder.is_dir():
        raise NnUNetToolError(f"{folder} does not exist: run nnUNetv2_plan_and_preprocess "
                              f"-d {dataset} first")
    return folder


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise NnUNetToolError(f"{path} does not exist ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NnUNetToolError(f"{path}: not a readable JSON file ({e})") from None


def conv_output_voxels(net: torch.nn.Module, patch: Sequence[int], in_channels: int) -> int:
    """nnU-Net's measure of a network's training memory: the elements of every
    convolution's output (transposed convolutions included) for one sample of `patch`,
    summed (what dynamic_network_architectures' `compute_conv_feature_map_size` counts).
    Runs on the meta device: no memory, no arithmetic."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        total += output[0].numel()

    convs = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    hooks = [m.register_forward_hook(count) for m in convs]
    try:
        with torch.no_grad():
            net(torch.empty(1, in_channels, *patch, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


# ----------------------------------------------------------------------------- plans
def median_shape_at_1mm(fingerprint: Mapping, transpose: Sequence[int]
                        ) -> tuple[list[float], float]:
    """The median image size in voxels at 1 mm per axis (in nnU-Net's transposed axis
    order) and the dataset's total voxels at 1 mm, from nnU-Net's fingerprint."""
    shapes, spacings = fingerprint["shapes_after_crop"], fingerprint["spacings"]
    mm = torch.tensor([[n * s for n, s in zip(shape, spacing)]
                       for shape, spacing in zip(shapes, spacings)], dtype=torch.float64)
    median = [float(mm[:, a].median()) for a in transpose]
    return median, float(mm.prod(dim=1).sum())


def choose_patch_and_batch(median: Sequence[float], multiple: Sequence[int], per_voxel: float,
                           budget: float, dataset_voxels: float) -> tuple[list[int], int]:
    """nnU-Net's rule with the encoder's strides: start from the median image size
    rounded up to multiples of `multiple`; while two samples need more than `budget`
    (`per_voxel` convolution-output elements per input voxel), shrink by one multiple the
    axis that is largest relative to the median; keep more than one voxel in the deepest
    map. Batch: what fits, at most 5% of the dataset, at least 2."""
    patch = [max(m, math.ceil(n / m) * m) for n, m in zip(median, multiple)]
    if math.prod(p // m for p, m in zip(patch, multiple)) < 2:
        axis = max(range(3), key=lambda a: median[a] / multiple[a])
        patch[axis] += multiple[axis]
    while per_voxel * math.prod(patch) * MIN_BATCH > budget:
        order = sorted(range(3), key=lambda a: patch[a] / max(median[a], 1.0), reverse=True)
        for a in order:
            smaller = patch[:a] + [patch[a] - multiple[a]] + patch[a + 1:]
            if smaller[a] >= multiple[a] and math.prod(
                    p // m for p, m in zip(smaller, multiple)) >= 2:
                patch = smaller
                break
        else:
            raise NnUNetToolError(
                f"no patch fits the memory nnU-Net planned: the smallest ({patch}, batch "
                f"{MIN_BATCH}) needs {per_voxel * math.prod(patch) * MIN_BATCH:.3g} "
                f"convolution-output elements, the plan allows {budget:.3g}; choose a "
                f"smaller --arch, or set --patch_size and --batch_size")
    fit = int(budget // (per_voxel * math.prod(patch)))
    covered = round(dataset_voxels * MAX_DATASET_COVERED / math.prod(patch))
    return patch, max(MIN_BATCH, min(fit, covered))


def check_patch(patch: Sequence[int], multiple: Sequence[int]) -> None:
    if len(patch) != 3 or any(p <= 0 or p % m for p, m in zip(patch, multiple)) or math.prod(
            p // m for p, m in zip(patch, multiple)) < 2:
        raise NnUNetToolError(
            f"--patch_size {list(patch)}: each axis must be a positive multiple of "
            f"{list(multiple)} (the encoder's total stride) and the deepest map must keep more than one voxel "
            f"(e.g. {[2 * multiple[0], *multiple[1:]]})")


def derive_plans(plans: dict, fingerprint: Mapping, dataset_json: Mapping, arch: str,
                 plans_name: str, patch_size: Sequence[int] | None = None,
                 batch_size: int | None = None,
                 decoder_channels: Sequence[int] = DECODER_CHANNELS,
                 stem_stride: Sequence[int] = (1, 2, 2)) -> tuple[dict, dict]:
    """nnU-Net's plans (as read from its JSON) -> (plans for DeSDUNet, summary)."""
    if arch not in ARCHS:
        raise NnUNetToolError(f"unknown --arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    if len(channels) != 1 or str(next(iter(channels.values()))).upper() != "CT":
        raise NnUNetToolError(
            f"dataset.json's channel_names are {dict(channels)}: DeSD was pre-trained on CT in "
            f"HU, one channel, so the dataset must have exactly one channel named CT")
    nn = _nnunet()
    manager = nn.PlansManager(copy.deepcopy(plans))
    if CONFIGURATION not in manager.available_configurations:
        raise NnUNetToolError(f"the plans have no {CONFIGURATION} configuration "
                              f"({', '.join(manager.available_configurations)})")
    source = manager.get_configuration(CONFIGURATION)
    in_channels = nn.input_channels(manager, source, dataset_json)
    num_heads = manager.get_label_manager(dataset_json).num_segmentation_heads

    # the memory nnU-Net planned: its network's convolution outputs x its batch size
    with torch.device("meta"):
        ref_net = nn.get_network(source.network_arch_class_name, source.network_arch_init_kwargs,
                                 source.network_arch_init_kwargs_req_import, in_channels,
                                 num_heads, allow_init=False, deep_supervision=True)
        budget = conv_output_voxels(ref_net, source.patch_size, in_channels) * source.batch_size
        ours = DeSDUNet(in_channels, num_heads, True, arch=arch,
                        decoder_channels=decoder_channels, stem_stride=stem_stride)
    multiple = list(ours.size_multiple)
    probe = [2 * m for m in multiple]  # every map is an exact fraction of it: counts scale
    per_voxel = conv_output_voxels(ours, probe, in_channels) / math.prod(probe)

    median, dataset_voxels = median_shape_at_1mm(fingerprint, manager.transpose_forward)
    if patch_size is None:
        patch, batch = choose_patch_and_batch(median, multiple, per_voxel, budget, dataset_voxels)
    else:
        patch = [int(p) for p in patch_size]
        check_patch(patch, multiple)
        fit = int(budget // (per_voxel * math.prod(patch)))
        batch = max(MIN_BATCH, fit)
    if batch_size is not None:
        batch = int(batch_size)

    config = copy.deepcopy(source.configuration)
    for key in ("inherits_from", "previous_stage", "next_stage"):
        config.pop(key, None)
    config.update({
        "data_identifier": f"{plans_name}_{CONFIGURATION}",
        "spacing": [1.0, 1.0, 1.0],
        "median_image_size_in_voxels": [round(m, 1) for m in median],
        "patch_size": patch,
        "batch_size": batch,
        "normalization_schemes": ["NoNormalization"],
        "use_mask_for_norm": [False],
        "architecture": {
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": {"arch": arch, "strides": encoder_strides(stem_stride),
                            "decoder_channels": [int(c) for c in decoder_channels],
                            "stem_stride": [int(s) for s in stem_stride]},
            "_kw_requires_import": [],
        },
    })
    new = copy.deepcopy(plans)
    new["plans_name"] = plans_name
    new["configurations"] = {CONFIGURATION: config}
    memory = per_voxel * math.prod(patch) * batch
    summary = {"patch_size": patch, "batch_size": batch, "median_1mm": median,
               "memory": memory, "budget": budget, "multiple": multiple,
               "source_patch_size": list(source.patch_size),
               "source_batch_size": source.batch_size}
    return new, summary


def write_plans(dataset: str, arch: str = "res3d50", source_plans: str = "nnUNetPlans",
                plans_name: str | None = None, **kwargs) -> dict:
    """Read nnU-Net's plans `source_plans` of `dataset`, write `plans_name` beside them."""
    folder = dataset_folder(dataset)
    plans_name = plans_name or f"DeSDPlans_{arch}"
    if plans_name == source_plans:
        raise NnUNetToolError(f"--plans_name {plans_name} would overwrite the source plans")
    plans = _read_json(folder / f"{source_plans}.json",
                       "nnU-Net's plans: run nnUNetv2_plan_and_preprocess first")
    fingerprint = _read_json(folder / "dataset_fingerprint.json", "nnU-Net's fingerprint")
    dataset_json = _read_json(folder / "dataset.json", "copied there by nnU-Net's planning")
    new, summary = derive_plans(plans, fingerprint, dataset_json, arch, plans_name, **kwargs)
    out = folder / f"{plans_name}.json"
    atomic.write_text(out, json.dumps(new, indent=4) + "\n")
    return {**summary, "out": str(out), "plans_name": plans_name, "dataset": folder.name}


# ----------------------------------------------------------------------------- weights
def desd_arch(plans: Mapping) -> str:
    """The encoder depth of plans written by `plans`; an error for any other plans."""
    config = plans.get("configurations", {}).get(CONFIGURATION, {})
    network = config.get("architecture", {}).get("network_class_name")
    arch = config.get("architecture", {}).get("arch_kwargs", {}).get("arch")
    if network != NETWORK_CLASS or arch not in ARCHS:
        raise NnUNetToolError(f"the plans {plans.get('plans_name')!r} do not build "
                              f"{NETWORK_CLASS} ({CONFIGURATION}: {network}): write them with "
                              f"tools/nnunet.py plans and pass their name with -p")
    return arch


def build_network(plans: dict, dataset_json: Mapping, seed: int = 0) -> torch.nn.Module:
    """The network nnU-Net's trainer builds from these plans (3d_fullres, deep
    supervision on), initialised from `seed` (the global RNG is left as it was)."""
    desd_arch(plans)
    nn = _nnunet()
    manager = nn.PlansManager(copy.deepcopy(plans))
    config = manager.get_configuration(CONFIGURATION)
    in_channels = nn.input_channels(manager, config, dataset_json)
    num_heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.get_network(config.network_arch_class_name, config.network_arch_init_kwargs,
                              config.network_arch_init_kwargs_req_import, in_channels,
                              num_heads, allow_init=True, deep_supervision=True)


def pretrained_network(plans: dict, dataset_json: Mapping, checkpoint: str | os.PathLike,
                       seed: int = 0, which: str | None = None
                       ) -> tuple[torch.nn.Module, dict]:
    """The network of `plans` with the backbone of `checkpoint` in its encoder."""
    checkpoint = Path(checkpoint)
    arch = desd_arch(plans)
    # CRC-checked, refuses code and non-tensor payloads: PretrainedLoadError naming the file
    state, source = extract_backbone_state(read_checkpoint(checkpoint), which)
    found = infer_arch(state)
    if found != arch:
        what = f"a {found} backbone" if found else "no complete res3d* backbone"
        raise NnUNetToolError(
            f"{checkpoint}: holds {what} ({source}), the plans' encoder is {arch}: write plans "
            f"for its depth (tools/nnunet.py plans --arch {found or '...'}) or use a {arch} "
            f"checkpoint")
    net = build_network(plans, dataset_json, seed)
    if net.encoder.conv1.weight.shape[1] != 1:
        raise NnUNetToolError(f"the network takes {net.encoder.conv1.weight.shape[1]} input "
                              f"channels; the pre-trained stem takes one (CT)")
    summary = load_pretrained_encoder(net.encoder, checkpoint, which)
    if summary["missing"]:
        raise NnUNetToolError(f"{checkpoint}: {len(summary['missing'])} encoder tensors were "
                              f"not in the checkpoint (e.g. {summary['missing'][:3]})")
    bad = [k for k, v in net.state_dict().items()
           if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise NnUNetToolError(f"{checkpoint}: non-finite values in {bad[:3]}")
    return net, {"arch": arch, "source": source, "n_encoder": summary["n_loaded"]}


def write_weights(dataset: str, checkpoint: str | os.PathLike, plans_name: str,
                  out: str | os.PathLike | None = None, seed: int = 0,
                  which: str | None = None) -> dict:
    """Write `{'network_weights': ...}` for `nnUNetv2_train -pretrained_weights`."""
    folder = dataset_folder(dataset)
    plans = _read_json(folder / f"{plans_name}.json", "write it with tools/nnunet.py plans")
    dataset_json = _read_json(folder / "dataset.json", "copied there by nnU-Net's planning")
    net, info = pretrained_network(plans, dataset_json, checkpoint, seed, which)
    out = Path(out) if out else folder / f"{plans_name}__pretrained.pth"
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    payload = {"network_weights": weights,
               "desd": {"checkpoint": str(checkpoint), "arch": info["arch"],
                        "source": info["source"], "seed": int(seed), "plans_name": plans_name}}
    with atomic.atomic_write(out, before_replace=verify_checkpoint_file) as f:
        torch.save(payload, f)
    return {**info, "out": str(out), "n_tensors": len(weights), "dataset": folder.name,
            "plans_name": plans_name}


# ----------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("nnunet.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plans", help="derive plans for DeSDUNet from the plans nnU-Net wrote")
    p.add_argument("-d", "--dataset", required=True,
                   help="nnU-Net dataset id or name (e.g. 501 or Dataset501_Spleen), after "
                        "nnUNetv2_plan_and_preprocess")
    p.add_argument("--arch", default="res3d50", choices=list(ARCHS),
                   help="encoder depth (default res3d50); must be the depth of the "
                        "checkpoint you will load (DeSD_Res50 and the published run: res3d50)")
    p.add_argument("-p", "--source_plans", default="nnUNetPlans",
                   help="nnU-Net's plans identifier to start from (default nnUNetPlans; "
                        "its resampling choices and memory budget are kept; e.g. "
                        "nnUNetResEncUNetMPlans)")
    p.add_argument("--plans_name", default=None,
                   help="new plans identifier (default DeSDPlans_<arch>); pass it to "
                        "nnU-Net as -plans_name / -p")
    p.add_argument("--patch_size", type=int_at_least(1), nargs=3, default=None,
                   metavar=("D", "H", "W"),
                   help="patch size in voxels at 1 mm, multiples of 16 32 32 (default: "
                        "nnU-Net's rule within its planned memory)")
    p.add_argument("--batch_size", type=int_at_least(1), default=None,
                   help="batch size (default: what fits the planned memory, at most 5%% of "
                        "the dataset, at least 2)")
    p.add_argument("--decoder_channels", type=int_at_least(1), nargs=5,
                   default=list(DECODER_CHANNELS), metavar="C",
                   help="widths of the five decoder levels, deepest first (default "
                        f"{' '.join(map(str, DECODER_CHANNELS))})")
    w = sub.add_parser("weights", help="write the -pretrained_weights file from a DeSD checkpoint")
    w.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    w.add_argument("-p", "--plans_name", default="DeSDPlans_res3d50",
                   help="plans identifier written by the plans step (default "
                        "DeSDPlans_res3d50)")
    w.add_argument("--checkpoint", required=True,
                   help="main_desd.py checkpoint.pth, the released DeSD_Res50 checkpoint, or "
                        "a .safetensors backbone (tools/export_backbone.py)")
    w.add_argument("--which", default=None, choices=("teacher", "student"),
                   help="network of a trainer checkpoint (default: the teacher, the one "
                        "DeSD evaluates)")
    w.add_argument("-o", "--out", default=None,
                   help="output file (default: <plans_name>__pretrained.pth in the "
                        "dataset's nnUNet_preprocessed folder)")
    w.add_argument("--seed", type=int, default=0,
                   help="seed of the decoder's initialisation (default 0; the same seed, "
                        "the same file)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "plans":
            s = write_plans(args.dataset, args.arch, args.source_plans, args.plans_name,
                            patch_size=args.patch_size, batch_size=args.batch_size,
                            decoder_channels=args.decoder_channels)
            print(f"wrote {s['out']}: 3d_fullres at 1 mm, {NETWORK_CLASS} ({args.arch}), patch "
                  f"{s['patch_size']}, batch {s['batch_size']} (nnU-Net's: patch "
                  f"{s['source_patch_size']}, batch {s['source_batch_size']}; memory "
                  f"{s['memory'] / s['budget']:.0%} of its plan)")
            print(f"next: nnUNetv2_preprocess -d {args.dataset} -plans_name {s['plans_name']} "
                  f"-c 3d_fullres")
        else:
            s = write_weights(args.dataset, args.checkpoint, args.plans_name, args.out,
                              args.seed, args.which)
            print(f"wrote {s['out']}: {s['n_tensors']} tensors, the {s['source']}'s {s['arch']} "
                  f"backbone in the encoder ({s['n_encoder']} tensors), the decoder from seed "
                  f"{args.seed}")
            print(f"next: nnUNetv2_train {args.dataset} 3d_fullres 0 -p {s['plans_name']} "
                  f"-pretrained_weights {s['out']}")
    except (ValueError, OSError) as e:  # NnUNetToolError, PretrainedLoadError, WriteError
        print(f"nnunet.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
