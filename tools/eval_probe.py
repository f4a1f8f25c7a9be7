"""Frozen-encoder probes on every stage: what pre-training bought, stage by stage.

    # random init vs DINO vs DeSD, 3 seeds, with the label-free view retrieval (CPU, minutes)
    python tools/eval_probe.py random runs/dino/checkpoint.pth runs/desd/checkpoint.pth \
        --names random DINO DeSD --probe_seeds 0 1 2 \
        --retrieval_list heldout/SSL_data_deeplesion.txt --output_dir probe_output
    # the released teacher (or any .safetensors backbone) on an MSD task, on a GPU
    python tools/eval_probe.py DeSD_Res50.pth --data_dir Task09_Spleen \
        --patch_size 64 128 128 --patches_per_case 32 --epochs 100 --output_dir probe_spleen

DeSD's claim is that distilling into every stage makes the shallow stages better, not only
the last one; these probes measure it without fine-tuning anything. Each CHECKPOINT is
main_desd.py's `checkpoint.pth` (its teacher), a backbone `.safetensors`
(tools/export_backbone.py), the released DeSD checkpoint, or the word `random` (a seeded
random initialisation, the baseline). Checkpoints given the same `--names` form one group
(e.g. three pre-training seeds). The depth is read from the checkpoints (`--arch`, when
given, must match it; `random` alone is res3d50). The encoder is frozen (eval mode,
`torch.no_grad()`, bf16 autocast on CUDA). Per stage:

- linear probe: a 1x1x1 convolution on the stage map (channels standardised with the
  training features' statistics), its logits upsampled trilinearly to the label grid,
  trained with cross-entropy (Adam, `--epochs` passes over `--probe_voxels` voxels drawn
  from the training patches: both maps are linear, so the upsampled features at those
  voxels give exactly the model's logits there); Dice per foreground class and their
  mean on the held-out cases' patches (voxel counts pooled over patches). Patches are
  fixed for `--seed` (`--patches_per_case` per case, most centred on an organ voxel);
  with `--augment` they first go through the pre-training's intensity augmentation, so
  the probe must read the organs through it;
- k-NN: the stage map averaged over space, cosine similarity, the k nearest training
  patches vote with weights exp(similarity / T) as in DINO's k-NN evaluation; a patch's
  label is that of its centre voxel; accuracy on the held-out patches;
- view retrieval (with `--retrieval_list`, label-free): two views of each held-out
  sub-volume (`data_loader_ssl.retrieval_pairs`), top-1/top-5 of finding each view's
  partner among all 2N by the pooled stage features (`retrieval.view_retrieval`).

Every measurement is repeated for each of `--probe_seeds` (the random init, the probe's
initialisation and voxel sample, the augmentation draws and the retrieval views change
with it). The spread of a group is the standard deviation over its checkpoints and
seeds; every group is compared with every group before it: difference of the means,
called better or worse when it exceeds twice the larger spread either way, within when it
does not, and not judged when a group was measured once (n = 1, no spread). The last
`--val_fraction` of the cases (sorted by name) is held out, as in finetune_example.py;
data are prepared as for fine-tuning and cached under `OUTPUT_DIR/preprocessed/`.

Output: the tables on stdout (mean ± std per group and stage; the comparisons), and in
OUTPUT_DIR `probe_results.csv` (one row per checkpoint, seed and stage),
`probe_results.json` (everything, with the summary and the settings; what `run()`
returns) and `probe_results.png` (bars with spreads).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
import utils  # noqa: E402
from common import listfile  # noqa: E402
from common.cases import (add_labelled_data_args, check_data_dir, labelled_data,  # noqa: E402
                          random_patch, split_cases)
from data_loader_ssl import VIEW_INTENSITY_PARAMS, BatchIntensityAugment, retrieval_pairs  # noqa: E402
from models import ARCHS, HU_MIN, build_backbone, hu_to_input, load_pretrained_encoder  # noqa: E402
from common.cli import BOOL, float_in, int_at_least  # noqa: E402
from common.probe_report import (SUMMARY_METRICS, compare, format_tables, result_columns,  # noqa: E402
                                 summarise, write_outputs)
from common.retrieval import held_out_warnings, retrieval_by_stage  # noqa: E402

NUM_STAGES = 4
RANDOM = "random"


class ProbeError(ValueError):
    """A checkpoint or data set the probe refuses, with what to do about it."""


# ----------------------------------------------------------------------------- encoders
def default_name(spec: str) -> str:
    """'random'; the run folder for the files main_desd.py/export_backbone.py write
    (runs/dino/checkpoint.pth -> dino); otherwise the file name without its suffix."""
    if spec == RANDOM:
        return RANDOM
    path = Path(spec)
    generic = path.name.startswith("checkpoint") or path.name.endswith("_backbone.safetensors")
    parent = path.resolve().parent.name
    return parent if generic and parent else path.name.split(".")[0]


def build_encoder(spec: str, arch: str, seed: int, which: str | None = None) -> nn.Module:
    """The frozen encoder for `spec` ('random' or a checkpoint path), in eval mode."""
    torch.manual_seed(seed)  # 'random' is the same network for the same seed
    encoder = build_backbone(arch)
    if spec != RANDOM:
        summary = load_pretrained_encoder(encoder, spec, which)
        if summary["n_loaded"] != summary["n_model"]:
            raise ProbeError(f"{spec}: only {summary['n_loaded']} of the encoder's "
                             f"{summary['n_model']} tensors were in the checkpoint; a probe of a "
                             f"half-loaded encoder would mislead")
    encoder.requires_grad_(False)
    return encoder.eval()


# ----------------------------------------------------------------------------- data
def sample_patches(cases: Sequence, patch_size: Sequence[int], per_case: int,
                   fg_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_case` patches of every case (int16 HU, uint8 labels), stacked.

    Each case draws from its own generator seeded by (seed, case index), so the patches
    depend only on the seed and the case, not on the other cases or the checkpoint.
    """
    images, labels = [], []
    for i, case in enumerate(cases):
        rng = np.random.default_rng([seed, i])
        for _ in range(per_case):
            img, seg = random_patch(case, patch_size, fg_fraction, HU_MIN, rng)
            images.append(img)
            labels.append(seg)
    return np.stack(images), np.stack(labels)


