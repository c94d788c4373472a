"""`train.init_from`: a run's first weights from released or earlier ones (continued pretraining on your own images).

The source is a mimkit checkpoint (a pretraining run's, sharded or not, or one `mimkit import` wrote), or any file
`mimkit import` reads (official MAE / BEiT / BootMAE, a Hugging Face ViT / ViTMAE folder, a timm ViT's state dict),
converted on the fly. Every tensor whose name and shape fit is taken; position tables are fitted to the new grid
(MAE's fixed sin-cos table rebuilt, a learned one resampled with timm), a patch embedding of another channel count
adapted as timm adapts `in_chans` (`adapt_input_conv`), frozen teacher copies of the encoder (a method's
`MethodSpec.teachers`) started from the encoder when the source has none. The key report says what was taken.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from mimkit.checkpoint import CheckpointError, load_checkpoint
from mimkit.files import InteropError
from mimkit.interop.common import load_mimkit_checkpoint
from mimkit.interop.import_base import ImportOptions
from mimkit.interop.imports import import_checkpoint, is_sincos_table
from mimkit.models import encoder_heads, encoder_of, sincos_2d_pos_embed


@dataclass
class InitReport:
    """What `train.init_from` took: recorded in the run (metrics.jsonl, the checkpoints) and logged."""

    source: str
    kind: str  # what the source was read as
    matched: list[str] = field(default_factory=list)  # taken as they are
    fitted: dict[str, str] = field(default_factory=dict)  # taken after fitting (resampled, adapted, rebuilt)
    from_encoder: list[str] = field(default_factory=list)  # teacher copies started from the encoder's weights
    missing: list[str] = field(default_factory=list)  # the model's, not in the source: initialised as usual
    skipped: dict[str, str] = field(default_factory=dict)  # in both, shapes that do not fit
    unexpected: list[str] = field(default_factory=list)  # the source's, not in the model

    def summary(self) -> str:
        return (f"train.init_from {self.source} ({self.kind}): {len(self.matched)} tensors taken, {len(self.fitted)} "
                f"fitted, {len(self.from_encoder)} teacher tensors from the encoder, {len(self.missing)} initialised "
                f"as usual, {len(self.skipped)} of another shape skipped, {len(self.unexpected)} unused")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


def source_state(path: str | Path, hints: ImportOptions | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The source's tensors under mimkit's names, and what it was read as; `hints`: what a conversion cannot read
    from the tensors (the attention heads), taken from the model the weights are for."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"train.init_from: {path} does not exist (a mimkit checkpoint, or a file `mimkit import` "
                           "reads: official MAE / BEiT / BootMAE weights, a Hugging Face folder, a timm state dict)")  # fmt: skip
    if path.is_dir() and (path / ".metadata").is_file():  # a sharded (FSDP) mimkit checkpoint
        model, cfg, _ = load_mimkit_checkpoint(path)
        return model.state_dict(), f"mimkit {cfg.method} checkpoint (sharded)"
    if path.is_file():
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            state = None
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and {"config", "method"} <= state.keys():
            return state["model"], f"mimkit {state['method']} checkpoint, step {state.get('step')}"
    with tempfile.TemporaryDirectory() as tmp:  # any other layout: through `mimkit import`'s conversion
        report = import_checkpoint(path, Path(tmp) / "imported.pt", hints or ImportOptions())
        return load_checkpoint(Path(tmp) / "imported.pt")["model"], f"{report.format} weights, converted"


def fit_tensor(
    key: str, tensor: torch.Tensor, want: torch.Tensor, prefix_tokens: int
) -> tuple[torch.Tensor | None, str]:
    """`tensor` made to fit `want`'s shape where a rule says how, with what was done; (None, why) otherwise."""
    if key.endswith("pos_embed") and tensor.ndim == 3 and want.ndim == 3 and tensor.shape[-1] == want.shape[-1]:
        old, new = tensor.shape[1] - prefix_tokens, want.shape[1] - prefix_tokens
        old_side, new_side = round(old**0.5), round(new**0.5)
        if old_side**2 == old and new_side**2 == new:
            if is_sincos_table(tensor, old_side) and prefix_tokens == 1:  # a fixed function of the grid: rebuilt
                return sincos_2d_pos_embed(want.shape[-1], new_side).to(
                    want.dtype
                ), f"sin-cos table rebuilt for {new_side}x{new_side}"
            fitted = resample_abs_pos_embed(tensor, new_size=[new_side, new_side], old_size=[old_side, old_side],
                                            num_prefix_tokens=prefix_tokens)  # fmt: skip
            return fitted, f"resampled {old_side}x{old_side} -> {new_side}x{new_side} (timm resample_abs_pos_embed)"
    if key.endswith("patch_embed.proj.weight") and tensor.ndim == 4 and tensor.shape[0] == want.shape[0] \
            and tensor.shape[2:] == want.shape[2:]:  # fmt: skip
        return adapt_input_conv(
            want.shape[1], tensor
        ), f"{tensor.shape[1]} -> {want.shape[1]} input channels (timm adapt_input_conv)"
    return None, f"shape {tuple(tensor.shape)}, the model's {tuple(want.shape)}"


def initial_state(model: torch.nn.Module, target: dict[str, torch.Tensor], path: str | Path,
                  teachers: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], InitReport]:  # fmt: skip
    """`target` (the model's full state dict) with the source's tensors in place, and the key report."""
    decoder_blocks = getattr(getattr(model, "decoder", None), "decoder_blocks", None)
    encoder = encoder_of(model)
    hints = ImportOptions(num_heads=encoder_heads(encoder) if len(encoder.blocks) else None,
                          decoder_heads=decoder_blocks[0].attn.num_heads if decoder_blocks else None)  # fmt: skip
    src, kind = source_state(path, hints)
    report = InitReport(str(path), kind, unexpected=sorted(set(src) - set(target)))
    prefix_tokens = getattr(model.encoder, "num_prefix_tokens", 1)
    new = dict(target)
    for key, want in target.items():
        if key not in src:
            report.missing.append(key)
            continue
        tensor, how = (src[key], "") if src[key].shape == want.shape else fit_tensor(key, src[key], want, prefix_tokens)
        if tensor is None:
            report.skipped[key] = how
            continue
        new[key] = tensor.to(device=want.device, dtype=want.dtype)
        if how:
            report.fitted[key] = how
        else:
            report.matched.append(key)
    for prefix in teachers:  # a frozen copy of the encoder the source lacks starts as the encoder it was given
        for key in [k for k in report.missing if k.startswith(prefix)]:
            student = "encoder." + key[len(prefix) :]
            if student in new and student not in report.missing and new[student].shape == target[key].shape:
                new[key] = new[student].clone()
                report.missing.remove(key)
                report.from_encoder.append(key)
    if not any(k.startswith("encoder.") for k in (*report.matched, *report.fitted)):
        raise InteropError(f"train.init_from: {path} ({kind}) has no encoder tensor that fits this model (e.g. "
                           f"{next(iter(report.skipped.items()), ('none', 'no shared names'))}): check model.* against "
                           "the source")  # fmt: skip
    return new, report
