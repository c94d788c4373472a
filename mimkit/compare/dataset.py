"""The study's data: a labelled .npz, an ImageFolder pair of trees, or two folders; its shape, class count and
channel statistics (cached in the study folder), seeded subsets for smoke runs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

from mimkit.checkpoint import atomic_write_text
from mimkit.compare.spec import SpecError
from mimkit.sources import FolderImages


@dataclass
class DataInfo:
    kind: str  # npz | folder
    pretrain_path: str  # data.path of pretraining and of the tokenizer
    eval_path: str  # data.path of the evaluations, with train_split / val_split
    train_split: str
    val_split: str
    image_size: int  # side of the training images (the median short side for a folder)
    num_train: int
    num_test: int
    num_classes: int
    mean: list[float]
    std: list[float]


def choose_patch(image_size: int) -> tuple[int, int]:
    """(patch, model img_size): the smallest patch of 4, 8, 16, 32 whose grid has at most 14 tokens a side (CIFAR
    32 px -> 4, 8 x 8 tokens; 96 px -> 8; 224 px -> 16, 14 x 14), 2 below 16 px; img_size a multiple of it."""
    patch = 2 if image_size < 16 else next((p for p in (4, 8, 16) if image_size // p <= 14), 32)
    return patch, image_size // patch * patch


def _channel_stats(chunks) -> tuple[list[float], list[float]]:
    """Per-channel mean / std in [0, 1] over uint8 (..., C) arrays (grey replicated to RGB, alpha dropped)."""
    total, squares, n = np.zeros(3), np.zeros(3), 0
    for chunk in chunks:
        c = (chunk[..., [0, 0, 0]] if chunk.shape[-1] == 1 else chunk[..., :3]).reshape(-1, 3).astype(np.float64) / 255
        total, squares, n = total + c.sum(0), squares + (c * c).sum(0), n + len(c)
    mean = total / n
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in np.sqrt(squares / n - mean * mean)]


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: two processes of a study may write the same file


def inspect_data(paths: list[str], work: Path, train_samples: int | None, test_samples: int | None) -> DataInfo:
    """Shape, class count and channel statistics of the labelled data; seeded subsets are written under `work`."""
    g = np.random.default_rng(0)
    if len(paths) == 1 and paths[0].endswith(".npz"):
        path = paths[0]
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise SpecError(f"--data {path}: no {', '.join(missing)} (a labelled .npz holds x_train, y_train, "
                                f"x_test, y_test; found {', '.join(z.files)})")  # fmt: skip
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        for split, count in (("train", train_samples), ("test", test_samples)):
            if count is not None and count < len(arrays[f"x_{split}"]):
                keep = np.sort(g.permutation(len(arrays[f"x_{split}"]))[:count])
                arrays[f"x_{split}"], arrays[f"y_{split}"] = arrays[f"x_{split}"][keep], arrays[f"y_{split}"][keep]
        if train_samples is not None or test_samples is not None:
            path = str(work / "data" / f"subset-{train_samples}-{test_samples}.npz")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _write_npz(Path(path), **arrays)
        x = arrays["x_train"]
        sample = x[np.sort(g.permutation(len(x))[:10000])]
        mean, std = _channel_stats(np.array_split(sample, max(1, len(sample) // 1000)))
        classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
        return DataInfo("npz", path, path, "train", "test", min(x.shape[1:3]), len(x), len(arrays["x_test"]), classes,
                        mean, std)  # fmt: skip
    if train_samples is not None or test_samples is not None:
        raise SpecError("--train-samples / --test-samples: subsets are made of .npz data only")
    if len(paths) == 1:
        root = Path(paths[0])
        val = next((s for s in ("val", "test") if (root / s).is_dir()), None)
        if not (root / "train").is_dir() or val is None:
            raise SpecError(f"--data {root}: expected a labelled .npz, a folder with train/ and val/ (or test/) "
                            "ImageFolder trees, or two folders TRAIN VAL")  # fmt: skip
    elif len(paths) == 2:  # the evaluations read <root>/<split>: a folder of two links
        root, val = work / "data" / "folders", "val"
        root.mkdir(parents=True, exist_ok=True)
        for name, target in (("train", paths[0]), ("val", paths[1])):
            link = root / name
            if link.is_symlink() and link.resolve() != Path(target).resolve():
                link.unlink()
            if not link.is_symlink():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)
    else:
        raise SpecError("--data: one .npz, one folder, or two folders (TRAIN VAL)")
    train, test = FolderImages(root / "train"), FolderImages(root / val)
    picked = [cast(Image.Image, train.load(int(i))) for i in g.permutation(len(train))[:500]]  # RGB: PIL images
    sizes = sorted(min(img.size) for img in picked)
    mean, std = _channel_stats(np.asarray(img.convert("RGB")) for img in picked)
    return DataInfo("folder", str(root / "train"), str(root), "train", val, sizes[len(sizes) // 2], len(train),
                    len(test), len(train.classes), mean, std)  # fmt: skip


def data_info(paths, work: Path, train_samples, test_samples) -> DataInfo:
    """inspect_data, kept in work/data.json for as long as the data files and subset sizes are the same."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SpecError(f"--data {missing[0]}: no such file or folder")
    stamp = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths] + [train_samples, test_samples]
    cache = work / "data.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["stamp"] == stamp and Path(saved["info"]["pretrain_path"]).exists():
            return DataInfo(**saved["info"])
    info = inspect_data(paths, work, train_samples, test_samples)
    atomic_write_text(cache, json.dumps({"stamp": stamp, "info": asdict(info)}, indent=1) + "\n")
    return info
