"""What the three evaluation commands share: the encoder (from a pretraining checkpoint, with a key report,
or randomly initialised), labelled data, transforms, resumable feature extraction, metrics files.

Everything here reuses the core: checkpoints are read with mimkit.checkpoint.load_checkpoint
(weights_only), the encoder is mimkit.models.create_encoder's stock timm VisionTransformer, the random
baseline is the encoder MAE pretraining starts from (mimkit.methods.build_model), image sources are
mimkit.data's, training batches come from mimkit.data.ResumableBatchSampler (resumable, rank-aware,
one seed per sample), and processes from mimkit.distributed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mimkit import distributed as mdist
from mimkit.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from mimkit.config import BEIT_METHODS, ConfigError, config_from_dict
from mimkit.data import CorruptImage, DataError, FolderImages, load_npz, pretrain_transform
from mimkit.datasets import open_torchvision
from mimkit.engine import autocast_context
from mimkit.methods import build_model, set_layer_norm_eps
from mimkit.methods.beit import timm_beit_kwargs
from mimkit.metrics import MetricsLog
from mimkit.models import create_encoder, get_preset

log = logging.getLogger("mimkit")

KNN_NOTE = ("k-NN on masked-image-modeling features is a trend monitor, not a quality measure: MIM features "
            "score low on k-NN (MAE ViT-B/16, 100 epochs: k-NN 11.2% vs linear 46.0%, fine-tune 81.3%)")  # fmt: skip


# =============================================================================================
# The encoder: a pretraining checkpoint with a key report, or a random init


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
        return EncoderSource(model, None, "random init (no checkpoint)")
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
    enc = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    if not enc:
        raise ConfigError(f"encoder.checkpoint: {path} holds no 'encoder.*' tensors (is it a pretraining checkpoint?)")
    try:
        pcfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ConfigError(f"encoder.checkpoint: {path} has an invalid config: {e}") from None
    model = {k: getattr(pcfg.model, k) for k in ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                                 "layer_norm_eps")}  # fmt: skip
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
    if pcfg.method in BEIT_METHODS:  # the encoder is timm's Beit (relative position bias, layer scale)

        beit_kwargs = timm_beit_kwargs(pcfg)
        if ecfg.img_size is not None and ecfg.img_size != ckpt["img_size"]:
            raise ConfigError(f"encoder.img_size: {ecfg.img_size} differs from the BEiT checkpoint {path} "
                              f"({ckpt['img_size']}); resampling relative position tables is not supported, "
                              "leave encoder.img_size unset")  # fmt: skip
    return EncoderSource(model, enc, f"{path}" + (f" (step {step})" if step is not None else ""), ckpt["img_size"],
                         beit_kwargs)  # fmt: skip


def build_encoder(src: EncoderSource, drop_path_rate: float = 0.0, seed: int = 0) -> VisionTransformer:
    """The encoder module, untrained: with a checkpoint, timm's default init (about to be overwritten);
    without one, the MAE initialisation pretraining starts from (xavier, sin-cos position table), drawn from
    `seed` alone, the global RNG left as it was."""
    m = src.model
    if src.beit_kwargs is not None:
        from timm.models.beit import Beit

        return Beit(**{**src.beit_kwargs, "drop_path_rate": drop_path_rate})
    if src.state is not None:
        return set_layer_norm_eps(create_encoder(m["arch"], m["img_size"], m["patch_size"], drop_path_rate,
                                                 m["embed_dim"], m["depth"], m["num_heads"]),
                                  m.get("layer_norm_eps", 1e-6))  # fmt: skip

    cfg = config_from_dict({"model": {**m, "drop_path_rate": drop_path_rate}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_model(cfg).encoder
    encoder.pos_embed.requires_grad_(True)  # fixed in pretraining only
    return encoder


def load_pretrained(model: VisionTransformer, src: EncoderSource) -> KeyReport:
    """Load the checkpoint's encoder tensors into `model` (a timm ViT, possibly with a classifier head),
    resampling the position embedding if the grid differs, and report what matched."""
    report = KeyReport(src.source)
    if src.state is None:
        report.notes.append("random init: the MAE initialisation (xavier-uniform, fixed 2-D sin-cos pos-embed)")
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
        report.notes.append(f"pos_embed resampled {old}x{old} -> {new[0]}x{new[1]} (timm.layers.resample_abs_pos_embed, bicubic)")
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ConfigError(f"encoder.checkpoint: tensor '{k}' has shape {tuple(v.shape)} in {src.source}, the model "
                              f"needs {tuple(own[k].shape)}")  # fmt: skip
    result = model.load_state_dict(state, strict=False)
    report.missing, report.unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    report.matched = sorted(set(state) - set(result.unexpected_keys))
    return report


def load_encoder(ecfg, seed: int = 0, drop_path_rate: float = 0.0) -> tuple[VisionTransformer, KeyReport]:
    """The encoder of `encoder.checkpoint` (or a random init), with its key report (also logged)."""
    src = encoder_source(ecfg)
    encoder = build_encoder(src, drop_path_rate, seed)
    report = load_pretrained(encoder, src)
    if mdist.world_from_env()[0] == 0:
        log.info("%s", report.text())
    return encoder, report


def feature_blocks(encoder: VisionTransformer, block: int, scan: bool) -> list[int]:
    """0-based block indices to read: every block when scanning, else the one asked (-1 = last)."""
    depth = len(encoder.blocks)
    if block > depth:
        raise ConfigError(f"block {block} does not exist: the encoder has {depth} blocks (1-based; -1 = last)")
    if scan:
        return list(range(depth))
    return [depth - 1 if block == -1 else block - 1]


def feature_dim(encoder: VisionTransformer, pool: str) -> int:
    return encoder.embed_dim * (2 if pool == "cls_mean" else 1)


def encoder_features(encoder: VisionTransformer, imgs: torch.Tensor, indices: list[int], pool: str) -> torch.Tensor:
    """(B, len(indices), D) features: each block's tokens after the encoder's final LayerNorm, pooled."""
    outs = encoder.forward_intermediates(imgs, indices=indices, norm=True, return_prefix_tokens=True,
                                         output_fmt="NLC", intermediates_only=True, stop_early=True)  # fmt: skip
    pooled = []
    for patches, prefix in outs:
        cls, mean = prefix[:, 0], patches.mean(dim=1)
        pooled.append(cls if pool == "cls" else mean if pool == "mean" else torch.cat([cls, mean], dim=-1))
    return torch.stack(pooled, dim=1).float()


# =============================================================================================
# Labelled data


class SubsetImages(Dataset):
    """A fixed subset of an image source (load/describe/targets), in the source's order."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(source.targets)[self.indices]
        self.classes = getattr(source, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.source.load(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.source.describe(int(self.indices[index]))


def subset(source, count: int | None, seed: int = 0):
    """A seeded random subset of `count` images (the same for the same seed), or the source itself."""
    if count is None or count >= len(source):
        return source
    g = np.random.default_rng(seed)
    return SubsetImages(source, np.sort(g.permutation(len(source))[:count]))


def open_labelled_split(path: str, split: str, fmt: str = "auto", root: str = "data", download: bool = False):
    """A labelled image source: `x_{split}` / `y_{split}` of a .npz, the ImageFolder tree path/split, or the split of
    a torchvision dataset (`torchvision:NAME` under `root`). The result has `.targets` (one int per image) and
    `.load(i)` / `.describe(i)` like mimkit.data's sources."""
    if fmt == "auto":
        fmt = ("torchvision" if str(path).startswith("torchvision:")
               else "npz" if str(path).endswith(".npz") else "folder")  # fmt: skip
    if fmt == "torchvision":
        return open_torchvision(path, split, root, download, purpose="labelled")
    if not Path(path).exists():
        raise DataError(f"data.path: {path} does not exist")
    if fmt == "npz":
        source = load_npz(path, split)
        if source.targets is None:
            raise DataError(f"data.path: {path} has x_{split} but no labels y_{split}")
        source.targets = np.asarray(source.targets).astype(np.int64).reshape(-1)
        if len(source.targets) != len(source):
            raise DataError(f"data.path: {path}: y_{split} has {len(source.targets)} labels for {len(source)} images")
        return source
    root = Path(path) / split
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder (expected one ImageFolder tree per split: "
                        f"{Path(path) / 'train'}, {Path(path) / 'val'}, ...)")  # fmt: skip
    source = FolderImages(root)
    if any(t < 0 for t in source.targets):
        raise DataError(f"data.path: {root} has images outside class sub-folders; expected {root}/<class>/<image>")
    source.targets = np.asarray(source.targets, dtype=np.int64)
    return source


@dataclass
class LabelledData:
    train: Any
    val: Any
    num_classes: int


def open_labelled(d, seed: int = 0) -> LabelledData:
    """The train and val splits of `data` (checked before any model is built), subsets applied."""
    train = open_labelled_split(d.path, d.train_split, d.format, d.root, d.download)
    val = open_labelled_split(d.path, d.val_split, d.format, d.root, d.download)
    if getattr(train, "classes", None) and getattr(val, "classes", None) and train.classes != val.classes:
        raise DataError(f"data.path: the class folders of '{d.train_split}' and '{d.val_split}' differ")
    num_classes = max(int(max(train.targets.max(), val.targets.max())) + 1, len(getattr(train, "classes", None) or []))
    if min(train.targets.min(), val.targets.min()) < 0:
        raise DataError(f"data.path: {d.path}: labels must be >= 0, found {int(min(train.targets.min(), val.targets.min()))}")
    unseen = sorted(set(np.unique(val.targets).tolist()) - set(np.unique(train.targets).tolist()))
    if unseen:
        raise DataError(f"data.path: {d.path}: '{d.val_split}' has labels absent from '{d.train_split}': "
                        f"{unseen[:10]} (out of range for a classifier trained on that split)")  # fmt: skip
    return LabelledData(subset(train, d.train_samples, seed), subset(val, d.val_samples, seed + 1), num_classes)


def eval_transform(img_size: int, mean, std, crop_pct: float | None = None) -> v2.Compose:
    """Resize the short side to img_size / crop_pct (bicubic), centre crop img_size, normalise.
    crop_pct None: 0.875 from 128 px up (MAE: 256 -> 224), else 1.0 (small images are used whole)."""
    crop_pct = crop_pct if crop_pct is not None else (0.875 if img_size >= 128 else 1.0)
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(img_size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])  # fmt: skip


def probe_train_transform(img_size: int, d) -> v2.Compose:
    """MAE linear probing: RandomResizedCrop(crop_scale, bicubic) + flip (mimkit.data.pretrain_transform)."""
    return pretrain_transform(img_size, d)


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """torch, numpy and python RNGs seeded from `seed` inside, restored after (timm's RandAugment and
    random erasing draw from python's and numpy's RNGs, v2 transforms from torch's)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class LabelledDataset(Dataset):
    """(image, label) pairs; indexed by an int (evaluation) or by (index, seed) pairs from
    mimkit.data.ResumableBatchSampler, the augmentation then being drawn from the sample's seed alone."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, (tuple, list)) else (item, 0)
        try:
            image = self.source.load(index)
        except CorruptImage as e:
            raise DataError(f"data.path: cannot decode {e}") from None
        with seeded_rngs(seed):
            x = self.transform(image)
        return x, int(self.source.targets[index])


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """This rank's share (every world_size-th image) in order; its own generator: no global RNG is drawn."""
    positions = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=positions, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator())  # fmt: skip


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_shards(t: torch.Tensor, n: int) -> torch.Tensor:
    """Rank r holds items r, r+w, r+2w, ...: put every rank's share back in order (identity for one process)."""
    parts = mdist.all_gather_objects(t.cpu())
    if len(parts) == 1:
        return parts[0]
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


