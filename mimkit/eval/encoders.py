"""The encoder an evaluation command runs: a pretraining checkpoint's (a file or a sharded folder, read
weights-only by mimkit.checkpoint.load_checkpoint) with a key report, or the random init MAE pretraining starts
from (mimkit.methods.build_model); a timm `Beit` for BEiT / mc-BEiT checkpoints (and for `encoder.family: beit`,
the random init BEiT pretraining starts from), a timm `VisionTransformer` otherwise. Also which blocks to read and
their pooled features."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from timm.models.vision_transformer import VisionTransformer

from mimkit import distributed as mdist
from mimkit.checkpoint import CheckpointError, load_checkpoint
from mimkit.config import ConfigError, config_from_dict
from mimkit.eval.config import Pool
from mimkit.methods import build_model, set_layer_norm_eps
from mimkit.models import Encoder, create_encoder, init_weights_beit, timm_beit_kwargs
from mimkit.presets import get_preset
from mimkit.registry import encoder_family, method_pool, method_spec

log = logging.getLogger("mimkit")

NO_CLS_TOKEN = {"class_token": False, "global_pool": "avg", "fc_norm": False}  # timm ViT arguments (I-JEPA's encoder)


@dataclass
class KeyReport:
    """How a checkpoint's encoder weights went into the model being evaluated."""

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: left at their init
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not used by the model
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys) if keys else "none"

        lines = [f"weights from {self.source}: {len(self.matched)} tensors matched, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected"]  # fmt: skip
        if self.matched:
            lines.append(f"  matched:    {summarize_keys(self.matched)}")
        lines.append(f"  missing:    {names(self.missing)}")
        lines.append(f"  unexpected: {names(self.unexpected)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_keys(keys: list[str]) -> str:
    """['blocks.0.attn.qkv.weight', 'blocks.0.norm1.bias', 'blocks.1...', 'cls_token'] -> 'blocks.0-1 (.. tensors), cls_token'."""
    groups: dict[str, int] = {}
    blocks: set[int] = set()
    for k in keys:
        parts = k.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            blocks.add(int(parts[1]))
            groups["blocks"] = groups.get("blocks", 0) + 1
        else:
            groups[parts[0]] = groups.get(parts[0], 0) + 1
    out = []
    for name, count in groups.items():
        if name == "blocks":
            span = str(min(blocks)) if len(blocks) == 1 else f"{min(blocks)}-{max(blocks)}"
            out.append(f"blocks.{span} ({count} tensors)")
        else:
            out.append(name if count == 1 else f"{name} ({count})")
    return ", ".join(out)


@dataclass
class EncoderSource:
    """What to build and what to load: the pretraining model section, and the checkpoint's encoder
    tensors (prefix stripped), or None for a random init."""

    model: dict  # mimkit.config ModelConfig fields
    state: dict[str, torch.Tensor] | None
    source: str
    checkpoint_img_size: int | None = None
    beit_kwargs: dict | None = None  # a BEiT / mc-BEiT checkpoint: timm Beit's arguments (else a timm ViT)
    timm_args: dict = field(default_factory=dict)  # other timm ViT arguments (no cls token: I-JEPA's)
    init_method: str = "mae"  # a random init: the method whose pretraining starts from this encoder


def _resolved(model: dict) -> dict:
    p = get_preset(model["arch"])
    return {
        "patch_size": model.get("patch_size") or p.patch_size,
        "embed_dim": model.get("embed_dim") or p.embed_dim,
        "depth": model.get("depth") or p.depth,
        "num_heads": model.get("num_heads") or p.num_heads,
        "img_size": model.get("img_size") or p.img_size,
    }


def encoder_source(ecfg) -> EncoderSource:
    """Read the encoder's architecture and weights from `encoder.checkpoint` (or the config for 'none')."""
    sizes = ("patch_size", "embed_dim", "depth", "num_heads")
    if ecfg.checkpoint == "none":
        model = {"arch": ecfg.arch, "img_size": ecfg.img_size, **{k: getattr(ecfg, k) for k in sizes}}
        method = getattr(ecfg, "method", None)  # the method whose initial encoder this is (default MAE's)
        if method is not None and encoder_family(method) == "vit" and method != "mae":
            no_cls = NO_CLS_TOKEN if method_pool(method) == "mean" else {}
            return EncoderSource(model, None, f"random init of {method}'s encoder (no checkpoint)", timm_args=no_cls,
                                 init_method=method)  # fmt: skip
        if ecfg.family != "beit" and (method is None or encoder_family(method) == "vit"):
            return EncoderSource(model, None, "random init (no checkpoint)")
        # the Beit BEiT pretraining starts from; its tokenizer is irrelevant here (never built)
        pcfg = config_from_dict({"method": "beit", "model": {k: v for k, v in model.items() if v is not None},
                                 "tokenizer": {"kind": "random"}})  # fmt: skip
        return EncoderSource(
            model, None, "random init of timm Beit (no checkpoint)", beit_kwargs=timm_beit_kwargs(pcfg)
        )
    path = Path(ecfg.checkpoint)
    if not path.exists():
        raise ConfigError(f"encoder.checkpoint: {path} does not exist (a checkpoint-N.pt file, a sharded checkpoint-N "
                          "folder, or 'none' for random init)")  # fmt: skip
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"encoder.checkpoint: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"encoder.checkpoint: {path} is not a mimkit pretraining checkpoint (no 'model' / 'config'); "
                          "convert official MAE / BEiT / BootMAE / Hugging Face weights with `mimkit import`")  # fmt: skip
    try:
        pcfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ConfigError(f"encoder.checkpoint: {path} has an invalid config: {e}") from None
    prefix = method_spec(pcfg.method).evaluated + "."  # the encoder its method evaluates (I-JEPA: the target's)
    enc = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not enc:
        raise ConfigError(f"encoder.checkpoint: {path} holds no '{prefix}*' tensors (is it a pretraining checkpoint?)")
    family = encoder_family(pcfg.method)
    if ecfg.family not in ("auto", family):
        raise ConfigError(f"encoder.family: {ecfg.family!r}, but {path} holds a {family} encoder ({pcfg.method} "
                          "pretraining); leave encoder.family at auto for a checkpoint")  # fmt: skip
    model = {k: getattr(pcfg.model, k) for k in ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                                 "layer_norm_eps")}  # fmt: skip
    if pcfg.model.in_chans != 3:  # a C-channel encoder (left out for RGB, so the dict is as before)
        model["in_chans"] = pcfg.model.in_chans
    ckpt = _resolved(model)
    asked = {"arch": ecfg.arch, **{k: getattr(ecfg, k) for k in sizes}}
    have = {"arch": model["arch"], **{k: ckpt[k] for k in sizes}}
    if asked["arch"] is not None and asked["arch"] != have["arch"]:
        preset = _resolved({"arch": asked["arch"]})
        if any(asked[k] is None and preset[k] != have[k] for k in sizes):  # another preset name is fine if same sizes
            raise ConfigError(f"encoder.arch: {asked['arch']!r} does not match the checkpoint {path} ({have['arch']!r}); "
                              "leave encoder.arch unset to use the checkpoint's")  # fmt: skip
    for key in sizes:
        if asked[key] is not None and asked[key] != have[key]:
            raise ConfigError(f"encoder.{key}: {asked[key]!r} does not match the checkpoint {path} ({have[key]!r}); "
                              f"leave encoder.{key} unset to use the checkpoint's")  # fmt: skip
    if ecfg.img_size is not None:
        model["img_size"] = ecfg.img_size
    step = state.get("step")
    beit_kwargs = None
    if family == "beit":  # the encoder is timm's Beit (relative position bias, layer scale)
        beit_kwargs = timm_beit_kwargs(pcfg)
        if ecfg.img_size is not None and ecfg.img_size != ckpt["img_size"]:
            raise ConfigError(f"encoder.img_size: {ecfg.img_size} differs from the BEiT checkpoint {path} "
                              f"({ckpt['img_size']}); resampling relative position tables is not supported, "
                              "leave encoder.img_size unset")  # fmt: skip
    timm_args = NO_CLS_TOKEN if method_pool(pcfg.method) == "mean" else {}  # no cls token (I-JEPA's encoder)
    return EncoderSource(model, enc, f"{path}" + (f" (step {step})" if step is not None else ""), ckpt["img_size"],
                         beit_kwargs, timm_args)  # fmt: skip


