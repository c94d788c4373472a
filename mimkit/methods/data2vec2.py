"""data2vec 2.0 (Baevski et al., ICML 2023), images; behaviour established by reading fairseq's
examples/data2vec (models/data2vec2.py, modalities/images.py, the image pretraining config; MIT), written anew.

A student ViT (a stock timm encoder) encodes only the visible patches of M independent masks per image (the paper's
multi-mask: the student batch is B x M sequences, EMAE's batching of K parts in one forward, except that the M masks
are drawn independently, not as a partition). An EMA teacher (mimkit.teachers.EMATeacher, always in eval mode) sees
the whole image once per image, shared by its M masks; the target of a patch is the mean of the teacher's top-K block
outputs, each instance-normalised over the patches (cls dropped). A light convolutional decoder (mimkit.decoders.
ConvDecoder2d) reads the student's tokens laid out on the patch grid, N(0, mask_noise_std) noise at the masked
positions, and predicts every patch's target; the loss is the squared L2 error on the masked positions, scaled by
1 / sqrt(D) (fairseq's default loss scale), averaged over the masked patches of the B x M sequences. Optional cls term
(`data2vec2.cls_loss_weight`): the student's cls token regressed onto the mean target of all patches, averaged over
the sequences. The teacher's decay goes linearly 0.9998 -> 0.99999 over the run (schedules.ema_decay_at).

Masks: mask.type block = data2vec 2.0's inverse block masks (masking.inverse_block_mask: the visible patches come
in blocks), mask.type random = uniform random masks; both with an equal visible count per sequence.
Differences from fairseq, by design: the timm encoder is pre-norm with a final norm (fairseq's image model is
post-norm), so the decoder reads the final-norm tokens and the targets are the residual stream after each block; the
cls term's weight is per sequence (fairseq multiplies its 0.01 by the sample size, i.e. sums over the batch), so it
is off by default.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.config import geometry
from mimkit.decoders import ConvDecoder2d
from mimkit.masking import inverse_block_mask, mask_to_ids, num_visible
from mimkit.methods.base import MIMMethod, set_layer_norm_eps, vit_encoder
from mimkit.models import encode_visible, init_weights_mae, sincos_2d_pos_embed
from mimkit.registry import MethodSpec, register
from mimkit.schedules import ema_decay_at
from mimkit.teachers import EMATeacher
from mimkit.typed_config import require


class Data2Vec2Output(NamedTuple):
    loss: torch.Tensor  # regression + cls_loss_weight * cls
    pred: torch.Tensor  # (B, M, L, D) decoder predictions of every patch (detached)
    mask: torch.Tensor  # (B, M, L), 1 = masked in that mask
    regression: torch.Tensor  # the masked-patch regression (detached)
    cls: torch.Tensor  # the cls term (detached; 0 when its weight is 0)
    ema_decay: float  # the decay after_step applies after this step


class Data2Vec2(MIMMethod):
    """`encoder` (the student), `decoder` (ConvDecoder2d) and `teacher` (EMATeacher: `teacher.encoder.*`)."""

    encoder: VisionTransformer

    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.8, mask_type: str = "block",
                 num_masks: int = 8, top_k_blocks: int = 8, mask_length: int = 3, mask_prob_adjust: float = 0.07,
                 decoder_dim: int | None = None, decoder_layers: int = 6, decoder_kernel: int = 3,
                 decoder_groups: int = 16, mask_noise_std: float = 0.01, cls_loss_weight: float = 0.0,
                 ema_decay: float = 0.9998, ema_end_decay: float = 0.99999):  # fmt: skip
        super().__init__()
        self.use_encoder(encoder)
        dim, depth = encoder.embed_dim, len(encoder.blocks)
        self.mask_ratio, self.mask_type, self.num_masks = mask_ratio, mask_type, num_masks
        self.mask_length, self.mask_prob_adjust = mask_length, mask_prob_adjust
        self.keep = num_visible(self.num_patches, mask_ratio)
        self.mask_noise_std, self.cls_loss_weight = mask_noise_std, cls_loss_weight
        self.ema_decays = (ema_decay, ema_end_decay)
        self.decoder = ConvDecoder2d(dim, self.grid, decoder_dim or dim, decoder_layers, decoder_kernel, decoder_groups)
        self.initialize_weights()
        top_k = min(top_k_blocks, depth)  # a shallow encoder: all its blocks
        self.teacher = EMATeacher(encoder, range(depth - top_k, depth), instance_norm=True, average=True)
        self.set_progress(0, 1, 1)

    def initialize_weights(self) -> None:
        """fairseq's: fixed sin-cos positions, xavier-uniform Linears with zero bias, LayerNorm (1, 0) (MAE's
        init_weights_mae); the patch embedding as a Linear on the flattened patch; convolutions PyTorch's default."""
        enc = self.encoder
        assert enc.pos_embed is not None and enc.cls_token is not None  # create_encoder's ViT has both
        enc.pos_embed.data.copy_(sincos_2d_pos_embed(enc.embed_dim, self.grid[0]))
        enc.pos_embed.requires_grad_(False)  # frozen in pretraining; timm makes it learnable at fine-tune
        w = enc.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        self.apply(init_weights_mae)

    # ---------------------------------------------------------------- teacher schedule

    def set_progress(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        self.step, self.total_steps = step, total_steps

    def current_decay(self, step: int | None = None) -> float:
        """The decay of the EMA update after optimizer step `step` (fairseq anneals by the update count, step + 1)."""
        return ema_decay_at((self.step if step is None else step) + 1, self.total_steps, *self.ema_decays)

    def after_step(self, step: int) -> None:
        self.teacher.update(self.encoder, self.current_decay(step))

    # ---------------------------------------------------------------- masks, targets, forward

    def one_mask(self, generator: torch.Generator | None) -> torch.Tensor:
        """(L,) bool, 1 = masked: an inverse block mask (block) or a uniform random one (random)."""
        if self.mask_type == "block":
            return inverse_block_mask(self.grid, self.mask_ratio, mask_length=self.mask_length,
                                      prob_adjust=self.mask_prob_adjust, generator=generator).flatten()  # fmt: skip
        mask = torch.ones(self.num_patches, dtype=torch.bool)
        mask[torch.randperm(self.num_patches, generator=generator)[: self.keep]] = False
        return mask

    def mask_inputs(self, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """M independent masks per sample, (M, L), from the sample's own generator (see MAE.mask_inputs)."""
        return {"mask": torch.stack([self.one_mask(generator) for _ in range(self.num_masks)])}

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, L, D) fp32: the teacher's top-K block outputs on the whole image, instance-normalised, averaged."""
        return self.teacher(imgs)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> Data2Vec2Output:
        """`mask` (B, M, L), 1 = masked, the same visible count everywhere; None: M fresh masks per image."""
        b, num = imgs.shape[0], self.num_patches
        if mask is None:
            mask = torch.stack([self.mask_inputs(None)["mask"] for _ in range(b)]).to(imgs.device)
        mask = mask.reshape(b, -1, num)
        masks = mask.shape[1]
        masking = mask_to_ids(mask.flatten(0, 1))  # (B*M, keep) visible ids, ascending
        latent = encode_visible(self.encoder, imgs, masking.ids_keep.view(b, masks, -1))  # one batched forward
        dim = latent.shape[-1]
        tokens = latent[:, 1:]
        full = tokens.new_empty(b * masks, num, dim)
        full = full.normal_(0.0, self.mask_noise_std) if self.mask_noise_std > 0 else full.zero_()
        full = full.scatter(1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, dim), tokens)
        pred = self.decoder(full)
        y = self.targets(imgs)  # one teacher pass per image, shared by its M masks
        target = y.repeat_interleave(masks, dim=0)
        scale = 1.0 / math.sqrt(dim)
        in_loss = masking.mask
        errors = (pred.float() - target).pow(2).sum(-1) * scale
        regression = (errors * in_loss).sum() / in_loss.sum()
        loss, cls = regression, regression.new_zeros(())
        if self.cls_loss_weight > 0:
            cls_target = y.mean(1).repeat_interleave(masks, dim=0)
            cls = ((latent[:, 0].float() - cls_target).pow(2).sum(-1) * scale).mean()
            loss = loss + self.cls_loss_weight * cls
        return Data2Vec2Output(loss, pred.detach().reshape(b, masks, num, -1), in_loss.view(b, masks, num),
                               regression.detach(), cls.detach(), self.current_decay())  # fmt: skip


