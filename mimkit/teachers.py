"""Teachers: a momentum (EMA) copy of a student encoder whose block outputs are a method's target.

`EMATeacher` is the part: a frozen deep copy of a timm ViT (requires_grad False, always in eval mode),
`update(student, momentum)` (the EMA, `ema_update_`), and a forward returning the outputs of some of its blocks,
each optionally instance-normalised over the tokens per channel and/or layer-normalised per token, optionally
averaged (data2vec 2.0's target: the mean of the top-K block outputs, each instance-normalised over time, then
optionally layer-normalised), or the last block through the encoder's final norm.

The same logic is in plain functions (`teacher_blocks`, `teacher_targets`, `ema_update_`) taking the copied encoder
itself, so a method that already holds the copy as a submodule (BootMAE's `ema_encoder`) keeps its state-dict keys:
`EMATeacher` would add a level (`<name>.encoder.*`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

TARGET_LN_EPS = 1e-5  # F.layer_norm's / F.instance_norm's default, as data2vec 2.0 uses them


@torch.no_grad()
def ema_update_(ema_encoder: nn.Module, student: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * student, for every parameter the student trains and every floating
    buffer (frozen ones, e.g. a sin-cos pos-embed, stay equal)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = [
        (e, s) for e, s in zip(ema_encoder.parameters(), student.parameters()) if s.requires_grad
    ]
    pairs += [(e, s) for e, s in zip(ema_encoder.buffers(), student.buffers()) if s.is_floating_point()]
    ema, weights = [e for e, _ in pairs], [s.detach() for _, s in pairs]
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, torch._foreach_mul(weights, 1.0 - decay))


@torch.no_grad()
def teacher_blocks(encoder: VisionTransformer, imgs: torch.Tensor, blocks: Sequence[int] = (-1,),
                   final_norm: bool = False) -> list[torch.Tensor]:  # fmt: skip
    """A timm ViT on the full image, without gradient: the patch tokens (cls dropped) output by each of `blocks`
    (indices into encoder.blocks, negative from the end), each (B, L, D), in the order asked. With `final_norm`
    the last block's output goes through the encoder's final norm (other blocks' never). Blocks after the last
    one asked are not run. The embedding is the ViT's at eval (no dropout): patch embed + pos embed, cls prepended."""
    depth = len(encoder.blocks)
    index = [b % depth for b in blocks]
    pos_embed, cls_token = encoder.pos_embed, encoder.cls_token
    assert pos_embed is not None and cls_token is not None  # create_encoder's ViT has both
    x = encoder.patch_embed(imgs) + pos_embed[:, 1:]
    cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    kept: dict[int, torch.Tensor] = {}
    for i, block in enumerate(encoder.blocks[: max(index) + 1]):
        x = block(x)
        if i in index:
            kept[i] = encoder.norm(x) if final_norm and i == depth - 1 else x
    return [kept[i][:, 1:] for i in index]


def instance_norm_tokens(x: torch.Tensor, eps: float = TARGET_LN_EPS) -> torch.Tensor:
    """(B, L, D) -> each channel normalised over the L tokens of its image (data2vec's instance norm over time:
    F.instance_norm on (B, D, L)), in fp32."""
    return F.instance_norm(x.float().transpose(1, 2), eps=eps).transpose(1, 2)


def layer_norm_tokens(x: torch.Tensor, eps: float = TARGET_LN_EPS) -> torch.Tensor:
    """(B, L, D) -> each token normalised over its D channels, no affine, in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


@torch.no_grad()
def teacher_targets(encoder: VisionTransformer, imgs: torch.Tensor, blocks: Sequence[int] = (-1,), *,
                    final_norm: bool = False, instance_norm: bool = False, layer_norm: bool = False,
                    average: bool = False, layer_norm_average: bool = False) -> torch.Tensor | list[torch.Tensor]:  # fmt: skip
    """`teacher_blocks`, then per block: instance norm over the tokens (`instance_norm`), then layer norm per token
    (`layer_norm`); with `average` their mean (B, L, D) (then layer-normalised with `layer_norm_average`), else the
    list. data2vec 2.0 (images): blocks = the top K, instance_norm, average. Untouched outputs keep their dtype;
    normalised or averaged ones are fp32."""
    outs = teacher_blocks(encoder, imgs, blocks, final_norm)
    if instance_norm:
        outs = [instance_norm_tokens(o) for o in outs]
    if layer_norm:
        outs = [layer_norm_tokens(o) for o in outs]
    if not average:
        return outs
    y = outs[0].float()
    for o in outs[1:]:
        y = y + o.float()
    y = y / len(outs)
    return layer_norm_tokens(y) if layer_norm_average else y


class EMATeacher(nn.Module):
    """A momentum copy of `student` (deep-copied now: equal at the start), frozen and always in eval mode; its
    state dict holds `encoder.*`. forward(imgs) -> `teacher_targets` with the options given here."""

    def __init__(self, student: VisionTransformer, blocks: Sequence[int] = (-1,), *, final_norm: bool = False,
                 instance_norm: bool = False, layer_norm: bool = False, average: bool = False,
                 layer_norm_average: bool = False):  # fmt: skip
        super().__init__()
        self.encoder = copy.deepcopy(student).requires_grad_(False).eval()
        self.blocks = tuple(blocks)
        self.options = {
            "final_norm": final_norm,
            "instance_norm": instance_norm,
            "layer_norm": layer_norm,
            "average": average,
            "layer_norm_average": layer_norm_average,
        }

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.encoder.eval()  # no drop path, no dropout: the teacher always runs in eval mode
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (`ema_update_`)."""
        ema_update_(self.encoder, student, momentum)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return teacher_targets(self.encoder, imgs, self.blocks, **self.options)
