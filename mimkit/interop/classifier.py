"""Fine-tuned classifiers (the checkpoints `mimkit finetune` writes: a timm ViT / Beit with its head) out of mimkit:
to timm (a `save_for_hf`-style folder with `num_classes` and `label_names`), to transformers
(`ViTForImageClassification` for cls-token pooling, `BeitForImageClassification` for Beit encoders and for global
average pooling, which is BEiT's mean pooling: ViT's k bias only shifts each query's scores by a constant, which
softmax ignores), and the top-k table of `mimkit predict`."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mimkit.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_text, load_checkpoint
from mimkit.config import ConfigError, config_from_dict
from mimkit.files import InteropError
from mimkit.interop.common import read_json
from mimkit.interop.hf_keys import hf_beit_key_map, hf_key_map, mimkit_to_hf
from mimkit.presets import PRESETS, get_preset
from mimkit.sources import CorruptImage, load_image
from mimkit.version import __version__

TIMM_ENTRY = {"vit": "vit_base_patch16_224", "beit": "beit_base_patch16_224"}  # sizes travel in model_args


@dataclass
class Classifier:
    """A classifier ready to run: the timm model (eval mode) and what its inputs and outputs need."""

    model: nn.Module
    family: str  # vit | beit (timm VisionTransformer | Beit)
    model_args: dict  # timm's constructor arguments (num_classes, global_pool included)
    mean: list[float]
    std: list[float]
    crop_pct: float
    label_names: list[str] | None = None
    info: dict = field(default_factory=dict)  # source, step, eps

    @property
    def img_size(self) -> int:
        return int(self.model_args["img_size"])

    def names(self) -> list[str]:
        return self.label_names or [str(i) for i in range(self.model_args["num_classes"])]


def is_finetuned(state) -> bool:
    return isinstance(state, dict) and state.get("command") == "finetune" and isinstance(state.get("model"), dict)


def _pretraining_config(ecfg: dict):
    """The config of the pretraining checkpoint a fine-tuning started from, when that file is still there."""
    path = Path(str(ecfg.get("checkpoint") or "none"))
    if str(path) == "none" or not path.exists():
        return None
    try:
        return config_from_dict(load_checkpoint(path)["config"])
    except (CheckpointError, ConfigError, KeyError, TypeError):
        return None


def _num_heads(sd: dict, ecfg: dict, pcfg, width: int, path) -> int:
    table = next((v for k, v in sd.items() if k.endswith("relative_position_bias_table")), None)
    if table is not None:  # Beit: (distances, heads)
        return int(table.shape[1])
    if ecfg.get("num_heads"):
        return int(ecfg["num_heads"])
    if pcfg is not None:
        return int(pcfg.model.num_heads or get_preset(pcfg.model.arch).num_heads)
    if ecfg.get("arch") in PRESETS:
        return PRESETS[ecfg["arch"]].num_heads
    by_width = {p.embed_dim: p.num_heads for p in PRESETS.values()}
    if width in by_width:
        return by_width[width]
    raise InteropError(f"{path}: cannot tell the attention heads of width {width} (its encoder.checkpoint is gone and "
                       "encoder.num_heads is unset)")  # fmt: skip


def timm_model_args(sd: dict, cfg: dict, num_classes: int, path, pcfg=None) -> tuple[str, dict]:
    """(family, timm constructor arguments) of a fine-tuned state dict, read from its shapes and config."""
    w = sd["patch_embed.proj.weight"]
    width, chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    beit_keys = ("blocks.0.attn.q_bias", "blocks.0.gamma_1", "rel_pos_bias.relative_position_bias_table",
                 "blocks.0.attn.relative_position_bias_table")  # fmt: skip
    family = "beit" if any(k in sd for k in beit_keys) else "vit"
    if "pos_embed" in sd:
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    else:  # Beit without absolute position embedding: (2G - 1)^2 + 3 relative distances
        entries = next(v for k, v in sd.items() if k.endswith("relative_position_bias_table")).shape[0]
        grid = (math.isqrt(entries - 3) + 1) // 2
    args = {"img_size": grid * patch, "patch_size": patch, "in_chans": chans, "embed_dim": width, "depth": depth,
            "num_heads": _num_heads(sd, cfg.get("encoder", {}), pcfg, width, path),
            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width, "num_classes": num_classes,
            "global_pool": cfg.get("model", {}).get("global_pool", "avg")}  # fmt: skip
    if family == "vit":
        return family, {**args, "qkv_bias": True}
    return family, {**args, "use_abs_pos_emb": "pos_embed" in sd,
                    "use_rel_pos_bias": "blocks.0.attn.relative_position_bias_table" in sd,
                    "use_shared_rel_pos_bias": "rel_pos_bias.relative_position_bias_table" in sd,
                    "init_values": 0.1 if "blocks.0.gamma_1" in sd else None}  # fmt: skip


def build_timm(family: str, model_args: dict) -> nn.Module:
    import timm

    return timm.create_model(TIMM_ENTRY[family], pretrained=False, **model_args)


def finetuned_classifier(path: str | Path, ema: bool = False) -> Classifier | None:
    """The classifier of a `mimkit finetune` checkpoint, None for any other checkpoint."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    return classifier_from_state(state, path, ema) if is_finetuned(state) else None


