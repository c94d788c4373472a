"""Import, step two: the configuration inferred from the converted tensors, and the whole `mimkit import` operation."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mimkit
from mimkit.checkpoint import save_checkpoint
from mimkit.config import ConfigError, config_from_dict, load_config, to_dict
from mimkit.files import InteropError, load_weights_file
from mimkit.interop.common import FORMATS, _read_json, read_hf_folder, unwrap_state_dict
from mimkit.interop.convert import Converted, convert_hf, convert_mimkit, convert_official, detect_format
from mimkit.methods import build_model
from mimkit.models import PRESETS, sincos_2d_pos_embed

# =============================================================================================
# Import: configuration inferred from the converted tensors

_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H
_DECODER_HEADS_BY_WIDTH = {512: 16}  # MAE's dec512d8b


def _count_blocks(tensors: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in tensors if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))}
    return (max(ids) + 1) if ids else 0


def _need(tensors: dict, key: str, conv: Converted, src: Path) -> torch.Tensor:
    if key not in tensors:
        raise InteropError(f"{src}: no tensor for '{key}' found; cannot infer the model's size from this file")
    return tensors[key]


def _choose_arch(embed_dim: int, patch: int) -> str:
    exact = [n for n, p in PRESETS.items() if p.embed_dim == embed_dim and p.patch_size == patch]
    same_width = [n for n, p in PRESETS.items() if p.embed_dim == embed_dim]
    return (exact or same_width or ["vit_base_patch16_224"])[0]


@dataclass
class ImportOptions:
    fmt: str = "auto"
    key: str | None = None
    img_size: int | None = None
    num_heads: int | None = None
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    mask_ratio: float | None = None
    norm_pix_loss: bool | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    strict: bool = False


def _infer_sections(conv: Converted, src: Path, fmt: str, opts: ImportOptions, hints: dict) -> tuple[dict, int]:
    """Config sections for the imported model; returns (sections, source grid)."""
    t = conv.tensors
    proj = _need(t, "encoder.patch_embed.proj.weight", conv, src)
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise InteropError(
            f"{src}: '{conv.origin['encoder.patch_embed.proj.weight']}' has shape {tuple(proj.shape)}; "
            "expected (width, 3, p, p) (RGB, square patches)"
        )
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
    depth = _count_blocks(t, "encoder.blocks")
    if depth == 0:
        raise InteropError(f"{src}: no transformer blocks found")
    fc1 = t.get("encoder.blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != 4 * embed_dim:
        raise InteropError(
            f"{src}: '{conv.origin['encoder.blocks.0.mlp.fc1.weight']}' has {fc1.shape[0]} hidden units; "
            f"mimkit's ViT blocks use 4 x {embed_dim}"
        )
    if "encoder.pos_embed" in t:
        n = t["encoder.pos_embed"].shape[1] - 1
        grid = math.isqrt(n)
        if grid * grid != n:
            raise InteropError(
                f"{src}: '{conv.origin['encoder.pos_embed']}' has {n} patch positions, not a square grid"
            )
    elif hints.get("img_size"):
        grid = int(hints["img_size"]) // patch
    elif hints.get("rel_pos_entries"):  # BEiT: (2G-1)^2 + 3 relative distances
        grid = (math.isqrt(hints["rel_pos_entries"] - 3) + 1) // 2
    elif opts.img_size:
        grid = opts.img_size // patch
    else:
        raise InteropError(f"{src}: no position embedding to read the image size from; pass --img-size")
    heads = opts.num_heads or hints.get("num_heads") or _HEADS_BY_WIDTH.get(embed_dim)
    if not heads:
        raise InteropError(f"{src}: cannot infer the number of attention heads for width {embed_dim}; pass --num-heads")

    has_decoder = any(k.startswith("decoder.") for k in t)
    if has_decoder:
        mask_token = _need(t, "decoder.mask_token", conv, src)
        dec_dim = int(mask_token.shape[-1])
        dec_depth = _count_blocks(t, "decoder.decoder_blocks")
        dec_heads = opts.decoder_heads or hints.get("decoder_heads") or _DECODER_HEADS_BY_WIDTH.get(dec_dim)
        if not dec_heads:
            raise InteropError(
                f"{src}: cannot infer the decoder's attention heads for width {dec_dim}; pass --decoder-heads"
            )
        pred = t.get("decoder.decoder_pred.weight")
        if pred is not None and pred.shape[0] != patch * patch * 3:
            raise InteropError(
                f"{src}: '{conv.origin['decoder.decoder_pred.weight']}' predicts {pred.shape[0]} values per "
                f"patch; expected {patch}*{patch}*3 = {patch * patch * 3}"
            )
    else:
        dec_dim = opts.decoder_dim or 512
        dec_depth = opts.decoder_depth if opts.decoder_depth is not None else 8
        dec_heads = opts.decoder_heads or 16
    img = opts.img_size or grid * patch
    mae = {"decoder_dim": dec_dim, "decoder_depth": dec_depth, "decoder_heads": dec_heads}
    norm_pix = opts.norm_pix_loss if opts.norm_pix_loss is not None else hints.get("norm_pix_loss")
    if norm_pix is not None:
        mae["norm_pix_loss"] = bool(norm_pix)
    sections: dict[str, Any] = {
        "method": "mae",
        "model": {
            "arch": _choose_arch(embed_dim, patch),
            "img_size": img,
            "patch_size": patch,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": heads,
            **({"layer_norm_eps": hints["layer_norm_eps"]} if "layer_norm_eps" in hints else {}),
        },
        "mae": mae,
    }
    ratio = opts.mask_ratio if opts.mask_ratio is not None else hints.get("mask_ratio")
    if ratio is not None:
        sections["mask"] = {"ratio": float(ratio)}
    mean = opts.mean or hints.get("mean")
    std = opts.std or hints.get("std")
    data = {}
    if mean is not None:
        data["mean"] = [float(v) for v in mean]
    if std is not None:
        data["std"] = [float(v) for v in std]
    if data:
        sections["data"] = data
    base = hints.get("mimkit_config")
    if base:  # a mimkit checkpoint: keep its recipe, replace the model / decoder sizes
        merged = dict(base)
        sections["model"]["arch"] = base.get("model", {}).get("arch", sections["model"]["arch"])
        for key, value in sections.items():
            merged[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        sections = merged
    return sections, grid


# =============================================================================================
# Import: the whole operation


@dataclass
class ImportReport:
    source: str
    format: str
    output: str | None = None
    matched: list[str] = field(default_factory=list)  # mimkit keys filled from the source
    missing: list[str] = field(default_factory=list)  # mimkit keys the source should have had, left at init
    initialized: list[str] = field(default_factory=list)  # decoder keys of an encoder-only source (fresh init)
    unexpected: dict[str, str] = field(default_factory=dict)  # source key -> reason not used
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "matched": list(self.matched),
            "missing": list(self.missing),
            "initialized": list(self.initialized),
            "unexpected": dict(self.unexpected),
            "notes": list(self.notes),
        }

    def text(self) -> str:
        lines = [f"import {self.source} ({self.format})" + (f" -> {self.output}" if self.output else "")]
        lines.append(f"  matched:     {len(self.matched)} tensors")
        lines.append(
            f"  missing:     {len(self.missing)}" + ("" if not self.missing else " (left at their initial values)")
        )
        lines += [f"    - {k}" for k in _group_keys(self.missing)]
        if self.initialized:
            lines.append(
                f"  initialized: {len(self.initialized)} decoder tensors (the source holds no decoder; MAE's init)"
            )
        lines.append(
            f"  unexpected:  {len(self.unexpected)}" + ("" if not self.unexpected else " (in the source, not imported)")
        )
        by_reason: dict[str, list[str]] = defaultdict(list)
        for k, why in self.unexpected.items():
            by_reason[why].append(k)
        for why, keys in by_reason.items():
            lines.append(f"    {why}:")
            lines += [f"      - {k}" for k in _group_keys(keys)]
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _group_keys(keys: list[str]) -> list[str]:
    """'blocks.0.x', 'blocks.1.x' ... -> 'blocks.{0..11}.x' so reports stay readable."""
    groups: dict[str, list[int]] = defaultdict(list)
    plain = []
    for k in keys:
        m = re.search(r"\.(\d+)\.", k)
        if m:
            groups[k[: m.start()] + ".{}." + k[m.end() :]].append(int(m.group(1)))
        else:
            plain.append(k)
    out = list(plain)
    for pattern, ids in groups.items():
        ids = sorted(ids)
        span = (
            str(ids[0])
            if len(ids) == 1
            else f"{ids[0]}..{ids[-1]}"
            if ids == list(range(ids[0], ids[-1] + 1))
            else ",".join(map(str, ids))
        )
        out.append(pattern.replace("{}", f"{{{span}}}" if len(ids) > 1 else span, 1))
    return out


def _is_sincos(table: torch.Tensor, grid: int) -> bool:
    dim = table.shape[-1]
    if dim % 4 or table.shape[1] != grid * grid + 1:
        return False
    return torch.allclose(table.float(), sincos_2d_pos_embed(dim, grid), atol=1e-4)


def _resample(table: torch.Tensor, old: int, new: int) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(table.float(), new_size=[new, new], old_size=[old, old], num_prefix_tokens=1).to(
        table.dtype
    )


def _read_timm_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """A timm hub-style folder (config.json with 'architecture', model.safetensors): a timm ViT
    state dict, i.e. the official MAE encoder layout."""
    config = _read_json(folder / "config.json")
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise InteropError(f"{folder}: timm folder without model.safetensors / pytorch_model.bin")
    sd, notes = unwrap_state_dict(load_weights_file(weights), weights)
    args, pre = config.get("model_args", {}), config.get("pretrained_cfg", config)
    hints: dict[str, Any] = {"num_heads": args.get("num_heads"), "img_size": args.get("img_size")}
    if pre.get("mean") and pre.get("std"):
        hints["mean"], hints["std"] = pre["mean"], pre["std"]
    return sd, hints, notes


def read_source(src: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(state dict, hints for the config, notes) from a file or a Hugging Face folder."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"import source not found: {src}")
    hints: dict[str, Any] = {}
    notes: list[str] = []
    if src.is_dir() and (src / "config.json").is_file() and "architecture" in _read_json(src / "config.json"):
        return _read_timm_folder(src)
    if src.is_dir():
        sd, config, pre = read_hf_folder(src)
        model_type = config.get("model_type")
        if model_type not in ("vit_mae", "vit"):
            raise InteropError(f"{src / 'config.json'}: model_type '{model_type}' is not supported (vit_mae or vit)")
        hints.update(
            num_heads=config.get("num_attention_heads"),
            decoder_heads=config.get("decoder_num_attention_heads"),
            img_size=config.get("image_size"),
            mask_ratio=config.get("mask_ratio"),
            norm_pix_loss=config.get("norm_pix_loss"),
        )
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise InteropError(
                f"{src / 'config.json'}: hidden_act '{act}' (mimkit's timm blocks use exact GELU, 'gelu')"
            )
        if not config.get("qkv_bias", True):
            notes.append("the source has no qkv bias: zeros used")
        hints["layer_norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
        if hints["layer_norm_eps"] != 1e-6:
            notes.append(f"LayerNorm eps {hints['layer_norm_eps']:g} from the source's config (model.layer_norm_eps); "
                         "a timm export of this model needs it set after loading (timm builds 1e-6)")  # fmt: skip
        if config.get("intermediate_size", 0) not in (0, 4 * config.get("hidden_size", 0)):
            raise InteropError(
                f"{src / 'config.json'}: intermediate_size {config['intermediate_size']} is not 4 x hidden_size"
            )
        if pre and pre.get("image_mean") and pre.get("image_std"):
            hints["mean"], hints["std"] = pre["image_mean"], pre["image_std"]
        return sd, hints, notes
    obj = load_weights_file(src)
    if isinstance(obj, dict) and "config" in obj and "mimkit_version" in obj and key is None:
        try:
            cfg = config_from_dict(obj["config"])
        except ConfigError as e:
            raise InteropError(f"{src}: invalid 'config': {e}") from None
        hints.update(
            mimkit_config=obj["config"],
            num_heads=cfg.model.num_heads or PRESETS[cfg.model.arch].num_heads,
            decoder_heads=cfg.mae.decoder_heads,
        )
    sd, unwrap_notes = unwrap_state_dict(obj, src, key)
    notes += unwrap_notes
    return sd, hints, notes


def import_checkpoint(src: str | Path, out: str | Path | None, opts: ImportOptions | None = None) -> ImportReport:
    """Convert ``src`` into a mimkit checkpoint at ``out`` (same dict layout as a training checkpoint:
    model, config, step, mimkit_version, method; plus ``imported_from``). Returns the key report."""
    opts = opts or ImportOptions()
    if opts.fmt not in FORMATS:
        raise InteropError(f"--format '{opts.fmt}' is not allowed; allowed: {', '.join(FORMATS)}")
    src = Path(src)
    sd, hints, notes = read_source(src, opts.key)
    if not sd:
        raise InteropError(f"{src}: holds no tensors")
    fmt = detect_format(sd) if opts.fmt == "auto" else opts.fmt
    if fmt == "unknown":
        sample = ", ".join(list(sd)[:6])
        raise InteropError(
            f"{src}: unrecognised key layout (first keys: {sample}); pass --format mae|beit|bootmae|hf|mimkit"
        )
    if fmt == "hf":
        conv = convert_hf(sd)
    elif fmt == "mimkit":
        conv = convert_mimkit(sd)
    else:
        conv = convert_official(sd, fmt)
        rel = next((v for k, v in sd.items() if k.endswith("relative_position_bias_table")), None)
        if rel is not None:
            hints["rel_pos_entries"] = int(rel.shape[0])
    if not conv.tensors:
        raise InteropError(
            f"{src}: no tensor maps onto a mimkit ViT ({fmt} layout); first keys: {', '.join(list(sd)[:6])}"
        )
    conv.notes = notes + conv.notes

    sections, _ = _infer_sections(conv, src, fmt, opts, hints)
    try:
        cfg = load_config(None, None, **sections)
    except ConfigError as e:
        raise InteropError(f"{src}: the inferred configuration is invalid: {e}") from None
    torch.manual_seed(0)  # what is not in the source is initialised reproducibly (MAE's init)
    model = build_model(cfg)
    target = model.state_dict()
    grid = model.encoder.patch_embed.grid_size[0]
    report = ImportReport(source=str(src), format=fmt)
    new_state = dict(target)
    has_decoder = any(k.startswith("decoder.") for k in conv.tensors)
    for key, tensor in conv.tensors.items():
        origin = conv.origin[key]
        if key not in target:
            report.unexpected[origin] = "no such tensor in mimkit's ViT / MAE decoder"
            continue
        want = target[key].shape
        if (
            key in ("encoder.pos_embed", "decoder.decoder_pos_embed")
            and tensor.shape != want
            and tensor.ndim == 3
            and tensor.shape[-1] == want[-1]
        ):
            old = math.isqrt(tensor.shape[1] - 1)
            if key == "decoder.decoder_pos_embed" and _is_sincos(tensor, old):
                tensor = sincos_2d_pos_embed(want[-1], grid).to(tensor.dtype)
                conv.notes.append(
                    f"decoder_pos_embed: fixed sin-cos table rebuilt for a {grid}x{grid} grid (was {old}x{old})"
                )
            else:
                tensor = _resample(tensor, old, grid)
                conv.notes.append(
                    f"{origin}: resampled {old}x{old} -> {grid}x{grid} with timm.layers.resample_abs_pos_embed"
                )
        if tensor.shape != want:
            raise InteropError(
                f"{src}: '{origin}' has shape {tuple(tensor.shape)}; mimkit's '{key}' needs {tuple(want)}"
            )
        new_state[key] = tensor.to(target[key].dtype)
        report.matched.append(key)
    for key in target:
        if key in conv.tensors:
            continue
        if key.startswith("decoder.") and not has_decoder:
            report.initialized.append(key)
        else:
            report.missing.append(key)
    if "encoder.pos_embed" in report.missing:
        conv.notes.append("encoder.pos_embed: not in the source; MAE's fixed 2-D sin-cos table used")
    if any(k.endswith("attn.qkv.bias") for k in report.missing):
        conv.notes.append("attn.qkv.bias: not in the source (no qkv bias); zeros used")
        for key in report.missing:
            if key.endswith("attn.qkv.bias"):
                new_state[key] = torch.zeros_like(target[key])
    if fmt in ("beit", "bootmae") and not has_decoder:
        conv.notes.append(f"{fmt}: only the encoder maps onto mimkit; the MAE decoder is freshly initialised")
    report.unexpected.update(conv.unexpected)
    report.notes = conv.notes
    report.config = to_dict(cfg)
    if opts.strict and (report.missing or report.unexpected):
        raise InteropError(
            f"{src}: --strict: {len(report.missing)} missing and {len(report.unexpected)} unexpected keys\n"
            + report.text()
        )
    model.load_state_dict(new_state, strict=True)
    if out is not None:
        out = Path(out)
        save_checkpoint(
            out,
            {
                "model": model.state_dict(),
                "config": to_dict(cfg),
                "step": 0,
                "epoch": 0.0,
                "mimkit_version": mimkit.__version__,
                "method": cfg.method,
                "imported_from": report.to_dict(),
            },
        )
        report.output = str(out)
    return report
