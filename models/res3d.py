"""3D ResNets as used by DeSD (docs/method.md §5).

One class, `ResNet3D`, and thin factories `res3d10 … res3d200`. State-dict names are an
interface: the released DeSD_Res50 teacher loads into `res3d50()` by name once the
`module.backbone.` prefix is stripped, so do not rename modules here.

Published details kept on purpose:
- InstanceNorm3d(affine=True) and LeakyReLU(0.01), convolutions without bias;
- a 1x1x1 projection shortcut (`downsample`) on the first block of *every* stage,
  layer1 included, even where an identity would fit the shapes (release quirk);
- PyTorch's default initialisation (the release never called its own init routine).

Two layers have more than one route to the same function, chosen when the network is built
(`build_backbone(arch, stem=..., norm_impl=...)`), never by a process-wide switch: the
stem convolution (`StemConv3d`) and the instance norm (`InstanceNorm3d`). Every route has
the same parameters and state-dict names and is tested equal to PyTorch's own layer in
float64, outputs and gradients; the defaults are the routes measured fastest so far (the
README's Speed section has the figures and the commands that measured them).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNet3D", "BasicBlock", "Bottleneck", "InstanceNorm3d", "StemConv3d", "NORM_IMPLS",
           "STEM_IMPLS", "ARCHS", "build_backbone",
           "res3d10", "res3d18", "res3d34", "res3d50", "res3d101", "res3d152", "res3d200"]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


NORM_IMPLS = ("auto", "reference", "group_norm", "decomposed")
STEM_IMPLS = ("conv3d", "conv2d")


class InstanceNorm3d(nn.InstanceNorm3d):
    """`nn.InstanceNorm3d(affine=True)`: the same function, parameters and state-dict names,
    computed by the route named by `impl` (fixed at construction):

    - `"reference"`: PyTorch's own, a batch norm over an `(1, N*C, D, H, W)` view;
    - `"group_norm"`: group norm with one channel per group (per sample and channel it is
      the same normalisation), a faster kernel in float32 on GPUs;
    - `"auto"` (default): `group_norm` without autocast, `reference` under autocast (where
      group norm would be computed in float32 and gained nothing);
    - `"decomposed"`: statistics in float32 by `var_mean` over (D, H, W) and one
      multiply-add per element, in the input's dtype and memory layout. Slower in eager
      mode, but nothing in it converts the layout, so under `torch.compile` with
      `channels_last_3d` the normalisation, the activation after it and a residual add
      fuse into one pass without layout copies.

    Affine-free, running-statistics and non-5D uses fall back to `reference`.
    """

    def __init__(self, num_features: int, *args, impl: str = "auto", **kwargs):
        super().__init__(num_features, *args, **kwargs)
        if impl not in NORM_IMPLS:
            raise ValueError(f"unknown instance-norm route {impl!r}; choose one of: "
                             f"{', '.join(NORM_IMPLS)}")
        self.impl = impl

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.impl
        if impl == "auto":
            impl = "reference" if _autocast_on(x.device.type) else "group_norm"
        if impl == "reference" or not self.affine or self.track_running_stats or x.dim() != 5:
            return super().forward(x)
        if impl == "group_norm":
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 at least
        var, mean = torch.var_mean(x.to(acc), dim=(2, 3, 4), keepdim=True, correction=0)
        scale = self.weight.to(acc).view(-1, 1, 1, 1) * torch.rsqrt(var + self.eps)
        shift = self.bias.to(acc).view(-1, 1, 1, 1) - mean * scale
        return (x * scale + shift).to(x.dtype)


class StemConv3d(nn.Conv3d):
    """`nn.Conv3d`: the same function, weight and state-dict names, computed by the route
    named by `impl` (fixed at construction):

    - `"conv3d"` (default): PyTorch's 3D convolution;
    - `"conv2d"`: the depth taps folded into input channels and one 2D convolution over
      the N*D' output slices. The stem has one input channel, for which cuDNN has no
      tensor-core 3D kernel; folded, it is a 2D convolution with `C_in * taps` input
      channels, a shape tensor-core kernels take. The taps are zero-padded to a multiple
      of 8 input channels (zeros add nothing). Any depth stride works (the depth windows
      are taken with that step); the depth padding pads the input. The output keeps the
      weight's layout (channels_last_3d weight: channels_last_3d output, no copy).

    Grouped or dilated convolutions, other padding modes, string padding and unbatched
    input take the `conv3d` route.
    """

    def __init__(self, *args, impl: str = "conv3d", **kwargs):
        super().__init__(*args, **kwargs)
        if impl not in STEM_IMPLS:
            raise ValueError(f"unknown stem route {impl!r}; choose one of: {', '.join(STEM_IMPLS)}")
        self.impl = impl

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"

    def foldable(self, x: torch.Tensor) -> bool:
        """Whether the `conv2d` route applies to this layer and input."""
        return (x.dim() == 5 and self.groups == 1 and self.dilation == (1, 1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "conv3d" or not self.foldable(x):
            return super().forward(x)
        n, cin = x.shape[:2]
        cout, _, kd = self.weight.shape[:3]
        (sd, sh, sw), (pd, ph, pw) = self.stride, self.padding
        taps = kd
        while (cin * taps) % 8:  # zero taps up to a multiple of 8 input channels
            taps += 1
        # depth windows of `taps` slices with step sd; the extra taps read zeros at the end
        xp = F.pad(x, (0, 0, 0, 0, pd, pd + taps - kd))
        win = xp.unfold(2, taps, sd)                              # N, C, D', H, W, taps
        d_out, h, w = win.shape[2:5]
        weight = F.pad(self.weight, (0, 0, 0, 0, 0, taps - kd)).flatten(1, 2)
        # a channels_last_3d weight is stored (C_out, kD, kH, kW, C_in): its stride on C_in is 1
        channels_last = self.weight.stride(1) == 1 and self.weight[0, 0].numel() > 1
        if channels_last:
            x2 = win.permute(0, 2, 3, 4, 1, 5).reshape(n * d_out, h, w, cin * taps).permute(0, 3, 1, 2)
            weight = weight.contiguous(memory_format=torch.channels_last)
        else:
            x2 = win.permute(0, 2, 1, 5, 3, 4).reshape(n * d_out, cin * taps, h, w)
        y = F.conv2d(x2, weight, self.bias, (sh, sw), (ph, pw))
        # (N*D', C_out, H', W') -> (N, C_out, D', H', W'); from NHWC slices this is
        # exactly channels_last_3d, from NCHW slices it needs one copy
        y = y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        y = y.unflatten(0, (n, d_out)).transpose(1, 2)
        return y if channels_last else y.contiguous()


def _norm(name: str, impl: str = "auto") -> Callable[[int], nn.Module]:
    if name == "instance":
        return lambda c: InstanceNorm3d(c, affine=True, impl=impl)
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
        stem: how the stem convolution is computed, "conv3d" (default) or "conv2d" (the
            same function; see `StemConv3d`).
        norm_impl: how the instance norms are computed, "auto" (default), "reference",
            "group_norm" or "decomposed" (the same function; see `InstanceNorm3d`).

    `forward(x)` returns `[B x C1, B x C2, B x C3, B x C4]`, each stage's feature map
    averaged over space; `forward_features(x)` returns the four un-pooled maps (and the
    stem's output first with `include_stem=True`) for dense tasks.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 in_channels: int = 1, stem_stride: Sequence[int] = (1, 2, 2),
                 norm: str = "instance", act: str = "leakyrelu", stem: str = "conv3d",
                 norm_impl: str = "auto"):
        super().__init__()
        norm_layer, act_layer = _norm(norm, norm_impl), _act(act)
        self.conv1 = StemConv3d(in_channels, 64, kernel_size=7, stride=tuple(stem_stride),
                                padding=3, bias=False, impl=stem)
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
