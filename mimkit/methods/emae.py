"""EMAE (Li et al., arXiv 2302.14431, TPAMI 2024): each image is split into K disjoint visible parts
(K = 1 / (1 - mask_ratio)); all parts go through MAE's encoder and decoder in one batched forward
(B*K sequences); the loss is MAE's reconstruction loss averaged over parts plus a self-consistency term
between the predictions of patches masked in two parts.

EMAE has no public code. What the paper states: parallel disjoint masks at MAE's ratio, all parts in one
iteration, a self-consistency loss on overlapping masked patches. ASSUMPTIONS (configurable, from the
reconstruction in the project's methods notes, section 6.2): the target is MAE's (norm-pix) pixel target;
the consistency distance is the squared L2 per patch in the target space, averaged over ordered pairs of
parts (both directions) and over the patches masked in both; the partner prediction is detached
(stop-gradient); weight lambda = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mimkit.losses import consistency_loss, masked_mse
from mimkit.masking import parallel_masks, parts_for_ratio
from mimkit.methods.base import set_layer_norm_eps, vit_encoder
from mimkit.methods.mae import MAE, PIXEL_DECODER_KEYS, check_pixel_decoder
from mimkit.models import encode_visible
from mimkit.registry import MethodSpec, register
from mimkit.typed_config import require


class EMAEOutput(NamedTuple):
    loss: torch.Tensor  # reconstruction + weight * consistency
    pred: torch.Tensor  # (B, K, L, width): the target's (pixels: p*p*3)
    mask: torch.Tensor  # (B, K, L), 1 = masked in that part
    reconstruction: torch.Tensor
    consistency: torch.Tensor


class EMAE(MAE):
    """MAE's encoder, decoder, target and checkpoint layout, trained with parallel masks. Part 0 of an
    image's K parts has exactly MAE's random mask for the same noise."""

    def __init__(self, encoder, *, consistency_weight: float = 1.0, stop_gradient: bool = True,
                 distance: str = "mse", **mae_kwargs):  # fmt: skip
        super().__init__(encoder, **mae_kwargs)
        self.parts = parts_for_ratio(self.mask_ratio)
        self.consistency_weight, self.stop_gradient, self.distance = consistency_weight, stop_gradient, distance

    # noise only: EMAE draws its parallel masks itself (no given mask, no CrossMAE readout)
    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> EMAEOutput:  # type: ignore[override]
        b, parts, num = imgs.shape[0], self.parts, self.num_patches
        masks = parallel_masks(b, num, parts, noise=noise, device=imgs.device)
        latent = encode_visible(self.encoder, imgs, masks.ids_keep)  # (B*K, 1+keep, D): one batched forward
        pred = self.decoder(latent, masks.ids_restore.reshape(b * parts, num)).reshape(b, parts, num, -1)
        target = self.target(imgs).unsqueeze(1).expand(-1, parts, -1, -1)
        # every part masks the same number of patches, so the pooled mean equals the mean of per-part losses
        reconstruction = masked_mse(pred, target, masks.mask)
        if self.consistency_weight > 0:
            consistency = consistency_loss(pred, masks.mask, self.stop_gradient, self.distance)
        else:
            consistency = reconstruction.new_zeros(())
        loss = reconstruction + self.consistency_weight * consistency
        return EMAEOutput(
            loss, pred.clone(), masks.mask, reconstruction.detach(), consistency.detach()
        )  # no view: FSDP2


def build(cfg) -> EMAE:
    m = cfg.mae
    return set_layer_norm_eps(EMAE(
        vit_encoder(cfg),
        consistency_weight=cfg.emae.consistency_weight,
        stop_gradient=cfg.emae.stop_gradient,
        distance=cfg.emae.distance,
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        mask_ratio=cfg.mask.ratio,
        norm_pix_loss=m.norm_pix_loss,
        target=m.target,
    ), cfg.model.layer_norm_eps)  # fmt: skip


def check_parallel_masks(cfg) -> None:
    """K = 1 / (1 - mask.ratio) whole parts, and a consistency weight (EMAE, and BootMAE with mask.type parallel)."""
    k = 1.0 / (1.0 - cfg.mask.ratio)
    require(abs(k - round(k)) < 1e-6 and round(k) >= 2,
            f"mask.ratio {cfg.mask.ratio} must be 1 - 1/K for a whole K >= 2 with mask.type parallel / method emae "
            "(0.5, 0.75, 0.8 ...)")  # fmt: skip
    require(
        cfg.emae.consistency_weight >= 0, f"emae.consistency_weight must be >= 0, got {cfg.emae.consistency_weight}"
    )


def check(cfg) -> None:
    check_pixel_decoder(cfg)
    check_parallel_masks(cfg)


SPEC = register(MethodSpec(
    name="emae", build=build, check=check, reads=(*PIXEL_DECODER_KEYS, "mae.norm_pix_loss", "mae.target", "emae"),
    summary="EMAE (Li et al. 2024): MAE with K disjoint parallel masks per image and a self-consistency term",
    mask_types=("random", "parallel"),  # it draws its own parallel parts
    mask_count=False,  # K comes from mask.ratio
    loss_terms=("reconstruction", "consistency"),
    predicts_pixels=lambda cfg: cfg.mae.target != "hog",
    no_weight_decay=(),  # no public code: MAE's
))  # fmt: skip
