"""What the three evaluation commands share besides the encoder (mimkit.eval.encoders): labelled data,
transforms, resumable feature extraction, accuracy and metrics files.

Image sources are mimkit.data's, training batches come from mimkit.data.ResumableBatchSampler (resumable,
rank-aware, one seed per sample), cached features are read weights-only, processes are mimkit.distributed's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mimkit import distributed as mdist
from mimkit.checkpoint import (
    CheckpointError,
    atomic_write_text,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    resume_point,
    save_checkpoint,
)
from mimkit.data import pretrain_transform
from mimkit.datasets import open_torchvision
from mimkit.engine import autocast_context, seed_everything
from mimkit.eval.encoders import encoder_features, feature_dim
from mimkit.logs import progress_bar
from mimkit.loop import Hook
from mimkit.machine import cpu_model
from mimkit.metrics import MetricsLog
from mimkit.models import Encoder
from mimkit.runs import GracefulStop, RunLock, RunStopped
from mimkit.sources import CorruptImage, DataError, FolderImages, check_channels, load_npz

log = logging.getLogger("mimkit")

KNN_NOTE = ("k-NN on masked-image-modeling features is a trend monitor, not a quality measure: MIM features "
            "score low on k-NN (MAE ViT-B/16, 100 epochs: k-NN 11.2% vs linear 46.0%, fine-tune 81.3%)")  # fmt: skip


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


def open_labelled_split(path: str, split: str, fmt: str = "auto", root: str = "data", download: bool = False,
                        split_key: str | None = None, in_chans: int = 3):  # fmt: skip
    """A labelled image source: `x_{split}` / `y_{split}` of a .npz, the ImageFolder tree path/split, or the split of
    a torchvision dataset (`torchvision:NAME` under `root`). The result has `.targets` (one int per image) and
    `.load(i)` / `.describe(i)` like mimkit.data's sources. `split_key`: the config key that chose `split`, named
    when the split is missing."""
    try:
        return _open_labelled_split(path, split, fmt, root, download, in_chans)
    except DataError as e:
        text = str(e)
        missing = f"'x_{split}'" in text or "is not a folder" in text or f"split '{split}'" in text
        if split_key is None or not missing:
            raise
        raise DataError(f"{text}; {split_key} is '{split}': set it to a split the data has") from None


def _open_labelled_split(path: str, split: str, fmt: str, root: str, download: bool, in_chans: int = 3):
    if fmt == "auto":
        fmt = ("torchvision" if str(path).startswith("torchvision:")
               else "npz" if str(path).endswith(".npz") else "folder")  # fmt: skip
    if fmt == "torchvision":
        source = open_torchvision(path, split, root, download, purpose="labelled")
        source.in_chans = in_chans
        return source
    if not Path(path).exists():
        raise DataError(f"data.path: {path} does not exist")
    if fmt == "npz":
        source = load_npz(path, split, in_chans=in_chans)
        if source.targets is None:
            raise DataError(f"data.path: {path} has x_{split} but no labels y_{split}")
        source.targets = np.asarray(source.targets).astype(np.int64).reshape(-1)
        if len(source.targets) != len(source):
            raise DataError(f"data.path: {path}: y_{split} has {len(source.targets)} labels for {len(source)} images")
        return source
    folder = Path(path) / split
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder (expected one ImageFolder tree per split: "
                        f"{Path(path) / 'train'}, {Path(path) / 'val'}, ...)")  # fmt: skip
    source = FolderImages(folder, in_chans)
    if any(t < 0 for t in source.targets):
        raise DataError(f"data.path: {folder} has images outside class sub-folders; expected {folder}/<class>/<image>")
    source.targets = np.asarray(source.targets, dtype=np.int64)
    return source


class RunStart(NamedTuple):
    clock: Stopwatch
    dist: mdist.DistInfo
    precision: str
    out_dir: Path
    data: LabelledData


def start_eval_run(cfg, run) -> RunStart:
    """What every evaluation command does first: the clock, the processes, the precision, the seed, then the
    labelled data, opened and checked before any model is built. `run` is the command's run section."""
    clock = Stopwatch()
    dist = mdist.init_distributed(run.device)
    precision = mdist.resolve_precision(run.precision, dist.device)
    seed_everything(run.seed)
    checkpoint = getattr(getattr(cfg, "encoder", None), "checkpoint", "none")
    in_chans, cfg.data.mean, cfg.data.std = checkpoint_channels(checkpoint, cfg.data.mean, cfg.data.std,
                                                                fine_tuning=hasattr(cfg, "aug"))  # fmt: skip
    return RunStart(clock, dist, precision, Path(run.out_dir), open_labelled(cfg.data, run.seed, in_chans))


