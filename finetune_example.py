"""Fine-tune a DeSD pre-trained 3D ResNet encoder for segmentation: the example loop.

The network and the loading live in `models/` (the part to copy into your project:
`from models import ResUNet3D, load_pretrained_encoder`); this file is the loop around
them, to read top to bottom: data, random patches, Dice + cross-entropy, sliding-window
inference, Dice on held-out cases.

    # from the pre-trained teacher (checkpoint.pth of main_desd.py, the released
    # DeSD_Res50 checkpoint, or a teacher_backbone.safetensors), on a synthetic set
    # (the encoder's depth is read from the checkpoint)
    python finetune_example.py --pretrained checkpoint.pth --output_dir ft_teacher
    # the same from scratch, to compare (res3d50 unless --arch says otherwise)
    python finetune_example.py --arch res3d50 --output_dir ft_scratch
    # on an MSD task (imagesTr/*.nii.gz, labelsTr/*.nii.gz), on a GPU
    python finetune_example.py --pretrained checkpoint.pth --data_dir Task09_Spleen \
        --epochs 50 --patch_size 64 128 128 --batch_size 2 --output_dir ft_spleen
    # a quick CPU run
    python finetune_example.py --arch res3d10 --epochs 2 --iters_per_epoch 10 \
        --patch_size 32 64 64 --n_synthetic 4 --synthetic_size 48 --output_dir ft_quick

Data are prepared as the pre-training data were (`models.contract`: resampled to 1 mm
exactly as stage 2 does, labels by nearest neighbour, HU clipped to [-1024, 1024], input
= HU / 1024) and cached under `OUTPUT_DIR/preprocessed_*`. Half of the patches are
centred on a foreground voxel. The last third of the cases (sorted by name) is held
out, segmented by sliding window, and the script prints the Dice per foreground class
and overall (`Dice: 0.xxx`), also written to `OUTPUT_DIR/results.json`; with
`--eval_every N` also after every N epochs (the learning curve, `results.json` 'curve').
`--freeze_encoder_epochs` and `--encoder_lr_scale` are the two usual ways to keep a
pre-trained encoder from being overwritten while the new decoder is still random.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import utils
from common import atomic
from common.cases import (add_labelled_data_args, check_data_dir, crop_pad, labelled_data,
                          random_patch, split_cases)
from models import ARCHS, HU_MIN, ResUNet3D, build_backbone, hu_to_input, load_pretrained_encoder
from common.cli import float_in, int_at_least


# ----------------------------------------------------------------------------- arguments
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeSD fine-tuning example", add_help=False)
    p.add_argument("--pretrained", default=None, type=str,
                   help="checkpoint to initialise the encoder from: main_desd.py's checkpoint.pth, "
                        "the released DeSD checkpoint, or a backbone .safetensors; omit to train "
                        "from scratch (to compare)")
    p.add_argument("--which", default=None, choices=("teacher", "student"),
                   help="network of the checkpoint to load (default: the teacher, the one DeSD "
                        "evaluates; the student if there is no teacher)")
    p.add_argument("--arch", default=None, choices=list(ARCHS),
                   help="encoder depth; by default read from --pretrained, res3d50 without it; "
                        "when given with --pretrained, it must match the checkpoint")
    p.add_argument("--epochs", default=20, type=int_at_least(1), help="training epochs")
    p.add_argument("--iters_per_epoch", default=50, type=int_at_least(1),
                   help="iterations (batches of random patches) per epoch")
    p.add_argument("--batch_size", default=2, type=int_at_least(1), help="patches per iteration")
    p.add_argument("--decoder_channels", default=(256, 128, 64, 32, 16), type=int_at_least(1),
                   nargs=5, metavar="C",
                   help="decoder widths from the deepest level to full resolution; the last "
                        "two dominate the cost on a CPU (e.g. 128 64 32 16 8 is twice as fast)")
    p.add_argument("--lr", default=3e-4, type=float_in(0.0, low_open=True),
                   help="AdamW peak learning rate (cosine decay to 1%% of it)")
    p.add_argument("--weight_decay", default=1e-4, type=float_in(0.0), help="AdamW weight decay")
    p.add_argument("--eval_overlap", default=0.5, type=float_in(0.0, 0.95),
                   help="sliding-window overlap at evaluation (0 is fastest)")
    p.add_argument("--eval_every", default=0, type=int_at_least(0),
                   help="also measure the held-out Dice after every N epochs (a learning curve "
                        "in results.json under 'curve'); 0: only after the last epoch")
    p.add_argument("--freeze_encoder_epochs", default=0, type=int_at_least(0),
                   help="keep the encoder fixed for the first N epochs (only the decoder "
                        "learns), then train everything: a common way to keep pre-trained "
                        "features from being overwritten while the decoder is still random")
    p.add_argument("--encoder_lr_scale", default=1.0, type=float_in(0.0, low_open=True),
                   help="the encoder's learning rate as a fraction of --lr (e.g. 0.1 to move "
                        "pre-trained weights less than the new decoder)")
    p.add_argument("--output_dir", "--out_dir", default="finetune_output", type=str,
                   help="where the synthetic set, the preprocessing cache, the model and "
                        "results.json go")
    p.add_argument("--seed", default=0, type=int,
                   help="seed for the network, the synthetic set and the patches (runs repeat)")
    add_labelled_data_args(p, patch_size=(32, 64, 64), synthetic_size=64,
                                     fg_fraction=0.5)
    utils.add_device_args(p)
    return p


# ----------------------------------------------------------------------------- data
def patch_batch(cases, args, rng: np.random.Generator, device: torch.device):
    """`batch_size` random patches: (input [B, 1, D, H, W], labels [B, D, H, W])."""
    patches = [random_patch(cases[rng.integers(len(cases))], args.patch_size,
                                      args.fg_fraction, HU_MIN, rng)
               for _ in range(args.batch_size)]
    x = torch.stack([hu_to_input(torch.from_numpy(img)) for img, _ in patches])[:, None]
    y = torch.stack([torch.from_numpy(seg.astype(np.int64)) for _, seg in patches])
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- loss, metric
def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice over the foreground classes, batch-wise)."""
    logits = logits.float()
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probs.dtype)
    dims = (0, 2, 3, 4)
    dice = (2 * (probs * onehot).sum(dims) + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
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
    padded = crop_pad(np.asarray(hu), (0, 0, 0),
                                [max(n, p) for n, p in zip(shape, patch)], HU_MIN)
    starts = [sorted(set(range(0, n - p, max(1, int(p * (1 - overlap))))) | {n - p})
              for n, p in zip(padded.shape, patch)]
    probs = torch.zeros((num_classes, *padded.shape))
    counts = torch.zeros(padded.shape)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                win = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                inp = hu_to_input(torch.from_numpy(padded[win]))[None, None].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16,
                                    enabled=device.type == "cuda"):
                    logits = net(inp)
                probs[(slice(None), *win)] += logits.float().softmax(1)[0].cpu()  # GPU->CPU sync
                counts[win] += 1
    pred = (probs / counts).argmax(0).numpy().astype(np.uint8)
    return pred[: shape[0], : shape[1], : shape[2]]


