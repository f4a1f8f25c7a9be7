"""The DINO projection head used on every DeSD stage (docs/method.md §5).

MLP (Linear -> [BatchNorm1d] -> GELU, `nlayers` times, last Linear to `bottleneck_dim`) ->
L2-normalise -> weight-normalised Linear(bottleneck_dim, out_dim, no bias). With
`norm_last_layer` the weight magnitude `g` is fixed to 1 and not trained.
Structure after DINO (Caron et al., 2021), as the DeSD release used it.

The weight-normalised layer is written out here rather than taken from
`torch.nn.utils.weight_norm` (deprecated) or its parametrization (which renames the
tensors): the released checkpoints store `last_layer.weight_g` / `last_layer.weight_v`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is `g * v / ||v||` (norm over each row)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        init = nn.Linear(in_features, out_features, bias=False).weight.detach()  # default init
        self.weight_v = nn.Parameter(init.clone())
        self.weight_g = nn.Parameter(init.norm(dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """Projection head.

    Args:
        in_dim: input feature width (the backbone stage's channels).
        out_dim: number of prototypes (published run: 60000).
        use_bn: BatchNorm1d after each hidden Linear (published run: True).
        norm_last_layer: fix the last layer's weight norm to 1 (published: always on).
        nlayers: Linear layers in the MLP (>= 1).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width before the last layer.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(nlayers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
