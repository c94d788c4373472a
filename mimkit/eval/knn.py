"""`mimkit knn`: cosine-weighted k-NN on frozen encoder features (k = 20, T = 0.07 by default), and
`knn_monitor`, the same measurement as a trend monitor called from a pretraining loop.

The vote (Wu et al. 2018, as in DINO's and solo-learn's k-NN): L2-normalised features, the k most similar
training images by cosine similarity s, each voting for its class with weight exp(s / T).
"""

from __future__ import annotations

import logging
import time
from functools import partial

import torch
import torch.nn.functional as F

from mimkit import distributed as mdist
from mimkit.checkpoint import atomic_write_text
from mimkit.config import active_loggers, to_dict
from mimkit.eval.common import (
    KNN_NOTE,
    EvalLog,
    EvalResult,
    LabelledDataset,
    cache_meta,
    eval_transform,
    extract_features,
    frozen,
    guarded,
    machine_description,
    start_eval_run,
    subset,
    write_final_metrics,
)
from mimkit.eval.config import IMAGENET_MEAN, IMAGENET_STD, KnnConfig, dump_eval_yaml
from mimkit.eval.encoders import feature_blocks, load_encoder, resolve_pool
from mimkit.models import Encoder
from mimkit.version import __version__

log = logging.getLogger("mimkit")


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:  # fmt: skip
    """(N_test, C) class scores: for each test feature, the sum over its k nearest training features (cosine)
    of exp(similarity / temperature), per class. Batched over test chunks of `chunk_size`."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    scores = torch.zeros(len(test), num_classes, dtype=torch.float32, device=test.device)
    for lo in range(0, len(test), chunk_size):
        sim = test[lo : lo + chunk_size] @ train.T  # (chunk, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores[lo : lo + chunk_size].scatter_add_(1, train_labels[top_idx], weights)
    return scores


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk_size: int = 1024) -> dict:  # fmt: skip
    """Top-1 / top-5 accuracy (%) of the weighted k-NN vote."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels.view(-1, 1)
    n = max(len(test_labels), 1)
    return {"top1": 100.0 * float(hit[:, 0].sum()) / n, "top5": 100.0 * float(hit.any(dim=1).sum()) / n}


# ---------------------------------------------------------------- the monitor


def knn_monitor(
    encoder: Encoder,
    train_source,
    val_source,
    *,
    img_size: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    crop_pct: float | None = None,
    pool: str = "cls",
    block: int = -1,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    max_train: int | None = 10000,
    max_val: int | None = 2000,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    num_workers: int = 0,
    seed: int = 0,
) -> dict:
    """k-NN top-1 / top-5 of `encoder` (all tokens visible), for logging every N epochs during pretraining.

    A trend monitor: MIM features score low on k-NN whatever their fine-tuning quality (`knn_note`).
    `train_source` / `val_source` are labelled sources (``open_labelled_split(path, split)``, or
    mimkit.data sources with ``.targets``); fixed seeded subsets of `max_train` / `max_val` images keep it
    cheap and comparable across epochs. The encoder's train/eval mode is restored, no gradient is taken,
    and no global RNG is drawn (an exactly-resumable loop stays exact). Under torch.distributed, call it on
    every process: the images are shared out and the features gathered."""
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    img_size = img_size or encoder.patch_embed.img_size[0]
    transform = eval_transform(img_size, mean, std, crop_pct)
    train, val = subset(train_source, max_train, seed), subset(val_source, max_val, seed + 1)
    indices = [len(encoder.blocks) - 1 if block == -1 else block - 1]
    num_classes = int(max(max(train.targets), max(val.targets))) + 1
    extract = partial(extract_features, encoder, indices=indices, pool=pool, batch_size=batch_size, device=device,
                      precision=precision, num_workers=num_workers)  # fmt: skip
    was_training = encoder.training
    try:
        f_train, y_train = extract(LabelledDataset(train, transform))
        f_val, y_val = extract(LabelledDataset(val, transform))
    finally:
        encoder.train(was_training)
    acc = knn_accuracy(f_train[:, 0].to(device), y_train.to(device), f_val[:, 0].to(device), y_val.to(device),
                       num_classes, k, temperature)  # fmt: skip
    return {"knn_top1": acc["top1"], "knn_top5": acc["top5"], "knn_k": k, "knn_train_images": len(train),
            "knn_val_images": len(val), "knn_seconds": round(time.perf_counter() - start, 2),
            "knn_note": "trend monitor"}  # fmt: skip


