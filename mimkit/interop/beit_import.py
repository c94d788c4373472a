"""Import of official BEiT / mc-BEiT checkpoints (the BEiT release's key names; mc-BEiT's follow them) into mimkit's
BEiT: the encoder is a timm ``Beit`` holding the official weights, relative position bias included (shared
``rel_pos_bias.*`` or per block). The official names are timm's ``Beit`` names (q_bias / v_bias, gamma_1 / gamma_2,
relative_position_bias_table), so the tensors go through timm's own ``timm.models.beit.checkpoint_filter_fn``,
which drops the relative_position_index buffers (timm rebuilds them) and resizes bias tables and position
embeddings to another resolution. The encoder-side [MASK] embedding and the MIM head become mimkit's ``mask_token``
and ``lm_head``. The config written has ``tokenizer.kind: none`` (the import holds no tokenizer): evaluation and
export build the model as they do a mimkit BEiT checkpoint's, pretraining asks for a tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models.beit import checkpoint_filter_fn as beit_checkpoint_filter_fn

from mimkit.config import ConfigError, load_config
from mimkit.files import InteropError
from mimkit.interop.convert import Converted
from mimkit.interop.import_base import (
    ImportOptions,
    ImportReport,
    data_section,
    encoder_sizes,
    merge_recipe,
    model_section,
    save_imported,
)
from mimkit.methods import build_model
from mimkit.models import encoder_of
from mimkit.registry import encoder_family

_ENCODER_PREFIXES = ("beit.", "encoder.")  # an encoder saved inside a larger model (and mimkit's own checkpoints)
_BEIT_MARKS = ("attn.q_bias", "attn.v_bias", ".gamma_1", ".gamma_2", "relative_position_bias_table")
_HEAD_KEYS = ("mask_token", "lm_head.weight", "lm_head.bias")  # mimkit's BEiT keys outside the encoder
_NOT_IMPORTED = [
    (re.compile(r"^(fc_norm|head)\."), "fine-tuning pooling norm / classifier head"),
    (re.compile(r"^tokenizer\."), "a mimkit run's tokenizer (the import holds none: tokenizer.kind none)"),
]
_DALLE_VOCAB = 8192  # BEiT's (DALL-E's) codebook: the lm_head width when the source has no lm_head


def has_relative_position_bias(keys) -> bool:
    return any(k.endswith("relative_position_bias_table") for k in keys)


def strip_encoder_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A BEiT encoder under ``beit.`` / ``encoder.``: that prefix removed (other keys, lm_head or mask_token, kept)."""
    for prefix in _ENCODER_PREFIXES:
        inner = [k[len(prefix) :] for k in sd if k.startswith(prefix)]
        if f"{prefix}patch_embed.proj.weight" in sd and any(k.endswith(_BEIT_MARKS) for k in inner):
            renamed = {k.removeprefix(prefix): v for k, v in sd.items()}
            return renamed, [f"removed the '{prefix}' prefix of the BEiT encoder's keys"]
    return sd, []


def _split(sd: dict[str, torch.Tensor], report: ImportReport) -> tuple[dict, dict]:
    """(encoder tensors, mask_token / lm_head tensors); keys of neither are reported as not imported."""
    encoder, head = {}, {}
    for k, v in sd.items():
        why = next((why for pattern, why in _NOT_IMPORTED if pattern.search(k)), None)
        if why:
            report.unexpected[k] = why
        elif k in _HEAD_KEYS:
            head[k] = v
        else:
            encoder[k] = v
    return encoder, head


def _sections(encoder: dict, head: dict, src: Path, opts: ImportOptions, hints: dict) -> dict:
    conv = Converted()
    for k, v in encoder.items():
        conv.put(f"encoder.{k}", v, k)
    sizes = encoder_sizes(conv, src, opts, hints)
    shared = "rel_pos_bias.relative_position_bias_table" in encoder
    if shared and any(re.match(r"^blocks\.\d+\.attn\.relative_position_bias_table$", k) for k in encoder):
        raise InteropError(f"{src}: holds both a shared 'rel_pos_bias.relative_position_bias_table' and "
                           "per-block 'blocks.N.attn.relative_position_bias_table' tables; a BEiT has one or the "
                           "other")  # fmt: skip
    vocab = int(head["lm_head.weight"].shape[0]) if "lm_head.weight" in head else _DALLE_VOCAB
    base = hints.get("mimkit_config") or {}
    sections = {
        # mc-BEiT's released weights have BEiT's layout; the method matters to pretraining only
        "method": base["method"] if encoder_family(str(base.get("method"))) == "beit" else "beit",
        "model": model_section(sizes, opts),
        "beit": {"shared_rel_pos_bias": shared, "abs_pos_emb": "pos_embed" in encoder},
        "tokenizer": {"kind": "none", "path": None, "vocab_size": vocab},
        "data": data_section(
            opts, hints, *((None, None) if base else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))
        ),
    }
    if opts.mask_ratio is not None or not base:  # BEiT's recipe: blockwise masking, 40%
        sections["mask"] = {"type": "block", "ratio": float(opts.mask_ratio if opts.mask_ratio is not None else 0.4)}
    return merge_recipe(sections, base)


