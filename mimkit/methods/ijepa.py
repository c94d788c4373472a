"""I-JEPA (Assran et al., CVPR 2023): a context encoder sees one large context block less the target blocks; a
narrow ViT predictor, given the context tokens and mask tokens (with position embeddings) at the target positions,
predicts the representations an EMA target encoder gives those patches from the whole image (its last-block output
after its final norm, layer-normalised again without affine); smooth-L1 (or L2) loss averaged over the target
blocks. Momentum 0.996 -> 1.0 linearly over the run, weight decay 0.04 -> 0.4 (cosine) through `weight_decay_at`.

The encoders are stock timm VisionTransformers without a cls token (`class_token=False, global_pool="avg",
fc_norm=False`: the final norm on every token, evaluation pools the patch tokens). Keys: encoder.*, predictor.*,
target_encoder.* (its EMA copy: what evaluation, embedding and export read, as the paper evaluates it). Masks: mimkit.masking.MultiBlockMasks, per image (see its note on batching).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mimkit.config import geometry
from mimkit.decoders import JEPAPredictor
from mimkit.masking import MultiBlockMasks, multiblock_ids, multiblock_size, take_patches
from mimkit.methods.base import MIMMethod, set_layer_norm_eps
from mimkit.models import create_encoder, encoder_heads, init_weights_jepa, run_blocks, sincos_2d_pos_embed
from mimkit.registry import MethodSpec, register
from mimkit.teachers import ema_update_, layer_norm_tokens
from mimkit.typed_config import require

TIMM_ARGS = {"class_token": False, "global_pool": "avg", "fc_norm": False}  # the encoder's timm arguments


class IJEPAOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    momentum: torch.Tensor  # the EMA momentum of this step's update
    # the targets' spread: per feature, the std over the batch's target tokens, averaged over the features; it falls
    # towards 0 when the target encoder collapses to one representation (which the loss alone does not show)
    target_std: torch.Tensor


def ijepa_encoder(cfg) -> VisionTransformer:
    """The stock timm ViT without a cls token `cfg.model` describes (LayerNorm eps 1e-6, qkv bias)."""
    m = cfg.model
    return create_encoder(m.arch, m.img_size, m.patch_size, m.drop_path_rate, m.embed_dim, m.depth, m.num_heads,
                          in_chans=m.in_chans, **TIMM_ARGS)  # fmt: skip


class IJEPA(MIMMethod):
    encoder: VisionTransformer

    def __init__(self, encoder: VisionTransformer, predictor_dim: int = 384, predictor_depth: int = 12,
                 predictor_heads: int | None = None, num_targets: int = 4, target_scale=(0.15, 0.2),
                 target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), min_keep: int = 10, loss: str = "smooth_l1",
                 momentum: float = 0.996, momentum_final: float = 1.0, weight_decay: float = 0.04,
                 weight_decay_final: float = 0.4):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        grid = tuple(encoder.patch_embed.grid_size)
        self.masks = MultiBlockMasks(grid, num_targets, target_scale, target_aspect, context_scale, min_keep)
        self.loss_kind = loss
        self.momenta, self.momentum = (momentum, momentum_final), momentum
        self.weight_decays = (weight_decay, weight_decay_final)
        init_weights_jepa(encoder)
        assert encoder.pos_embed is not None  # create_encoder's ViT has one
        encoder.pos_embed.data.copy_(sincos_2d_pos_embed(encoder.embed_dim, grid[0], cls_token=False))
        encoder.pos_embed.requires_grad_(False)  # fixed, as the official encoder's
        self.predictor = JEPAPredictor(encoder.embed_dim, grid[0], predictor_dim, predictor_depth,
                                   predictor_heads or encoder_heads(encoder))  # fmt: skip
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)

    def train(self, mode: bool = True) -> IJEPA:
        super().train(mode)
        self.target_encoder.eval()  # no drop path in the target encoder
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.predictor.grad_checkpointing = enable

    def mask_inputs(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.masks(generator)

    def set_progress(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """The official schedule: step i of T updates with m0 + i (m1 - m0) / T."""
        m0, m1 = self.momenta
        self.momentum = m0 + step * (m1 - m0) / max(total_steps, 1)

    def weight_decay_at(self, step: int, total_steps: int) -> float:
        """The official cosine weight-decay schedule, stepped before each update: wd0 -> wd1 at progress
        (step + 1) / T, clamped to the final value."""
        w0, w1 = self.weight_decays
        wd = w1 + (w0 - w1) * 0.5 * (1.0 + math.cos(math.pi * (step + 1) / max(total_steps, 1)))
        return max(w1, wd) if w1 <= w0 else min(w1, wd)

    def after_step(self, step: int) -> None:
        ema_update_(self.target_encoder, self.encoder, self.momentum)

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, L, D): the target encoder's final-norm output on the whole image, layer-normalised (no affine)."""
        enc = self.target_encoder
        return layer_norm_tokens(enc.forward_features(imgs))

    def encode_context(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.encoder.patch_embed(imgs) + self.encoder.pos_embed
        x = run_blocks(self.encoder.blocks, take_patches(x, ids), self.encoder.grad_checkpointing)
        return self.encoder.norm(x)

    def forward(self, imgs: torch.Tensor, context: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> IJEPAOutput:  # fmt: skip
        """context (B, L) and targets (B, M, L) bool masks (1 = in the block); drawn afresh when not given."""
        if context is None or targets is None:
            drawn = [self.masks() for _ in range(imgs.shape[0])]
            context = torch.stack([d["context"] for d in drawn]).to(imgs.device)
            targets = torch.stack([d["targets"] for d in drawn]).to(imgs.device)
        ctx_ids, tgt_ids = multiblock_ids(context), multiblock_ids(targets)
        b, m, k = tgt_ids.shape
        h = take_patches(self.targets(imgs), tgt_ids.reshape(b, m * k)).view(b, m, k, -1)
        z = self.predictor(self.encode_context(imgs, ctx_ids), ctx_ids, tgt_ids).float()
        loss = F.smooth_l1_loss(z, h) if self.loss_kind == "smooth_l1" else F.mse_loss(z, h)
        spread = h.float().reshape(-1, h.shape[-1]).std(0).mean()
        return IJEPAOutput(loss, torch.tensor(self.momentum, device=imgs.device), spread)


def smallest_target(cfg) -> int:
    """Patches of the smallest target block the config can draw (scanning the one uniform draw that sets both the
    scale and the aspect: rounding makes the smallest block fall anywhere in the range)."""
    g, j = geometry(cfg), cfg.ijepa
    sizes = (multiblock_size((g.img // g.patch,) * 2, j.target_scale, j.target_aspect, u / 4096) for u in range(4097))
    return min(h * w for h, w in sizes)


def resolved_min_keep(cfg) -> int:
    j = cfg.ijepa
    return j.min_keep if j.min_keep is not None else max(0, min(10, smallest_target(cfg) - 1))


def build(cfg) -> IJEPA:
    j = cfg.ijepa
    return set_layer_norm_eps(IJEPA(
        ijepa_encoder(cfg), predictor_dim=j.predictor_dim or min(geometry(cfg).dim, 384), predictor_depth=j.predictor_depth,
        predictor_heads=j.predictor_heads, num_targets=j.num_targets, target_scale=j.target_scale,
        target_aspect=j.target_aspect, context_scale=j.context_scale, min_keep=resolved_min_keep(cfg), loss=j.loss,
        momentum=j.momentum, momentum_final=j.momentum_final, weight_decay=cfg.optim.weight_decay,
        weight_decay_final=j.weight_decay_final,
    ), cfg.model.layer_norm_eps)  # fmt: skip


def check(cfg) -> None:
    j, g = cfg.ijepa, geometry(cfg)
    heads, width = j.predictor_heads or g.heads, j.predictor_dim or min(g.dim, 384)
    require(width > 0 and j.predictor_depth >= 1 and width % 4 == 0,
            f"ijepa.predictor_dim must be a positive multiple of 4 and predictor_depth >= 1, got {width}, "
            f"{j.predictor_depth}")  # fmt: skip
    require(heads > 0 and width % heads == 0, f"ijepa.predictor_heads {heads} must divide ijepa.predictor_dim {width}")
    require(j.num_targets >= 1, f"ijepa.num_targets must be >= 1, got {j.num_targets}")
    for key in ("target_scale", "context_scale", "target_aspect"):
        lo, hi = getattr(j, key)
        require(0 < lo <= hi and (key == "target_aspect" or hi <= 1), f"ijepa.{key} must be 0 < lo <= hi"
                f"{' <= 1' if key != 'target_aspect' else ''}, got {(lo, hi)}")  # fmt: skip
    smallest = smallest_target(cfg)
    require(j.min_keep is None or 0 <= j.min_keep < smallest, f"ijepa.min_keep {j.min_keep} must be below the "
            f"smallest target block ({smallest} patches): the official collator would draw forever")  # fmt: skip
    require(0.0 <= j.momentum <= j.momentum_final <= 1.0, "ijepa.momentum <= ijepa.momentum_final must lie in [0, 1]")
    require(
        j.weight_decay_final > 0 and cfg.optim.weight_decay > 0,
        "ijepa.weight_decay_final and optim.weight_decay "
        f"(the schedule's start) must be > 0, got {j.weight_decay_final}, {cfg.optim.weight_decay}",
    )


SPEC = register(MethodSpec(
    name="ijepa", build=build, check=check, reads=("ijepa",),
    summary="I-JEPA (Assran et al. 2023): an EMA target encoder's layer-normed features of 4 target blocks predicted "
            "from one context block by a narrow ViT predictor; no cls token (evaluation pools the target encoder's "
            "patch tokens, as the paper)",
    mask_types=("random",), reads_mask=False,  # it draws its own multi-block masks (ijepa.*): mask.* is refused
    mask_count=False, predicts_pixels=False, family="vit", pool="mean",
    logged=("momentum", "target_std"), teachers=("target_encoder.",), evaluated="target_encoder",
    no_weight_decay=(),  # the official groups: only biases and 1-D parameters are exempt
))  # fmt: skip
