"""What every conversion shares: reading HF folders and state-dict containers, rebuilding a mimkit checkpoint's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from mimkit.checkpoint import CheckpointError, load_checkpoint
from mimkit.config import Config, ConfigError, config_from_dict
from mimkit.files import InteropError, load_weights_file
from mimkit.methods import build_model
from mimkit.presets import PRESETS
from mimkit.registry import encoder_family, method_spec

FORMATS = ("auto", "mimkit", "mae", "beit", "bootmae", "hf")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return data


def read_hf_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """(state dict, config.json, preprocessor_config.json or None) of a Hugging Face model folder,
    single-file or sharded, safetensors preferred over PyTorch .bin files."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InteropError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = read_json(config_path)
    state: dict[str, torch.Tensor] = {}
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            shards = sorted(set(read_json(folder / index_name).get("weight_map", {}).values()))
            for shard in shards:
                state.update(_as_state_dict(load_weights_file(folder / shard), folder / shard))
            break
        if (folder / single).is_file():
            state = _as_state_dict(load_weights_file(folder / single), folder / single)
            break
    else:
        raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin (or sharded index) found")
    pre = folder / "preprocessor_config.json"
    return state, config, (read_json(pre) if pre.is_file() else None)


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InteropError(f"{path}: expected a mapping of parameter names to tensors")
    return obj


_CONTAINER_KEYS = ("model", "module", "state_dict", "model_state", "model_state_dict")


def unwrap_state_dict(obj: Any, path: Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights inside a loaded checkpoint: ``obj[key]`` when given, else the first of
    model / module / state_dict, else ``obj`` itself if it maps names to tensors. Returns the state
    dict and notes (e.g. that an EMA copy is present). A ``module.`` (DDP) prefix is removed."""
    notes = []
    if not isinstance(obj, dict):
        raise InteropError(f"{path}: expected a dict (state dict or checkpoint), got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise InteropError(f"{path}: has no key '{key}' (top-level keys: {', '.join(map(str, obj)) or 'none'})")
        sd = obj[key]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        found = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if found is None:
            raise InteropError(
                f"{path}: found no weights: none of the keys {', '.join(_CONTAINER_KEYS)} holds a state dict "
                f"and the top level is not a state "
                f"dict (top-level keys: {', '.join(map(str, obj)) or 'none'}); pass --key NAME"
            )
        sd = obj[found]
        others = [k for k in obj if k != found and k in ("model_ema", "ema", "teacher", "target_encoder")]
        if others:
            notes.append(f"used '{found}'; the file also holds {', '.join(others)} (import it with --key {others[0]})")
    if not isinstance(sd, dict):
        raise InteropError(f"{path}: '{key}' is not a state dict (got {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InteropError(f"{path}: weight '{bad[0]}' is a {type(sd[bad[0]]).__name__}, not a tensor")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
        notes.append("removed the 'module.' (DistributedDataParallel) prefix")
    return dict(sd), notes


# =============================================================================================
# mimkit checkpoints


def load_mimkit_checkpoint(path: str | Path, evaluated: bool = False) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model of a mimkit checkpoint (training or imported): (model in eval mode, config, raw dict).
    `evaluated`: its `encoder` holds the weights evaluation and export read (MethodSpec.evaluated: I-JEPA's
    target encoder), as an export or an embedding wants; else the trained encoder, as continued training does."""
    path = Path(path)
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    if not isinstance(state, dict):
        raise InteropError(f"{path}: not a mimkit checkpoint (expected a dict, got {type(state).__name__})")
    for key in ("model", "config"):
        if key not in state:
            hint = " (to convert official MAE / BEiT / BootMAE / Hugging Face weights, run `mimkit import`)"
            raise InteropError(f"{path}: not a mimkit checkpoint: no '{key}' key{hint}")
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise InteropError(f"{path}: invalid 'config': {e}") from None
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise InteropError(f"{path}: 'model' is not a state dict of tensors")
    try:
        model = build_model(cfg)
        result = model.load_state_dict(state["model"], strict=False)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:  # e.g. a tensor of another shape
        detail = " ".join(str(e).split())[:300]
        raise InteropError(f"{path}: 'model' does not match its 'config' ({type(e).__name__}: {detail})") from None
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(
            f"{path}: 'model' does not match its 'config' (missing: {', '.join(result.missing_keys[:5]) or 'none'}; "
            f"unexpected: {', '.join(result.unexpected_keys[:5]) or 'none'})"
        )
    evaluated_name = method_spec(cfg.method).evaluated
    if evaluated and evaluated_name != "encoder":
        cast(nn.Module, model.encoder).load_state_dict(getattr(model, evaluated_name).state_dict())
    return model.eval(), cfg, state


def encoder_spec(encoder) -> dict:
    """Sizes of a timm VisionTransformer as built by mimkit (square images, fused qkv with bias)."""
    block = encoder.blocks[0]
    return {
        "img_size": int(encoder.patch_embed.img_size[0]),
        "patch_size": int(encoder.patch_embed.patch_size[0]),
        "embed_dim": int(encoder.embed_dim),
        "depth": len(encoder.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_hidden": int(block.mlp.fc1.out_features),
    }


def timm_name(cfg: Config) -> str:
    if encoder_family(cfg.method) == "beit":  # the sizes travel in model_args; any Beit entry point builds it
        return "beit_base_patch16_224"
    return PRESETS[cfg.model.arch].timm_name