# =============================================================================================
# Feature extraction, cached and resumable


@torch.no_grad()
def extract_features(encoder: VisionTransformer, dataset: Dataset, *, indices: list[int], pool: str, batch_size: int,
                     device: torch.device, precision: str = "fp32", num_workers: int = 0, cache: Path | None = None,
                     meta: dict | None = None, save_every: int = 50, desc: str | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N, len(indices), D) float32 features and (N,) labels of `dataset` (deterministic transform), batched,
    sharded over processes. With `cache`, a finished file whose `meta` matches is reused; an interrupted
    extraction continues from its partial file (one per rank, saved every `save_every` batches)."""
    rank, world = rank_world()
    meta = {**(meta or {}), "indices": list(indices), "pool": pool, "n": len(dataset)}
    if cache is not None and cache.is_file():
        saved = load_checkpoint(cache)
        if saved.get("meta") == meta:
            log.info("features: reusing %s", cache)
            return saved["features"], saved["labels"]
        log.warning("features: %s was made with other settings; extracting again", cache)
    positions = list(range(rank, len(dataset), world))
    partial = cache.with_name(f"{cache.stem}.rank{rank}of{world}.partial.pt") if cache is not None else None
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    done = 0
    if partial is not None and partial.is_file():
        saved = load_checkpoint(partial)
        if saved.get("meta") == meta and saved.get("batch_size") == batch_size:
            feats, labels, done = [saved["features"]], [saved["labels"]], int(saved["done"])
            log.info("features: continuing %s from image %d of %d", partial, done, len(positions))
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=positions[done:], num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())  # fmt: skip
    bar = None
    if desc and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(positions), initial=done, desc=desc, unit="img", dynamic_ncols=True)
    for i, (imgs, y) in enumerate(loader, start=1):
        with autocast_context(device, precision):
            f = encoder_features(encoder, imgs.to(device, non_blocking=True), indices, pool)
        feats.append(f.cpu())
        labels.append(y)
        done += len(y)
        if bar is not None:
            bar.update(len(y))
        if partial is not None and i % save_every == 0 and done < len(positions):
            feats, labels = [torch.cat(feats)], [torch.cat(labels)]
            save_checkpoint(partial, {"meta": meta, "batch_size": batch_size, "done": done, "features": feats[0],
                                      "labels": labels[0]})  # fmt: skip
    if bar is not None:
        bar.close()
    encoder.train(was_training)
    dim = feature_dim(encoder, pool)
    mine_f = torch.cat(feats) if feats else torch.empty(0, len(indices), dim)
    mine_y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
    all_f, all_y = gather_shards(mine_f, len(dataset)), gather_shards(mine_y, len(dataset))
    if cache is not None:
        if rank == 0:
            save_checkpoint(cache, {"meta": meta, "features": all_f, "labels": all_y})
        mdist.barrier()
        if partial is not None:
            partial.unlink(missing_ok=True)
    return all_f, all_y


def cache_meta(ecfg, d, split: str, samples: int | None, img_size: int, seed: int) -> dict:
    """What a feature cache depends on (a changed checkpoint file is detected by size and mtime)."""
    ckpt = Path(ecfg.checkpoint)
    if ckpt.is_dir():  # a sharded checkpoint: its meta.pt is written last, with the folder
        ckpt = ckpt / "meta.pt"
    stamp = [ckpt.stat().st_size, ckpt.stat().st_mtime_ns] if ecfg.checkpoint != "none" and ckpt.is_file() else None
    return {"encoder": {k: v for k, v in asdict(ecfg).items()}, "checkpoint_stamp": stamp, "seed": seed,
            "data": [d.path, d.format, split, samples, list(d.mean), list(d.std), d.crop_pct]
            + ([d.root] if str(d.path).startswith("torchvision:") else []), "img_size": img_size}  # fmt: skip


# =============================================================================================
# Accuracy, metrics files, timing


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k scores, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == targets.unsqueeze(-1)
    return [int(hit[..., : min(k, logits.shape[-1])].any(dim=-1).sum()) for k in ks]


EvalLog = MetricsLog  # JSONL + TensorBoard, with the command's name as the TensorBoard prefix


def write_final_metrics(out_dir: Path, metrics: dict) -> Path:
    path = Path(out_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict  # what metrics.json holds
    metrics_path: Path
    checkpoint: Path | None = None


class Stopwatch:
    def __init__(self, already: float = 0.0):
        self.start, self.already = time.perf_counter(), already

    def total(self) -> float:
        return self.already + time.perf_counter() - self.start


def machine_description(device: torch.device) -> str:
    """'2 x Intel(R) Xeon(R) ... (torch 2.x, 2 threads)' or the GPU's name."""
    import os
    import platform

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} x {name} (torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''})"


def frozen(module: nn.Module) -> nn.Module:
    """No gradients, evaluation mode (dropout / drop path off, norms use running statistics)."""
    module.requires_grad_(False)
    return module.eval()
