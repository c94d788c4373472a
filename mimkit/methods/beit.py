"""BEiT (Bao et al., ICLR 2022) and mc-BEiT (Li et al., ECCV 2022): BERT-style masked image modeling with a
frozen visual tokenizer (mimkit/tokenizers.py). Methods notes sections 3 and 4.

Backbone: timm's ``Beit`` (shared relative position bias, layer scale, no absolute position embedding, q/v
bias), so ``model.encoder.state_dict()`` loads into ``timm.models.beit.Beit(..., use_shared_rel_pos_bias=True,
use_abs_pos_emb=False, init_values=..., num_classes=0, global_pool='')`` unchanged. Corruption: the patch
embeddings of masked patches are *replaced* by a learned ``mask_token`` before the blocks; the encoder runs on
all patches plus cls; ``lm_head`` (after the final LN) predicts the tokenizer's code at masked positions only.
Init (the official code's, `mimkit.models.init_weights_beit`): N(0, 0.02) cut at +-0.02 (the official
``trunc_normal_(std)`` helper's bounds, one standard deviation; timm's helper cuts at +-2 absolute) for Linear and
patch-embedding weights, cls / mask tokens and lm_head, drawn by rejection so that no weight sits on a bound; zero
biases; then attn.proj and mlp.fc2 of block l (1-indexed) divided by sqrt(2l).

- ``beit``: hard targets argmax(tokenizer logits), cross-entropy on masked patches (block masking, 40%).
- ``mcbeit``: soft targets. p_j = softmax(z_j / tau) (tau 4) for every patch j; W = row-softmax(cos-sim of the
  model's own final-LN patch features on the masked input / tau_s) (tau_s 1); target y_i = omega sum_j W_ij p_j
  + (1 - omega) p_i (omega 0.2); loss = mean over masked patches of -sum_k y_ik log softmax(o_i)_k.
  Released recipe: random masking at 75%.

Stop-gradient through W (``beit.stop_gradient``, default **false**): the official mc-BEiT code does not detach W
(nor the features it is built from), so the gradient of the loss also flows into the features through the
affinity. mimkit's default reproduces the code, because the published mc-BEiT numbers were produced that way
and a reimplementation that silently changes the objective cannot be compared to them; with omega = 0.2 the
affinity part of the target is a fifth of it and (1 - omega) p_i anchors it to the tokenizer, so the
"move the target toward the prediction" shortcut a gradient through the target opens is limited. Set
``beit.stop_gradient=true`` for the cleaner "the target is a constant" variant (an ablation knob).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from torch import nn

from mimkit.config import resolve_block_generator
from mimkit.data import ViewSpec
from mimkit.losses import soft_cross_entropy
from mimkit.masking import block_mask_for, num_visible
from mimkit.methods.base import MIMMethod, set_layer_norm_eps
from mimkit.models import create_beit_encoder, encode_beit_with_mask_tokens, init_weights_beit, trunc_normal_sigma_
from mimkit.registry import MethodSpec, register
from mimkit.schedules import temperature_at
from mimkit.targets import affinity, soft_targets, tokenizer_probs
from mimkit.tokenizers import DVAESpec, Tokenizer, load_tokenizer
from mimkit.typed_config import require


class BEiTOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    logits: torch.Tensor  # (M, vocab) lm_head logits at the masked patches (batch-major order)
    mask: torch.Tensor  # (B, L) 1 = masked
    mlm_acc: torch.Tensor  # accuracy of argmax(logits) against the tokenizer's hard ids (monitoring only)


class BEiT(MIMMethod):
    """Keys: encoder.* (timm Beit), mask_token, lm_head.*, tokenizer.* (frozen, saved so a run resumes alone).
    ``tokenizer=None`` (tokenizer.kind none: an imported encoder) builds the same model without one, lm_head
    ``vocab_size`` wide: it evaluates and exports; a training forward says that it needs a tokenizer."""

    soft = False
    encoder: Beit

    def __init__(self, encoder: Beit, tokenizer: Tokenizer | None, *, mask_ratio: float = 0.4,
                 mask_count: int | None = None, mask_type: str = "block", tokenizer_size: int | None = None,
                 tokenizer_interpolation: str | None = None, block_generator: str = "beit",
                 vocab_size: int | None = None):  # fmt: skip
        super().__init__()
        init_weights_beit(encoder)  # first: a function of the RNG state timm's Beit left (eval's random-init baseline)
        self.encoder, self.tokenizer = encoder, tokenizer
        self.num_patches = encoder.patch_embed.num_patches
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.mask_ratio, self.mask_type, self.block_generator = mask_ratio, mask_type, block_generator
        self.num_masked = self.num_patches - num_visible(self.num_patches, mask_ratio, mask_count)  # count wins
        dim = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        vocab = tokenizer.vocab_size if tokenizer is not None else vocab_size
        if vocab is None:
            raise ValueError("a BEiT without a tokenizer needs vocab_size, the width of its lm_head")
        self.lm_head = nn.Linear(dim, vocab)
        trunc_normal_sigma_(self.mask_token, 0.02)
        trunc_normal_sigma_(self.lm_head.weight, 0.02)
        nn.init.zeros_(self.lm_head.bias)
        if tokenizer is None:  # no second view to ask the data pipeline for
            return
        size = tokenizer_size or self.grid[0] * tokenizer.downsample
        if size // tokenizer.downsample != self.grid[0] or self.grid[0] != self.grid[1]:
            raise ValueError(
                f"tokenizer grid {size}/{tokenizer.downsample} does not match the ViT patch grid {self.grid}: set "
                f"tokenizer.size to {self.grid[0] * tokenizer.downsample} (or leave it unset)"
            )
        interp = (
            tokenizer_interpolation if tokenizer_interpolation not in (None, "default") else tokenizer.interpolation
        )
        self.second_view = ViewSpec(size, interp, tuple(tokenizer.mean), tuple(tokenizer.std))

    def mask_inputs(self, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Per-sample mask (L,) bool, 1 = masked, drawn in the data pipeline from the sample's generator. Block
        masks come from BEiT's generator by default, whose count can fall short of num_masked (the losses average
        over the masked patches actually in the batch)."""
        if self.mask_type == "block":
            mask = block_mask_for(self.block_generator, self.grid, self.num_masked, generator=generator)
            return {"mask": mask.flatten()}
        mask = torch.zeros(self.num_patches, dtype=torch.bool)
        mask[torch.randperm(self.num_patches, generator=generator)[: self.num_masked]] = True
        return {"mask": mask}

    def features(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-LN tokens (B, 1+L, D) of the corrupted input: masked patch embeddings replaced by mask_token."""
        return encode_beit_with_mask_tokens(self.encoder, imgs, mask, self.mask_token)

    @torch.no_grad()
    def tokenizer_logits(self, tokenizer_image: torch.Tensor) -> torch.Tensor:
        """(B, L, V) fp32 tokenizer logits on the patch grid (row-major, as the ViT's patches)."""
        if self.tokenizer is None:
            raise ValueError("this BEiT has no tokenizer (tokenizer.kind none, an imported encoder): set "
                             "tokenizer.kind and tokenizer.path to pretrain it")  # fmt: skip
        z = self.tokenizer(tokenizer_image)
        if tuple(z.shape[-2:]) != self.grid:
            raise ValueError(f"tokenizer output grid {tuple(z.shape[-2:])} != ViT patch grid {self.grid}")
        return z.float().flatten(2).transpose(1, 2)

    def loss_terms(self, feats, z, mask):
        m = mask.bool()
        logits = self.lm_head(feats[m])
        targets = z.argmax(-1)[m]
        if not m.any():  # a batch of masks that all fell short to nothing: no masked patch, no loss (not NaN)
            return logits.sum() * 0.0, logits, targets
        return F.cross_entropy(logits.float(), targets), logits, targets

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None,
                tokenizer_image: torch.Tensor | None = None) -> BEiTOutput:  # fmt: skip
        """imgs: the ViT view; tokenizer_image: the same crop in the tokenizer's size and normalisation (the data
        pipeline's second view); mask (B, L), 1 = masked (default: drawn from the global RNG)."""
        if tokenizer_image is None:
            raise ValueError("BEiT needs `tokenizer_image`, the tokenizer's view of the same crop")
        if mask is None:
            mask = torch.stack([self.mask_inputs(None)["mask"] for _ in range(imgs.shape[0])]).to(imgs.device)
        mask = mask.flatten(1)
        z = self.tokenizer_logits(tokenizer_image)
        feats = self.features(imgs, mask)[:, 1:]
        loss, logits, targets = self.loss_terms(feats, z, mask)
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return BEiTOutput(loss, logits, mask.float(), acc)


class McBEiT(BEiT):
    """BEiT with mc-BEiT's soft, affinity-refined targets (see the module docstring)."""

    soft = True

    def __init__(self, encoder, tokenizer, *, temperature: float = 4.0, omega: float = 0.2,
                 sim_temperature: float = 1.0, stop_gradient: bool = False, temperature_warmup: float | None = None,
                 temperature_warmup_epochs: int = 30, **kwargs):  # fmt: skip
        super().__init__(encoder, tokenizer, **kwargs)
        self.temperature, self.omega, self.sim_temperature, self.stop_gradient = (
            temperature, omega, sim_temperature, stop_gradient)  # fmt: skip
        self.temperature_warmup, self.temperature_warmup_epochs = temperature_warmup, temperature_warmup_epochs
        self.set_progress(0, 1, 1)

    def set_progress(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """Called by the training loop before each step: the epoch fixes the tokenizer temperature (set once per
        epoch, as the official schedule), so a resumed run gets the same value from its step."""
        self.step, self.steps_per_epoch = step, steps_per_epoch

    def current_temperature(self) -> float:
        epoch = self.step // self.steps_per_epoch
        return temperature_at(epoch, self.temperature, self.temperature_warmup, self.temperature_warmup_epochs)

    def targets(self, feats: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, L, V) refined soft targets over every patch (before selecting the masked ones)."""
        probs = tokenizer_probs(z, self.current_temperature())
        if self.omega == 0:
            return probs
        weights = affinity(feats, self.sim_temperature)
        if self.stop_gradient:
            weights = weights.detach()
        return soft_targets(probs, weights, self.omega)

    def loss_terms(self, feats, z, mask):
        m = mask.bool()
        logits_all = self.lm_head(feats)
        if not m.any():
            return logits_all.sum() * 0.0, logits_all[m], z.argmax(-1)[m]
        loss = soft_cross_entropy(logits_all, self.targets(feats, z), mask)
        return loss, logits_all[m], z.argmax(-1)[m]


def build(cfg) -> BEiT:
    """timm's Beit encoder, the tokenizer the config names, the masked-token head."""
    t, b = cfg.tokenizer, cfg.beit
    spec = DVAESpec(t.vocab_size, t.hidden, t.downsample, t.code_dim)
    tokenizer = None if t.kind == "none" else load_tokenizer(t.kind, t.path, spec, seed=cfg.train.seed)
    kwargs = dict(mask_ratio=cfg.mask.ratio, mask_count=cfg.mask.count, mask_type=cfg.mask.type,
                  tokenizer_size=t.size, tokenizer_interpolation=t.interpolation,
                  block_generator=resolve_block_generator(cfg), vocab_size=t.vocab_size)  # fmt: skip
    model: BEiT
    if cfg.method == "mcbeit":
        model = McBEiT(create_beit_encoder(cfg), tokenizer, temperature=b.temperature, omega=b.omega,
                       sim_temperature=b.sim_temperature, stop_gradient=b.stop_gradient,
                       temperature_warmup=b.temperature_warmup, temperature_warmup_epochs=b.temperature_warmup_epochs,
                       **kwargs)  # fmt: skip
    else:
        model = BEiT(create_beit_encoder(cfg), tokenizer, **kwargs)
    return set_layer_norm_eps(model, cfg.model.layer_norm_eps)


def check(cfg) -> None:
    b, t = cfg.beit, cfg.tokenizer
    require(b.layer_scale_init > 0, f"beit.layer_scale_init must be positive, got {b.layer_scale_init}")
    require(b.temperature > 0, f"beit.temperature must be positive, got {b.temperature}")
    require(b.temperature_warmup is None or b.temperature_warmup > 0,
            f"beit.temperature_warmup must be positive or null, got {b.temperature_warmup}")  # fmt: skip
    require(b.temperature_warmup_epochs >= 1,
            f"beit.temperature_warmup_epochs must be >= 1, got {b.temperature_warmup_epochs}")  # fmt: skip
    require(b.sim_temperature > 0, f"beit.sim_temperature must be positive, got {b.sim_temperature}")
    require(0.0 <= b.omega <= 1.0, f"beit.omega must be in [0, 1], got {b.omega}")
    require(t.kind in ("random", "none") or t.path is not None,
            f"tokenizer.path is required with tokenizer.kind {t.kind} (method {cfg.method}); "
            "train one with `mimkit tokenizer train configs/tokenizer_cifar10.yaml`")  # fmt: skip


# BEiT's backbone keys (timm Beit's options); mc-BEiT reads the whole section (its soft targets too)
BEIT_BACKBONE_KEYS = ("beit.layer_scale_init", "beit.shared_rel_pos_bias", "beit.abs_pos_emb")
# the official code's no_weight_decay() = {pos_embed, cls_token} of the encoder (mask tokens and the relative
# position bias table are decayed)
BEIT_NO_WEIGHT_DECAY = ("encoder.pos_embed", "encoder.cls_token")

SPEC = register(MethodSpec(
    name="beit", build=build, check=check, reads=(*BEIT_BACKBONE_KEYS, "tokenizer"), family="beit",
    summary="BEiT (Bao et al. 2022): visual-token ids of masked patches, timm's Beit encoder",
    mask_types=("random", "block"), block_generator="beit", needs_tokenizer=True, predicts_pixels=False,
    logged=("mlm_acc",), no_weight_decay=BEIT_NO_WEIGHT_DECAY, rgb_only=True,  # its tokenizers read RGB
))  # fmt: skip
MCBEIT_SPEC = register(MethodSpec(
    name="mcbeit", build=build, check=check, reads=("beit", "tokenizer"), family="beit",
    summary="mc-BEiT (Li et al. 2022): BEiT with soft, refined multi-choice token targets",
    mask_types=("random", "block"), block_generator="beit", needs_tokenizer=True, predicts_pixels=False,
    logged=("mlm_acc",), no_weight_decay=BEIT_NO_WEIGHT_DECAY, rgb_only=True,
))  # fmt: skip
