"""Run nnU-Net v2's own training entry point (what `nnUNetv2_train` runs) for a few
iterations: a helper of tests/test_nnunet.py, run as a subprocess.

    python tests/nnunet_short_train.py --epochs 2 --iterations 3 --snapshot start.pt -- \\
        501 3d_fullres 0 -p DeSDPlans_res3d10 -pretrained_weights w.pth -device cpu

nnU-Net 2.8.1 has no argument or environment variable for the length of a run:
`nnUNetTrainer.__init__` sets 1000 epochs of 250 training and 50 validation iterations.
Its shortened variants (`nnUNetTrainer_1epoch`, ...) are found by a search that imports
every trainer module on the way, the Primus trainers among them, which import timm and so
torchvision; the CI installs nnU-Net without them (`.ci/run` says why), so only
`nnUNetTrainer` itself, the first module searched, can be found there, and external
trainers (`nnUNet_extTrainer`) are searched after the same walk. This helper therefore
sets the three lengths on `nnUNetTrainer` after its own `__init__`, saves the network's
state when training starts (after `-pretrained_weights` were loaded, before the first
step) to `--snapshot`, and calls nnU-Net's `run_training_entry` with the arguments after
`--`. Everything else (argument parsing, trainer lookup, plans, network construction by
dotted path, weight loading, data loading, augmentation, loss, checkpoints, the final
validation) is nnU-Net's code, unchanged; the results folder is the one `nnUNetTrainer`
writes, so `nnUNetv2_predict` runs on it as it is.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("nnunet_short_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, required=True, help="epochs (nnU-Net: 1000)")
    p.add_argument("--iterations", type=int, required=True,
                   help="training iterations per epoch (nnU-Net: 250)")
    p.add_argument("--val_iterations", type=int, default=1,
                   help="validation iterations per epoch (nnU-Net: 50)")
    p.add_argument("--snapshot", default=None,
                   help="file to save the network's state_dict to when training starts")
    p.add_argument("nnunet_args", nargs=argparse.REMAINDER,
                   help="arguments of nnUNetv2_train, after --")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    rest = args.nnunet_args[1:] if args.nnunet_args[:1] == ["--"] else args.nnunet_args

    import torch
    from nnunetv2.run.run_training import run_training_entry
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    init, on_train_start = nnUNetTrainer.__init__, nnUNetTrainer.on_train_start

    @functools.wraps(init)  # the trainer reads its own __init__'s signature
    def short_init(self, *a, **k):
        init(self, *a, **k)
        self.num_epochs = args.epochs
        self.num_iterations_per_epoch = args.iterations
        self.num_val_iterations_per_epoch = args.val_iterations

    def snapshot_on_train_start(self):
        on_train_start(self)
        if args.snapshot:
            state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
            torch.save(state, args.snapshot)

    nnUNetTrainer.__init__ = short_init
    nnUNetTrainer.on_train_start = snapshot_on_train_start
    sys.argv = ["nnUNetv2_train", *rest]
    run_training_entry()


if __name__ == "__main__":
    main()
