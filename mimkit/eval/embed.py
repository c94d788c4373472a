"""`mimkit embed CKPT DATA --out FILE`: features without masking for every image of a folder (ImageFolder tree or
flat), a .npz (x_{split}, labels y_{split} optional) or a torchvision dataset, with the pooling and block of the
evaluation commands (features.pool, features.block) and their encoder (a pretraining or imported checkpoint, or
'none' = the random init of a preset), written with the image identities to .npy / .npz / .parquet.

    from mimkit import embed
    feats = embed("runs/mae/checkpoint-00001000.pt", "my_images/")   # (N, D) float32 numpy array
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch.utils.data import Dataset

from mimkit import distributed as mdist
from mimkit.checkpoint import atomic_write_bytes, atomic_write_text
from mimkit.config import ConfigError
from mimkit.datasets import open_torchvision
from mimkit.eval.common import checkpoint_channels, eval_transform, extract_features
from mimkit.eval.config import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, Pool
from mimkit.eval.encoders import feature_blocks, load_encoder, resolve_pool
from mimkit.extras import MissingExtra, install_hint
from mimkit.sources import CorruptImage, DataError, FolderImages, load_npz

log = logging.getLogger("mimkit")

OUT_SUFFIXES = (".npy", ".npz", ".parquet")
POOLS = ("auto", "cls", "mean", "cls_mean")  # auto: the checkpoint's method's (mean for I-JEPA, else cls)


@dataclass
class Embedding:
    """Features of a set of images: `features` (N, D) float32, `ids` (relative paths, or indices as strings),
    `labels` (N,) int64 or None, `classes` (class names) or None."""

    features: np.ndarray
    ids: list[str]
    labels: np.ndarray | None = None
    classes: list[str] | None = None


class _Images(Dataset):
    """(image, label or -1) with the evaluation transform."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform
        targets = getattr(source, "targets", None)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image = self.source.load(index)
        except CorruptImage as e:
            raise DataError(f"data: cannot decode {e}") from None
        return self.transform(image), int(self.targets[index]) if self.targets is not None else -1


def open_images(data: str, split: str | None = None, root: str = "data", download: bool = False, in_chans: int = 3):
    """(source, ids, labels or None, classes or None) of a folder, a .npz or `torchvision:NAME[:SPLIT]`, read with
    `in_chans` channels."""
    if str(data).startswith("torchvision:"):
        source = open_torchvision(data, split, root, download)
        source.in_chans = in_chans
        ids = [str(i) for i in range(len(source))]
    elif str(data).endswith(".npz"):
        if not Path(data).is_file():
            raise DataError(f"data: {data} does not exist")
        source = load_npz(data, split or "train", in_chans=in_chans)
        ids = [str(i) for i in range(len(source))]
    else:
        folder = Path(data)
        if not folder.is_dir():
            raise DataError(f"data: {data} is not a folder, a .npz or torchvision:NAME[:SPLIT]")
        source = FolderImages(folder, in_chans)
        ids = [p.relative_to(folder).as_posix() for p in source.files]
    targets = getattr(source, "targets", None)
    labels = None if targets is None else np.asarray(targets, dtype=np.int64).reshape(-1)
    if labels is not None and (len(labels) != len(source) or (labels < 0).any()):
        labels = None  # a flat folder, or images outside the class folders: no labels
    classes = list(getattr(source, "classes", None) or []) or None
    return source, ids, labels, classes if labels is not None else None


def check_out(out: str | Path | None) -> Path | None:
    """The output file, its suffix checked (and Parquet's pyarrow) before anything is computed."""
    if out is None:
        return None
    out = Path(out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out: {out} has suffix '{out.suffix}'; use one of {', '.join(OUT_SUFFIXES)}")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise MissingExtra(
                f"--out {out}: Parquet output needs pyarrow: {install_hint('parquet', 'a .npz')}"
            ) from None
    return out


