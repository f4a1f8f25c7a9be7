"""DeSDUNet: the DeSD encoder with a U-Net decoder and deep supervision, in the form nnU-Net
v2 builds its networks from a plans file.

nnU-Net locates the class by the dotted path in the plans (`models.nnunet_net.DeSDUNet`,
so the folder holding `models/` must be on `PYTHONPATH`) and builds it as

    DeSDUNet(input_channels=1, num_classes=K, deep_supervision=True, **arch_kwargs)

with `arch_kwargs` from the plans (`tools/nnunet.py plans` writes them): `arch` (any
`res3d*` depth), `strides` (read by nnU-Net's trainer for its deep-supervision scales;
checked here against the encoder), optionally `decoder_channels`, `stem_stride` and the
other keyword arguments of `models.build_backbone`. Its trainer switches
`network.decoder.deep_supervision`; with it on, `forward` returns one output per scale,
full resolution first, at the scales nnU-Net derives from `strides`; with it off, the
full-resolution logits.

The input is CT in HU at 1 mm (nnU-Net's `NoNormalization` keeps HU): the first operation
is the pre-training contract, `models.hu_to_input` (clip to [-1024, 1024], divide by
1024), so the encoder sees at fine-tuning and inference what it saw in pre-training.

Parameter names: the encoder's are `encoder.` + the published `ResNet3D` names (so
`load_pretrained_encoder` reads a fine-tuned network back); the 1x1x1 output layers are
`decoder.seg_layers.*`, the names nnU-Net leaves out when it loads pre-trained weights.
PyTorch only, like the rest of `models/`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .contract import hu_to_input
from .res3d import build_backbone
from .unet import UpBlock

__all__ = ["DeSDUNet", "DECODER_CHANNELS", "encoder_strides"]

# Widths of the five decoder levels, deepest first (as ResUNet3D's default).
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def encoder_strides(stem_stride: Sequence[int] = (1, 2, 2)) -> list[list[int]]:
    """The encoder's downsampling per resolution level, as nnU-Net's `strides`: the input
    (1, 1, 1), the stem convolution (`stem_stride`), then the max-pool before layer1 and
    the stride-2 first blocks of layers 2-4 (2, 2, 2 each). Six levels; the decoder
    produces a map at each but the deepest, so nnU-Net's deep-supervision scales (the
    cumulative products without the last) are exactly the decoder's outputs."""
    return [[1, 1, 1], [int(s) for s in stem_stride]] + [[2, 2, 2] for _ in range(4)]


class DeepSupervisionDecoder(nn.Module):
    """Five U-Net levels from the deepest encoder stage up to the input's resolution, and
    a 1x1x1 output layer (`seg_layers`) at each. `deep_supervision` is the switch
    nnU-Net's trainer sets: on, every level's logits (full resolution first); off, the
    last level's."""

    def __init__(self, deepest_channels: int, skip_channels: Sequence[int],
                 decoder_channels: Sequence[int], num_classes: int, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = bool(deep_supervision)
        self.stages = nn.ModuleList()
        cin = deepest_channels
        for cskip, cout in zip(skip_channels, decoder_channels):
            self.stages.append(UpBlock(cin, cskip, cout))
            cin = cout
        self.seg_layers = nn.ModuleList(nn.Conv3d(c, num_classes, 1) for c in decoder_channels)

    def forward(self, deepest: torch.Tensor, skips: Sequence[torch.Tensor]):
        """`skips` from deep to shallow (layer3, layer2, layer1, stem, input)."""
        y, outputs = deepest, []
        for i, (stage, skip) in enumerate(zip(self.stages, skips)):
            y = stage(y, skip)
            if self.deep_supervision:
                outputs.append(self.seg_layers[i](y))
        if self.deep_supervision:
            return outputs[::-1]
        return self.seg_layers[-1](y)


class DeSDUNet(nn.Module):
    """DeSD `res3d*` encoder + U-Net decoder with deep supervision (nnU-Net's contract).

    Args:
        input_channels: image channels (1: CT; the pre-trained stem takes one).
        num_classes: output channels (nnU-Net passes its number of segmentation heads).
        deep_supervision: return every decoder level's logits (training) or only the
            full-resolution ones (inference); nnU-Net switches `decoder.deep_supervision`.
        arch: encoder depth, one of `models.ARCHS`.
        strides: the plans' `strides` (nnU-Net's trainer reads them for its
            deep-supervision scales); must equal `encoder_strides(stem_stride)`.
        decoder_channels: widths of the five decoder levels, deepest first.
        stem_stride: stride of the stem convolution (D, H, W); published (1, 2, 2).
        **backbone_kwargs: passed to `models.build_backbone` (norm, act, ...).

    Inputs are HU at 1 mm; their sizes must be multiples of the total stride
    (`math.prod` per axis of `strides`, (16, 32, 32) with the published stem), so every
    deep-supervision output has exactly the size nnU-Net downsamples the labels to, and
    the deepest map must keep more than one voxel (instance norm cannot normalise one).
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 2,
                 deep_supervision: bool = False, arch: str = "res3d50",
                 strides: Sequence[Sequence[int]] | None = None,
                 decoder_channels: Sequence[int] = DECODER_CHANNELS,
                 stem_stride: Sequence[int] = (1, 2, 2), **backbone_kwargs):
        super().__init__()
        expected = encoder_strides(stem_stride)
        if strides is not None and [list(map(int, s)) for s in strides] != expected:
            raise ValueError(f"strides {[list(s) for s in strides]} do not match the encoder's "
                             f"{expected} (stem_stride {list(stem_stride)}); write the plans "
                             f"again with tools/nnunet.py plans")
        if len(decoder_channels) != len(expected) - 1:
            raise ValueError(f"decoder_channels needs {len(expected) - 1} widths, got "
                             f"{list(decoder_channels)}")
        self.strides = expected
        self.encoder = build_backbone(arch, in_channels=input_channels,
                                      stem_stride=tuple(stem_stride), **backbone_kwargs)
        skips = [*self.encoder.stage_channels[2::-1], self.encoder.stem_channels, input_channels]
        self.decoder = DeepSupervisionDecoder(self.encoder.stage_channels[3], skips,
                                              decoder_channels, num_classes, deep_supervision)

    @property
    def size_multiple(self) -> tuple[int, ...]:
        """The total stride per axis: input sizes must be multiples of it."""
        return tuple(math.prod(s[i] for s in self.strides) for i in range(3))

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise ValueError unless `size` is a multiple of the total stride with more than
        one voxel left at the deepest stage."""
        size, multiple = tuple(int(n) for n in size), self.size_multiple
        if any(n % m for n, m in zip(size, multiple)) or math.prod(
                n // m for n, m in zip(size, multiple)) <= 1:
            raise ValueError(f"input of size {size}: sizes must be multiples of {multiple} "
                             f"(the encoder's total stride) and leave more than one voxel at "
                             f"the deepest stage (instance norm cannot normalise one voxel)")

    def forward(self, x: torch.Tensor):
        self.check_input_size(x.shape[2:])
        x = hu_to_input(x)  # the pre-training contract: clip to +-1024 HU, divide by 1024
        stem, l1, l2, l3, l4 = self.encoder.forward_features(x, include_stem=True)
        return self.decoder(l4, (l3, l2, l1, stem, x))
