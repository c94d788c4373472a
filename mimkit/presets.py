"""ViT size presets by name (model.arch): widths, depths, heads, default patch and image size, and the timm
architecture with the same widths (for export and timm.create_model)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VitPreset:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    timm_name: str  # a timm architecture with the same widths, for export / create_model

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


_SIZES = {  # name: (width, depth, heads, timm base name)
    "tiny": (192, 12, 3, "vit_tiny_patch16_224"),
    "small": (384, 12, 6, "vit_small_patch16_224"),
    "base": (768, 12, 12, "vit_base_patch16_224"),
    "large": (1024, 24, 16, "vit_large_patch16_224"),
    "huge": (1280, 32, 16, "vit_huge_patch14_224"),
}

PRESETS: dict[str, VitPreset] = {}
for _size, (_d, _depth, _h, _timm) in _SIZES.items():
    _patch = 14 if _size == "huge" else 16
    PRESETS[f"vit_{_size}_patch{_patch}_224"] = VitPreset(_d, _depth, _h, _patch, 224, _timm)
    for _p in (2, 4):  # small-image presets (CIFAR-sized inputs)
        PRESETS[f"vit_{_size}_patch{_p}_32"] = VitPreset(_d, _depth, _h, _p, 32, _timm)


def get_preset(arch: str) -> VitPreset:
    if arch not in PRESETS:
        raise ValueError(f"unknown model.arch '{arch}'; allowed: {', '.join(sorted(PRESETS))}")
    return PRESETS[arch]
