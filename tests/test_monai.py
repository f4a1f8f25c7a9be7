"""ResUNet3D with a DeSD encoder in a MONAI loop: the README's snippet (DiceCELoss,
sliding_window_inference, DiceMetric) run as written on synthetic CT phantoms, and its
Dice checked against a perfect prediction and a hand-computed one."""
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

import synthetic_ct
from models import build_backbone

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[pre_(\d+)/mod_(\d+)\]: (\d+) shared layers")


def _snippet() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- monai-snippet:start -->")[1].split("<!-- monai-snippet:end -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.count('arch="res3d50"') == 1 and "net.eval()" in code
    return code.replace('arch="res3d50"', 'arch="res3d10"')  # the same lines, a small encoder


def _volume(shape, seed):
    """A phantom at 1 mm: HU (1, 1, D, H, W) float and labels (1, 1, D, H, W) long."""
    hu, labels = synthetic_ct.phantom(shape, (1.0, 1.0, 1.0), np.random.default_rng(seed))
    return (torch.from_numpy(hu.astype(np.float32))[None, None],
            torch.from_numpy(labels.astype(np.int64))[None, None])


class _Oracle(nn.Module):
    """A predictor that reads the label back from an image made as label x 100 HU."""

    def forward(self, x):
        label = torch.round(x * 1024 / 100).long()
        return one_hot(label, 4) * 10.0


@pytest.fixture(scope="module")
def snippet_run(tmp_path_factory):
    """The snippet run once, in a folder holding a res3d10 `checkpoint.pth`."""
    folder = tmp_path_factory.mktemp("monai")
    torch.manual_seed(1)
    backbone = {k: v + 0.5 for k, v in build_backbone("res3d10").state_dict().items()}
    torch.save({"teacher": {"module.backbone." + k: v for k, v in backbone.items()},
                "args": {"arch": "res3d10"}}, folder / "checkpoint.pth")
    train = [_volume((32, 64, 64), seed) for seed in (0, 1)]
    val = [_volume((40, 64, 72), 2)]  # not a multiple of the window: overlapping windows
    code = _snippet()
    torch.manual_seed(0)
    namespace = {"train_loader": train, "val_loader": val}
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(folder)
        exec(compile(code, "README.md", "exec"), namespace)
    return namespace, code, backbone, val, out.getvalue()


def test_readme_monai_snippet_trains_and_scores(snippet_run):
    namespace, _, backbone, val, out = snippet_run
    net = namespace["net"]
    n = len(net.encoder.state_dict())
    assert LINE.search(out).groups()[1:] == (str(n), str(n))  # the whole encoder loaded
    loss = namespace["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    # two optimiser steps moved the loaded encoder away from the teacher
    assert not torch.equal(net.encoder.state_dict()["conv1.weight"], backbone["conv1.weight"])
    value = namespace["dice"].aggregate().item()
    assert 0.0 <= value <= 1.0
    assert re.search(r"Dice: (\d\.\d{3})", out).group(1) == f"{value:.3f}"
    assert set(val[0][1].unique().tolist()) == {0, 1, 2, 3}  # every class is scored


def test_a_perfect_prediction_scores_one(snippet_run):
    """The snippet's validation lines with a predictor that is always right: Dice 1."""
    namespace, code, _, val, _ = snippet_run
    validation = code[code.index("net.eval()"):]
    label = val[0][1]
    namespace.update(net=_Oracle(), val_loader=[(label.float() * 100, label)])
    exec(compile(validation, "README.md", "exec"), namespace)
    assert namespace["dice"].aggregate().item() == pytest.approx(1.0, abs=1e-6)


def test_dice_by_hand():
    """Class 1: 8 voxels predicted, 8 true, 4 shared: 2*4/(8+8) = 0.5; class 2: 2
    predicted, 2 true, 1 shared: 0.5; class 3, absent from both, is left out and the
    background is not counted: the mean is 0.5."""
    pred = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    true = torch.zeros_like(pred)
    pred[0, 0, 0, :2, :] = 1          # 8 voxels
    true[0, 0, 0, 1:3, :] = 1         # 8 voxels, 4 shared
    pred[0, 0, 3, 3, 2:4] = 2         # 2 voxels
    true[0, 0, 3, 3, 1:3] = 2         # 2 voxels, 1 shared
    dice = DiceMetric(include_background=False)
    dice(y_pred=one_hot(pred, 4), y=one_hot(true, 4))
    assert dice.aggregate().item() == pytest.approx(0.5)
    true[0, 0, 3, 3, 1:3] = 0
    true[0, 0, 3, 3, 2:4] = 2         # class 2 now exact: (0.5 + 1) / 2
    dice.reset()
    dice(y_pred=one_hot(pred, 4), y=one_hot(true, 4))
    assert dice.aggregate().item() == pytest.approx(0.75)