def centre_label(labels: np.ndarray) -> np.ndarray:
    """The label of every patch's centre voxel (`labels`: N x D x H x W)."""
    return labels[(slice(None), *(n // 2 for n in labels.shape[1:]))].astype(np.int64)


@torch.no_grad()
def augment_inputs(inputs: torch.Tensor, seed: int) -> torch.Tensor:
    """Network inputs [N x D x H x W] through the pre-training's intensity augmentation
    (per depth slice, the view-1 parameters); deterministic for `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return BatchIntensityAugment().augment(inputs[:, None], VIEW_INTENSITY_PARAMS[0], gen)[:, 0]


# ----------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(encoder: nn.Module, inputs: torch.Tensor, batch_size: int,
                     device: torch.device) -> list[torch.Tensor]:
    """The four stage maps of every patch (network inputs [N x D x H x W]; float32, CPU):
    [N x C_s x d_s x h_s x w_s]."""
    from tqdm import tqdm
    encoder.to(device)
    stages: list[list[torch.Tensor]] = [[] for _ in range(NUM_STAGES)]
    for start in tqdm(range(0, len(inputs), batch_size), desc="features", leave=False):
        x = inputs[start:start + batch_size, None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            maps = encoder.forward_features(x)
        for s, m in enumerate(maps):
            stages[s].append(m.float().cpu())  # GPU->CPU sync, once per batch
    return [torch.cat(s) for s in stages]


# ----------------------------------------------------------------------------- k-NN
def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Weighted k-NN on cosine similarity, after DINO's `knn_classifier` (eval_knn.py).

    The k most similar training samples vote for their label with weight
    exp(similarity / temperature); k is capped at the number of training samples.
    Returns the predicted label of each test sample.
    """
    num_classes = num_classes or int(train_y.max()) + 1
    sim = F.normalize(test_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T
    top, idx = sim.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx].long(), (top.double() / temperature).exp())
    return votes.argmax(1)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> float:
    """Fraction of test samples whose k-NN label (`knn_classify`) is right."""
    pred = knn_classify(train_x, train_y, test_x, k, temperature, num_classes)
    return float((pred == test_y.long()).double().mean())


# ----------------------------------------------------------------------------- linear probe
def upsampled_at(feats: torch.Tensor, size: Sequence[int], n_per_patch: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage features upsampled (trilinearly) to the label grid `size`, at `n_per_patch`
    random voxels of every patch: [N * n_per_patch x C], and the flat voxel indices
    [N x n_per_patch].

    Exactly what `F.interpolate(feats, size, mode="trilinear", align_corners=False)` gives
    at those voxels (grid_sample with the same half-voxel convention and a clamped border),
    without materialising the upsampled map: C x D x H x W per patch is what made
    training on full maps slow and memory-bound.
    """
    n, c = feats.shape[:2]
    idx = torch.randint(0, math.prod(size), (n, n_per_patch), generator=generator)
    coords = torch.stack(torch.unravel_index(idx, tuple(size)), dim=-1)     # N x V x (z, y, x)
    extent = torch.tensor(size, dtype=torch.float32)
    grid = ((coords + 0.5) / extent * 2 - 1).flip(-1)                     # grid_sample: (x, y, z)
    out = F.grid_sample(feats, grid[:, None, None].to(feats.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)     # N x C x 1 x 1 x V
    return out.reshape(n, c, n_per_patch).transpose(1, 2).reshape(-1, c), idx


class LinearProbe(nn.Module):
    """1x1x1 convolution on standardised stage features; logits upsampled to the labels.

    The standardisation (per channel, from the training features) is a fixed affine map,
    so the probe stays linear in the features; it only makes Adam's job the same for
    every stage whatever the scale of its features.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.reshape(-1))
        self.register_buffer("std", std.reshape(-1).clamp_min(1e-6))
        self.conv = nn.Conv3d(len(self.mean), num_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits of stage maps [N x C x d x h x w], upsampled to `size`."""
        shape = (1, -1, 1, 1, 1)
        logits = self.conv((feats - self.mean.view(shape)) / self.std.view(shape))
        return F.interpolate(logits, size=tuple(size), mode="trilinear", align_corners=False)


def train_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int,
                       batch_size: int, lr: float, n_voxels: int, seed: int,
                       device: torch.device) -> LinearProbe:
    """Fit a `LinearProbe` on stage maps `feats` [N x C x ...] to `labels` [N x D x H x W]
    with cross-entropy and Adam.

    Because 1x1x1 convolution and trilinear upsampling are both linear (and the upsampling
    weights sum to one), upsample(conv(f)) = conv(upsample(f)): the probe is trained on the
    upsampled features at `n_voxels` voxels drawn uniformly from the training patches
    (the same model and loss as on full maps, estimated on a sample), in `epochs` passes of
    shuffled mini-batches of `batch_size` voxels.
    """
    gen = torch.Generator().manual_seed(seed)
    per_patch = max(1, n_voxels // len(feats))
    x, idx = upsampled_at(feats, labels.shape[1:], per_patch, gen)
    y = labels.reshape(len(labels), -1).gather(1, idx).reshape(-1)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    probe = LinearProbe(x.mean(0), x.std(0), num_classes).to(device)
    x = (x - probe.mean) / probe.std  # once here rather than at every step
    weight, bias = probe.conv.weight, probe.conv.bias
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    # Steps this small are slower with several CPU threads than with one (thread start and
    # sync outweigh the work; measured 10-20x on a busy 2-core machine).
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=gen).split(batch_size):
                batch = batch.to(device)
                logits = F.linear(x[batch], weight.flatten(1), bias)
                loss = F.cross_entropy(logits, y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return probe.eval()


@torch.no_grad()
def linear_probe_dice(probe: LinearProbe, feats: torch.Tensor, labels: torch.Tensor,
                      num_classes: int, batch_size: int, device: torch.device) -> np.ndarray:
    """Dice of each foreground class with voxel counts pooled over all patches (NaN where
    a class is in neither the prediction nor the labels)."""
    inter = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64)
    for start in range(0, len(feats), batch_size):
        y = labels[start:start + batch_size]
        pred = probe(feats[start:start + batch_size].to(device), y.shape[1:]).argmax(1).cpu()
        inter += torch.bincount(y[pred == y].flatten(), minlength=num_classes)[:num_classes]
        total += torch.bincount(pred.flatten(), minlength=num_classes)[:num_classes]
        total += torch.bincount(y.flatten(), minlength=num_classes)[:num_classes]
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.tensor(float("nan")))
    return dice[1:].numpy()


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


# ----------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeSD per-stage probes", add_help=False)
    p.add_argument("checkpoints", nargs="*", default=[RANDOM], metavar="CHECKPOINT",
                   help="checkpoints to probe, side by side: main_desd.py's checkpoint.pth (its "
                        "teacher), a backbone .safetensors, the released DeSD checkpoint, or "
                        "'random' for a seeded random initialisation")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="one group name per checkpoint; checkpoints with the same name form one "
                        "group (e.g. pre-training seeds) summarised together (default: "
                        "'random', the run folder of a checkpoint.pth or "
                        "*_backbone.safetensors, else the file name)")
    p.add_argument("--which", default=None, choices=("teacher", "student"),
                   help="network of a trainer checkpoint to probe (default: the teacher, the "
                        "one DeSD evaluates)")
    p.add_argument("--arch", default=None, choices=list(ARCHS),
                   help="encoder depth; by default read from the checkpoints (all must be one "
                        "depth; 'random' is built at it), res3d50 for 'random' alone; when "
                        "given, every checkpoint must be this depth")
    p.add_argument("--patches_per_case", default=12, type=int_at_least(1),
                   help="fixed patches drawn from every case; more gives steadier numbers and "
                        "costs feature extraction time and memory (the maps are cached)")
    p.add_argument("--epochs", default=40, type=int_at_least(1),
                   help="passes of the linear probe over its training voxels (Adam steps = "
                        "epochs x probe_voxels / probe_batch_size; a few hundred are enough "
                        "for a linear classifier)")
    p.add_argument("--probe_voxels", default=32768, type=int_at_least(1),
                   help="voxels drawn uniformly from the training patches to fit the linear "
                        "probe on (its features upsampled exactly as at evaluation); more is "
                        "closer to training on every voxel and costs memory (x channels)")
    p.add_argument("--probe_batch_size", default=4096, type=int_at_least(1),
                   help="voxels per linear-probe Adam step")
    p.add_argument("--probe_lr", default=1e-2, type=float_in(0.0, low_open=True),
                   help="Adam learning rate of the linear probe (features are standardised, "
                        "so one rate suits every stage)")
    p.add_argument("--knn_k", default=5, type=int_at_least(1),
                   help="neighbours of the k-NN probe (DINO uses 20 with thousands of images; "
                        "keep it well below the number of training patches)")
    p.add_argument("--knn_temperature", default=0.07, type=float_in(0.0, low_open=True),
                   help="temperature of the k-NN vote weights exp(cos / T) (DINO: 0.07)")
    p.add_argument("--probe_seeds", default=[0], type=int, nargs="+", metavar="SEED",
                   help="repeat every measurement with these seeds (the random init, the "
                        "probe's initialisation and voxel sample, the augmentation draws and the "
                        "retrieval views change with them); spreads are taken over them")
    p.add_argument("--augment", default=False, **BOOL,
                   help="pass the probe patches through the pre-training's intensity "
                        "augmentation (per depth slice), so that the probe must read the organs "
                        "through it")
    p.add_argument("--retrieval_list", default=None, type=str,
                   help="list file of held-out unlabelled sub-volumes (splitting_to_patches.py's, "
                        "none of them pre-trained on): adds the label-free view retrieval "
                        "top-1/top-5 per stage")
    p.add_argument("--retrieval_n", default=64, type=int_at_least(2),
                   help="held-out sub-volumes used for the view retrieval (the first N listed)")
    p.add_argument("--retrieval_crop", default=(16, 48, 48), type=int_at_least(1), nargs=3,
                   metavar=("D", "H", "W"),
                   help="view size of the retrieval (the pre-training's --global_crop_size)")
    p.add_argument("--batch_size", default=8, type=int_at_least(1),
                   help="patches per forward pass of the frozen encoder")
    p.add_argument("--output_dir", "--out_dir", default="probe_output", type=str,
                   help="where the synthetic set, the preprocessing cache and probe_results.* go")
    p.add_argument("--seed", default=0, type=int,
                   help="seed of the synthetic set and the patches (fixed for every checkpoint "
                        "and probe seed): the same seeds give the same numbers")
    add_labelled_data_args(p, patch_size=(16, 48, 48), synthetic_size=96,
                                     fg_fraction=0.8)
    utils.add_device_args(p)
    return p


def run(args) -> dict:
    """Probe every checkpoint of `args.checkpoints`; returns the results (also written)."""
    names = args.names or [default_name(c) for c in args.checkpoints]
    device = utils.setup_device(args)
    start = time.time()

    # ---------------------------------------------------------------- checkpoints, held-out list
    # Checked before anything is created or the data are prepared: a wrong checkpoint fails
    # in seconds. The depth is the checkpoints' (one for all); 'random' is built at it.
    args.arch = utils.resolve_arch(args.arch, [c for c in args.checkpoints if c != RANDOM],
                                   args.which)
    print(f"encoder: {args.arch}")
    held_out = (listfile.read_list_file(args.retrieval_list)[:args.retrieval_n]
                if args.retrieval_list else [])
    check_data_dir(args)  # a wrong --data_dir fails before the output folder exists
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- data
    data_dir, cases, class_names = labelled_data(args, out_dir)
    num_classes = len(class_names)
    splits = dict(zip(("train", "val"), split_cases(cases, args.val_fraction)))
    patches = {k: sample_patches(v, args.patch_size, args.patches_per_case, args.fg_fraction,
                                 args.seed + (k == "val"))
               for k, v in splits.items()}
    inputs = {k: hu_to_input(torch.from_numpy(images)) for k, (images, _) in patches.items()}
    labels = {k: torch.from_numpy(seg.astype(np.int64)) for k, (_, seg) in patches.items()}
    centre = {k: torch.from_numpy(centre_label(seg)) for k, (_, seg) in patches.items()}
    counts = np.bincount(centre["val"].numpy(), minlength=num_classes)
    knn_chance = float(counts.max() / counts.sum())  # always the commonest label
    print(f"{len(splits['train'])} training and {len(splits['val'])} held-out cases "
          f"({', '.join(c.name for c in splits['val'])}); {len(labels['train'])} + "
          f"{len(labels['val'])} patches of {tuple(args.patch_size)}; classes: "
          f"{', '.join(class_names)}; held-out patch centres: " + ", ".join(
              f"{n} {c}" for n, c in zip(class_names, counts)) + f" (k-NN chance {knn_chance:.3f})")
    pairs = {}
    if held_out:
        pairs = {s: retrieval_pairs(held_out, args.retrieval_crop, s) for s in args.probe_seeds}
        print(f"view retrieval: {len(held_out)} held-out sub-volumes of {args.retrieval_list}")
        for w in held_out_warnings(len(held_out)):
            print(f"WARNING: {w}")

    # ---------------------------------------------------------------- probes
    runs = []
    for spec, name in zip(args.checkpoints, names):
        print(f"== {name}: {spec}")
        t0, feats = time.time(), None
        for seed in args.probe_seeds:
            encoder = build_encoder(spec, args.arch, seed, args.which)
            if feats is None or spec == RANDOM or args.augment:  # else the same features
                feats = {k: extract_features(encoder, augment_inputs(x, seed + (k == "val"))
                                             if args.augment else x, args.batch_size, device)
                         for k, x in inputs.items()}
            stages = []
            for s in range(NUM_STAGES):
                probe = train_linear_probe(feats["train"][s], labels["train"], num_classes,
                                           args.epochs, args.probe_batch_size, args.probe_lr,
                                           args.probe_voxels, seed * 100 + s, device)
                dice = linear_probe_dice(probe, feats["val"][s], labels["val"], num_classes,
                                         args.batch_size, device)
                pooled = {k: f[s].mean(dim=(2, 3, 4)) for k, f in feats.items()}
                acc = knn_accuracy(pooled["train"], centre["train"], pooled["val"], centre["val"],
                                   args.knn_k, args.knn_temperature, num_classes)
                stages.append({"stage": s + 1, **{f"dice_{n}": float(d) for n, d in
                                                  zip(class_names[1:], dice)},
                               "dice_mean": _nanmean(list(map(float, dice))), "knn_acc": acc})
            if pairs:
                r = retrieval_by_stage(encoder, pairs[seed], device, args.batch_size)
                for st in stages:
                    st |= {f"retrieval_top{k}": r[f"retrieval_top{k}_stage{st['stage']}"]
                           for k in (1, 5)}
            runs.append({"name": name, "checkpoint": spec, "seed": seed, "stages": stages})
        print(f"   {len(args.probe_seeds)} seed(s) in {time.time() - t0:.1f} s")

    # ---------------------------------------------------------------- report
    metrics = [m for m in SUMMARY_METRICS if m in runs[0]["stages"][0]]
    summary = summarise(runs, metrics)
    results = {"class_names": class_names, "knn_chance": knn_chance,
               "columns": ["checkpoint", "path", "seed", "stage",
                           *result_columns(class_names, bool(pairs))],
               "retrieval_chance": {f"top{k}": min(1.0, k / (2 * len(next(iter(pairs.values()))[0]) - 1))
                                    for k in (1, 5)} if pairs else None,
               "summary_metrics": metrics, "runs": runs, "summary": summary,
               "comparisons": compare(summary, metrics),
               "settings": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                            for k, v in vars(args).items() if k not in ("device", "threads")}}
    results["settings"].update(names=names, data_dir=str(data_dir),
                               held_out=[c.name for c in splits["val"]])
    print(format_tables(results))
    results["seconds"] = round(time.time() - start, 1)
    written = write_outputs(results, out_dir)
    print(f"written: {', '.join(str(p) for p in written)} ({results['seconds']:.0f} s)")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments (a bad value stops here, naming the flag)."""
    parser = argparse.ArgumentParser("eval_probe.py", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    arch = args.arch or utils.DEFAULT_ARCH  # every depth has the same strides
    utils.check_patch_size(parser, arch, args.patch_size)
    utils.check_patch_size(parser, arch, args.retrieval_crop, "--retrieval_crop")
    if args.names is not None and len(args.names) != len(args.checkpoints):
        parser.error(f"--names gives {len(args.names)} names for {len(args.checkpoints)} "
                     f"checkpoints")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # PretrainedLoadError, ProbeError, VolumeError ...
        print(f"eval_probe.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
