"""The contract between a pretraining method and everything that drives it (the training loop, the
reconstruction pictures, export). A method is an `nn.Module` holding a stock timm encoder as `encoder`;
it subclasses `MIMMethod` and overrides what it needs — the defaults are no-ops.

Called by the loop, in this order, every optimizer step:
  `mask_inputs(generator)` — in the data pipeline, per sample, from the sample's own generator (so masks
      depend on (seed, epoch, sample) only, not on workers, ranks or resumes);
  `set_progress(step, steps_per_epoch, total_steps)` — before the step (schedules of the method's own);
  `forward(images, **mask_inputs)` — returns a NamedTuple with `loss` (a scalar) and the fields named in
      its spec's `loss_terms` and `logged` (mimkit.registry.MethodSpec), which are logged beside the loss;
  `after_step(step)` — after an applied update (e.g. a momentum encoder's EMA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.data import ViewSpec
from mimkit.models import Encoder, create_encoder, patchify


class MIMMethod(nn.Module):
    second_view: ViewSpec | None = None  # a second view of each crop the data pipeline must deliver (BEiT)
    norm_pix_loss: bool = False  # predictions are per-patch normalised pixels (shown on reconstruction panels)
    encoder: Encoder  # a subclass narrows it to the one it builds
    patch_size: int
    grid: tuple[int, int]
    num_patches: int

    def use_encoder(self, encoder: Encoder) -> None:
        """`encoder` as the method's, with what its patch embedding fixes: patch_size, grid, num_patches."""
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.num_patches = encoder.patch_embed.num_patches

    def mask_inputs(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def mask_inputs_at(self, img_size: int) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
        """`mask_inputs` for img_size-px inputs: a stage of train.resolution_stages (methods whose spec takes them
        override this for sizes other than their own)."""
        if img_size != self.encoder.patch_embed.img_size[0]:
            raise NotImplementedError(f"{type(self).__name__} pretrains at its own input size only")
        return self.mask_inputs

    def set_progress(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """Where training is, before optimizer step `step` (0-based) of `total_steps`."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step` was applied."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The per-patch target the loss compares predictions with (pixel methods): raw patches by default."""
        return patchify(imgs.float(), self.patch_size)

    def pixels_from_pred(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Pixel predictions (B, L, p*p*3) back in pixel space, undoing the target's normalisation with the
        ground truth's statistics (for reconstruction pictures)."""
        return pred


def vit_encoder(cfg) -> VisionTransformer:
    """The stock timm VisionTransformer `cfg.model` describes (the encoder of the visible-token methods)."""
    m = cfg.model
    return create_encoder(
        m.arch, m.img_size, m.patch_size, m.drop_path_rate, m.embed_dim, m.depth, m.num_heads, in_chans=m.in_chans
    )


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def set_layer_norm_eps(module: ModuleT, eps: float) -> ModuleT:
    """Every LayerNorm module of `module` with this eps (model.layer_norm_eps; 1e-6 is what the builders use)."""
    if eps != 1e-6:
        for norm in module.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.eps = eps
    return module
