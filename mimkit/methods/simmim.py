"""SimMIM (Xie et al., CVPR 2022): masked patches are replaced by a learned mask token *inside* the encoder
(every patch goes through it), a one-layer linear head predicts each patch's pixels from the encoder's
output, and the loss is L1 on the pixels of the masked patches. Masks are random over coarse cells
(32-px mask patches: 2x2 tokens of a ViT/16), ratio 0.6 in the paper.

Built from mimkit's parts: the encoder pass `models.encode_with_mask_tokens`, the mask
`masking.coarse_random_mask`, the loss `losses.masked_l1`; the target is the normalised input's patches
(MIMMethod's default `target`), so reconstruction pictures need no un-normalising.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.config import geometry
from mimkit.losses import masked_l1
from mimkit.masking import coarse_random_mask
from mimkit.methods.base import MIMMethod, set_layer_norm_eps, vit_encoder
from mimkit.models import encode_with_mask_tokens
from mimkit.registry import MethodSpec, register
from mimkit.typed_config import require


class SimMIMOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    pred: torch.Tensor  # (B, L, p*p*3) pixel predictions (normalised input space) for every patch
    mask: torch.Tensor  # (B, L) 1 = masked


class SimMIM(MIMMethod):
    """Keys: encoder.* (a stock timm ViT), mask_token, head.* (Linear embed_dim -> p*p*3, SimMIM's 1x1-conv +
    pixel-shuffle decoder written per patch)."""

    encoder: VisionTransformer

    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.6, mask_patch_size: int = 32):
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid = tuple(encoder.patch_embed.grid_size)
        if mask_patch_size % self.patch_size:
            raise ValueError(f"simmim.mask_patch_size {mask_patch_size} must be a multiple of the patch size "
                             f"{self.patch_size}")  # fmt: skip
        self.cell, self.mask_ratio = mask_patch_size // self.patch_size, mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.embed_dim, self.patch_size**2 * encoder.patch_embed.proj.in_channels)

    def mask_inputs(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"mask": coarse_random_mask(self.grid, self.cell, self.mask_ratio, generator).flatten()}

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> SimMIMOutput:
        """`mask` (B, L), 1 = masked; drawn afresh when not given."""
        if mask is None:
            mask = torch.stack([coarse_random_mask(self.grid, self.cell, self.mask_ratio) for _ in imgs])
            mask = mask.flatten(1).to(imgs.device)
        mask = mask.float()
        tokens = encode_with_mask_tokens(self.encoder, imgs, mask, self.mask_token)
        pred = self.head(tokens[:, 1:])
        return SimMIMOutput(masked_l1(pred, self.target(imgs), mask), pred, mask)


def build(cfg) -> SimMIM:
    model = SimMIM(vit_encoder(cfg), mask_ratio=cfg.mask.ratio, mask_patch_size=cfg.simmim.mask_patch_size)
    return set_layer_norm_eps(model, cfg.model.layer_norm_eps)


def check(cfg) -> None:
    cell, g = cfg.simmim.mask_patch_size, geometry(cfg)
    require(cell > 0 and cell % g.patch == 0 and g.img % cell == 0,
            f"simmim.mask_patch_size {cell} must be a multiple of model.patch_size {g.patch} that divides "
            f"model.img_size {g.img}")  # fmt: skip


SPEC = register(MethodSpec(
    name="simmim", build=build, check=check, reads=("simmim",),
    summary="SimMIM (Xie et al. 2022): mask tokens inside the encoder, a linear head, L1 on masked pixels",
    mask_types=("random",),  # it draws its own coarse cells
    mask_count=False,  # coarse cells take mask.ratio
    no_weight_decay=("encoder.pos_embed", "encoder.cls_token", "mask_token"),  # its model's no_weight_decay()
))  # fmt: skip