# ----------------------------------------------------------------------------- loop
def train_one_epoch(net: nn.Module, cases, optimizer: torch.optim.Optimizer,
                    lr_schedule: np.ndarray, epoch: int, args, device: torch.device) -> float:
    from tqdm import tqdm
    net.train()
    rng = np.random.default_rng([args.seed, epoch])  # patches depend on seed and epoch only
    total = torch.zeros((), device=device)
    for it in tqdm(range(args.iters_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   leave=False):
        for group in optimizer.param_groups:  # "scale": the encoder's --encoder_lr_scale
            group["lr"] = lr_schedule[epoch * args.iters_per_epoch + it] * group["scale"]
        x, y = patch_batch(cases, args, rng, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        loss = dice_ce_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    mean = (total / args.iters_per_epoch).item()  # the epoch's one CPU-GPU sync
    if not math.isfinite(mean):
        raise ValueError(f"non-finite loss in epoch {epoch + 1}; lower --lr")
    return mean


def evaluate(net: nn.Module, val_cases, num_classes: int, args, device: torch.device
             ) -> tuple[float, list[float]]:
    """Held-out Dice: (mean over the foreground classes, per class). A class absent from a
    case in both prediction and truth does not count for that case."""
    net.eval()
    scores = np.stack([dice_per_class(
        predict_volume(net, c.image, args.patch_size, num_classes, device, args.eval_overlap),
        np.asarray(c.labels), num_classes) for c in val_cases])
    net.train()
    per_class = [float(np.nanmean(col)) if not np.isnan(col).all() else float("nan")
                 for col in scores.T]
    kept = [v for v in per_class if not math.isnan(v)]
    return (float(np.mean(kept)) if kept else float("nan")), per_class


def run(args) -> dict:
    device = utils.setup_device(args)
    torch.manual_seed(args.seed)

    # ---------------------------------------------------------------- encoder
    # Its depth is the checkpoint's; loaded before anything is created or the data are
    # prepared, so a wrong checkpoint fails in seconds.
    args.arch = utils.resolve_arch(args.arch, [args.pretrained] if args.pretrained else [],
                                   args.which)
    encoder = build_backbone(args.arch)
    if args.pretrained:
        load_pretrained_encoder(encoder, args.pretrained, args.which)
    else:
        print(f"no --pretrained: training {args.arch} from scratch")
    check_data_dir(args)  # a wrong --data_dir fails before the output folder exists
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- data
    data_dir, cases, names = labelled_data(args, out_dir)
    train_cases, val_cases = split_cases(cases, args.val_fraction)
    num_classes = len(names)
    print(f"{len(train_cases)} training and {len(val_cases)} held-out cases "
          f"({', '.join(c.name for c in val_cases)}); {num_classes} classes: {', '.join(names)}")

    # ---------------------------------------------------------------- network
    net = ResUNet3D(args.arch, num_classes=num_classes, decoder_channels=args.decoder_channels)
    net.encoder = encoder
    net.to(device)

    # ---------------------------------------------------------------- optimiser, schedule
    encoder_params = list(net.encoder.parameters())
    known = {id(q) for q in encoder_params}
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "scale": args.encoder_lr_scale},
         {"params": [q for q in net.parameters() if id(q) not in known], "scale": 1.0}],
        lr=args.lr, weight_decay=args.weight_decay)
    lr_schedule = utils.cosine_scheduler(args.lr, 0.01 * args.lr, args.epochs, args.iters_per_epoch)

    # ---------------------------------------------------------------- loop
    start, curve = time.time(), []
    for epoch in range(args.epochs):
        frozen = epoch < args.freeze_encoder_epochs  # AdamW leaves a parameter without a
        for q in encoder_params:                     # gradient untouched (no decay either)
            q.requires_grad_(not frozen)
        loss = train_one_epoch(net, train_cases, optimizer, lr_schedule, epoch, args, device)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  ({time.time() - start:.0f} s)"
              + ("  (encoder fixed)" if frozen else ""))
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            dice, _ = evaluate(net, val_cases, num_classes, args, device)
            curve.append({"epoch": epoch + 1, "step": (epoch + 1) * args.iters_per_epoch,
                          "dice": dice})
            print(f"epoch {epoch + 1}/{args.epochs}  held-out Dice {dice:.3f}")

    # ---------------------------------------------------------------- evaluation
    overall, per_class = evaluate(net, val_cases, num_classes, args, device)
    curve.append({"epoch": args.epochs, "step": args.epochs * args.iters_per_epoch,
                  "dice": overall})
    print("Dice per class (held-out): "
          + "  ".join(f"{n} {v:.3f}" for n, v in zip(names[1:], per_class)))
    print(f"Dice: {overall:.3f}")

    results = {"dice": overall, "dice_per_class": dict(zip(names[1:], per_class)),
               "curve": curve, "pretrained": args.pretrained, "arch": args.arch,
               "epochs": args.epochs, "iters_per_epoch": args.iters_per_epoch,
               "freeze_encoder_epochs": args.freeze_encoder_epochs,
               "encoder_lr_scale": args.encoder_lr_scale,
               "seed": args.seed, "held_out": [c.name for c in val_cases]}
    with atomic.atomic_write(out_dir / "finetuned_model.pth") as f:
        torch.save(net.state_dict(), f)
    atomic.write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    print(f"model and results.json written to {out_dir}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("finetune_example.py", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    # every depth has the same strides: the check does not wait for the checkpoint's depth
    utils.check_patch_size(parser, args.arch or utils.DEFAULT_ARCH, args.patch_size)
    try:
        run(args)
    except (ValueError, OSError) as e:  # PretrainedLoadError and VolumeError are ValueErrors
        print(f"finetune_example.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