def build_encoder(src: EncoderSource, drop_path_rate: float = 0.0, seed: int = 0) -> Encoder:
    """The encoder module, untrained: with a checkpoint, timm's default init (about to be overwritten);
    without one, the MAE initialisation pretraining starts from (xavier, sin-cos position table), drawn from
    `seed` alone, the global RNG left as it was."""
    m = src.model
    if src.beit_kwargs is not None:
        from timm.models.beit import Beit

        if src.state is not None:  # with the pretraining's LayerNorm eps (model.layer_norm_eps)
            return set_layer_norm_eps(Beit(**{**src.beit_kwargs, "drop_path_rate": drop_path_rate}),
                                      m.get("layer_norm_eps", 1e-6))  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # BEiT pretraining's init (official bounds), from `seed` alone
            torch.manual_seed(seed)
            encoder = Beit(**{**src.beit_kwargs, "drop_path_rate": drop_path_rate})
            init_weights_beit(encoder)
            return encoder
    if src.state is not None:
        return set_layer_norm_eps(create_encoder(m["arch"], m["img_size"], m["patch_size"], drop_path_rate,
                                                 m["embed_dim"], m["depth"], m["num_heads"],
                                                 in_chans=m.get("in_chans", 3), **src.timm_args),
                                  m.get("layer_norm_eps", 1e-6))  # fmt: skip

    cfg = config_from_dict({"method": src.init_method, "model": {**m, "drop_path_rate": drop_path_rate}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = cast(VisionTransformer, build_model(cfg).encoder)  # that method's initial timm ViT (default MAE's)
    assert vit.pos_embed is not None  # create_encoder's ViT has one
    vit.pos_embed.requires_grad_(True)  # fixed in pretraining only
    return vit


def load_pretrained(model: Encoder, src: EncoderSource) -> KeyReport:
    """Load the checkpoint's encoder tensors into `model` (a timm ViT, possibly with a classifier head),
    resampling the position embedding if the grid differs, and report what matched."""
    report = KeyReport(src.source)
    if src.state is None:
        report.notes.append("random init: timm Beit, BEiT's official init (trunc-normal 0.02 cut at +-0.02, per-layer rescale)"
                            if src.beit_kwargs is not None else
                            "random init: the MAE initialisation (xavier-uniform, fixed 2-D sin-cos pos-embed)"
                            if src.init_method == "mae" else
                            f"random init: the encoder {src.init_method} pretraining starts from")  # fmt: skip
        return report
    state = dict(src.state)
    own = model.state_dict()
    pe = state.get("pos_embed")
    if pe is not None and own.get("pos_embed") is not None and pe.shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        old = int(round((pe.shape[1] - prefix) ** 0.5))
        new = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(pe.float(), new_size=list(new), old_size=[old, old],
                                                    num_prefix_tokens=prefix).to(pe.dtype)  # fmt: skip
        report.notes.append(
            f"pos_embed resampled {old}x{old} -> {new[0]}x{new[1]} (timm.layers.resample_abs_pos_embed, bicubic)"
        )
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ConfigError(f"encoder.checkpoint: tensor '{k}' has shape {tuple(v.shape)} in {src.source}, the model "
                              f"needs {tuple(own[k].shape)}")  # fmt: skip
    result = model.load_state_dict(state, strict=False)
    report.missing, report.unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    report.matched = sorted(set(state) - set(result.unexpected_keys))
    return report


def load_encoder(ecfg, seed: int = 0, drop_path_rate: float = 0.0) -> tuple[Encoder, KeyReport]:
    """The encoder of `encoder.checkpoint` (or a random init), with its key report (also logged)."""
    src = encoder_source(ecfg)
    encoder = build_encoder(src, drop_path_rate, seed)
    report = load_pretrained(encoder, src)
    if mdist.world_from_env()[0] == 0:
        log.info("%s", report.text())
    return encoder, report


def feature_blocks(encoder: Encoder, block: int, scan: bool) -> list[int]:
    """0-based block indices to read: every block when scanning, else the one asked (-1 = last)."""
    depth = len(encoder.blocks)
    if block > depth:
        raise ConfigError(f"block {block} does not exist: the encoder has {depth} blocks (1-based; -1 = last)")
    if scan:
        return list(range(depth))
    return [depth - 1 if block == -1 else block - 1]


def resolve_pool(pool: Pool, encoder) -> Pool:
    """features.pool auto: the checkpoint's method's pooling (MethodSpec.pool): mean for an encoder without a cls
    token (I-JEPA), cls otherwise. A cls pooling of an encoder without one is refused."""
    has_cls = getattr(encoder, "cls_token", None) is not None
    if pool == "auto":
        return "cls" if has_cls else "mean"
    if not has_cls and pool != "mean":
        raise ConfigError(f"features.pool {pool}: the encoder has no cls token (I-JEPA); use mean or auto")
    return pool


def feature_dim(encoder: Encoder, pool: str) -> int:
    return encoder.embed_dim * (2 if pool == "cls_mean" else 1)


def encoder_features(encoder: Encoder, imgs: torch.Tensor, indices: list[int], pool: str) -> torch.Tensor:
    """(B, len(indices), D) features: each block's tokens after the encoder's final LayerNorm, pooled."""
    prefixed = bool(getattr(encoder, "num_prefix_tokens", 1))  # no cls token (I-JEPA): patch tokens only, pool mean
    outs = encoder.forward_intermediates(imgs, indices=indices, norm=True, return_prefix_tokens=prefixed,
                                         output_fmt="NLC", intermediates_only=True, stop_early=True)  # fmt: skip
    # intermediates_only: a list per block, of (patches, prefix tokens) pairs with return_prefix_tokens
    blocks = cast(list[Any], outs)
    pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = blocks if prefixed else [(o, None) for o in blocks]
    pooled = []
    for patches, prefix in pairs:
        mean = patches.mean(dim=1)
        if pool == "mean":
            pooled.append(mean)
            continue
        assert prefix is not None  # resolve_pool: an encoder without a cls token pools mean
        pooled.append(prefix[:, 0] if pool == "cls" else torch.cat([prefix[:, 0], mean], -1))
    return torch.stack(pooled, dim=1).float()
