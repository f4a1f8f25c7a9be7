"""Networks: the 3D ResNet family and the DINO projection head."""
from .head import DINOHead
from .res3d import (ARCHS, ResNet3D, build_backbone, res3d10, res3d18, res3d34, res3d50,
                    res3d101, res3d152, res3d200)

__all__ = ["ARCHS", "DINOHead", "ResNet3D", "build_backbone", "res3d10", "res3d18", "res3d34",
           "res3d50", "res3d101", "res3d152", "res3d200"]