def load_finetuned(path: str | Path, ema: bool = False) -> Classifier:
    """The classifier of a `mimkit finetune` checkpoint (its EMA weights with `ema`), rebuilt as a timm model."""
    found = finetuned_classifier(path, ema)
    if found is None:
        raise InteropError(
            f"{path}: not a fine-tuned checkpoint (no command 'finetune'; `mimkit finetune` writes them)"
        )
    return found


def classifier_from_state(state: dict, path, ema: bool = False) -> Classifier:
    """A Classifier from a fine-tuned checkpoint's dict (see :func:`load_finetuned`)."""
    if ema and "ema" not in state:
        raise InteropError(f"{path}: --ema asked for, but the checkpoint holds no EMA weights (ema.enabled was off)")
    sd, cfg = state["ema" if ema else "model"], state.get("config") or {}
    pcfg = _pretraining_config(cfg.get("encoder", {}))
    family, args = timm_model_args(sd, cfg, int(state.get("num_classes") or sd["head.weight"].shape[0]), path, pcfg)
    eps = float(pcfg.model.layer_norm_eps) if pcfg is not None and family == "vit" else 1e-6
    model = build_timm(family, args)
    for m in model.modules():  # the encoder's LayerNorm eps (fc_norm is 1e-6 either way, as mimkit builds it)
        if isinstance(m, nn.LayerNorm) and m is not getattr(model, "fc_norm", None):
            m.eps = eps
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(f"{path}: the fine-tuned weights do not fit a timm {family} (missing: "
                           f"{', '.join(result.missing_keys[:5]) or 'none'}; unexpected: "
                           f"{', '.join(result.unexpected_keys[:5]) or 'none'})")  # fmt: skip
    data = cfg.get("data", {})
    crop = data.get("crop_pct") or (0.875 if args["img_size"] >= 128 else 1.0)
    names = state.get("classes") or state.get("label_names") or _folder_classes(data)
    return Classifier(model.eval(), family, args, list(data.get("mean", (0.485, 0.456, 0.406))),
                      list(data.get("std", (0.229, 0.224, 0.225))), float(crop),
                      list(names) if names and len(names) == args["num_classes"] else None,
                      {"source": str(path), "step": state.get("step"), "eps": eps, "ema": ema})  # fmt: skip


def _folder_classes(data: dict) -> list[str] | None:
    """The class folders of the ImageFolder tree it was fine-tuned on, when that tree is still there."""
    path = str(data.get("path", ""))
    root = Path(path) / str(data.get("train_split", "train"))
    if not path or path.startswith("torchvision:") or path.endswith(".npz") or not root.is_dir():
        return None
    return sorted(p.name for p in root.iterdir() if p.is_dir()) or None


# ---------------------------------------------------------------- timm


