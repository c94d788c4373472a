"""Export of a mimkit checkpoint to timm (safetensors + config) and to Hugging Face transformers folders."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from mimkit.checkpoint import atomic_write_bytes, atomic_write_text, current_umask
from mimkit.config import Config
from mimkit.files import InteropError
from mimkit.interop.common import encoder_spec, load_mimkit_checkpoint, read_json, timm_name
from mimkit.interop.hf_keys import hf_beit_config, hf_beit_key_map, hf_key_map, mimkit_to_hf
from mimkit.methods.mae import MAEDecoder
from mimkit.models import encoder_of, timm_beit_kwargs
from mimkit.registry import encoder_family
from mimkit.version import __version__

# =============================================================================================
# Export

log = logging.getLogger("mimkit")


def _data_stats(cfg: Config) -> tuple[list[float], list[float]]:
    return [float(v) for v in cfg.data.mean], [float(v) for v in cfg.data.std]


def export_timm(ckpt: str | Path, out: str | Path) -> dict[str, Path]:
    """``OUT/model.safetensors`` (the encoder state dict, timm names) + ``OUT/config.json`` (timm's
    hub layout: architecture, model_args, pretrained_cfg with mean/std, input size, num_classes 0).
    Load with ``timm.create_model("local-dir:OUT", pretrained=True)`` or ``timm.create_model(
    architecture, pretrained=True, pretrained_cfg_overlay=dict(file="OUT/model.safetensors",
    mean=..., std=...), num_classes=0, **model_args)`` (see :func:`timm_create_kwargs`)."""
    from safetensors.torch import save

    model, cfg, state = load_mimkit_checkpoint(ckpt, evaluated=True)  # the encoder its method evaluates
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc = encoder_of(model)
    spec = encoder_spec(enc)
    if spec["mlp_hidden"] != 4 * spec["embed_dim"]:
        raise InteropError(f"{ckpt}: encoder MLP width {spec['mlp_hidden']} is not 4 x {spec['embed_dim']}")
    if cfg.model.layer_norm_eps != 1e-6:  # timm's JSON model_args cannot carry a norm layer
        log.warning(
            "%s: LayerNorm eps %g (model.layer_norm_eps); timm builds 1e-6: after timm.create_model, set it with "
            "`for m in model.modules(): isinstance(m, torch.nn.LayerNorm) and setattr(m, 'eps', %g)`",
            ckpt, cfg.model.layer_norm_eps, cfg.model.layer_norm_eps)  # fmt: skip
    tensors = {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}
    weights = out / "model.safetensors"
    data = save(tensors, metadata={"format": "pt", "producer": f"mimkit {__version__}"})
    atomic_write_bytes(weights, lambda f: f.write(data))  # mode 0o666 less the umask (safetensors' own: 0o600)
    mean, std = _data_stats(cfg)
    size = spec["img_size"]
    if encoder_family(cfg.method) == "beit":  # timm's Beit: relative position bias, layer scale, no abs. pos-embed
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
        if enc.patch_embed.proj.in_channels != 3:  # a C-channel encoder (RGB ones keep timm's default, unwritten)
            model_args["in_chans"] = enc.patch_embed.proj.in_channels
        if enc.cls_token is None:  # I-JEPA's encoder: no cls token, mean of the final-norm patch tokens
            model_args.update({"class_token": False, "global_pool": "avg", "fc_norm": False})
    config = {
        "architecture": timm_name(cfg),
        "num_classes": 0,
        "num_features": spec["embed_dim"],
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "mimkit",
            "custom_load": False,
            "input_size": [enc.patch_embed.proj.in_channels, size, size],
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
            "version": __version__,
            "method": cfg.method,
            "step": state.get("step"),
            "source": str(ckpt),
            "pretraining": "encoder after masked-image-modeling pretraining; no head",
        },
    }
    config_path = out / "config.json"
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    return {"weights": weights, "config": config_path}


def timm_create_kwargs(out: str | Path) -> tuple[str, dict]:
    """(architecture, kwargs) for ``timm.create_model`` from a timm export folder, without the
    local-dir scheme: the weights file and the preprocessing (mean/std, input size) go in
    ``pretrained_cfg_overlay``, the sizes in the model arguments."""
    out = Path(out)
    cfg = read_json(out / "config.json")
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
        raise InteropError(
            "Hugging Face export/import needs transformers >= 5, which is not installed: "
            "pip install 'mimkit[hf]' (or pip install 'transformers>=5')"
        ) from e
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
        num_channels=encoder.patch_embed.proj.in_channels,
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
        # mask.count c: a ratio whose int(L * (1 - r)) is L - c, away from float rounding
        mask_ratio=float(model.mask_ratio)
        if getattr(model, "mask_count", None) is None
        else (model.mask_count - 0.5) / model.num_patches,
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
    model, cfg, _ = load_mimkit_checkpoint(ckpt, evaluated=True)  # the encoder its method evaluates
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time_ns()
    written = _export_hf(model, cfg, ckpt, out)
    _follow_umask(written.values(), started)
    return written


def _follow_umask(folders, since_ns: int) -> None:
    """Files written since `since_ns` in the export folders get the mode an ordinary open() gives (0o666 less the
    umask): transformers saves weights through safetensors, which creates them 0o600."""
    mode = 0o666 & ~current_umask()
    for folder in set(folders):
        for path in Path(folder).iterdir():
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime_ns >= since_ns - 2_000_000_000:
                os.chmod(path, mode)


def _export_hf(model, cfg: Config, ckpt, out: Path) -> dict[str, Path]:
    from transformers import ViTMAEForPreTraining, ViTModel

    state = model.state_dict()
    written = {}
    if encoder_family(cfg.method) == "beit":
        written = _export_hf_beit(model, cfg, state, ckpt, out)
        _save_image_processor(cfg, written, int(model.encoder.patch_embed.img_size[0]))
        return written
    spec = encoder_spec(model.encoder)
    if model.encoder.cls_token is None:  # I-JEPA: no cls token, transformers' IJepaModel
        written = _export_hf_ijepa(model, state, spec["depth"], ckpt, out)
        _save_image_processor(cfg, written, spec["img_size"])
        return written

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


def _export_hf_ijepa(model, state: dict, depth: int, ckpt, out: Path) -> dict[str, Path]:
    """I-JEPA: ``OUT`` a ``transformers.IJepaModel`` folder (the encoder; ViT key names without a cls token; load with
    ``add_pooling_layer=False``; its last_hidden_state is the timm encoder's forward_features, mean-pool it)."""
    from transformers import IJepaConfig, IJepaModel

    hf = IJepaModel(IJepaConfig(**hf_encoder_kwargs(model.encoder)), add_pooling_layer=False)
    _load_exact(hf, mimkit_to_hf(state, hf_key_map(depth, None, prefix="", cls_token=False)), f"{ckpt} -> IJepaModel")
    hf.eval().save_pretrained(out)
    return {"vit": out, "ijepa": out}


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