def checkpoint_channels(path, mean, std, fine_tuning: bool = False) -> tuple[int, tuple, tuple]:
    """(channels, mean, std) of the evaluated checkpoint's encoder (its model.in_chans; 3 without a checkpoint). For
    a C-channel checkpoint other than 3, a mean / std of another length (the RGB defaults) becomes the checkpoint's
    own statistics, the ones it was pretrained with."""
    if path in (None, "none") or not Path(path).exists():
        return 3, mean, std
    beside = Path(path).parent / "config.yaml"  # the run's config: an RGB run's checkpoint is not read twice
    try:
        run_config = yaml.safe_load(beside.read_text()) if Path(path).is_file() and beside.is_file() else None
    except (OSError, yaml.YAMLError):
        run_config = None
    if isinstance(run_config, dict) and isinstance(run_config.get("model"), dict) \
            and run_config["model"].get("in_chans", 3) == 3:  # fmt: skip
        return 3, mean, std
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return 3, mean, std  # the encoder loader names the problem
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        return 3, mean, std
    in_chans = int((saved.get("model") or {}).get("in_chans", 3))
    if in_chans not in (1, 3) and fine_tuning:  # fine-tuning: timm's training transform (RandAugment, PIL)
        raise DataError(f"encoder.checkpoint: {path} reads {in_chans} channels; fine-tuning augments with timm's "
                        "PIL-based training transform (1 or 3 channels); evaluate it with mimkit linprobe or mimkit knn")  # fmt: skip
    if in_chans != 3:
        stats, trained = {"mean": mean, "std": std}, saved.get("data") or {}
        for key, given in stats.items():
            if len(given) != in_chans:
                value = trained.get(key)
                if not isinstance(value, (list, tuple)) or len(value) != in_chans:
                    raise DataError(f"data.{key}: {len(given)} values but the checkpoint {path} reads "
                                    f"{in_chans} channels; give {in_chans} values")  # fmt: skip
                stats[key] = tuple(float(v) for v in value)
        mean, std = stats["mean"], stats["std"]
        log.info("%s reads %d channel(s): data.mean %s, data.std %s", path, in_chans, list(mean), list(std))
    return in_chans, mean, std


@dataclass
class LabelledData:
    train: Any
    val: Any
    num_classes: int


def open_labelled(d, seed: int = 0, in_chans: int = 3) -> LabelledData:
    """The train and val splits of `data` (checked before any model is built), subsets applied. `in_chans`: the
    encoder's image channels (3: RGB)."""
    train = open_labelled_split(d.path, d.train_split, d.format, d.root, d.download, split_key="data.train_split",
                                in_chans=in_chans)  # fmt: skip
    val = open_labelled_split(d.path, d.val_split, d.format, d.root, d.download, split_key="data.val_split",
                              in_chans=in_chans)  # fmt: skip
    if in_chans != 3:
        check_channels(train, in_chans)
    if getattr(train, "classes", None) and getattr(val, "classes", None) and train.classes != val.classes:
        raise DataError(f"data.path: the class folders of '{d.train_split}' and '{d.val_split}' differ")
    num_classes = max(int(max(train.targets.max(), val.targets.max())) + 1, len(getattr(train, "classes", None) or []))
    if min(train.targets.min(), val.targets.min()) < 0:
        raise DataError(
            f"data.path: {d.path}: labels must be >= 0, found {int(min(train.targets.min(), val.targets.min()))}"
        )
    unseen = sorted(set(np.unique(val.targets).tolist()) - set(np.unique(train.targets).tolist()))
    if unseen:
        raise DataError(f"data.path: {d.path}: '{d.val_split}' has labels absent from '{d.train_split}': "
                        f"{unseen[:10]} (out of range for a classifier trained on that split)")  # fmt: skip
    return LabelledData(subset(train, d.train_samples, seed), subset(val, d.val_samples, seed + 1), num_classes)


