"""The part to copy into your project (PyTorch only): the DeSD 3D ResNets, the DINO head,
a U-Net on the encoder, safe loading of pre-trained weights and the input contract.

    from models import ResUNet3D, load_pretrained_encoder

Names are imported on first use, so ``from models.contract import HU_MIN`` (what the
preprocessing workers need) does not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "contract": ["HU_MAX", "HU_MIN", "HU_SCALE", "SPACING_MM", "hu_to_input"],
    "head": ["DINOHead"],
    "nnunet_net": ["DeSDUNet"],
    "pretrained": ["PretrainedLoadError", "backbone_only", "declared_arch",
                   "extract_backbone_state", "infer_arch", "load_pretrained_encoder",
                   "load_safetensors", "read_checkpoint", "save_backbone", "save_safetensors",
                   "strip_prefixes", "verify_checkpoint_file"],
    "res3d": ["ARCHS", "ResNet3D", "build_backbone", "res3d10", "res3d18", "res3d34", "res3d50",
              "res3d101", "res3d152", "res3d200"],
    "unet": ["ResUNet3D"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
