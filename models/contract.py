"""The data contract between pre-training and fine-tuning (docs/method.md §2, §4).

The encoder was pre-trained on CT resampled to 1 mm, clipped to [-1024, 1024] HU and
divided by 1024, so fine-tuning inputs must be prepared the same way. These constants
are the one definition; the preprocessing, the dataset and the examples use them.
No torch import: the preprocessing workers read these constants without paying for it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing the constants needs no torch
    import torch

__all__ = ["SPACING_MM", "HU_MIN", "HU_MAX", "HU_SCALE", "hu_to_input"]

SPACING_MM = (1.0, 1.0, 1.0)  # (z, y, x): the resampling target of stage 2
HU_MIN, HU_MAX = -1024, 1024  # stage 2 clips to this range
HU_SCALE = 1024.0  # network input = HU / 1024, in [-1, 1] (a power of two: exact in float32)


def hu_to_input(hu: torch.Tensor) -> torch.Tensor:
    """HU at 1 mm -> the network's input: clipped to [HU_MIN, HU_MAX], divided by HU_SCALE."""
    return hu.float().clamp(HU_MIN, HU_MAX) / HU_SCALE
