"""Import, step two: the configuration inferred from the converted tensors, and the whole `mimkit import` operation
(BEiT / mc-BEiT with a relative position bias: mimkit/interop/beit_import.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn

from mimkit.checkpoint import CheckpointError, load_checkpoint
from mimkit.config import ConfigError, config_from_dict, load_config
from mimkit.files import InteropError, is_weights_file, load_weights_file
from mimkit.interop.beit_import import has_relative_position_bias, import_beit, strip_encoder_prefix
from mimkit.interop.common import FORMATS, read_hf_folder, read_json, unwrap_state_dict
from mimkit.interop.convert import Converted, convert_hf, convert_mimkit, convert_official, detect_format
from mimkit.interop.import_base import (
    ImportOptions,
    ImportReport,
    count_blocks,
    data_section,
    encoder_sizes,
    merge_recipe,
    model_section,
    need,
    save_imported,
)
from mimkit.methods import build_model
from mimkit.models import encoder_of, sincos_2d_pos_embed
from mimkit.presets import PRESETS

# =============================================================================================
# Import: configuration inferred from the converted tensors

_DECODER_HEADS_BY_WIDTH = {512: 16}  # MAE's dec512d8b


def _infer_sections(conv: Converted, src: Path, opts: ImportOptions, hints: dict) -> dict:
    """Config sections for the imported plain-ViT model (method mae)."""
    t = conv.tensors
    sizes = encoder_sizes(conv, src, opts, hints)
    patch = sizes["patch_size"]
    has_decoder = any(k.startswith("decoder.") for k in t)
    if has_decoder:
        mask_token = need(t, "decoder.mask_token", src)
        dec_dim = int(mask_token.shape[-1])
        dec_depth = count_blocks(t, "decoder.decoder_blocks")
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
    mae = {"decoder_dim": dec_dim, "decoder_depth": dec_depth, "decoder_heads": dec_heads}
    norm_pix = opts.norm_pix_loss if opts.norm_pix_loss is not None else hints.get("norm_pix_loss")
    if norm_pix is not None:
        mae["norm_pix_loss"] = bool(norm_pix)
    model = model_section(sizes, opts)
    if "layer_norm_eps" in hints:
        model["layer_norm_eps"] = hints["layer_norm_eps"]
    sections: dict[str, Any] = {"method": "mae", "model": model, "mae": mae}
    ratio = opts.mask_ratio if opts.mask_ratio is not None else hints.get("mask_ratio")
    if ratio is not None:
        sections["mask"] = {"ratio": float(ratio)}
    data = data_section(opts, hints)
    if data:
        sections["data"] = data
    return merge_recipe(sections, hints.get("mimkit_config"))


# =============================================================================================
# Import: the whole operation


def is_sincos_table(table: torch.Tensor, grid: int) -> bool:
    dim = table.shape[-1]
    if dim % 4 or table.shape[1] != grid * grid + 1:
        return False
    return torch.allclose(table.float(), sincos_2d_pos_embed(dim, grid), atol=1e-4)


def _through_timm_filter(conv: Converted, encoder: VisionTransformer, report: ImportReport) -> None:
    """The encoder's tensors through timm's own ``vision_transformer.checkpoint_filter_fn`` (it resamples the
    position embedding to the model's grid), in place; what it drops is reported."""
    enc = {k[len("encoder.") :]: v for k, v in conv.tensors.items() if k.startswith("encoder.")}
    filtered = vit_checkpoint_filter_fn(enc, encoder)
    for k, v in enc.items():
        origin = conv.origin[f"encoder.{k}"]
        if k not in filtered:
            report.unexpected[origin] = "dropped by timm's vision_transformer.checkpoint_filter_fn"
            del conv.tensors[f"encoder.{k}"]
        elif k == "pos_embed" and filtered[k].shape != v.shape:
            old, new = math.isqrt(v.shape[1] - 1), encoder.patch_embed.grid_size[0]
            conv.notes.append(f"{origin}: resampled {old}x{old} -> {new}x{new} by timm.models.vision_transformer."
                              "checkpoint_filter_fn (timm.layers.resample_abs_pos_embed, bicubic)")  # fmt: skip
    conv.tensors.update({f"encoder.{k}": v for k, v in filtered.items() if k in enc})


def _read_timm_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """A timm hub-style folder (config.json with 'architecture', model.safetensors): a timm ViT
    state dict, i.e. the official MAE encoder layout."""
    config = read_json(folder / "config.json")
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise InteropError(f"{folder}: timm folder without model.safetensors / pytorch_model.bin")
    sd, notes = unwrap_state_dict(load_weights_file(weights), weights)
    args, pre = config.get("model_args", {}), config.get("pretrained_cfg", config)
    hints: dict[str, Any] = {"num_heads": args.get("num_heads"), "img_size": args.get("img_size")}
    if pre.get("mean") and pre.get("std"):
        hints["mean"], hints["std"] = pre["mean"], pre["std"]
    return sd, hints, notes


def _what_file(path: Path) -> str:
    """What a file that is not a weights file looks like, for the error."""
    if path.stat().st_size == 0:
        return "the file is empty"
    kind = {".json": "a JSON file", ".yaml": "a YAML file", ".yml": "a YAML file", ".txt": "a text file"}.get(
        path.suffix.lower(), "neither a torch.save archive, a pickle nor safetensors"
    )
    if path.suffix.lower() == ".json":
        kind += "; for a Hugging Face / timm model give the folder that holds it"
    return kind


def read_source(src: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(state dict, hints for the config, notes) from a file or a Hugging Face folder."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"import source not found: {src}")
    if src.is_file() and src.suffix != ".safetensors" and not is_weights_file(src):
        raise InteropError(f"{src}: not a weights file ({_what_file(src)}); `mimkit import` takes a PyTorch .pth / .pt / "
                           ".bin file, a .safetensors file, or a Hugging Face / timm model folder")  # fmt: skip
    hints: dict[str, Any] = {}
    notes: list[str] = []
    if src.is_dir() and (src / "meta.pt").is_file() and (src / ".metadata").is_file():  # a mimkit sharded checkpoint
        return _mimkit_source(_read_sharded(src), src, key, hints, notes)
    if src.is_dir() and (src / "config.json").is_file() and "architecture" in read_json(src / "config.json"):
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
    return _mimkit_source(load_weights_file(src), src, key, hints, notes)


def _read_sharded(folder: Path) -> dict:
    """A mimkit sharded (DCP) checkpoint folder, consolidated (read without running code, as every reader does)."""
    try:
        return load_checkpoint(folder)
    except CheckpointError as e:
        raise InteropError(str(e)) from None


def _mimkit_source(obj: Any, src: Path, key: str | None, hints: dict, notes: list[str]):
    """(state dict, hints, notes) of a loaded file: a mimkit checkpoint brings its recipe as hints."""
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
    model, config, step, mimkit_version, method; plus ``imported_from``). Returns the key report. BEiT / mc-BEiT
    sources with a relative position bias become mimkit BEiT checkpoints (a timm ``Beit``, :func:`import_beit`),
    every other one a plain ViT (method mae)."""
    opts = opts or ImportOptions()
    if opts.fmt not in FORMATS:
        raise InteropError(f"--format '{opts.fmt}' is not allowed; allowed: {', '.join(FORMATS)}")
    src = Path(src)
    sd, hints, notes = read_source(src, opts.key)
    if not sd:
        raise InteropError(f"{src}: holds no tensors")
    if opts.fmt in ("auto", "beit"):
        sd, prefix_notes = strip_encoder_prefix(sd)
        notes += prefix_notes
    fmt = detect_format(sd) if opts.fmt == "auto" else opts.fmt
    if fmt == "unknown":
        sample = ", ".join(list(sd)[:6])
        raise InteropError(
            f"{src}: unrecognised key layout (first keys: {sample}); pass --format mae|beit|bootmae|hf|mimkit"
        )
    rel = next((v for k, v in sd.items() if k.endswith("relative_position_bias_table")), None)
    if rel is not None:
        hints["rel_pos_entries"] = int(rel.shape[0])
    if fmt == "beit" and has_relative_position_bias(sd):
        return import_beit(src, out, sd, hints, notes, opts)
    conv = _convert(src, sd, fmt, notes)
    try:
        cfg = load_config(None, None, **_infer_sections(conv, src, opts, hints))
    except ConfigError as e:
        raise InteropError(f"{src}: the inferred configuration is invalid: {e}") from None
    torch.manual_seed(0)  # what is not in the source is initialised reproducibly (MAE's init)
    model = build_model(cfg)
    report = ImportReport(source=str(src), format=fmt)
    _through_timm_filter(conv, cast(VisionTransformer, model.encoder), report)  # a ViT (BEiTs: import_beit)
    new_state = _place_tensors(src, conv, model, report)
    if fmt in ("beit", "bootmae") and not any(k.startswith("decoder.") for k in conv.tensors):
        conv.notes.append(f"{fmt}: only the encoder maps onto mimkit; the MAE decoder is freshly initialised")
    report.unexpected.update(conv.unexpected)
    report.notes = conv.notes
    report.check_strict(opts.strict)
    model.load_state_dict(new_state, strict=True)
    save_imported(out, model, cfg, report)
    return report


def _convert(src: Path, sd: dict, fmt: str, notes: list[str]) -> Converted:
    """The source's tensors under mimkit's ViT / MAE names (a BEiT without relative position bias is a plain ViT)."""
    conv = convert_hf(sd) if fmt == "hf" else convert_mimkit(sd) if fmt == "mimkit" else convert_official(sd, fmt)
    if not conv.tensors:
        raise InteropError(
            f"{src}: no tensor maps onto a mimkit ViT ({fmt} layout); first keys: {', '.join(list(sd)[:6])}"
        )
    conv.notes = notes + conv.notes
    if fmt == "beit":
        conv.notes.append("beit: no relative position bias in the source, so its encoder is exactly a plain ViT "
                          "(imported as one)")  # fmt: skip
    return conv


def _place_tensors(src: Path, conv: Converted, model: nn.Module, report: ImportReport) -> dict:
    """The model's state dict with every converted tensor in place (decoder position table rebuilt or resampled
    for the grid), the key report filled in: matched, unexpected, initialised (a decoder the source lacks), missing."""
    target = model.state_dict()
    grid = encoder_of(model).patch_embed.grid_size[0]
    new_state = dict(target)
    has_decoder = any(k.startswith("decoder.") for k in conv.tensors)
    for key, tensor in conv.tensors.items():
        origin = conv.origin[key]
        if key not in target:
            report.unexpected[origin] = "no such tensor in mimkit's ViT / MAE decoder"
            continue
        want = target[key].shape
        if (
            key == "decoder.decoder_pos_embed"
            and tensor.shape != want
            and tensor.ndim == 3
            and tensor.shape[-1] == want[-1]
        ):
            tensor = _decoder_table_for(tensor, want[-1], grid, origin, conv.notes)
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
    return new_state


def _decoder_table_for(tensor: torch.Tensor, dim: int, grid: int, origin: str, notes: list[str]) -> torch.Tensor:
    old = math.isqrt(tensor.shape[1] - 1)
    if is_sincos_table(tensor, old):  # MAE's table is a fixed function of the grid: rebuilt, not interpolated
        notes.append(f"decoder_pos_embed: fixed sin-cos table rebuilt for a {grid}x{grid} grid (was {old}x{old})")
        return sincos_2d_pos_embed(dim, grid).to(tensor.dtype)
    notes.append(f"{origin}: resampled {old}x{old} -> {grid}x{grid} with timm.layers.resample_abs_pos_embed")
    return resample_abs_pos_embed(tensor, new_size=[grid, grid], old_size=[old, old], num_prefix_tokens=1)
