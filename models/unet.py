"""ResUNet3D: a U-Net decoder on a DeSD 3D ResNet encoder, for segmentation fine-tuning."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .res3d import build_backbone

__all__ = ["ResUNet3D"]


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
    single one): with the published stem (depth / 16, height and width / 32 at stage 4),
    at least 17 voxels in depth or 33 in height or width.
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

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise ValueError when an input of spatial `size` leaves one voxel at stage 4."""
        deepest = self.encoder.stage_shapes(size)[-1]
        if math.prod(deepest) <= 1:
            factor = [16 * s for s in self.encoder.conv1.stride]  # stem x max-pool x 3 stages
            raise ValueError(
                f"input of size {tuple(size)} is too small: the encoder's last stage would be "
                f"{deepest}, a single voxel that instance norm cannot normalise; use more "
                f"than {factor[0]} voxels in depth or more than {factor[1]} in height or "
                f"{factor[2]} in width")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[2:])
        stem, l1, l2, l3, l4 = self.encoder.forward_features(x, include_stem=True)
        y = l4
        for block, skip in zip(self.decoder, (l3, l2, l1, stem, x)):
            y = block(y, skip)
        return self.head(y)