def _identity_fill(key: str, like: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """Official options that leave a timm Beit tensor out, and the value that computes the same thing."""
    if key.endswith(("attn.q_bias", "attn.v_bias")):
        return torch.zeros_like(like), "no q / v bias in the source (qkv_bias off): zeros, the same attention"
    if key.endswith(("gamma_1", "gamma_2")):
        return torch.ones_like(like), "no layer scale in the source: gamma_1 / gamma_2 of ones, the same blocks"
    return None


def _resize_notes(before: dict, after: dict) -> list[str]:
    return [f"{k}: {tuple(before[k].shape)} -> {tuple(v.shape)} (resized by timm.models.beit.checkpoint_filter_fn)"
            for k, v in after.items() if k in before and v.shape != before[k].shape]  # fmt: skip


def import_beit(src: Path, out, sd: dict[str, torch.Tensor], hints: dict, notes: list[str],
                opts: ImportOptions) -> ImportReport:  # fmt: skip
    """An official BEiT / mc-BEiT state dict (prefixes removed) -> a mimkit BEiT checkpoint at ``out``."""
    report = ImportReport(source=str(src), format="beit", initialized_what="tensors of the MIM head / [MASK] "
                          "embedding (not in the source: BEiT's init)")  # fmt: skip
    encoder, head = _split(sd, report)
    try:
        cfg = load_config(None, None, **_sections(encoder, head, src, opts, hints))
    except ConfigError as e:
        raise InteropError(f"{src}: the inferred configuration is invalid: {e}") from None
    torch.manual_seed(0)  # what is not in the source is initialised reproducibly (BEiT's init)
    model = build_model(cfg)
    filtered = beit_checkpoint_filter_fn(encoder, encoder_of(model))
    index_buffers = [k for k in encoder if k.endswith("relative_position_index")]
    if index_buffers:
        notes.append(f"{len(index_buffers)} relative_position_index buffers not imported: timm's Beit rebuilds them")
    notes += _resize_notes(encoder, filtered)
    full = model.state_dict()
    given = {f"encoder.{k}": v for k, v in filtered.items()} | head
    for key, tensor in given.items():
        if key not in full:
            report.unexpected[key.removeprefix("encoder.")] = "no such tensor in timm's Beit"
        elif tensor.shape != full[key].shape:
            raise InteropError(f"{src}: '{key.removeprefix('encoder.')}' has shape {tuple(tensor.shape)}; mimkit's "
                               f"BEiT (a timm Beit) needs {tuple(full[key].shape)}")  # fmt: skip
        else:
            full[key] = tensor.to(full[key].dtype)
            report.matched.append(key)
    for key in (k for k in full if k not in given):
        fill = _identity_fill(key, full[key])
        if key in _HEAD_KEYS:
            report.initialized.append(key)
        elif fill is None:
            report.missing.append(key)
        else:
            full[key] = fill[0]
            notes += [fill[1]] if fill[1] not in notes else []
    model.load_state_dict(full, strict=True)
    notes.append(f"method {cfg.method}, tokenizer.kind none: knn / linprobe / finetune / export use it as is; to "
                 "pretrain it further, set tokenizer.kind and tokenizer.path")  # fmt: skip
    if not hints.get("mimkit_config") and not (opts.mean or hints.get("mean")):
        notes.append(f"data.mean / data.std {list(IMAGENET_INCEPTION_MEAN)} / {list(IMAGENET_INCEPTION_STD)}, "
                     "the official BEiT normalisation (timm's Beit weights); pass --mean / --std "
                     "otherwise")  # fmt: skip
    report.notes = notes
    report.check_strict(opts.strict)
    save_imported(out, model, cfg, report)
    return report
