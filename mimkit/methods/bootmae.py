"""BootMAE (Dong et al., ECCV 2022), written from the project's methods notes (section 5); the official code
carries no licence and was not used.

Two targets, two target-aware decoders, one encoder (a stock timm ViT run on the visible patches only):
- pixels: each patch normalised per channel, (x - mean) / sqrt(biased var + 1e-5), predicted by the pixel
  decoder, which cross-attends to the output of encoder block 0 (low-level features) of the visible tokens;
- features: the last-block tokens (before the final norm) of a momentum (EMA) copy of the encoder run on the
  full image, in eval mode and without gradient, predicted by the feature decoder, which cross-attends to the
  student's last-block tokens (before the final norm); both sides go through a LayerNorm without affine.
Both losses are masked-token MSEs with larger weights at the centre of masked regions (1 + the masked fraction
of the 3x3 neighbourhood), normalised by the number of masked tokens. L = R + lambda(e) * P, lambda ramped
linearly over the first 25% of epochs. Masks: a block mask of exactly 120/196 patches (BootMAE's own generator,
which draws until each block fits) topped up at random to 75%. The pixel head is BootMAE's ConvTranspose2d as a
per-token linear map with one bias per colour channel (`bootmae.pixel_head: official`; per_pixel: p*p*3 biases).

Every ingredient is a switch in the `bootmae:` config section (see mimkit.config.BootMAEConfig). The pixel
decoder takes its size from `mae.decoder_*`. With `mask.type: parallel` the EMAE parallel masks are used: K
disjoint visible parts per image in one batched forward (the momentum target is computed once per image), the
losses are averaged over parts and EMAE's self-consistency term (`emae.*`) is added on the pixel predictions.

`set_progress` sets the loss-weight ramp and the momentum once per epoch (the official schedule), `after_step` the
EMA update. The EMA encoder is a submodule with requires_grad=False: saved and resumed exactly, never optimised.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.config import geometry, resolve_block_generator
from mimkit.decoders import ChannelBiasHead, TargetAwareDecoder
from mimkit.losses import center_weights, consistency_loss, weighted_mse
from mimkit.masking import VisibleTokenMasks, parts_for_ratio, visible_token_masks
from mimkit.methods.base import MIMMethod, set_layer_norm_eps, vit_encoder
from mimkit.methods.emae import check_parallel_masks
from mimkit.methods.mae import PIXEL_DECODER_KEYS, check_pixel_decoder
from mimkit.models import (
    encode_visible,
    encoder_heads,
    init_weights_bootmae,
    sincos_2d_pos_embed,
    trunc_normal_sigma_,
)
from mimkit.registry import MethodSpec, register
from mimkit.schedules import feature_weight_at, momentum_at
from mimkit.targets import PixelTarget
from mimkit.teachers import ema_update_, teacher_targets
from mimkit.typed_config import require

FEATURE_EPS = 1e-6  # the affine-free LayerNorm on feature target and prediction


class BootMAEOutput(NamedTuple):
    loss: torch.Tensor  # reconstruction + feature_weight * feature (+ consistency weight * consistency)
    pred: torch.Tensor  # (B, L, p*p*3) pixel predictions in the target's normalised space; (B, K, L, .) parallel
    mask: torch.Tensor  # (B, L), 1 = masked; (B, K, L) with parallel masks
    reconstruction: torch.Tensor  # R, the centre-weighted pixel loss (detached)
    feature: torch.Tensor  # P, the centre-weighted feature loss (detached; 0 without a feature target)
    consistency: torch.Tensor  # EMAE self-consistency (parallel masks only, else 0; detached)
    feature_weight: float  # lambda(e) of this step (0 without a feature target)
    momentum: float  # EMA decay after_step applies after this step
    feature_pred: torch.Tensor | None  # (B[*K], L, D) feature-decoder output, before the affine-free LayerNorm


class BootMAE(MIMMethod):
    """`encoder` (the student, a stock timm ViT), `pixel_decoder`, `feature_decoder` and `ema_encoder` (the
    momentum copy of the encoder, requires_grad False) are its submodules; the last two only with an EMA target."""

    encoder: VisionTransformer

    def __init__(self, encoder: VisionTransformer, *, decoder_dim: int = 512, decoder_depth: int = 2,
                 decoder_heads: int = 16, feature_decoder_dim: int | None = None,
                 feature_decoder_depth: int | None = None, feature_decoder_heads: int | None = None,
                 mask_ratio: float = 0.75, mask_count: int | None = None, mask_type: str = "hybrid",
                 block_generator: str = "exact", hybrid_block_ratio: float = 120 / 196,
                 hybrid_max_block_ratio: float = 60 / 196, pixel_head: str = "official",
                 feature_target: str = "ema", feature_weight: float = 1.0, feature_weight_ramp: float = 0.25,
                 cross_attention: bool = True, pixel_context_layer: int = 0, feature_context_layer: int = -1,
                 pixel_norm: str = "patch_channel", center_weight: bool = True, mask_pos_only: bool = True,
                 momentum: float = 0.999, momentum_mid: float = 0.9999, momentum_mid_epoch: float = 100,
                 momentum_final: float | None = None, momentum_final_epoch: float = 400,
                 consistency_weight: float = 1.0, stop_gradient: bool = True, distance: str = "mse"):  # fmt: skip
        super().__init__()
        self.use_encoder(encoder)
        dim, depth = encoder.embed_dim, len(encoder.blocks)
        self.mask_ratio, self.mask_type, self.block_generator = mask_ratio, mask_type, block_generator
        self.mask_count = mask_count  # mask.count: masked patches per image, overrides the ratio
        self.masks = VisibleTokenMasks(mask_type, self.grid, mask_ratio, count=mask_count,
                                       block_generator=block_generator, hybrid_block_ratio=hybrid_block_ratio,
                                       hybrid_max_block_ratio=hybrid_max_block_ratio)  # fmt: skip
        self.parts = parts_for_ratio(mask_ratio) if mask_type == "parallel" else 1
        self.pixel_norm, self.center_weight = pixel_norm, center_weight
        self.pixel_target = PixelTarget(self.patch_size, pixel_norm)  # a part (no state): mimkit.targets
        self.norm_pix_loss = pixel_norm != "none"  # for reconstruction captions
        self.feature_weight, self.feature_weight_ramp = feature_weight, feature_weight_ramp
        self.momentum_schedule = (momentum, momentum_mid, momentum_mid_epoch, momentum_final, momentum_final_epoch)
        self.consistency_weight, self.stop_gradient, self.distance = consistency_weight, stop_gradient, distance
        self.pixel_layer, self.feature_layer = pixel_context_layer % depth, feature_context_layer % depth
        context = dim if cross_attention else None
        if pixel_head not in ("official", "per_pixel"):
            raise ValueError(f"pixel_head must be official or per_pixel, got {pixel_head!r}")
        self.pixel_head = pixel_head
        head = ChannelBiasHead(decoder_dim, self.patch_size) if pixel_head == "official" else None
        self.pixel_decoder = TargetAwareDecoder(dim, context, self.grid[0], decoder_dim, decoder_depth, decoder_heads,
                                                self.patch_size**2 * 3, mask_pos_only, head=head)  # fmt: skip
        self.feature_decoder = self.ema_encoder = None
        if feature_target == "ema":
            fdim = feature_decoder_dim or dim
            heads = feature_decoder_heads or encoder_heads(encoder)
            fdepth = feature_decoder_depth or decoder_depth
            self.feature_decoder = TargetAwareDecoder(dim, context, self.grid[0], fdim, fdepth, heads, dim,
                                                      mask_pos_only)  # fmt: skip
        self.initialize_weights()
        if feature_target == "ema":  # the momentum copy starts equal to the student
            # the teacher's encoder itself (not a mimkit.teachers.EMATeacher, which would add a level to the
            # state-dict keys `ema_encoder.*`); its logic is mimkit.teachers' functions
            self.ema_encoder = copy.deepcopy(encoder).requires_grad_(False).eval()
        self.set_progress(0, 1, 1)

    def initialize_weights(self) -> None:
        """Section 5.3: frozen row-first sin-cos pos-embed; BootMAE's xavier Linears (models.init_weights_bootmae);
        cls ~ N(0, 1e-6); mask tokens ~ N(0, 0.02) truncated at +-1 sigma (strictly inside: models.trunc_normal_sigma_);
        the pixel head is BootMAE's ConvTranspose2d(dim, 3, p, p) in patchify order with PyTorch's default init,
        U(+-1/sqrt(3 p^2)) for weights and its 3 channel biases (the per_pixel head: those 3 repeated over the p*p
        pixels, tied at init, free in training)."""
        enc = self.encoder
        assert enc.pos_embed is not None and enc.cls_token is not None  # create_encoder's ViT has both
        enc.pos_embed.data.copy_(sincos_2d_pos_embed(enc.embed_dim, self.grid[0], row_first=True))
        enc.pos_embed.requires_grad_(False)  # frozen in pretraining; timm makes it learnable at fine-tune
        for name, m in self.named_modules():
            init_weights_bootmae(name, m)
        w = enc.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=1e-6)
        for decoder in (self.pixel_decoder, self.feature_decoder):
            if decoder is not None:
                trunc_normal_sigma_(decoder.mask_token, 0.02)
        head, pixels = self.pixel_decoder.head, self.patch_size**2
        assert isinstance(head, (ChannelBiasHead, nn.Linear))  # the official or the per_pixel head
        bound = 1 / math.sqrt(3 * pixels)  # ConvTranspose2d's default: fan_in = out channels (3) x kernel area
        nn.init.uniform_(head.weight, -bound, bound)
        biases = torch.empty(3).uniform_(-bound, bound)
        head.bias.data.copy_(biases if self.pixel_head == "official" else biases.repeat(pixels))

    # ---------------------------------------------------------------- schedule and momentum encoder

    def set_progress(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """Where training is: the epoch fixes the feature-loss weight and the EMA momentum."""
        self.step, self.steps_per_epoch, self.epochs = step, steps_per_epoch, total_steps / steps_per_epoch

    def current_feature_weight(self) -> float:
        if self.ema_encoder is None:
            return 0.0
        epoch = self.step // self.steps_per_epoch
        return feature_weight_at(epoch, self.epochs, self.feature_weight, self.feature_weight_ramp)

    def current_momentum(self, step: int | None = None) -> float:
        return momentum_at((self.step if step is None else step) // self.steps_per_epoch, *self.momentum_schedule)

    def after_step(self, step: int) -> None:
        """EMA update after optimizer step `step` (teachers.ema_update_)."""
        if self.ema_encoder is not None:
            ema_update_(self.ema_encoder, self.encoder, self.current_momentum(step))

    def train(self, mode: bool = True) -> BootMAE:
        super().train(mode)
        if self.ema_encoder is not None:
            self.ema_encoder.eval()  # the momentum encoder always runs in eval mode (no drop path)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for decoder in (self.pixel_decoder, self.feature_decoder):
            if decoder is not None:
                decoder.grad_checkpointing = enable

    # ---------------------------------------------------------------- masks, targets, forward

    def mask_inputs(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample masking input drawn in the data pipeline (see MAE.mask_inputs)."""
        return self.masks(generator)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.pixel_target(imgs)

    def pixels_from_pred(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        return self.pixel_target.pixels_from(pred, imgs)

    def feature_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's last-block patch tokens before the final norm, (B, L, D) (mimkit.teachers)."""
        assert self.ema_encoder is not None  # feature_target ema: forward reads this with a feature decoder only
        return teacher_targets(self.ema_encoder, imgs, (-1,))[0]

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> BootMAEOutput:  # fmt: skip
        """`mask` (B, L, 1 = masked) from hybrid/block masking, or `noise` (B, L) for random/parallel masks."""
        b, num, parts = imgs.shape[0], self.num_patches, self.parts if mask is None else 1
        ids_keep, ids_restore, masks = visible_token_masks(b, num, self.mask_ratio, parts, count=self.mask_count,
                                                           noise=noise, mask=mask, device=imgs.device)  # fmt: skip
        per_part = (lambda t: t.repeat_interleave(parts, dim=0)) if parts > 1 else (lambda t: t)  # noqa: E731
        latent, features = encode_visible(self.encoder, imgs, ids_keep, (self.pixel_layer, self.feature_layer))
        weights = center_weights(masks, self.grid) if self.center_weight else masks
        count = masks.sum()

        pred = self.pixel_decoder(latent, ids_restore, masks, features[self.pixel_layer])
        reconstruction = weighted_mse(pred, per_part(self.target(imgs)), weights, count)
        loss, feature, feature_pred = reconstruction, reconstruction.new_zeros(()), None
        lam = self.current_feature_weight()
        if self.feature_decoder is not None:
            feature_pred = self.feature_decoder(latent, ids_restore, masks, features[self.feature_layer])
            target = per_part(self.feature_target(imgs)).float()
            norm = lambda f: F.layer_norm(f.float(), target.shape[-1:], eps=FEATURE_EPS)  # noqa: E731
            feature = weighted_mse(norm(feature_pred), norm(target), weights, count)
            loss = loss + lam * feature
        consistency = reconstruction.new_zeros(())
        if parts > 1:
            pred, masks = pred.view(b, parts, num, -1), masks.view(b, parts, num)
            if self.consistency_weight > 0:
                consistency = consistency_loss(pred, masks, self.stop_gradient, self.distance)
                loss = loss + self.consistency_weight * consistency
        momentum = self.current_momentum() if self.ema_encoder is not None else 0.0
        return BootMAEOutput(
            loss,
            pred.clone(),
            masks,
            reconstruction.detach(),
            feature.detach(),
            consistency.detach(),
            lam,
            momentum,
            None if feature_pred is None else feature_pred.clone(),
        )  # no views (FSDP2)


def build(cfg) -> BootMAE:
    m, bm, e, mask = cfg.mae, cfg.bootmae, cfg.emae, cfg.mask
    same_names = {name: getattr(bm, name) for name in (
        "feature_decoder_dim", "feature_decoder_depth", "feature_decoder_heads", "feature_target", "feature_weight",
        "feature_weight_ramp", "cross_attention", "pixel_context_layer", "feature_context_layer", "pixel_norm",
        "center_weight", "mask_pos_only", "momentum", "momentum_mid", "momentum_mid_epoch", "momentum_final",
        "momentum_final_epoch", "pixel_head")}  # fmt: skip
    model = BootMAE(vit_encoder(cfg), decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                    decoder_heads=m.decoder_heads, mask_ratio=mask.ratio, mask_count=mask.count, mask_type=mask.type,
                    block_generator=resolve_block_generator(cfg),
                    hybrid_block_ratio=mask.hybrid_block_ratio, hybrid_max_block_ratio=mask.hybrid_max_block_ratio,
                    consistency_weight=e.consistency_weight, stop_gradient=e.stop_gradient, distance=e.distance,
                    **same_names)  # fmt: skip
    return set_layer_norm_eps(model, cfg.model.layer_norm_eps)


def check(cfg) -> None:
    b, g = cfg.bootmae, geometry(cfg)
    check_pixel_decoder(cfg, heads_divide=False)  # its target-aware blocks take any width >= heads
    if cfg.mask.type == "parallel":
        check_parallel_masks(cfg)
    require(b.feature_weight >= 0, f"bootmae.feature_weight must be >= 0, got {b.feature_weight}")
    require(
        0.0 <= b.feature_weight_ramp <= 1.0,
        f"bootmae.feature_weight_ramp must be in [0, 1], got {b.feature_weight_ramp}",
    )
    for name in ("momentum", "momentum_mid", "momentum_final"):
        value = getattr(b, name)
        require(value is None or 0.0 <= value <= 1.0, f"bootmae.{name} must be in [0, 1], got {value}")
    require(b.momentum_mid_epoch > 0, f"bootmae.momentum_mid_epoch must be positive, got {b.momentum_mid_epoch}")
    require(b.momentum_final is None or b.momentum_final_epoch > b.momentum_mid_epoch,
            f"bootmae.momentum_final_epoch {b.momentum_final_epoch} must be after momentum_mid_epoch {b.momentum_mid_epoch}")  # fmt: skip
    for name in ("pixel_context_layer", "feature_context_layer"):
        layer = getattr(b, name)
        require(-g.depth <= layer < g.depth, f"bootmae.{name} {layer} is not a block of the {g.depth}-block encoder")
    fdim, fheads = b.feature_decoder_dim or g.dim, b.feature_decoder_heads or g.heads
    for name in ("feature_decoder_dim", "feature_decoder_depth", "feature_decoder_heads"):
        value = getattr(b, name)
        require(value is None or value > 0, f"bootmae.{name} must be positive or null, got {value}")
    require(fdim % 4 == 0 and fdim >= fheads,
            f"bootmae.feature_decoder_dim {fdim} must be divisible by 4 and >= feature_decoder_heads {fheads}")  # fmt: skip


SPEC = register(MethodSpec(
    name="bootmae", build=build, check=check,
    reads=lambda cfg: (*PIXEL_DECODER_KEYS, "bootmae", *(("emae",) if cfg.mask.type == "parallel" else ())),
    summary="BootMAE (Dong et al. 2022): pixels plus the features of a momentum encoder, target-aware decoders",
    mask_types=("random", "block", "hybrid", "parallel"),
    loss_terms=("reconstruction", "feature", "consistency"),
    logged=("feature_weight", "momentum"),
    no_weight_decay=("encoder.pos_embed", "encoder.cls_token"),  # the encoder's no_weight_decay()
    teachers=("ema_encoder.",), rgb_only=True,  # its official pixel head has one bias per colour channel
))  # fmt: skip