def too_few_images_remedy(d) -> str:
    """What to change when the train split cannot fill one optimizer step (the evaluation commands have no
    data.repeats, which pretraining's message names)."""
    more = (f"raise data.train_samples (now {d.train_samples}) or remove it" if d.train_samples is not None
            else f"give data.train_split ('{d.train_split}') more images")  # fmt: skip
    return f"lower train.batch_size or train.accum_steps, or {more}"


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
    positions = list(range(rank, len(cast(Sized, dataset)), world_size))  # map-style: it has a length
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
def extract_features(encoder: Encoder, dataset: Dataset, *, indices: list[int], pool: str, batch_size: int,
                     device: torch.device, precision: str = "fp32", num_workers: int = 0, cache: Path | None = None,
                     meta: dict | None = None, save_every: int = 50, desc: str | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N, len(indices), D) float32 features and (N,) labels of `dataset` (deterministic transform), batched,
    sharded over processes. With `cache`, a finished file whose `meta` matches is reused; an interrupted
    extraction continues from its partial file (one per rank, saved every `save_every` batches)."""
    rank, world = rank_world()
    n = len(cast(Sized, dataset))  # map-style (torch's Dataset declares no __len__)
    meta = {**(meta or {}), "indices": list(indices), "pool": pool, "n": n}
    if cache is not None and cache.is_file():
        saved = load_checkpoint(cache)
        if saved.get("meta") == meta:
            log.info("features: reusing %s", cache)
            return saved["features"], saved["labels"]
        log.warning("features: %s was made with other settings; extracting again", cache)
    positions = list(range(rank, n, world))
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
        bar = progress_bar(total=len(positions), initial=done, desc=desc, unit="img", dynamic_ncols=True)
    for i, (imgs, y) in enumerate(loader, start=1):
        signalled = GracefulStop.requested_now()
        if signalled is not None and done < len(positions):
            if partial is not None and feats:
                save_checkpoint(partial, {"meta": meta, "batch_size": batch_size, "done": done,
                                          "features": torch.cat(feats), "labels": torch.cat(labels)})  # fmt: skip
            if bar is not None:
                bar.close()
            kept = f"; {done} of {len(positions)} images kept in {partial}" if partial is not None else ""
            raise RunStopped(f"stopped by {signalled} during feature extraction{kept}; run the same command to go on",
                             signal_name=signalled, step=0, checkpoint=partial)  # fmt: skip
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
    all_f, all_y = gather_shards(mine_f, n), gather_shards(mine_y, n)
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


def resume_eval_run(train, command: str, setting: dict[str, Any]) -> tuple[Path | None, dict | None]:
    """The checkpoint `train.resume` names in `train.out_dir` (auto: the newest) and its state, or (None, None).
    A checkpoint of another command or with other `setting` values (steps per epoch, probed blocks, ...) cannot
    continue this run exactly and is refused."""
    resume_from, state = resume_point(train.out_dir, train.resume)
    if resume_from is not None:
        assert state is not None  # resume_point reads the state of the checkpoint it names
        differ = [k for k, v in {"command": command, **setting}.items() if state.get(k) != v]
        if differ:
            raise CheckpointError(f"cannot resume {resume_from} exactly: it is not a {command} checkpoint of this "
                                  f"setting ({', '.join(differ)} differ: data, batch size, processes or accum_steps)")  # fmt: skip
    return resume_from, state


def guarded(run_command):
    """An evaluation command (`run_knn(cfg)`, ...) with one writer per output folder (rank 0 holds its lock) and a
    graceful stop: SIGTERM / SIGINT / SIGUSR1 finish the step, write a checkpoint and raise RunStopped."""

    @functools.wraps(run_command)
    def run(cfg):
        with contextlib.ExitStack() as stack:
            stack.enter_context(GracefulStop())
            if mdist.world_from_env()[0] == 0:
                stack.enter_context(RunLock(cfg.train.out_dir, key="train.out_dir"))
            return run_command(cfg)

    return run


def evaluation_hook(every: int, evaluate, evals: list, metrics: MetricsLog, describe, is_main: bool) -> Hook:
    """The evaluation of a fine-tuning or probing loop, every `every` epochs and at the last step, before the
    checkpoint (which holds `evals`): `evaluate(done)` gives the record, appended to `evals` and the metrics log,
    and `describe(record)` its log line."""

    def run(done: int) -> None:
        record = evaluate(done)
        evals.append(record)
        metrics.write({**record, "time": time.time()})
        if is_main:
            log.info("%s", describe(record))

    return Hook(every, run, before_save=True, at_last_step=True)


def save_eval_checkpoint(out_dir: Path, done: int, keep_last: int, state: dict) -> Path:
    """Write step `done`'s state atomically, then keep only the newest `keep_last` checkpoints."""
    path = save_checkpoint(checkpoint_path(out_dir, done), state)
    prune_checkpoints(out_dir, keep_last)
    return path


def write_final_metrics(out_dir: Path, metrics: dict) -> Path:
    path = Path(out_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


def finish_eval(out_dir: Path, summary: dict, checkpoint: Path | None, is_main: bool) -> EvalResult:
    """metrics.json written by rank 0, every rank waited for: the command's result."""
    path = out_dir / "metrics.json"
    if is_main:
        path = write_final_metrics(out_dir, summary)
    mdist.barrier()
    return EvalResult(out_dir, summary, path, checkpoint)


@dataclass
class EvalResult:
    """What `mimkit.eval.evaluate` returns: `out_dir` (the evaluation's folder), `metrics` (what metrics.json holds:
    top1, top5, ...), `metrics_path` (that file) and `checkpoint` (the last checkpoint of a training evaluation)."""

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

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return (
        f"{os.cpu_count()} x {cpu_model()} (torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''})"
    )


def frozen(module: nn.Module) -> nn.Module:
    """No gradients, evaluation mode (dropout / drop path off, norms use running statistics)."""
    module.requires_grad_(False)
    return module.eval()
