"""MaskFeat (Wei et al., CVPR 2022) for images, as a preset of parts rather than a new model: SimMIM's encoder
pass (masked patches enter the encoder as a learned mask token), the HOG target (`targets.HOGTarget`: per colour
channel, 9 unsigned orientation bins, cells of half a patch — 8 px at patch 16 — each cell L2-normalised), a linear
head on every patch token, MSE on the masked patches' HOG. Masks: BEiT's blockwise masks at 40% (the recipe;
`mask.type random` draws random patches instead).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.config import geometry, resolve_block_generator
from mimkit.losses import masked_mse
from mimkit.masking import block_mask_for, num_visible
from mimkit.methods.base import MIMMethod, set_layer_norm_eps, vit_encoder
from mimkit.models import encode_with_mask_tokens
from mimkit.registry import MethodSpec, register
from mimkit.targets import HOGTarget
from mimkit.typed_config import require


class MaskFeatOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    pred: torch.Tensor  # (B, L, C * 9 * cells) HOG predictions for every patch
    mask: torch.Tensor  # (B, L) 1 = masked


class MaskFeat(MIMMethod):
    """Keys: encoder.* (a stock timm ViT), mask_token, head.* (Linear embed_dim -> the HOG width)."""

    encoder: VisionTransformer

    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.4, mask_count: int | None = None,
                 mask_type: str = "block", block_generator: str = "beit"):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = self.num_patches - num_visible(self.num_patches, mask_ratio, mask_count)
        self.mask_type, self.block_generator = mask_type, block_generator
        self.target_part = HOGTarget(self.patch_size, encoder.patch_embed.proj.in_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.embed_dim, self.target_part.width())

    def mask_inputs(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """(L,) bool, 1 = masked: BEiT's block generator (its count may fall short of the target, the loss averages
        over the patches actually masked) or random patches."""
        if self.mask_type == "block":
            return {
                "mask": block_mask_for(self.block_generator, self.grid, self.num_masked, generator=generator).flatten()
            }
        mask = torch.zeros(self.num_patches, dtype=torch.bool)
        mask[torch.randperm(self.num_patches, generator=generator)[: self.num_masked]] = True
        return {"mask": mask}

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.target_part(imgs)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> MaskFeatOutput:
        """`mask` (B, L), 1 = masked; drawn afresh when not given."""
        if mask is None:  # fresh masks from the global RNG
            seeds = torch.randint(2**62, (imgs.shape[0],)).tolist()
            mask = torch.stack([self.mask_inputs(torch.Generator().manual_seed(s))["mask"] for s in seeds]).to(
                imgs.device
            )
        mask = mask.float()
        tokens = encode_with_mask_tokens(self.encoder, imgs, mask, self.mask_token)
        pred = self.head(tokens[:, 1:])
        return MaskFeatOutput(masked_mse(pred, self.target(imgs), mask), pred, mask)


def build(cfg) -> MaskFeat:
    model = MaskFeat(vit_encoder(cfg), mask_ratio=cfg.mask.ratio, mask_count=cfg.mask.count, mask_type=cfg.mask.type,
                     block_generator=resolve_block_generator(cfg))  # fmt: skip
    return set_layer_norm_eps(model, cfg.model.layer_norm_eps)


def check(cfg) -> None:
    patch = geometry(cfg).patch
    require(patch % 2 == 0, f"method maskfeat: its HOG cells are half a patch, so model.patch_size must be even, "
            f"got {patch}")  # fmt: skip


SPEC = register(MethodSpec(
    name="maskfeat", build=build, check=check, reads=(),
    summary="MaskFeat (Wei et al. 2022): HOG features of the masked patches, mask tokens inside the encoder",
    mask_types=("block", "random"), block_generator="beit", predicts_pixels=False,
    no_weight_decay=("encoder.pos_embed", "encoder.cls_token", "mask_token"),  # SimMIM's, whose pass it takes
))  # fmt: skip
