"""What both import paths (a plain ViT / MAE, and timm's Beit for BEiT / mc-BEiT) share: the options, the key
report, the encoder's sizes read from its tensors, the recipe a mimkit source brings, and the checkpoint written."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.checkpoint import save_checkpoint
from mimkit.config import Config, to_dict
from mimkit.files import InteropError
from mimkit.interop.convert import Converted
from mimkit.presets import PRESETS
from mimkit.version import __version__

_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H


def count_blocks(tensors: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in tensors if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))}
    return (max(ids) + 1) if ids else 0


def need(tensors: dict, key: str, src: Path) -> torch.Tensor:
    if key not in tensors:
        raise InteropError(f"{src}: no tensor for '{key}' found; cannot infer the model's size from this file")
    return tensors[key]


def choose_arch(embed_dim: int, patch: int) -> str:
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


def encoder_sizes(conv: Converted, src: Path, opts: ImportOptions, hints: dict) -> dict[str, int]:
    """patch_size, embed_dim, depth, num_heads and the source's patch grid, read from the converted encoder tensors
    (``encoder.*`` keys), the source's hints and the options."""
    t = conv.tensors
    proj = need(t, "encoder.patch_embed.proj.weight", src)
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise InteropError(
            f"{src}: '{conv.origin['encoder.patch_embed.proj.weight']}' has shape {tuple(proj.shape)}; "
            "expected (width, 3, p, p) (RGB, square patches)"
        )
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
    depth = count_blocks(t, "encoder.blocks")
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
    return {"patch_size": patch, "embed_dim": embed_dim, "depth": depth, "num_heads": heads, "grid": grid}


def model_section(sizes: dict[str, int], opts: ImportOptions) -> dict[str, Any]:
    """The config's model section for encoder_sizes(...): the target resolution is --img-size, else the source's."""
    return {
        "arch": choose_arch(sizes["embed_dim"], sizes["patch_size"]),
        "img_size": opts.img_size or sizes["grid"] * sizes["patch_size"],
        **{k: sizes[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")},
    }


def data_section(opts: ImportOptions, hints: dict, default_mean=None, default_std=None) -> dict[str, list[float]]:
    """data.mean / data.std: --mean / --std, else the source's, else the family's default (None: the config's)."""
    data = {}
    for name, given, default in (("mean", opts.mean, default_mean), ("std", opts.std, default_std)):
        value = given or hints.get(name) or default
        if value is not None:
            data[name] = [float(v) for v in value]
    return data


def merge_recipe(sections: dict[str, Any], base: dict | None) -> dict[str, Any]:
    """A mimkit source keeps its recipe (``base``, its config); what the tensors say replaces the sizes."""
    if not base:
        return sections
    merged = dict(base)
    sections["model"]["arch"] = base.get("model", {}).get("arch", sections["model"]["arch"])
    for key, value in sections.items():
        merged[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


@dataclass
class ImportReport:
    source: str
    format: str
    output: str | None = None
    matched: list[str] = field(default_factory=list)  # mimkit keys filled from the source
    missing: list[str] = field(default_factory=list)  # mimkit keys the source should have had, left at init
    initialized: list[str] = field(default_factory=list)  # pretraining-only keys of an encoder-only source (fresh)
    unexpected: dict[str, str] = field(default_factory=dict)  # source key -> reason not used
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    initialized_what: str = "decoder tensors (the source holds no decoder; MAE's init)"

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
            lines.append(f"  initialized: {len(self.initialized)} {self.initialized_what}")
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

    def check_strict(self, strict: bool) -> None:
        if strict and (self.missing or self.unexpected):
            raise InteropError(
                f"{self.source}: --strict: {len(self.missing)} missing and {len(self.unexpected)} unexpected keys\n"
                + self.text()
            )


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


def save_imported(out: str | Path | None, model: nn.Module, cfg: Config, report: ImportReport) -> None:
    """The same dict layout as a training checkpoint (model, config, step, mimkit_version, method) plus
    ``imported_from`` (the key report)."""
    report.config = to_dict(cfg)
    if out is None:
        return
    save_checkpoint(
        Path(out),
        {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            "step": 0,
            "epoch": 0.0,
            "mimkit_version": __version__,
            "method": cfg.method,
            "imported_from": report.to_dict(),
        },
    )
    report.output = str(out)
