"""3D ResNets as used by DeSD (SPEC.md §5).

One class, `ResNet3D`, and thin factories `res3d10 … res3d200`. State-dict names are an
interface: the released DeSD_Res50 teacher loads into `res3d50()` by name once the
`module.backbone.` prefix is stripped, so do not rename modules here.

Published details kept on purpose:
- InstanceNorm3d(affine=True) (computed by a faster route, same function) and LeakyReLU(0.01),
  convolutions without bias;
- a 1x1x1 projection shortcut (`downsample`) on the first block of *every* stage,
  layer1 included, even where an identity would fit the shapes (release quirk);
- PyTorch's default initialisation (the release never called its own init routine).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNet3D", "BasicBlock", "Bottleneck", "InstanceNorm3d", "ARCHS", "build_backbone",
           "res3d10", "res3d18", "res3d34", "res3d50", "res3d101", "res3d152", "res3d200"]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


class InstanceNorm3d(nn.InstanceNorm3d):
    """`nn.InstanceNorm3d(affine=True)`: the same function, parameters and state-dict names,
    computed by the faster of two routes.

    PyTorch evaluates instance norm as a batch norm over a `(1, N*C, D, H, W)` view. Per
    sample and channel it is also group norm with one channel per group, a kernel that is
    faster in float32: on an H100 the 53 norms of the published res3d50 step took 49.9 ms
    by PyTorch's route and 24.0 ms as group norm, and the fp32 step went from 113.6 to
    84.8 ms (`benchmarks/bench_norm.py`, `bench_train.py --norm_impl`). Under bf16
    autocast group norm is computed in float32 (autocast's rule) and the step was no
    faster (93.8 vs 95.3 ms), so `impl = "auto"` takes group norm without autocast and
    PyTorch's route with it. `"reference"` and `"group_norm"` force a route.
    """
    impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.impl
        if impl == "auto":
            impl = "reference" if _autocast_on(x.device.type) else "group_norm"
        if impl == "reference" or not self.affine or self.track_running_stats or x.dim() != 5:
            return super().forward(x)
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def _norm(name: str) -> Callable[[int], nn.Module]:
    if name == "instance":
        return lambda c: InstanceNorm3d(c, affine=True)
    if name == "batch":
        return nn.BatchNorm3d
    if name == "group":
        return lambda c: nn.GroupNorm(min(32, c), c)
    raise ValueError(f"unknown norm {name!r}; choose one of: instance, batch, group")


def _act(name: str) -> Callable[[], nn.Module]:
    if name == "leakyrelu":
        return lambda: nn.LeakyReLU(0.01, inplace=True)
    if name == "relu":
        return lambda: nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {name!r}; choose one of: leakyrelu, relu")


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], act: Callable[[], nn.Module]):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.norm1 = norm(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.norm2 = norm(planes)
        self.act = act()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], act: Callable[[], nn.Module]):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 1)
        self.norm1 = norm(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.norm2 = norm(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.norm3 = norm(planes * 4)
        self.act = act()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act(out + shortcut)


class ResNet3D(nn.Module):
    """3D ResNet returning the features of its four stages.

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: number of blocks in each of the four stages.
        in_channels: input channels (1 for CT).
        stem_stride: stride of the 7x7x7 stem convolution, (D, H, W); published (1, 2, 2).
        norm: "instance" (published), "batch" or "group".
        act: "leakyrelu" (published, slope 0.01) or "relu".

    `forward(x)` returns `[B x C1, B x C2, B x C3, B x C4]`, each stage's feature map
    averaged over space; `forward_features(x)` returns the four un-pooled maps (and the
    stem's output first with `include_stem=True`) for dense tasks.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 in_channels: int = 1, stem_stride: Sequence[int] = (1, 2, 2),
                 norm: str = "instance", act: str = "leakyrelu"):
        super().__init__()
        norm_layer, act_layer = _norm(norm), _act(act)
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=tuple(stem_stride),
                               padding=3, bias=False)
        self.norm1 = norm_layer(64)
        self.act = act_layer()
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        self.stage_channels: list[int] = []
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2))):
            # Release quirk: every stage's first block gets a projection shortcut.
            downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                          bias=False),
                norm_layer(planes * block.expansion))
            blocks = [block(inplanes, planes, stride, downsample, norm_layer, act_layer)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes, 1, None, norm_layer, act_layer)
                       for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_channels.append(inplanes)
        self.stem_channels = 64

    def stage_shapes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial sizes of the stem and the four stage maps for an input of `size` (D, H, W)."""
        def conv(n: int, k: int, s: int, p: int) -> int:
            return (n + 2 * p - k) // s + 1
        shapes = [tuple(conv(n, 7, s, 3) for n, s in zip(size, self.conv1.stride))]
        cur = tuple(conv(n, 3, 2, 1) for n in shapes[0])        # max-pool
        for stride in (1, 2, 2, 2):
            cur = tuple(conv(n, 3, stride, 1) for n in cur)
            shapes.append(cur)
        return shapes

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> norm -> act (before the max-pool): stride (1, 2, 2) by default."""
        return self.act(self.norm1(self.conv1(x)))

    def forward_features(self, x: torch.Tensor, include_stem: bool = False) -> list[torch.Tensor]:
        """The four stages' un-pooled feature maps (the stem's output first if asked)."""
        stem = self.stem(x)
        out = [stem] if include_stem else []
        x = self.maxpool(stem)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f.mean(dim=(2, 3, 4)) for f in self.forward_features(x)]


ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "res3d10": (BasicBlock, (1, 1, 1, 1)),
    "res3d18": (BasicBlock, (2, 2, 2, 2)),
    "res3d34": (BasicBlock, (3, 4, 6, 3)),
    "res3d50": (Bottleneck, (3, 4, 6, 3)),
    "res3d101": (Bottleneck, (3, 4, 23, 3)),
    "res3d152": (Bottleneck, (3, 8, 36, 3)),
    "res3d200": (Bottleneck, (3, 24, 36, 3)),
}


def build_backbone(arch: str, **kwargs) -> ResNet3D:
    """Build a backbone by name; an unknown name lists the choices."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNet3D(block, layers, **kwargs)


def res3d10(**kwargs) -> ResNet3D:
    return build_backbone("res3d10", **kwargs)


def res3d18(**kwargs) -> ResNet3D:
    return build_backbone("res3d18", **kwargs)


def res3d34(**kwargs) -> ResNet3D:
    return build_backbone("res3d34", **kwargs)


def res3d50(**kwargs) -> ResNet3D:
    return build_backbone("res3d50", **kwargs)


def res3d101(**kwargs) -> ResNet3D:
    return build_backbone("res3d101", **kwargs)


def res3d152(**kwargs) -> ResNet3D:
    return build_backbone("res3d152", **kwargs)


def res3d200(**kwargs) -> ResNet3D:
    return build_backbone("res3d200", **kwargs)
