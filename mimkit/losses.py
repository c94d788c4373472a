"""Targets and losses shared by the methods (pure functions of tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_patch_normalize(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE norm_pix target: each patch by its own mean and unbiased variance, eps inside sqrt."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error (computed in fp32); 0 when no patch is masked
    (BEiT's block generator can place no block on a small grid)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Sum over patches of weight x per-patch mean squared error, over `count` (BootMAE: centre weights over the
    masked count); fp32."""
    return ((pred.float() - target.float()).pow(2).mean(dim=-1) * weights).sum() / count


def consistency_loss(pred: torch.Tensor, mask: torch.Tensor, stop_gradient: bool = True,
                     distance: str = "mse") -> torch.Tensor:  # fmt: skip
    """Mean over ordered pairs (i, j), i != j, and over patches masked in both parts, of the distance
    between part i's prediction and part j's (detached when stop_gradient)."""
    parts = pred.shape[1]
    pred = pred.float()
    total = pred.new_zeros(())
    count = pred.new_zeros(())
    for i in range(parts):
        for j in range(parts):
            if i == j:
                continue
            partner = pred[:, j].detach() if stop_gradient else pred[:, j]
            diff = pred[:, i] - partner
            per_patch = diff.pow(2).mean(-1) if distance == "mse" else diff.abs().mean(-1)
            both = mask[:, i] * mask[:, j]
            total = total + (per_patch * both).sum()
            count = count + both.sum()
    return total / count.clamp(min=1)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: L1 over the pixels of masked patches, averaged over those pixels and the channels
    (as the official `(|x - x_rec| * mask).sum() / (mask.sum() + 1e-5) / in_chans` on the pixel grid)."""
    per_patch = (pred.float() - target.float()).abs().sum(dim=-1)  # summed over p * p * 3 values
    pixels_per_patch = pred.shape[-1] // 3
    return (per_patch * mask).sum() / (mask.sum() * pixels_per_patch + 1e-5) / 3


def center_weights(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """BootMAE's loss weights w = m + m * AvgPool3x3(m) (stride 1, zero padding counted): 1 + the masked fraction
    of a masked token's 3x3 neighbourhood, in (1, 2]; 0 for visible tokens. mask: (N, L), 1 = masked."""
    m = mask.float().view(-1, 1, *grid)
    pooled = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True)
    return (m + m * pooled).view(mask.shape)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches (mask (B, L), 1 = masked) of -sum_k target_k log softmax(logits)_k."""
    m = mask.bool()
    per_patch = -(targets[m] * F.log_softmax(logits[m].float(), dim=-1)).sum(-1)
    return per_patch.mean()