def embed(checkpoint: str, data: str, out: str | Path | None = None, *, pool: str = "auto", block: int = -1,
          split: str | None = None, arch: str | None = None, img_size: int | None = None, batch_size: int = 64,
          device: str = "auto", precision: str = "fp32", mean=IMAGENET_MEAN, std=IMAGENET_STD,
          crop_pct: float | None = None, num_workers: int = 0, root: str = "data", download: bool = False,
          progress: bool = True, seed: int = 0) -> np.ndarray:  # fmt: skip
    """(N, D) float32 features of every image of `data` (see :func:`embed_images`); with `out`, also written there."""
    return embed_images(**{k: v for k, v in locals().items()}).features


def embed_images(checkpoint: str, data: str, out: str | Path | None = None, *, pool: str = "auto", block: int = -1,
                 split: str | None = None, arch: str | None = None, img_size: int | None = None, batch_size: int = 64,
                 device: str = "auto", precision: str = "fp32", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 crop_pct: float | None = None, num_workers: int = 0, root: str = "data", download: bool = False,
                 progress: bool = True, seed: int = 0) -> Embedding:  # fmt: skip
    """Features of `data` by the encoder of `checkpoint` (a mimkit checkpoint, or 'none' with `arch`), pooled
    (`pool`: auto (the checkpoint's method's: mean for I-JEPA, else cls) | cls | mean | cls_mean) at `block` (1-based, -1 = last) after the final LayerNorm, as the evaluation
    commands read them; the evaluation transform (resize, centre crop img_size, normalise by mean / std)."""
    out = check_out(out)
    if pool not in POOLS:
        raise ConfigError(f"features.pool: {pool!r}; allowed: {', '.join(POOLS)}")
    if checkpoint == "none" and arch is None:
        raise ConfigError("encoder.arch: required with checkpoint 'none' (the preset of the random init)")
    # the checkpoint's channels, and its own statistics where mean / std are left at the RGB defaults
    in_chans, mean, std = checkpoint_channels(str(checkpoint), mean, std)
    source, ids, labels, classes = open_images(data, split, root, download, in_chans)  # the data before any model
    encoder, _ = load_encoder(EncoderConfig(checkpoint=str(checkpoint), arch=arch, img_size=img_size), seed=seed)
    pool = resolve_pool(cast(Pool, pool), encoder)  # one of POOLS (checked above)
    dev = mdist.resolve_device(device)
    encoder.to(dev)
    size = int(encoder.patch_embed.img_size[0])
    dataset = _Images(source, eval_transform(size, mean, std, crop_pct))
    feats, _ = extract_features(encoder, dataset, indices=feature_blocks(encoder, block, False), pool=pool,
                                batch_size=batch_size, device=dev, precision=mdist.resolve_precision(precision, dev),
                                num_workers=num_workers, desc="embed" if progress else None)  # fmt: skip
    result = Embedding(feats[:, 0].numpy().astype(np.float32), ids, labels, classes)
    if out is not None:
        write_embedding(result, out)
    return result


def write_embedding(e: Embedding, out: Path) -> list[Path]:
    """.npz: features, ids (+ labels, classes); .npy: the features, the ids beside it in OUT.ids.txt;
    .parquet: one row per image (id, [label], feature)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".npy":
        atomic_write_bytes(out, lambda f: np.save(f, e.features))
        ids = out.with_suffix(".ids.txt")
        atomic_write_text(ids, "".join(f"{i}\n" for i in e.ids))
        return [out, ids]
    if suffix == ".npz":
        arrays: dict[str, Any] = {"features": e.features, "ids": np.asarray(e.ids, dtype=str)}  # savez's keywords
        if e.labels is not None:
            arrays["labels"] = e.labels
        if e.classes is not None:
            arrays["classes"] = np.asarray(e.classes, dtype=str)
        atomic_write_bytes(out, lambda f: np.savez(f, **arrays))
        return [out]
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"id": pa.array(e.ids), "feature": pa.array(list(e.features))}
    if e.labels is not None:
        columns["label"] = pa.array(e.labels)
    meta = {"classes": json.dumps(e.classes)} if e.classes is not None else None
    pq.write_table(pa.table(columns, metadata=meta), str(out))
    return [out]
