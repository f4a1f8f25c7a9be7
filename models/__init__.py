"""The part to copy into your project (PyTorch only): the DeSD 3D ResNets, the DINO head,
a U-Net on the encoder, safe loading of pre-trained weights and the input contract.

    from models import ResUNet3D, load_pretrained_encoder
"""
from .contract import HU_MAX, HU_MIN, HU_SCALE, SPACING_MM, hu_to_input
from .head import DINOHead
from .pretrained import (PretrainedLoadError, backbone_only, declared_arch, extract_backbone_state,
                         infer_arch, load_pretrained_encoder, load_safetensors, read_checkpoint,
                         save_backbone, save_safetensors, strip_prefixes, verify_checkpoint_file)
from .res3d import (ARCHS, ResNet3D, build_backbone, res3d10, res3d18, res3d34, res3d50,
                    res3d101, res3d152, res3d200)
from .unet import ResUNet3D

__all__ = ["ARCHS", "DINOHead", "ResNet3D", "ResUNet3D", "build_backbone", "res3d10", "res3d18",
           "res3d34", "res3d50", "res3d101", "res3d152", "res3d200",
           "PretrainedLoadError", "read_checkpoint", "verify_checkpoint_file",
           "extract_backbone_state", "strip_prefixes", "backbone_only", "infer_arch",
           "declared_arch", "load_pretrained_encoder", "save_backbone", "save_safetensors",
           "load_safetensors", "SPACING_MM", "HU_MIN", "HU_MAX", "HU_SCALE", "hu_to_input"]
