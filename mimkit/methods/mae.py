"""MAE (He et al., CVPR 2022): a ViT encoder on the visible patches only, a light decoder that
re-inserts mask tokens and predicts the pixels of every patch, MSE on the masked patches only.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mimkit.config import resolve_block_generator
from mimkit.masking import block_mask_for, mask_to_ids, num_visible, random_mask
from mimkit.models import init_weights_mae, patchify, sincos_2d_pos_embed


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    pred: torch.Tensor  # (B, L, p*p*3) predictions for every patch (normalised space if norm_pix)
    mask: torch.Tensor  # (B, L) 1 = masked


def encode_visible(encoder: VisionTransformer, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Run a timm ViT on the visible patches only: pos-embed is added before masking, the cls
    token (with its own pos-embed) is prepended after. Returns final-LN tokens (B, 1+keep, D).
    `ids_keep` of shape (B, K, keep) encodes K views of each image as B*K sequences (EMAE's parts),
    embedding each image's patches once."""
    x = encoder.patch_embed(imgs)
    x = x + encoder.pos_embed[:, 1:, :]
    if ids_keep.dim() == 3:
        b, parts, keep = ids_keep.shape
        x = torch.gather(x.unsqueeze(1).expand(-1, parts, -1, -1), 2,
                         ids_keep.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))  # fmt: skip
        x = x.reshape(b * parts, keep, x.shape[-1])
    else:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (encoder.cls_token + encoder.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = run_blocks(encoder.blocks, x, encoder.grad_checkpointing)
    return encoder.norm(x)


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """A stack of blocks, recomputing activations in backward when grad_checkpointing is on (timm's
    `set_grad_checkpointing` flag), trading compute for memory."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint_seq(blocks, x)
    return blocks(x)


def per_patch_normalize(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE norm_pix target: each patch by its own mean and unbiased variance, eps inside sqrt."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error (computed in fp32)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """Linear embed -> mask tokens appended and un-shuffled -> fixed sin-cos pos -> blocks -> LN ->
    per-patch pixel head. The cls token passes through and is dropped from the output."""

    def __init__(self, encoder_dim: int, num_patches: int, patch_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        grid = int(num_patches**0.5)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(dim, grid), requires_grad=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, patch_size * patch_size * 3)
        self.grad_checkpointing = False

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(run_blocks(self.decoder_blocks, x, self.grad_checkpointing))
        return self.decoder_pred(x)[:, 1:]


class MAE(nn.Module):
    """Encoder attribute names are timm's; decoder names follow the official MAE layout."""

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        mask_type: str = "random",
        block_generator: str = "exact",
    ):
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.num_patches = encoder.patch_embed.num_patches
        self.mask_ratio = mask_ratio
        self.mask_type, self.block_generator = mask_type, block_generator
        self.norm_pix_loss = norm_pix_loss
        self.decoder = MAEDecoder(
            encoder.embed_dim, self.num_patches, self.patch_size, decoder_dim, decoder_depth, decoder_heads
        )
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def initialize_weights(self) -> None:
        grid = self.encoder.patch_embed.grid_size[0]
        self.encoder.pos_embed.data.copy_(sincos_2d_pos_embed(self.encoder.embed_dim, grid))
        self.encoder.pos_embed.requires_grad_(False)  # frozen in pretraining; timm makes it learnable at fine-tune
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on the flattened patch
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        self.apply(init_weights_mae)

    def mask_inputs(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample masking input, drawn in the data pipeline from the sample's own generator,
        so masks depend only on (seed, epoch, sample index): not on workers, ranks or resumes."""
        if self.mask_type == "block":
            grid = self.encoder.patch_embed.grid_size
            num_masked = self.num_patches - num_visible(self.num_patches, self.mask_ratio)
            return {"mask": block_mask_for(self.block_generator, grid, num_masked, generator=generator).flatten()}
        return {"noise": torch.rand(self.num_patches, generator=generator)}

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs.float(), self.patch_size)
        return per_patch_normalize(target) if self.norm_pix_loss else target

    def forward(
        self, imgs: torch.Tensor, noise: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MAEOutput:
        """`noise` (B, L) drives random masking (as HF ViTMAE's `noise`); `mask` (B, L, 1 = masked,
        same count per image) gives the mask directly; neither: fresh random noise."""
        if mask is not None:
            masking = mask_to_ids(mask)
        else:
            masking = random_mask(imgs.shape[0], self.num_patches, self.mask_ratio, noise=noise, device=imgs.device)
        latent = encode_visible(self.encoder, imgs, masking.ids_keep)
        pred = self.decoder(latent, masking.ids_restore)
        loss = masked_mse(pred, self.target(imgs), masking.mask)
        return MAEOutput(loss, pred.clone(), masking.mask)  # not a view of the decoder output: FSDP2 hooks outputs


def build(cfg, encoder: VisionTransformer) -> MAE:
    return MAE(
        encoder,
        decoder_dim=cfg.mae.decoder_dim,
        decoder_depth=cfg.mae.decoder_depth,
        decoder_heads=cfg.mae.decoder_heads,
        mask_ratio=cfg.mask.ratio,
        norm_pix_loss=cfg.mae.norm_pix_loss,
        mask_type=cfg.mask.type,
        block_generator=resolve_block_generator(cfg),
    )