def export_classifier_timm(c: Classifier, out: str | Path) -> dict[str, Path]:
    """OUT/model.safetensors + OUT/config.json (timm's hub layout, with num_classes and label_names):
    ``timm.create_model("local-dir:OUT", pretrained=True)`` is the classifier."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in c.model.state_dict().items()}
    data = save(tensors, metadata={"format": "pt", "producer": f"mimkit {__version__}"})
    atomic_write_bytes(out / "model.safetensors", lambda f: f.write(data))
    k = c.model_args["num_classes"]
    config = {
        "architecture": TIMM_ENTRY[c.family], "num_classes": k, "num_features": c.model_args["embed_dim"],
        "global_pool": c.model_args["global_pool"], "model_args": c.model_args, "label_names": c.names(),
        "pretrained_cfg": {"tag": "mimkit-finetuned", "custom_load": False,
                           "input_size": [c.model_args["in_chans"], c.img_size, c.img_size], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": c.crop_pct, "crop_mode": "center", "mean": c.mean,
                           "std": c.std, "num_classes": k, "pool_size": None, "first_conv": "patch_embed.proj",
                           "classifier": "head"},
        "mimkit": {"version": __version__, "source": c.info.get("source"), "step": c.info.get("step"),
                   "layer_norm_eps": c.info.get("eps"), "ema": c.info.get("ema"),
                   "fine_tuned": "classifier after `mimkit finetune`: encoder + head"},
    }  # fmt: skip
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return {"weights": out / "model.safetensors", "config": out / "config.json"}


def load_timm_export(folder: str | Path) -> Classifier:
    """A classifier exported to timm (this module's folder), as a Classifier."""
    import timm

    folder = Path(folder)
    cfg = read_json(folder / "config.json")
    if not cfg.get("num_classes"):
        raise InteropError(f"{folder}: a timm export without a head (num_classes 0); predict needs a classifier")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    eps = (cfg.get("mimkit") or {}).get("layer_norm_eps") or 1e-6
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m is not getattr(model, "fc_norm", None):
            m.eps = eps
    pre = cfg["pretrained_cfg"]
    family = "beit" if "beit" in cfg["architecture"] else "vit"
    return Classifier(model.eval(), family, cfg["model_args"], list(pre["mean"]), list(pre["std"]),
                      float(pre.get("crop_pct", 1.0)), cfg.get("label_names"), {"source": str(folder)})  # fmt: skip


def load_classifier(path: str | Path) -> Classifier:
    """A fine-tuned checkpoint (.pt) or a timm export folder."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_timm_export(path)
    return load_finetuned(path)


# ---------------------------------------------------------------- transformers


def _hf_labels(c: Classifier) -> dict:
    names = c.names()
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def hf_classifier(c: Classifier):
    """(transformers model with the classifier's weights, class name): ViTForImageClassification for cls-token
    pooling of a ViT, BeitForImageClassification otherwise (mean pooling -> pooler LayerNorm = timm's fc_norm)."""
    try:
        import transformers
    except ImportError as e:
        raise InteropError("export --to hf needs transformers >= 5: pip install 'mimkit[hf]'") from e
    a, sd = c.model_args, c.model.state_dict()
    common = dict(hidden_size=a["embed_dim"], num_hidden_layers=a["depth"], num_attention_heads=a["num_heads"],
                  intermediate_size=round(a["mlp_ratio"] * a["embed_dim"]), image_size=a["img_size"],
                  patch_size=a["patch_size"], num_channels=a["in_chans"], hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, layer_norm_eps=c.info.get("eps", 1e-6), **_hf_labels(c))  # fmt: skip
    state = {**{f"encoder.{k}": v for k, v in sd.items()}, **sd}
    model: transformers.PreTrainedModel
    if c.family == "vit" and a["global_pool"] == "token":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**common, qkv_bias=True))
        mapping = {**hf_key_map(a["depth"], None, prefix="vit."), **_head_map()}
    else:
        mean_pool = a["global_pool"] == "avg"
        model = transformers.BeitForImageClassification(transformers.BeitConfig(
            **common, use_mask_token=False, use_absolute_position_embeddings="pos_embed" in sd,
            use_relative_position_bias=bool(a.get("use_rel_pos_bias")),
            use_shared_relative_position_bias=bool(a.get("use_shared_rel_pos_bias")),
            layer_scale_init_value=0.1 if "blocks.0.gamma_1" in sd else 0.0, use_mean_pooling=mean_pool))  # fmt: skip
        mapping = _beit_classifier_map(a["depth"], state, mean_pool)
    _load_all(model, mimkit_to_hf(state, mapping), f"{c.info.get('source')} -> {type(model).__name__}")
    return model.eval(), type(model).__name__


def _head_map() -> dict:
    return {f"classifier.{wb}": (f"head.{wb}", None) for wb in ("weight", "bias")}


def _beit_classifier_map(depth: int, state: dict, mean_pool: bool) -> dict:
    """HF BeitForImageClassification key -> (mimkit-prefixed key, qkv chunk): BEiT's map without the [MASK] token,
    a ViT's fused q / v biases split, entries whose source the model lacks (layer scale, position tables) dropped."""
    base = hf_beit_key_map(depth, shared_rel_pos_bias=True, abs_pos_emb=True)
    base.update({f"layers.{i}.relative_position_bias.relative_position_bias_table":
                 (f"encoder.blocks.{i}.attn.relative_position_bias_table", None) for i in range(depth)})  # fmt: skip
    for i in range(depth):
        if f"encoder.blocks.{i}.attn.qkv.bias" in state:  # a ViT: k's bias is a per-query constant, softmax drops it
            base[f"layers.{i}.attention.q_proj.bias"] = (f"encoder.blocks.{i}.attn.qkv.bias", 0)
            base[f"layers.{i}.attention.v_proj.bias"] = (f"encoder.blocks.{i}.attn.qkv.bias", 2)
    base.pop("embeddings.mask_token")
    if mean_pool:  # BeitModel's final norm is off; the pooler's LayerNorm is timm's fc_norm
        for wb in ("weight", "bias"):
            base.pop(f"layernorm.{wb}")
            base[f"pooler.layernorm.{wb}"] = (f"fc_norm.{wb}", None)
    mapping = {f"beit.{k}": v for k, v in base.items() if v[0] in state}
    return {**mapping, **_head_map()}


def _load_all(model, tensors: dict, what: str) -> None:
    expected = set(model.state_dict())
    if set(tensors) != expected:
        raise InteropError(f"{what}: the key map does not fit this transformers version (unmapped: "
                           f"{', '.join(sorted(expected - set(tensors))[:5]) or 'none'}; unknown: "
                           f"{', '.join(sorted(set(tensors) - expected)[:5]) or 'none'})")  # fmt: skip
    model.load_state_dict(tensors, strict=True)


def export_classifier_hf(c: Classifier, out: str | Path) -> dict[str, Path]:
    """OUT: a transformers image-classification folder (config with id2label, safetensors, preprocessor)."""
    import os

    from transformers import ViTImageProcessor

    model, name = hf_classifier(c)
    out = Path(out)
    model.save_pretrained(out)
    ViTImageProcessor(do_resize=True, size={"height": c.img_size, "width": c.img_size}, resample=3, do_rescale=True,
                      do_normalize=True, image_mean=c.mean, image_std=c.std).save_pretrained(out)  # fmt: skip
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():  # safetensors writes 0o600: the mode an ordinary open() gives instead
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)
    return {"folder": out, "class": name}