# ---------------------------------------------------------------- mimkit knn


@guarded
def run_knn(cfg: KnnConfig) -> EvalResult:
    """Extract (or reuse) train and val features, vote, write metrics. Resuming = the feature caches in
    train.out_dir (run.out_dir): finished ones are reused, an interrupted extraction continues where it stopped."""
    r = cfg.train
    clock, dist, precision, out_dir, data = start_eval_run(cfg, r)
    device = dist.device
    encoder, report = load_encoder(cfg.encoder, r.seed)
    cfg.features.pool = resolve_pool(cfg.features.pool, encoder)  # auto: the checkpoint's method's
    frozen(encoder).to(device)
    img_size = encoder.patch_embed.img_size[0]
    indices = feature_blocks(encoder, cfg.features.block, scan=False)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_eval_yaml(cfg))
        log.info("mimkit %s | knn | %s | block %d, %s features | k %d, T %g | %d train / %d val images, %d classes | %s",
                 __version__, cfg.encoder.checkpoint, indices[0] + 1, cfg.features.pool, cfg.knn.k,
                 cfg.knn.temperature, len(data.train), len(data.val), data.num_classes, device)  # fmt: skip
        log.info("note: %s", KNN_NOTE)
    mdist.barrier()
    transform = eval_transform(img_size, cfg.data.mean, cfg.data.std, cfg.data.crop_pct)
    extract = partial(extract_features, encoder, indices=indices, pool=cfg.features.pool, batch_size=r.batch_size,
                      device=device, precision=precision, num_workers=cfg.data.num_workers,
                      save_every=r.save_every_batches)  # fmt: skip
    feats = {}
    for name, split, source, count in (("train", cfg.data.train_split, data.train, cfg.data.train_samples),
                                       ("val", cfg.data.val_split, data.val, cfg.data.val_samples)):  # fmt: skip
        cache = out_dir / f"features-{name}.pt"
        if r.resume == "none" and dist.is_main:
            for stale in [cache, *out_dir.glob(f"features-{name}.rank*.partial.pt")]:
                stale.unlink(missing_ok=True)
        mdist.barrier()
        meta = cache_meta(cfg.encoder, cfg.data, split, count, img_size, r.seed)
        feats[name] = extract(LabelledDataset(source, transform), cache=cache, meta=meta,
                              desc=f"features ({name})" if r.progress else None)  # fmt: skip
    (f_train, y_train), (f_val, y_val) = feats["train"], feats["val"]
    acc = knn_accuracy(f_train[:, 0].to(device), y_train.to(device), f_val[:, 0].to(device), y_val.to(device),
                       data.num_classes, cfg.knn.k, cfg.knn.temperature, cfg.knn.chunk_size)  # fmt: skip
    metrics = {
        "command": "knn", "top1": acc["top1"], "top5": acc["top5"], "k": cfg.knn.k, "temperature": cfg.knn.temperature,
        "pool": cfg.features.pool, "block": indices[0] + 1, "feature_dim": int(f_train.shape[-1]),
        "encoder": cfg.encoder.checkpoint, "key_report": report.to_dict(), "train_images": len(data.train),
        "val_images": len(data.val), "num_classes": data.num_classes, "epochs": 0,
        "wall_clock_s": round(clock.total(), 2), "machine": machine_description(device), "note": KNN_NOTE,
        "mimkit_version": __version__,
    }  # fmt: skip
    path = out_dir / "metrics.json"
    if dist.is_main:
        mlog = EvalLog(out_dir, True, active_loggers(r), "knn", config=to_dict(cfg))
        mlog.write({"step": 0, "knn_top1": acc["top1"], "knn_top5": acc["top5"], "time": time.time()})
        mlog.close()
        path = write_final_metrics(out_dir, metrics)
        log.info("k-NN (k=%d, T=%g): top-1 %.2f%%, top-5 %.2f%% (%d val images)", cfg.knn.k, cfg.knn.temperature,
                 acc["top1"], acc["top5"], len(data.val))  # fmt: skip
    mdist.barrier()
    return EvalResult(out_dir, metrics, path)
