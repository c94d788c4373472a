"""Checkpoints in and out: export a mimkit checkpoint to timm or Hugging Face, import official MAE,
BEiT / mc-BEiT, BootMAE and Hugging Face ViTMAE weights into a mimkit checkpoint.

No file is ever read in a way that can run code: safetensors, JSON, or
``torch.load(weights_only=True)`` with a short allowlist of inert classes that official training
checkpoints store next to their weights (``argparse.Namespace`` holding the run's arguments, paths,
numpy scalars). Anything else in a pickle is refused, and the error names the file and the globals.

Key layouts handled (names only; the conversions are written from the published parameter names):

* mimkit: ``encoder.*`` is a stock timm ``VisionTransformer`` state dict, ``decoder.*`` is MAE's
  decoder with the official attribute names.
* official MAE (``models_mae.py``): the same names without the ``encoder.`` / ``decoder.`` prefixes
  (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``; ``decoder_embed``,
  ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``).
* BEiT / mc-BEiT: timm-like block names plus ``attn.q_bias`` / ``attn.v_bias`` (k bias is zero),
  layer scale ``gamma_1`` / ``gamma_2``, a relative position bias (shared ``rel_pos_bias.*`` or
  per block), an encoder-side ``mask_token`` and ``lm_head``. Layer scale is folded exactly into
  ``attn.proj`` / ``mlp.fc2``; the relative position bias cannot be held by a plain ViT and is
  reported as unexpected.
* BootMAE: the BEiT-style encoder with a fixed sin-cos ``pos_embed``; its two cross-attention
  decoders (``decode_blocks*``, ``down*``, ``lm_head*``, ``de_pos_embed``, ``mask_token*``) are not
  MAE's decoder and are reported as unexpected by ``import``; ``convert_bootmae_official`` maps the whole
  model onto mimkit's BootMAE (decoders included).
* Hugging Face ``BeitModel`` / ``BeitForMaskedImageModeling`` (export of BEiT / mc-BEiT): ``hf_beit_key_map``.
* Hugging Face ``ViTMAEForPreTraining`` / ``ViTModel``: 5.x module names (``layers.N.attention.q_proj``)
  and the on-disk names ``save_pretrained`` writes (``encoder.layer.N.attention.attention.query``,
  ``decoder.decoder_encoder.layer.N``, and 4.x ``decoder.decoder_layers.N`` ...).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mimkit
from mimkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mimkit.config import BEIT_METHODS, Config, ConfigError, config_from_dict, load_config, to_dict
from mimkit.errors import MimkitError
from mimkit.models import PRESETS, sincos_2d_pos_embed

FORMATS = ("auto", "mimkit", "mae", "beit", "bootmae", "hf")


class InteropError(MimkitError, ValueError):
    """A problem with a file to import or export, naming the file and, where there is one, the key."""


# =============================================================================================
# Reading files without running code


def _inert_globals() -> list:
    """Classes official training checkpoints pickle beside their tensors, none of which runs code
    when rebuilt: the argparse Namespace of the run's arguments, paths, numpy scalars and dtypes."""
    import numpy as np

    allowed: list = [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        np.dtype,
    ]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` plus the inert allowlist; clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_inert_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            found = []
        inert = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in _inert_globals()}
        blocked = [g for g in found if g not in inert]
        what = ", ".join(blocked) if blocked else str(e).splitlines()[0]
        raise InteropError(
            f"{path}: refused to load: it pickles Python objects that weights-only loading does not allow ({what}). "
            "Nothing from the file was run. If you trust it, re-save only its tensors (e.g. "
            "torch.save({'model': ckpt['model']}, 'weights.pth') in an environment you control) and import that."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InteropError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def load_weights_file(path: str | Path) -> Any:
    """A .safetensors file (tensors only) or a PyTorch file (see :func:`load_torch_file`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights not found: {path}")
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise InteropError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from None
    return load_torch_file(path)


def _read_json(path: Path) -> dict:
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
    config = _read_json(config_path)
    state: dict[str, torch.Tensor] = {}
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            shards = sorted(set(_read_json(folder / index_name).get("weight_map", {}).values()))
            for shard in shards:
                state.update(_as_state_dict(load_weights_file(folder / shard), folder / shard))
            break
        if (folder / single).is_file():
            state = _as_state_dict(load_weights_file(folder / single), folder / single)
            break
    else:
        raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin (or sharded index) found")
    pre = folder / "preprocessor_config.json"
    return state, config, (_read_json(pre) if pre.is_file() else None)


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


def load_mimkit_checkpoint(path: str | Path) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model of a mimkit checkpoint (training or imported): (model in eval mode, config, raw dict)."""
    from mimkit.methods import build_model

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
    model = build_model(cfg)
    result = model.load_state_dict(state["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(
            f"{path}: 'model' does not match its 'config' (missing: {', '.join(result.missing_keys[:5]) or 'none'}; "
            f"unexpected: {', '.join(result.unexpected_keys[:5]) or 'none'})"
        )
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


def _timm_name(cfg: Config) -> str:
    if cfg.method in BEIT_METHODS:  # the sizes travel in model_args; any Beit entry point builds it
        return "beit_base_patch16_224"
    return PRESETS[cfg.model.arch].timm_name


# =============================================================================================
# Hugging Face key map (transformers 5.x module names)

_HF_BLOCK = {  # HF ViT / ViTMAE layer sub-module -> timm Block sub-module
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = ("q_proj", "k_proj", "v_proj")  # timm's fused qkv rows are [q; k; v]

# On-disk / older names -> 5.x module names, applied in order.
_HF_RENAMES = [
    (re.compile(r"^(vit\.)?encoder\.layer\.(\d+)\."), r"\1layers.\2."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\.(\d+)\."), r"decoder.decoder_layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
]


def hf_canonical_key(key: str) -> str:
    for pattern, repl in _HF_RENAMES:
        key = pattern.sub(repl, key)
    return key


def hf_key_map(
    encoder_depth: int, decoder_depth: int | None = None, prefix: str = "vit."
) -> dict[str, tuple[str, int | None]]:
    """HF key -> (mimkit key, chunk of timm's fused qkv or None). ``prefix`` is ``vit.`` for
    ViTMAEForPreTraining, ``""`` for ViTModel / ViTMAEModel; ``decoder_depth`` None: no decoder."""
    m: dict[str, tuple[str, int | None]] = {
        f"{prefix}embeddings.cls_token": ("encoder.cls_token", None),
        f"{prefix}embeddings.position_embeddings": ("encoder.pos_embed", None),
    }
    if decoder_depth is not None:
        m["decoder.mask_token"] = ("decoder.mask_token", None)
        m["decoder.decoder_pos_embed"] = ("decoder.decoder_pos_embed", None)
    blocks = [(f"{prefix}layers", "encoder.blocks", encoder_depth)]
    if decoder_depth is not None:
        blocks.append(("decoder.decoder_layers", "decoder.decoder_blocks", decoder_depth))
    for wb in ("weight", "bias"):
        m[f"{prefix}embeddings.patch_embeddings.projection.{wb}"] = (f"encoder.patch_embed.proj.{wb}", None)
        m[f"{prefix}layernorm.{wb}"] = (f"encoder.norm.{wb}", None)
        if decoder_depth is not None:
            for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
                m[f"decoder.{name}.{wb}"] = (f"decoder.{name}.{wb}", None)
        for hf_prefix, mk_prefix, depth in blocks:
            for i in range(depth):
                for hf_name, mk_name in _HF_BLOCK.items():
                    m[f"{hf_prefix}.{i}.{hf_name}.{wb}"] = (f"{mk_prefix}.{i}.{mk_name}.{wb}", None)
                for chunk, hf_name in enumerate(_HF_QKV):
                    m[f"{hf_prefix}.{i}.attention.{hf_name}.{wb}"] = (f"{mk_prefix}.{i}.attn.qkv.{wb}", chunk)
    return m


_HF_BEIT_BLOCK = {  # HF BeitLayer sub-module -> timm Beit Block sub-module
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_beit_key_map(depth: int, *, shared_rel_pos_bias: bool = True, abs_pos_emb: bool = False,
                    mim_head: bool = False) -> dict[str, tuple[str, int | None]]:  # fmt: skip
    """HF ``BeitModel`` (``mim_head=False``: keys without prefix, final LayerNorm ``layernorm``) or
    ``BeitForMaskedImageModeling`` (``mim_head=True``: ``beit.`` prefix, the final norm is the head's
    ``layernorm``, plus ``lm_head``) key -> (mimkit BEiT / mc-BEiT key, chunk of timm's fused qkv weight or None).
    timm's q_bias / v_bias are HF's q_proj / v_proj biases (k has none in both); layer scale gamma_1 / gamma_2 is
    HF's lambda_1 / lambda_2; the [MASK] embedding (mimkit's top-level mask_token) is HF's embeddings.mask_token."""
    pre = "beit." if mim_head else ""
    m: dict[str, tuple[str, int | None]] = {
        f"{pre}embeddings.cls_token": ("encoder.cls_token", None),
        f"{pre}embeddings.mask_token": ("mask_token", None),
    }
    if abs_pos_emb:
        m[f"{pre}embeddings.position_embeddings"] = ("encoder.pos_embed", None)
    if shared_rel_pos_bias:
        m[f"{pre}shared_position_bias.relative_position_bias_table"] = (
            "encoder.rel_pos_bias.relative_position_bias_table", None)  # fmt: skip
    norm = "layernorm" if mim_head else f"{pre}layernorm"
    for wb in ("weight", "bias"):
        m[f"{pre}embeddings.patch_embeddings.projection.{wb}"] = (f"encoder.patch_embed.proj.{wb}", None)
        m[f"{norm}.{wb}"] = (f"encoder.norm.{wb}", None)
        if mim_head:
            m[f"lm_head.{wb}"] = (f"lm_head.{wb}", None)
    for i in range(depth):
        hf, mk = f"{pre}layers.{i}", f"encoder.blocks.{i}"
        m[f"{hf}.lambda_1"], m[f"{hf}.lambda_2"] = (f"{mk}.gamma_1", None), (f"{mk}.gamma_2", None)
        for chunk, name in enumerate(_HF_QKV):
            m[f"{hf}.attention.{name}.weight"] = (f"{mk}.attn.qkv.weight", chunk)
        m[f"{hf}.attention.q_proj.bias"], m[f"{hf}.attention.v_proj.bias"] = (
            (f"{mk}.attn.q_bias", None), (f"{mk}.attn.v_bias", None))  # fmt: skip
        if not shared_rel_pos_bias:
            m[f"{hf}.relative_position_bias.relative_position_bias_table"] = (
                f"{mk}.attn.relative_position_bias_table", None)  # fmt: skip
        for wb in ("weight", "bias"):
            for hf_name, mk_name in _HF_BEIT_BLOCK.items():
                m[f"{hf}.{hf_name}.{wb}"] = (f"{mk}.{mk_name}.{wb}", None)
    return m


def hf_beit_config(model, cfg: Config, *, mim_head: bool = False):
    """A transformers ``BeitConfig`` for a mimkit BEiT / mc-BEiT model (``model.encoder`` a timm ``Beit``)."""
    from transformers import BeitConfig

    from mimkit.methods.beit import timm_beit_kwargs

    kw = timm_beit_kwargs(cfg)
    return BeitConfig(
        vocab_size=int(model.lm_head.out_features), hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"],
        num_attention_heads=kw["num_heads"], intermediate_size=int(kw["mlp_ratio"] * kw["embed_dim"]),
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        image_size=kw["img_size"], patch_size=kw["patch_size"], num_channels=3, layer_norm_eps=1e-6,
        use_mask_token=True, use_absolute_position_embeddings=kw["use_abs_pos_emb"],
        use_relative_position_bias=kw["use_rel_pos_bias"],
        use_shared_relative_position_bias=kw["use_shared_rel_pos_bias"], layer_scale_init_value=kw["init_values"],
        use_mean_pooling=mim_head,  # MIM head: BeitModel's own final norm off, the head's layernorm is timm's norm
    )  # fmt: skip


def mimkit_to_hf(state: dict[str, torch.Tensor], mapping: dict[str, tuple[str, int | None]]) -> dict[str, torch.Tensor]:
    out = {}
    for hf_key, (mk_key, chunk) in mapping.items():
        t = state[mk_key]
        out[hf_key] = (t if chunk is None else t.chunk(3, dim=0)[chunk]).detach().clone().contiguous()
    return out


# =============================================================================================
# Export


def _data_stats(cfg: Config) -> tuple[list[float], list[float]]:
    return [float(v) for v in cfg.data.mean], [float(v) for v in cfg.data.std]


def export_timm(ckpt: str | Path, out: str | Path) -> dict[str, Path]:
    """``OUT/model.safetensors`` (the encoder state dict, timm names) + ``OUT/config.json`` (timm's
    hub layout: architecture, model_args, pretrained_cfg with mean/std, input size, num_classes 0).
    Load with ``timm.create_model("local-dir:OUT", pretrained=True)`` or ``timm.create_model(
    architecture, pretrained=True, pretrained_cfg_overlay=dict(file="OUT/model.safetensors",
    mean=..., std=...), num_classes=0, **model_args)`` (see :func:`timm_create_kwargs`)."""
    from safetensors.torch import save_file

    model, cfg, state = load_mimkit_checkpoint(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc = model.encoder
    spec = encoder_spec(enc)
    if spec["mlp_hidden"] != 4 * spec["embed_dim"]:
        raise InteropError(f"{ckpt}: encoder MLP width {spec['mlp_hidden']} is not 4 x {spec['embed_dim']}")
    if cfg.model.layer_norm_eps != 1e-6:  # timm's JSON model_args cannot carry a norm layer
        import logging

        logging.getLogger("mimkit").warning(
            "%s: LayerNorm eps %g (model.layer_norm_eps); timm builds 1e-6: after timm.create_model, set it with "
            "`for m in model.modules(): isinstance(m, torch.nn.LayerNorm) and setattr(m, 'eps', %g)`",
            ckpt, cfg.model.layer_norm_eps, cfg.model.layer_norm_eps)  # fmt: skip
    tensors = {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}
    weights = out / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt", "producer": f"mimkit {mimkit.__version__}"})
    mean, std = _data_stats(cfg)
    size = spec["img_size"]
    if cfg.method in BEIT_METHODS:  # timm's Beit: relative position bias, layer scale, no abs. pos-embed
        from mimkit.methods.beit import timm_beit_kwargs

        model_args = timm_beit_kwargs(cfg)
    else:
        model_args = {
            "img_size": size,
            "patch_size": spec["patch_size"],
            "embed_dim": spec["embed_dim"],
            "depth": spec["depth"],
            "num_heads": spec["num_heads"],
            "mlp_ratio": 4.0,
            "qkv_bias": True,
            "num_classes": 0,
            "global_pool": "token",
        }
    config = {
        "architecture": _timm_name(cfg),
        "num_classes": 0,
        "num_features": spec["embed_dim"],
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "mimkit",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "mimkit": {
            "version": mimkit.__version__,
            "method": cfg.method,
            "step": state.get("step"),
            "source": str(ckpt),
            "pretraining": "encoder after masked-image-modeling pretraining; no head",
        },
    }
    config_path = out / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"weights": weights, "config": config_path}


def timm_create_kwargs(out: str | Path) -> tuple[str, dict]:
    """(architecture, kwargs) for ``timm.create_model`` from a timm export folder, without the
    local-dir scheme: the weights file and the preprocessing (mean/std, input size) go in
    ``pretrained_cfg_overlay``, the sizes in the model arguments."""
    out = Path(out)
    cfg = _read_json(out / "config.json")
    pre = cfg["pretrained_cfg"]
    overlay = {
        "file": str(out / "model.safetensors"),
        "num_classes": 0,
        "mean": tuple(pre["mean"]),
        "std": tuple(pre["std"]),
        "input_size": tuple(pre["input_size"]),
        "crop_pct": pre["crop_pct"],
    }
    return cfg["architecture"], {"pretrained": True, "pretrained_cfg_overlay": overlay, **cfg["model_args"]}


def timm_usage(out: str | Path) -> str:
    name, kwargs = timm_create_kwargs(out)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (
        f"timm.create_model('local-dir:{out}', pretrained=True)\n"
        f"# or, equivalently:\ntimm.create_model('{name}', {args})"
    )


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise InteropError("Hugging Face export/import needs transformers >= 5, which is not installed: "
                           "pip install 'mimkit[hf]' (or pip install 'transformers>=5')") from e
    if int(transformers.__version__.split(".")[0]) < 5:
        raise InteropError(f"Hugging Face export needs transformers >= 5 (found {transformers.__version__})")
    return transformers


def hf_vit_config(model, cfg: Config):
    from transformers import ViTConfig

    return ViTConfig(**hf_encoder_kwargs(model.encoder))


def hf_encoder_kwargs(encoder) -> dict:
    """The HF (ViT / ViTMAE) config fields that describe a mimkit encoder."""
    spec = encoder_spec(encoder)
    return dict(
        hidden_size=spec["embed_dim"],
        num_hidden_layers=spec["depth"],
        num_attention_heads=spec["num_heads"],
        intermediate_size=spec["mlp_hidden"],
        image_size=spec["img_size"],
        patch_size=spec["patch_size"],
        num_channels=3,
        qkv_bias=True,
        layer_norm_eps=encoder.norm.eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def hf_vit_mae_config(model, cfg: Config):
    from transformers import ViTMAEConfig

    dec = model.decoder
    block = dec.decoder_blocks[0] if len(dec.decoder_blocks) else None
    return ViTMAEConfig(
        **hf_encoder_kwargs(model.encoder),
        decoder_hidden_size=dec.decoder_embed.out_features,
        decoder_num_hidden_layers=len(dec.decoder_blocks),
        decoder_num_attention_heads=block.attn.num_heads if block is not None else cfg.mae.decoder_heads,
        decoder_intermediate_size=block.mlp.fc1.out_features
        if block is not None
        else 4 * dec.decoder_embed.out_features,
        mask_ratio=float(model.mask_ratio),
        norm_pix_loss=bool(model.norm_pix_loss),
    )


def _load_exact(hf_model, tensors: dict[str, torch.Tensor], what: str) -> None:
    expected = set(hf_model.state_dict())
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise InteropError(
            f"{what}: the mimkit -> transformers key map does not fit this transformers version "
            f"(unmapped HF keys: {', '.join(missing[:5]) or 'none'}; unknown: {', '.join(extra[:5]) or 'none'})"
        )
    result = hf_model.load_state_dict(tensors, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def export_hf(ckpt: str | Path, out: str | Path) -> dict[str, Path]:
    """``OUT``: a ``transformers.ViTModel`` folder (encoder; load with ``add_pooling_layer=False``,
    mimkit has no pooler); ``OUT/vit_mae``: a ``ViTMAEForPreTraining`` folder when the decoder is
    MAE's. BEiT / mc-BEiT: ``OUT`` a ``BeitModel`` folder and ``OUT/beit_mim`` a ``BeitForMaskedImageModeling``
    one (:func:`hf_beit_key_map`). safetensors weights, config.json, preprocessor_config.json (mean/std, size)."""
    _require_transformers()
    from transformers import ViTMAEForPreTraining, ViTModel

    from mimkit.methods.mae import MAEDecoder

    model, cfg, _ = load_mimkit_checkpoint(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    written = {}
    if cfg.method in BEIT_METHODS:
        written = _export_hf_beit(model, cfg, state, ckpt, out)
        _save_image_processor(cfg, written, int(model.encoder.patch_embed.img_size[0]))
        return written
    spec = encoder_spec(model.encoder)

    vit = ViTModel(hf_vit_config(model, cfg), add_pooling_layer=False)
    vit_map = hf_key_map(spec["depth"], None, prefix="")
    _load_exact(vit, mimkit_to_hf(state, vit_map), f"{ckpt} -> ViTModel")
    vit.eval().save_pretrained(out)
    written["vit"] = out

    if isinstance(getattr(model, "decoder", None), MAEDecoder):
        mae_dir = out / "vit_mae"
        hf = ViTMAEForPreTraining(hf_vit_mae_config(model, cfg))
        mae_map = hf_key_map(spec["depth"], len(model.decoder.decoder_blocks), prefix="vit.")
        _load_exact(hf, mimkit_to_hf(state, mae_map), f"{ckpt} -> ViTMAEForPreTraining")
        hf.eval().save_pretrained(mae_dir)
        written["vit_mae"] = mae_dir

    _save_image_processor(cfg, written, spec["img_size"])
    return written


def _export_hf_beit(model, cfg: Config, state: dict, ckpt, out: Path) -> dict[str, Path]:
    """BEiT / mc-BEiT: ``OUT`` a ``BeitModel`` folder (encoder with its [MASK] embedding: pass ``bool_masked_pos``
    for the pretraining input), ``OUT/beit_mim`` a ``BeitForMaskedImageModeling`` folder (plus the lm_head)."""
    from transformers import BeitForMaskedImageModeling, BeitModel

    b, depth = cfg.beit, len(model.encoder.blocks)
    layout = dict(shared_rel_pos_bias=b.shared_rel_pos_bias, abs_pos_emb=b.abs_pos_emb)
    beit = BeitModel(hf_beit_config(model, cfg), add_pooling_layer=False)
    _load_exact(beit, mimkit_to_hf(state, hf_beit_key_map(depth, **layout)), f"{ckpt} -> BeitModel")
    beit.eval().save_pretrained(out)
    mim_dir = out / "beit_mim"
    mim = BeitForMaskedImageModeling(hf_beit_config(model, cfg, mim_head=True))
    _load_exact(mim, mimkit_to_hf(state, hf_beit_key_map(depth, **layout, mim_head=True)),
                f"{ckpt} -> BeitForMaskedImageModeling")  # fmt: skip
    mim.eval().save_pretrained(mim_dir)
    # "vit": the encoder folder under the key the CLI prints (its config says model_type beit: load it with
    # BeitModel or AutoModel)
    return {"vit": out, "beit": out, "beit_mim": mim_dir}


def _save_image_processor(cfg: Config, written: dict[str, Path], img_size: int) -> None:
    try:
        from transformers import ViTImageProcessor

        mean, std = _data_stats(cfg)
        proc = ViTImageProcessor(
            do_resize=True,
            size={"height": img_size, "width": img_size},
            resample=3,
            do_rescale=True,
            do_normalize=True,
            image_mean=mean,
            image_std=std,
        )
        for folder in written.values():
            proc.save_pretrained(folder)
    except Exception:  # an image processor is a convenience; the weights and config are what matter
        pass


# =============================================================================================
# Import: conversion of each family's names to mimkit's


@dataclass
class Converted:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # mimkit key -> tensor
    origin: dict[str, str] = field(default_factory=dict)  # mimkit key -> source key(s)
    unexpected: dict[str, str] = field(default_factory=dict)  # source key -> why it was not used
    notes: list[str] = field(default_factory=list)

    def put(self, key: str, tensor: torch.Tensor, origin: str) -> None:
        self.tensors[key] = tensor
        self.origin[key] = origin


_MAE_ENCODER_TOP = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
}
_MAE_DECODER_TOP = {
    "mask_token",
    "decoder_pos_embed",
    "decoder_embed.weight",
    "decoder_embed.bias",
    "decoder_norm.weight",
    "decoder_norm.bias",
    "decoder_pred.weight",
    "decoder_pred.bias",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

_REASONS = {
    "beit": [
        (
            re.compile(r"(^|\.)rel_pos_bias\.|relative_position_(bias_table|index)$"),
            "relative position bias: a plain timm VisionTransformer has none "
            "(features will differ from the BEiT model)",
        ),
        (re.compile(r"^mask_token$"), "BEiT's encoder-side [MASK] embedding; MAE's mask token lives in the decoder"),
        (re.compile(r"^lm_head\."), "visual-token classifier (pretraining head)"),
        (re.compile(r"^(fc_norm|head)\."), "fine-tuning pooling norm / classifier head"),
    ],
    "bootmae": [
        (
            re.compile(
                r"^(decode_blocks(_1)?\.|decode_norm(_1)?\.|down(_1)?\.|lm_head(_1)?\.|de_pos_embed$|mask_token(_1)?$)"
            ),
            "BootMAE's cross-attention pixel / feature decoders are not MAE's decoder",
        ),
        (re.compile(r"^(fc_norm|head)\."), "fine-tuning pooling norm / classifier head"),
    ],
    "mae": [(re.compile(r"^(fc_norm|head)\."), "fine-tuning pooling norm / classifier head")],
}


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf"
    if "encoder.cls_token" in keys or "encoder.patch_embed.proj.weight" in keys:
        return "mimkit"
    if any(
        k.startswith(("decode_blocks", "down.", "down_1.", "lm_head_1.")) or k in ("de_pos_embed", "mask_token_1")
        for k in keys
    ):
        return "bootmae"
    if any(k.endswith(("attn.q_bias", ".gamma_1")) or "rel_pos_bias" in k or "relative_position" in k for k in keys):
        return "beit"
    if "patch_embed.proj.weight" in keys or any(_BLOCK_RE.match(k) for k in keys):
        return "mae"
    return "unknown"


def _fold_layer_scale(conv: Converted, sd, i: int, gamma_key: str, linear: str) -> None:
    """gamma * (W x + b) == (diag(gamma) W) x + gamma * b: exact, so the scale disappears."""
    gamma = sd[gamma_key].float()
    w_key, b_key = f"encoder.blocks.{i}.{linear}.weight", f"encoder.blocks.{i}.{linear}.bias"
    if w_key not in conv.tensors:
        conv.unexpected[gamma_key] = f"layer scale without its '{linear}' weight"
        return
    w = conv.tensors[w_key]
    conv.put(w_key, (w.float() * gamma[:, None]).to(w.dtype), f"{conv.origin[w_key]} * {gamma_key}")
    if b_key in conv.tensors:
        b = conv.tensors[b_key]
        conv.put(b_key, (b.float() * gamma).to(b.dtype), f"{conv.origin[b_key]} * {gamma_key}")


def convert_official(sd: dict[str, torch.Tensor], family: str) -> Converted:
    """Official MAE, BEiT / mc-BEiT and BootMAE layouts -> mimkit keys."""
    conv = Converted()
    reasons = _REASONS[family]
    blocks: dict[int, dict[str, str]] = defaultdict(dict)
    for k, t in sd.items():
        m = _BLOCK_RE.match(k)
        if m:
            blocks[int(m.group(1))][m.group(2)] = k
        elif k in _MAE_ENCODER_TOP:
            conv.put(f"encoder.{k}", t, k)
        elif family == "mae" and (k in _MAE_DECODER_TOP or k.startswith("decoder_blocks.")):
            conv.put(f"decoder.{k}", t, k)
        else:
            conv.unexpected[k] = next(
                (why for pat, why in reasons if pat.search(k)), "not part of a ViT encoder or MAE decoder"
            )
    folded = 0
    for i, parts in sorted(blocks.items()):
        for sub, k in parts.items():
            if sub in ("attn.q_bias", "attn.k_bias", "attn.v_bias", "gamma_1", "gamma_2"):
                continue
            if "relative_position" in sub:
                conv.unexpected[k] = next(why for pat, why in _REASONS["beit"] if pat.search(k))
                continue
            conv.put(f"encoder.blocks.{i}.{sub}", sd[k], k)
        if "attn.q_bias" in parts or "attn.v_bias" in parts:  # BEiT-style: learnable q and v bias, k bias 0
            q_key, v_key = parts.get("attn.q_bias"), parts.get("attn.v_bias")
            if q_key is None or v_key is None:
                raise InteropError(f"block {i}: has only one of attn.q_bias / attn.v_bias")
            q, v = sd[q_key], sd[v_key]
            k_key = parts.get("attn.k_bias")
            k = sd[k_key] if k_key else torch.zeros_like(q)
            conv.put(
                f"encoder.blocks.{i}.attn.qkv.bias", torch.cat([q, k, v]), f"cat({q_key}, {k_key or 'zeros'}, {v_key})"
            )
        for gamma, linear in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
            if gamma in parts:
                _fold_layer_scale(conv, sd, i, parts[gamma], linear)
                folded += 1
    if any(k.endswith("attn.q_bias") for k in sd):
        conv.notes.append("fused BEiT-style attn.q_bias / attn.v_bias (k bias zero) into attn.qkv.bias")
    if folded:
        conv.notes.append(f"folded {folded} layer-scale vectors (gamma_1 / gamma_2) exactly into attn.proj / mlp.fc2")
    return conv


_BOOTMAE_DECODERS = {  # official decoder prefix -> (mimkit decoder, its mask token, the table its mask tokens get)
    "": ("pixel_decoder", "mask_token", "de_pos_embed"),
    "_1": ("feature_decoder", "mask_token_1", "pos_embed"),  # the feature decoder reuses the encoder's table
}
_BOOTMAE_BLOCK = {  # official Decode_Block sub-module -> mimkit DecoderBlock sub-module (weights and biases)
    "norm1": "norm1", "attn.proj": "attn.proj", "norm3": "norm_q", "norm4": "norm_context",
    "c_attn.proj": "cross_attn.proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip


def convert_bootmae_official(sd: dict[str, torch.Tensor], patch_size: int) -> Converted:
    """A whole official BootMAE pretraining model (``modeling_pretrain_bootmae.py`` names) -> mimkit ``BootMAE``
    keys: the encoder as :func:`convert_official` maps it, both cross-attention decoders, and the momentum
    encoder as a copy of the encoder (load ``model_ema`` the same way for the EMA one). Exact: BEiT-style
    q / v biases become fused biases with a zero k part; the cross-attention's fused ``kv`` splits into ``k`` /
    ``v``; the pixel head ``ConvTranspose2d(dim, 3, p, p)`` becomes mimkit's Linear(dim, p*p*3) in patchify
    order, its per-channel bias repeated over the p*p pixels."""
    decoder_side = ("decode_", "down", "lm_head", "mask_token", "de_pos_embed")
    encoder = convert_official({k: v for k, v in sd.items() if not k.startswith(decoder_side)}, "bootmae")
    conv = Converted(notes=list(encoder.notes), unexpected=dict(encoder.unexpected))
    for key, tensor in encoder.tensors.items():
        conv.put(key, tensor, encoder.origin[key])
        conv.put("ema_encoder." + key[len("encoder.") :], tensor, encoder.origin[key])
    taken: set[str] = set()

    def take(src: str) -> torch.Tensor:
        if src not in sd:
            raise InteropError(f"official BootMAE state dict: no '{src}'")
        taken.add(src)
        return sd[src]

    for suffix, (name, token, table) in _BOOTMAE_DECODERS.items():
        conv.put(f"{name}.mask_token", take(token), token)
        conv.put(f"{name}.pos_embed", take(table), table)
        for wb in ("weight", "bias"):
            conv.put(f"{name}.embed.{wb}", take(f"down{suffix}.{wb}"), f"down{suffix}.{wb}")
            conv.put(f"{name}.norm.{wb}", take(f"decode_norm{suffix}.{wb}"), f"decode_norm{suffix}.{wb}")
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"^decode_blocks{suffix}\.(\d+)\.", k)))
        for i in range(depth):
            src, dst = f"decode_blocks{suffix}.{i}", f"{name}.blocks.{i}"
            for official, ours in _BOOTMAE_BLOCK.items():
                for wb in ("weight", "bias"):
                    conv.put(f"{dst}.{ours}.{wb}", take(f"{src}.{official}.{wb}"), f"{src}.{official}.{wb}")
            q, v = take(f"{src}.attn.q_bias"), take(f"{src}.attn.v_bias")
            conv.put(f"{dst}.attn.qkv.weight", take(f"{src}.attn.qkv.weight"), f"{src}.attn.qkv.weight")
            conv.put(f"{dst}.attn.qkv.bias", torch.cat([q, torch.zeros_like(q), v]),
                     f"cat({src}.attn.q_bias, zeros, {src}.attn.v_bias)")  # fmt: skip
            k_w, v_w = take(f"{src}.c_attn.kv.weight").chunk(2, dim=0)
            conv.put(f"{dst}.cross_attn.q.weight", take(f"{src}.c_attn.q.weight"), f"{src}.c_attn.q.weight")
            conv.put(f"{dst}.cross_attn.q.bias", take(f"{src}.c_attn.q_bias"), f"{src}.c_attn.q_bias")
            conv.put(f"{dst}.cross_attn.k.weight", k_w, f"{src}.c_attn.kv.weight[:half]")
            conv.put(f"{dst}.cross_attn.v.weight", v_w, f"{src}.c_attn.kv.weight[half:]")
            conv.put(f"{dst}.cross_attn.v.bias", take(f"{src}.c_attn.v_bias"), f"{src}.c_attn.v_bias")
    conv.put("feature_decoder.head.weight", take("lm_head_1.weight"), "lm_head_1.weight")
    conv.put("feature_decoder.head.bias", take("lm_head_1.bias"), "lm_head_1.bias")
    deconv_w, deconv_b = take("lm_head.proj.weight"), take("lm_head.proj.bias")  # (dim, 3, p, p), (3,)
    if tuple(deconv_w.shape[1:]) != (3, patch_size, patch_size):
        raise InteropError(f"official BootMAE 'lm_head.proj.weight' has shape {tuple(deconv_w.shape)}; expected "
                           f"(dim, 3, {patch_size}, {patch_size})")  # fmt: skip
    # output pixel (i, j) of channel c of a patch = sum_d x_d W[d, c, i, j] + b[c]; patchify order is (i, j, c)
    conv.put("pixel_decoder.head.weight", deconv_w.permute(2, 3, 1, 0).reshape(-1, deconv_w.shape[0]),
             "lm_head.proj.weight (ConvTranspose2d -> Linear)")  # fmt: skip
    conv.put("pixel_decoder.head.bias", deconv_b.repeat(patch_size * patch_size), "lm_head.proj.bias (per channel)")
    for k in sd:
        if k.startswith(decoder_side) and k not in taken:
            conv.unexpected[k] = "not part of mimkit's BootMAE decoders"
    return conv


def convert_hf(sd: dict[str, torch.Tensor]) -> Converted:
    """Hugging Face ViTMAEForPreTraining / ViTMAEModel / ViTModel (any name vintage) -> mimkit keys."""
    conv = Converted()
    canon = {hf_canonical_key(k): k for k in sd}
    prefix = "vit." if any(k.startswith("vit.") for k in canon) else ""
    enc_depth = 1 + max(
        (int(m.group(1)) for k in canon if (m := re.match(rf"^{re.escape(prefix)}layers\.(\d+)\.", k))), default=-1
    )
    dec_ids = [int(m.group(1)) for k in canon if (m := re.match(r"^decoder\.decoder_layers\.(\d+)\.", k))]
    has_decoder = any(k.startswith("decoder.") for k in canon)
    mapping = hf_key_map(enc_depth, (1 + max(dec_ids, default=-1)) if has_decoder else None, prefix)
    qkv: dict[str, list] = defaultdict(lambda: [None, None, None])
    used = set()
    for hf_key, (mk_key, chunk) in mapping.items():
        if hf_key not in canon:
            continue
        used.add(hf_key)
        src = canon[hf_key]
        if chunk is None:
            conv.put(mk_key, sd[src], src)
        else:
            qkv[mk_key][chunk] = src
    for mk_key, parts in qkv.items():
        if None in parts:
            absent = _HF_QKV[parts.index(None)]
            raise InteropError(f"{mk_key}: the source has the other attention projections but no '{absent}'")
        conv.put(mk_key, torch.cat([sd[p] for p in parts], dim=0), "cat(" + ", ".join(parts) + ")")
    for k, original in canon.items():
        if k not in used:
            pooler = "pooler." in k
            conv.unexpected[original] = (
                "HF ViTModel pooler (mimkit has none)" if pooler else "not part of a ViT encoder or MAE decoder"
            )
    if any(k != hf_canonical_key(k) for k in sd):
        conv.notes.append("read Hugging Face on-disk names (encoder.layer.N.attention.attention.query ...)")
    conv.notes.append("fused HF q_proj / k_proj / v_proj into timm's attn.qkv")
    return conv


def convert_mimkit(sd: dict[str, torch.Tensor]) -> Converted:
    conv = Converted()
    for k, t in sd.items():
        if k.startswith(("encoder.", "decoder.")):
            conv.put(k, t, k)
        else:
            conv.unexpected[k] = "not an encoder. / decoder. key"
    return conv


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
    from mimkit.methods import build_model

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
