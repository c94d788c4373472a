"""Targets the methods predict, and their inverses for pictures: normalised pixels (MAE's norm-pix per patch,
BootMAE's per patch and channel), a momentum encoder's features (BootMAE), a tokenizer's soft codes (mc-BEiT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.losses import per_patch_normalize
from mimkit.models import patchify

NORM_PIX_EPS = 1e-6  # MAE: eps added to the unbiased variance of each patch
PATCH_CHANNEL_EPS = 1e-5  # BootMAE: eps added to the biased variance of each patch and channel


def pixel_target(imgs: torch.Tensor, patch_size: int, norm: str = "patch") -> torch.Tensor:
    """(B, L, p*p*3) in patchify layout. patch: MAE's norm_pix (each patch by its mean and unbiased std, eps 1e-6
    inside the root); patch_channel: BootMAE's (each patch and RGB channel by its mean and biased std, eps 1e-5);
    none: raw pixels."""
    target = patchify(imgs.float(), patch_size)
    if norm == "patch":
        return per_patch_normalize(target, NORM_PIX_EPS)
    if norm == "patch_channel":
        b, num, _ = target.shape
        t = target.view(b, num, patch_size * patch_size, 3)
        mean, var = t.mean(dim=2, keepdim=True), t.var(dim=2, unbiased=False, keepdim=True)
        return ((t - mean) / (var + PATCH_CHANNEL_EPS).sqrt()).view(b, num, -1)
    return target


def pixels_from_target(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, norm: str = "patch") -> torch.Tensor:
    """Predictions in `pixel_target`'s space back to pixels, with the ground truth's own statistics."""
    if norm == "none":
        return pred
    raw = patchify(imgs.float(), patch_size)
    if norm == "patch":
        return pred * (raw.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5 + raw.mean(dim=-1, keepdim=True)
    b, num, _ = raw.shape
    t, p = raw.view(b, num, -1, 3), pred.reshape(b, num, -1, 3)
    std = (t.var(2, unbiased=False, keepdim=True) + PATCH_CHANNEL_EPS).sqrt()
    return (p * std + t.mean(2, keepdim=True)).view(pred.shape)


@torch.no_grad()
def momentum_features(ema_encoder: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """A momentum copy of a timm ViT on the full image: last-block patch tokens before the final norm, (B, L, D)."""
    enc = ema_encoder
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return enc.blocks(torch.cat([cls, x], dim=1))[:, 1:]


@torch.no_grad()
def ema_update_(ema_encoder: nn.Module, student: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * student, for every parameter the student trains and every floating
    buffer (frozen ones, e.g. a sin-cos pos-embed, stay equal)."""
    pairs = [(e, s) for e, s in zip(ema_encoder.parameters(), student.parameters()) if s.requires_grad]
    pairs += [(e, s) for e, s in zip(ema_encoder.buffers(), student.buffers()) if s.is_floating_point()]
    ema, weights = [e for e, _ in pairs], [s.detach() for _, s in pairs]
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, torch._foreach_mul(weights, 1.0 - decay))


def tokenizer_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) tokenizer logits -> softmax(logits / temperature), in fp32."""
    return F.softmax(logits.float() / temperature, dim=-1)


def affinity(features: torch.Tensor, sim_temperature: float = 1.0) -> torch.Tensor:
    """(B, L, D) features -> W (B, L, L) = row-softmax(cosine similarity / sim_temperature); rows sum to 1."""
    f = F.normalize(features.float(), dim=-1)
    return F.softmax(f @ f.transpose(1, 2) / sim_temperature, dim=-1)


def soft_targets(probs: torch.Tensor, weights: torch.Tensor, omega: float) -> torch.Tensor:
    """mc-BEiT's refined target: omega * W p + (1 - omega) p, over every patch. probs (B, L, V), W (B, L, L)."""
    return omega * torch.bmm(weights, probs) + (1.0 - omega) * probs