def build(cfg) -> Data2Vec2:
    d = cfg.data2vec2
    options = {name: getattr(d, name) for name in (
        "num_masks", "top_k_blocks", "mask_length", "mask_prob_adjust", "decoder_dim", "decoder_layers",
        "decoder_kernel", "decoder_groups", "mask_noise_std", "cls_loss_weight", "ema_decay", "ema_end_decay")}  # fmt: skip
    model = Data2Vec2(vit_encoder(cfg), mask_ratio=cfg.mask.ratio, mask_type=cfg.mask.type, **options)
    return set_layer_norm_eps(model, cfg.model.layer_norm_eps)


def check(cfg) -> None:
    d, g = cfg.data2vec2, geometry(cfg)
    for name in ("num_masks", "top_k_blocks", "mask_length", "decoder_layers", "decoder_groups"):
        require(getattr(d, name) >= 1, f"data2vec2.{name} must be >= 1, got {getattr(d, name)}")
    require(d.decoder_kernel >= 1 and d.decoder_kernel % 2 == 1,
            f"data2vec2.decoder_kernel must be odd and positive (same padding), got {d.decoder_kernel}")  # fmt: skip
    width = d.decoder_dim or g.dim
    require(
        d.decoder_dim is None or d.decoder_dim > 0,
        f"data2vec2.decoder_dim must be positive or null, got {d.decoder_dim}",
    )
    require(width % d.decoder_groups == 0 and g.dim % d.decoder_groups == 0,
            f"data2vec2.decoder_groups {d.decoder_groups} must divide the decoder width {width} and the encoder "
            f"width {g.dim}")  # fmt: skip
    for name in ("mask_prob_adjust", "mask_noise_std", "cls_loss_weight"):
        require(getattr(d, name) >= 0, f"data2vec2.{name} must be >= 0, got {getattr(d, name)}")
    for name in ("ema_decay", "ema_end_decay"):
        require(0.0 <= getattr(d, name) <= 1.0, f"data2vec2.{name} must be in [0, 1], got {getattr(d, name)}")


SPEC = register(MethodSpec(
    name="data2vec2", build=build, check=check, reads=("data2vec2",),
    summary="data2vec 2.0 (Baevski et al. 2023): M inverse block masks per image sharing one EMA-teacher pass, "
            "the teacher's top-K instance-normalised block outputs regressed by a conv decoder",
    mask_types=("block", "random"),  # block: data2vec 2.0's inverse block masks (blocks kept visible)
    mask_count=False,  # the visible count comes from mask.ratio
    loss_terms=("regression", "cls"),
    logged=("ema_decay",), teachers=("teacher.encoder.",),
    predicts_pixels=False,
    no_weight_decay=(),  # fairseq exempts only 1-D parameters and biases (its cls token is decayed)
))  # fmt: skip