# ---------------------------------------------------------------- predict


@torch.no_grad()
def predict_topk(c: Classifier, images: list[Path], transform, top_k: int = 5, batch_size: int = 32,
                 device: str | torch.device = "cpu", bar=None) -> list[list[tuple[str, float]]]:  # fmt: skip
    """For each image, its top-k (class name, probability), most probable first."""
    k, names = min(top_k, c.model_args["num_classes"]), c.names()
    model, rows = c.model.to(device), []
    for start in range(0, len(images), batch_size):
        batch = []
        for path in images[start : start + batch_size]:
            try:
                batch.append(transform(load_image(path)))
            except CorruptImage as e:
                raise InteropError(f"predict: cannot decode {e}") from None
        probs = model(torch.stack(batch).to(device)).float().softmax(-1)
        top = probs.topk(k, dim=-1)
        rows += [[(names[i], float(p)) for p, i in zip(ps.tolist(), ix.tolist())] for ps, ix in zip(*top)]
        if bar is not None:
            bar.update(len(batch))
    return rows


def write_topk_csv(out: str | Path, images: list[Path], rows: list[list[tuple[str, float]]]) -> Path:
    """path, class_1, probability_1, ..., class_k, probability_k: one line per image."""
    import io

    k = max((len(r) for r in rows), default=0)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path"] + [f"{col}_{i}" for i in range(1, k + 1) for col in ("class", "probability")])
    for path, row in zip(images, rows):
        w.writerow([str(path)] + [v for name, p in row for v in (name, f"{p:.6f}")])
    atomic_write_text(Path(out), buf.getvalue())
    return Path(out)
