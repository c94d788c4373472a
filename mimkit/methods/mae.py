"""MAE (He et al., CVPR 2022): a ViT encoder on the visible patches only, a light decoder that
re-inserts mask tokens and predicts the pixels of every patch, MSE on the masked patches only.
With decoder "crossmae" (CrossMAE, Fu et al., TMLR 2025) a cross-attention-only decoder reads out a random
`reconstruct_ratio` of the masked patches, and the loss is on those.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.config import geometry, resolve_block_generator
from mimkit.decoders import CrossMAEDecoder, MAEDecoder, resolve_context_blocks
from mimkit.losses import masked_mse
from mimkit.masking import (
    RandomMask,
    VisibleTokenMasks,
    masked_patch_ids,
    put_patches,
    reconstruction_ids,
    take_patches,
    visible_token_masks,
)
from mimkit.methods.base import MIMMethod, set_layer_norm_eps, vit_encoder
from mimkit.models import encode_visible, init_weights_mae, resampled_pos_embed, sincos_2d_pos_embed
from mimkit.registry import MethodSpec, method_spec, register
from mimkit.targets import make_target
from mimkit.typed_config import require


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    pred: torch.Tensor  # (B, L, width) predictions for every patch, in the target's space (pixels: p*p*3); in training
    # zeros at the patches not decoded (MAE: the visible ones, unless decode_visible; CrossMAE: all but its readout)
    mask: torch.Tensor  # (B, L) 1 = masked
    loss_mask: torch.Tensor | None = None  # (B, L) 1 = in the loss (CrossMAE's decoded masked patches); None: mask


class MAE(MIMMethod):
    """Encoder attribute names are timm's; decoder names follow the official MAE layout."""

    encoder: VisionTransformer
    decoder: MAEDecoder | CrossMAEDecoder

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        mask_count: int | None = None,
        mask_type: str = "random",
        block_generator: str = "exact",
        hybrid_block_ratio: float = 120 / 196,
        hybrid_max_block_ratio: float = 60 / 196,
        decoder: str = "mae",
        reconstruct_ratio: float = 1.0,
        decoder_context_blocks: tuple[int, ...] | str = (),
        decode_visible: bool = False,
        target: str = "auto",
    ):
        """target: the per-patch target (mimkit.targets.make_target: norm_pix, pixels or hog); auto: norm_pix when
        norm_pix_loss, else pixels. The decoder's head predicts the target's width per patch."""
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.num_patches = encoder.patch_embed.num_patches
        self.mask_ratio = mask_ratio
        self.mask_count = mask_count  # mask.count: masked patches per image, overrides the ratio
        self.mask_type, self.block_generator = mask_type, block_generator
        self.hybrid_ratios = (hybrid_block_ratio, hybrid_max_block_ratio)
        self.masks = self.masks_on(tuple(encoder.patch_embed.grid_size), mask_count)
        if target == "auto":
            target = "norm_pix" if norm_pix_loss else "pixels"
        self.target_part = make_target(target, self.patch_size, encoder.patch_embed.proj.in_channels)
        self.norm_pix_loss = target == "norm_pix"  # for captions and export
        sizes = (encoder.embed_dim, self.num_patches, self.patch_size, decoder_dim, decoder_depth, decoder_heads)
        width = self.target_part.width(self.patch_size)
        self.reconstruct_ratio = reconstruct_ratio
        self.decode_visible = decode_visible  # training: also predict the visible patches (the official code's work)
        if decoder == "crossmae":
            context_blocks = resolve_context_blocks(decoder_context_blocks, len(encoder.blocks))
            self.decoder = CrossMAEDecoder(*sizes, context_blocks=context_blocks, out_dim=width)
        else:
            self.decoder = MAEDecoder(*sizes, out_dim=width)
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def initialize_weights(self) -> None:
        grid = self.encoder.patch_embed.grid_size[0]
        pos_embed, cls_token = self.encoder.pos_embed, self.encoder.cls_token
        assert pos_embed is not None and cls_token is not None  # create_encoder's ViT has both
        pos_embed.data.copy_(sincos_2d_pos_embed(self.encoder.embed_dim, grid))
        pos_embed.requires_grad_(False)  # frozen in pretraining; timm makes it learnable at fine-tune
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on the flattened patch
        nn.init.normal_(cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        self.apply(init_weights_mae)

    def mask_inputs(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample masking input, drawn in the data pipeline from the sample's own generator,
        so masks depend only on (seed, epoch, sample index): not on workers, ranks or resumes."""
        return self._draw(self.masks, generator)

    def mask_inputs_at(self, img_size: int) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
        """`mask_inputs` for img_size-px inputs (train.resolution_stages): the same draw on that grid."""
        if img_size == self.encoder.patch_embed.img_size[0]:
            return self.mask_inputs
        grid = img_size // self.patch_size
        return partial(self._draw, self.masks_on((grid, grid)))

    def masks_on(self, grid: tuple[int, int], count: int | None = None) -> VisibleTokenMasks:
        return VisibleTokenMasks(self.mask_type, grid, self.mask_ratio, count=count, block_generator=self.block_generator,
                                 hybrid_block_ratio=self.hybrid_ratios[0], hybrid_max_block_ratio=self.hybrid_ratios[1])  # fmt: skip

    def _draw(self, masks: VisibleTokenMasks, generator: torch.Generator) -> dict[str, torch.Tensor]:
        inputs = masks(generator)
        if isinstance(self.decoder, CrossMAEDecoder):  # drawn after the mask, so the mask is MAE's for the generator
            inputs["select_noise"] = torch.rand(masks.num_patches, generator=generator)
        return inputs

    def position_tables(self, imgs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The encoder's and decoder's position tables for inputs of another size than the model's (a
        train.resolution_stages stage): both resampled to the input's grid; (None, None) at the model's own size."""
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        if grid == tuple(self.encoder.patch_embed.grid_size):
            return None, None
        assert self.encoder.pos_embed is not None  # create_encoder's ViT has one
        decoder_prefix = 0 if isinstance(self.decoder, CrossMAEDecoder) else 1  # CrossMAE's table has no cls row
        return (resampled_pos_embed(self.encoder.pos_embed, grid),
                resampled_pos_embed(self.decoder.decoder_pos_embed, grid, decoder_prefix))  # fmt: skip

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.target_part(imgs)

    def pixels_from_pred(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Pixels of the predictions; a target that is not pixels (hog) has none to show: zeros (the data mean, a
        flat grey in the pictures), shaped as pixels."""
        if not self.target_part.PREDICTS_PIXELS:
            return pred.new_zeros(*pred.shape[:-1], self.patch_size**2 * imgs.shape[1])
        return self.target_part.pixels_from(pred, imgs)

    def forward(
        self,
        imgs: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        select_noise: torch.Tensor | None = None,
    ) -> MAEOutput:
        """`noise` (B, L) drives random masking (as HF ViTMAE's `noise`); `mask` (B, L, 1 = masked,
        same count per image) gives the mask directly; neither: fresh random noise. `select_noise` (B, L):
        which masked patches the CrossMAE decoder reconstructs (fresh when None). Images smaller than the model's
        (train.resolution_stages) run on position tables resampled to their grid."""
        num = (imgs.shape[-2] // self.patch_size) * (imgs.shape[-1] // self.patch_size)
        masking = visible_token_masks(imgs.shape[0], num, self.mask_ratio, count=self.mask_count, noise=noise,
                                      mask=mask, device=imgs.device)  # fmt: skip
        pos, decoder_pos = self.position_tables(imgs)
        if isinstance(self.decoder, CrossMAEDecoder):
            return self._forward_crossmae(imgs, masking, select_noise, pos, decoder_pos)
        latent = encode_visible(self.encoder, imgs, masking.ids_keep, pos_embed=pos)
        if self.training and not self.decode_visible:  # the loss reads the masked patches: decode those only
            masked = masked_patch_ids(masking.mask, num - masking.ids_keep.shape[1])
            pred = self.decoder(latent, masking.ids_restore, masked, pos_embed=decoder_pos)
            loss = masked_mse(pred, take_patches(self.target(imgs), masked), take_patches(masking.mask, masked))
            return MAEOutput(loss, put_patches(pred, masked, num), masking.mask)
        pred = self.decoder(latent, masking.ids_restore, pos_embed=decoder_pos)
        loss = masked_mse(pred, self.target(imgs), masking.mask)
        return MAEOutput(loss, pred.clone(), masking.mask)  # not a view of the decoder output: FSDP2 hooks outputs

    def _forward_crossmae(self, imgs: torch.Tensor, masking: RandomMask, select_noise: torch.Tensor | None,
                          pos: torch.Tensor | None = None, decoder_pos: torch.Tensor | None = None) -> MAEOutput:  # fmt: skip
        """Training: queries at the selected masked patches only; `pred` holds zeros at every other patch.
        Eval mode (pictures, report): a query at every patch (queries are independent, so this changes no
        prediction), so `pred` is a full reconstruction like MAE's and the loss is on every masked patch."""
        decoder = self.decoder
        assert isinstance(decoder, CrossMAEDecoder)  # forward's branch for this decoder
        encoded = encode_visible(self.encoder, imgs, masking.ids_keep, decoder.context_blocks, pos_embed=pos)
        latent, features = encoded if decoder.context_blocks else (encoded, None)
        ids = reconstruction_ids(masking.mask, self.reconstruct_ratio if self.training else None, select_noise)
        pred = decoder(latent, ids, features, pos_embed=decoder_pos)
        in_loss = take_patches(masking.mask, ids)
        loss = masked_mse(pred, take_patches(self.target(imgs), ids), in_loss)
        num = masking.mask.shape[1]
        return MAEOutput(loss, put_patches(pred, ids, num), masking.mask, put_patches(in_loss, ids, num))


def build(cfg) -> MAE:
    if (
        cfg.mask.type == "parallel"
    ):  # MAE's parts with EMAE's parallel masks and consistency term: EMAE (its spec reads)
        return method_spec("emae").build(cfg)
    return set_layer_norm_eps(MAE(
        vit_encoder(cfg),
        decoder_dim=cfg.mae.decoder_dim,
        decoder_depth=cfg.mae.decoder_depth,
        decoder_heads=cfg.mae.decoder_heads,
        mask_ratio=cfg.mask.ratio,
        norm_pix_loss=cfg.mae.norm_pix_loss,
        mask_count=cfg.mask.count,
        mask_type=cfg.mask.type,
        block_generator=resolve_block_generator(cfg),
        hybrid_block_ratio=cfg.mask.hybrid_block_ratio,
        hybrid_max_block_ratio=cfg.mask.hybrid_max_block_ratio,
        decoder=cfg.mae.decoder,
        reconstruct_ratio=cfg.mae.reconstruct_ratio,
        decoder_context_blocks=cfg.mae.decoder_context_blocks,
        decode_visible=cfg.mae.decode_visible,
        target=cfg.mae.target,
    ), cfg.model.layer_norm_eps)  # fmt: skip


# the keys of mae.* that size MAE's pixel decoder and choose its target: what EMAE and BootMAE read of it
PIXEL_DECODER_KEYS = ("mae.decoder_dim", "mae.decoder_depth", "mae.decoder_heads")


def check_pixel_decoder(cfg, heads_divide: bool = True) -> None:
    m = cfg.mae
    require(
        m.decoder_dim > 0 and m.decoder_heads > 0,
        f"mae.decoder_dim and mae.decoder_heads must be positive, got {m.decoder_dim}, {m.decoder_heads}",
    )
    require(m.decoder_depth >= 0, f"mae.decoder_depth must be >= 0, got {m.decoder_depth}")
    require(m.decoder_dim % m.decoder_heads == 0 or (not heads_divide and m.decoder_dim >= m.decoder_heads),
            f"mae.decoder_dim {m.decoder_dim} must be divisible by mae.decoder_heads {m.decoder_heads}")  # fmt: skip
    require(
        m.decoder_dim % 4 == 0,
        f"mae.decoder_dim must be divisible by 4 (sin-cos position embedding), got {m.decoder_dim}",
    )
    patch = geometry(cfg).patch
    require(
        m.target != "hog" or patch % 2 == 0,
        f"mae.target hog needs an even patch size (HOG cells of patch / 2 px, 2x2 per patch), got {patch}",
    )


def check(cfg) -> None:
    check_pixel_decoder(cfg)
    if cfg.mask.type == "parallel":
        require(
            cfg.mae.decoder != "crossmae",
            "mae.decoder crossmae does not compose with mask.type parallel (EMAE): "
            "its consistency loss compares patches masked in two parts, which partial decoding mostly leaves out",
        )
        check_emae = method_spec("emae").check
        assert check_emae is not None  # EMAE registers its checks
        check_emae(cfg)
    elif cfg.mae.decoder == "crossmae":
        check_crossmae(cfg)


def check_crossmae(cfg) -> None:
    m, g = cfg.mae, geometry(cfg)
    masked = cfg.mask.count or g.num_patches - int(g.num_patches * (1 - cfg.mask.ratio))
    require(0.0 < m.reconstruct_ratio <= 1.0 and round(m.reconstruct_ratio * masked) >= 1,
            f"mae.reconstruct_ratio must be in (0, 1] and decode at least one of the {masked} masked patches, "
            f"got {m.reconstruct_ratio}")  # fmt: skip
    blocks, depth = m.decoder_context_blocks, g.depth
    require(blocks == "all" or (all(-depth <= b < depth and b % depth != depth - 1 for b in blocks)
                                and len({b % depth for b in blocks}) == len(blocks)),
            f"mae.decoder_context_blocks {list(blocks)} must be all or distinct blocks before the last of the "
            f"{depth}-block encoder (0..{depth - 2}, or -{depth}..-2), whose final-LN output is always read")  # fmt: skip


def reads(cfg) -> tuple[str, ...]:
    parallel = ("emae",) if cfg.mask.type == "parallel" else ()  # EMAE's composition reads its section
    if cfg.mae.decoder == "crossmae":
        return ("mae", *parallel)
    return (
        *PIXEL_DECODER_KEYS,
        "mae.norm_pix_loss",
        "mae.target",
        "mae.decoder",
        *(parallel or ("mae.decode_visible",)),
    )


SPEC = register(MethodSpec(
    name="mae", build=build, check=check, reads=reads,
    summary="MAE (He et al. 2022): pixels (or mae.target=hog: MaskFeat's HOG) of the masked patches from the visible "
            "ones; CrossMAE's decoder with mae.decoder=crossmae, EMAE's parallel masks with mask.type=parallel",
    mask_types=("random", "block", "hybrid", "parallel"),
    loss_terms=("reconstruction", "consistency"),  # with mask.type parallel (EMAE's terms)
    predicts_pixels=lambda cfg: cfg.mae.target != "hog",
    resolution_stages=lambda cfg: cfg.mask.type != "parallel",  # not EMAE's composition (its own forward)
    no_weight_decay=(),  # timm's add_weight_decay with an empty skip list: its cls and mask tokens are decayed
))  # fmt: skip
