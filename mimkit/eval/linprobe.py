"""`mimkit linprobe`: linear probing of a frozen encoder, the MAE protocol.

The encoder is frozen (no gradient) and stays in eval mode; the head is BatchNorm1d(affine=False, eps 1e-6)
+ Linear (trunc_normal 0.01), trained with LARS (timm's; trust ratio on the weight matrix, none on the bias,
MAE's setting), SGD or AdamW, linear warmup then cosine (per iteration), lr = blr x effective batch / 256.

Two modes: `augment` (MAE: RandomResizedCrop + flip through the encoder every epoch) and `cached` (the fast
path: the features are extracted once, without augmentation, and the head trains on them). With
`probe.scan_blocks` one head per block trains simultaneously from a single encoder pass, and the best block
is reported (BEiT, BootMAE). Validation features are always extracted once (the encoder is fixed).

Resume is exact: the head, the optimizer and the step are checkpointed; batches come from
mimkit.data.ResumableBatchSampler and augmentations from per-sample seeds.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn
from torch.utils.data import DataLoader

from mimkit import distributed as mdist
from mimkit.config import active_loggers, to_dict
from mimkit.data import ResumableBatchSampler
from mimkit.engine import StepEngine, autocast_context
from mimkit.eval.common import (
    EvalLog,
    EvalResult,
    LabelledDataset,
    cache_meta,
    eval_transform,
    evaluation_hook,
    extract_features,
    finish_eval,
    frozen,
    guarded,
    machine_description,
    probe_train_transform,
    resume_eval_run,
    save_eval_checkpoint,
    start_eval_run,
    too_few_images_remedy,
    topk_correct,
)
from mimkit.eval.config import LinprobeConfig, dump_eval_yaml
from mimkit.eval.encoders import encoder_features, feature_blocks, feature_dim, load_encoder, resolve_pool
from mimkit.eval.knn import knn_accuracy
from mimkit.loop import TrainLoop, prepare_run_folder
from mimkit.schedules import lr_at
from mimkit.version import __version__

log = logging.getLogger("mimkit")


class ProbeHeads(nn.Module):
    """One BatchNorm1d(affine=False) + Linear per probed block; (B, H, D) features -> (B, H, C) logits."""

    def __init__(self, num_heads: int, dim: int, num_classes: int, init_std: float = 0.01):
        super().__init__()
        linears = [nn.Linear(dim, num_classes) for _ in range(num_heads)]
        self.heads = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear) for linear in linears
        )
        for linear in linears:
            trunc_normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(feats[:, i]) for i, head in enumerate(self.heads)], dim=1)


def probe_optimizer(heads: nn.Module, o, lr: float) -> torch.optim.Optimizer:
    """Weight matrices get weight decay (and, for LARS, the trust-ratio adaptation); biases neither."""
    weights = [p for p in heads.parameters() if p.ndim > 1]
    biases = [p for p in heads.parameters() if p.ndim <= 1]
    if o.name == "lars":
        groups = [{"params": weights, "weight_decay": o.weight_decay, "always_adapt": True},
                  {"params": biases, "weight_decay": 0.0, "always_adapt": False}]  # fmt: skip
        return Lars(groups, lr=lr, momentum=o.momentum, trust_coeff=o.trust_coeff)
    groups = [{"params": weights, "weight_decay": o.weight_decay}, {"params": biases, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas)


@torch.no_grad()
def probe_accuracy(heads: nn.Module, feats: torch.Tensor, labels: torch.Tensor, device: torch.device,
                   chunk: int = 4096) -> list[dict]:  # fmt: skip
    """Top-1 / top-5 (%) of every head on (N, H, D) features."""
    was_training = heads.training
    heads.eval()
    hits = torch.zeros(feats.shape[1], 2, dtype=torch.int64)
    for lo in range(0, len(feats), chunk):
        logits = heads(feats[lo : lo + chunk].to(device)).float().cpu()
        y = labels[lo : lo + chunk]
        for h in range(logits.shape[1]):
            hits[h] += torch.tensor(topk_correct(logits[:, h], y))
    heads.train(was_training)
    n = max(len(labels), 1)
    return [{"top1": 100.0 * int(a) / n, "top5": 100.0 * int(b) / n} for a, b in hits.tolist()]


@dataclass
class ProbeData:
    """The probe's features and batches: val features always (the encoder is fixed), train features in cached mode
    (`loader` None) or augmented images through the encoder (`loader`), the sampler of both, and the k-NN record of
    the cached features."""

    f_val: torch.Tensor
    y_val: torch.Tensor
    sampler: ResumableBatchSampler
    f_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None
    loader: DataLoader | None = None
    knn: dict = field(default_factory=dict)


def probe_data(cfg: LinprobeConfig, encoder, data, indices: list[int], conf: int, dist, precision: str,
               out_dir: Path) -> ProbeData:  # fmt: skip
    """Extract (or reuse the caches of) the val features, and the train features in cached mode; the train sampler."""
    t, p, device = cfg.train, cfg.probe, dist.device
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    mdist.barrier()
    img_size = encoder.patch_embed.img_size[0]
    blocks = [i + 1 for i in indices]
    extract = dict(indices=indices, pool=p.pool, batch_size=t.batch_size, device=device, precision=precision,
                   num_workers=cfg.data.num_workers)  # fmt: skip
    plain = eval_transform(img_size, cfg.data.mean, cfg.data.std, cfg.data.crop_pct)
    f_val, y_val = extract_features(
        encoder, LabelledDataset(data.val, plain), cache=out_dir / "features-val.pt",
        meta=cache_meta(cfg.encoder, cfg.data, cfg.data.val_split, cfg.data.val_samples, img_size, t.seed),
        desc="features (val)" if t.progress else None, **extract,
    )  # fmt: skip
    # cached features: the remainder of an epoch is a last, smaller step (no image left out every epoch)
    sampler = ResumableBatchSampler(len(data.train), t.batch_size, t.accum_steps, dist.rank, dist.world_size, t.seed,
                                    keep_partial=p.mode == "cached", remedy=too_few_images_remedy(cfg.data))  # fmt: skip
    if p.mode != "cached":
        workers = cfg.data.num_workers
        loader = DataLoader(LabelledDataset(data.train, probe_train_transform(img_size, cfg.data)), batch_sampler=sampler,
                            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                            generator=torch.Generator())  # fmt: skip
        return ProbeData(f_val, y_val, sampler, loader=loader)
    f_train, y_train = extract_features(
        encoder, LabelledDataset(data.train, plain), cache=out_dir / "features-train.pt",
        meta=cache_meta(cfg.encoder, cfg.data, cfg.data.train_split, cfg.data.train_samples, img_size, t.seed),
        desc="features (train)" if t.progress else None, **extract,
    )  # fmt: skip
    knn = {}
    if p.knn_k:  # the same features as `mimkit knn` would extract for this block: no second pass over the images
        acc = knn_accuracy(f_train[:, conf], y_train, f_val[:, conf], y_val, data.num_classes, p.knn_k,
                           p.knn_temperature)  # fmt: skip
        knn = {"knn_top1": acc["top1"], "knn_top5": acc["top5"], "knn_k": p.knn_k, "knn_block": blocks[conf]}
        if dist.is_main:
            log.info("k-NN on the cached features (k=%d, T=%g, block %d): top-1 %.2f%%", p.knn_k,
                     p.knn_temperature, blocks[conf], acc["top1"])  # fmt: skip
    return ProbeData(f_val, y_val, sampler, f_train, y_train, knn=knn)


def resume_probe(t, heads, engine: StepEngine, clock, expected: dict) -> tuple[Path | None, int, list]:
    """(checkpoint, step, evaluations so far) of a resumed probe, its heads, optimizer and counters loaded;
    (None, 0, []) for a new one."""
    resume_from, state = resume_eval_run(t, "linprobe", expected)
    if resume_from is None:
        return None, 0, []
    assert state is not None  # read with the checkpoint
    heads.load_state_dict(state["heads"])
    engine.optimizer.load_state_dict(state["optimizer"])
    clock.already, engine.nonfinite_total = state["elapsed_s"], state["nonfinite_steps"]
    return resume_from, state["step"], state["evals"]


def evaluate_probe(heads: nn.Module, pd, device: torch.device, blocks: list[int], conf: int, steps_per_epoch: int,
                   done: int) -> dict:  # fmt: skip
    """The evaluation record at step `done`: every head's top-1 / top-5, the configured block's and the best."""
    accs = probe_accuracy(heads, pd.f_val, pd.y_val, device)
    best = max(range(len(accs)), key=lambda h: accs[h]["top1"])
    return {"step": done, "epoch": round(done / steps_per_epoch, 4), "top1": accs[conf]["top1"],
            "top5": accs[conf]["top5"], "best_block": blocks[best], "best_top1": accs[best]["top1"],
            "per_block_top1": {str(b): a["top1"] for b, a in zip(blocks, accs)},
            "per_block_top5": {str(b): a["top5"] for b, a in zip(blocks, accs)}}  # fmt: skip


@guarded
def run_linprobe(cfg: LinprobeConfig) -> EvalResult:
    # ---- setup: processes, data (checked first), frozen encoder, heads, features
    t, o, p = cfg.train, cfg.optim, cfg.probe
    clock, dist, precision, out_dir, data = start_eval_run(cfg, t)
    device = dist.device
    encoder, report = load_encoder(cfg.encoder, t.seed)
    p.pool = resolve_pool(p.pool, encoder)  # auto: the checkpoint's method's
    frozen(encoder).to(device)
    indices = feature_blocks(encoder, p.block, p.scan_blocks)
    blocks = [i + 1 for i in indices]  # 1-based, as reported
    conf = (len(blocks) - 1 if p.block == -1 else p.block - 1) if p.scan_blocks else 0  # the configured block's head
    heads = ProbeHeads(len(indices), feature_dim(encoder, p.pool), data.num_classes, p.head_init_std).to(device)
    pd = probe_data(cfg, encoder, data, indices, conf, dist, precision, out_dir)
    steps_per_epoch, effective_batch = pd.sampler.steps_per_epoch, pd.sampler.global_step_size
    total_steps = t.epochs * steps_per_epoch
    peak_lr = o.lr if o.lr is not None else o.blr * effective_batch / 256
    optimizer = probe_optimizer(heads, o, peak_lr)
    # the heads train in fp32 (features are extracted under autocast, in forward below)
    engine = StepEngine(heads, optimizer, device=device, precision="fp32", accum_steps=t.accum_steps,
                        max_nonfinite_steps=t.max_nonfinite_steps, name="linprobe", hint="Try a lower optim.blr.")  # fmt: skip

    # ---- resume: heads, optimizer, step (which fixes epoch, data position and lr), evaluations so far
    resume_from, step, evals = resume_probe(t, heads, engine, clock, {"steps_per_epoch": steps_per_epoch,
                                                                      "blocks": blocks})  # fmt: skip
    train_heads = engine.distribute(dist.enabled)
    if dist.is_main:
        prepare_run_folder(out_dir, dump_eval_yaml(cfg))
        log.info("mimkit %s | linprobe (%s) | %s | blocks %s, %s features, dim %d | %d train / %d val images, %d "
                 "classes | %s, effective batch %d, peak lr %.3g, %d steps/epoch, %d steps | %d processes on %s, %s",
                 __version__, p.mode, cfg.encoder.checkpoint, blocks if len(blocks) < 6 else f"1-{blocks[-1]}",
                 p.pool, feature_dim(encoder, p.pool), len(data.train), len(data.val), data.num_classes, o.name,
                 effective_batch, peak_lr, steps_per_epoch, total_steps, dist.world_size, device, precision)  # fmt: skip
        if resume_from is not None:
            log.info("resumed from %s at step %d", resume_from, step)
    metrics = EvalLog(out_dir, dist.is_main, active_loggers(t), "linprobe", resumed_step=step if resume_from else None,
                      config=to_dict(cfg))  # fmt: skip

    evaluate = functools.partial(evaluate_probe, heads, pd, device, blocks, conf, steps_per_epoch)

    def save(done: int) -> Path | None:
        if not dist.is_main:
            return None
        return save_eval_checkpoint(out_dir, done, t.keep_last, {
            "command": "linprobe", "heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
            "epoch": done / steps_per_epoch, "steps_per_epoch": steps_per_epoch, "blocks": blocks, "evals": evals,
            "elapsed_s": clock.total(), "nonfinite_steps": engine.nonfinite_total, "config": to_dict(cfg),
            "key_report": report.to_dict(), "mimkit_version": __version__,
        })  # fmt: skip

    # ---- the loop
    engine.last_checkpoint = resume_from

    def describe(r: dict) -> str:
        return f"epoch {r['epoch']:.2f}: top-1 {r['top1']:.2f}% (best block {r['best_block']}: {r['best_top1']:.2f}%)"

    loop = TrainLoop("linprobe", t, engine=engine, metrics=metrics, save=save, out_dir=out_dir, is_main=dist.is_main,
                     step=step, last_step=min(total_steps, t.max_steps or total_steps), steps_per_epoch=steps_per_epoch,
                     effective_batch=effective_batch,
                     hooks=(evaluation_hook(t.eval_every_epochs, evaluate, evals, metrics, describe, dist.is_main),))  # fmt: skip
    heads.train()  # the encoder is never put in train mode
    for step, batches in loop.steps(lambda epoch, in_epoch: probe_batches(pd, epoch, in_epoch)):
        lr = lr_at(step, steps_per_epoch, cfg, peak_lr)
        engine.set_lr(lr)

        def forward(micro: int):
            feats, y = probe_features(next(batches), pd, encoder, indices, p.pool, device, precision)
            logits = train_heads(feats).float()
            return sum(F.cross_entropy(logits[:, h], y) for h in range(logits.shape[1])), {}

        result = loop.step(step, forward)
        loop.after_step(result, lr, loss=result.loss / len(blocks))  # logged: the mean loss over the heads
    loop.close()

    final = evals[-1] if evals and evals[-1]["step"] == loop.done else evaluate(loop.done)
    summary = linprobe_summary(cfg, final, loop.done, blocks[conf], peak_lr, effective_batch, report, data, pd.knn,
                               engine.nonfinite_total, clock.total(), device)  # fmt: skip
    return finish_eval(out_dir, summary, engine.last_checkpoint, dist.is_main)


def linprobe_summary(cfg: LinprobeConfig, final: dict, done: int, block: int, peak_lr: float, effective_batch: int,
                     report, data, knn: dict, nonfinite_steps: int, wall_clock_s: float, device) -> dict:  # fmt: skip
    """What metrics.json holds: the last evaluation, the configured block's and the best block's, and the run."""
    t, o, p = cfg.train, cfg.optim, cfg.probe
    return {
        "command": "linprobe", "top1": final["top1"], "top5": final["top5"], "best_block": final["best_block"],
        "best_top1": final["best_top1"], "per_block_top1": final["per_block_top1"], "block": block,
        "pool": p.pool, "mode": p.mode, "optimizer": o.name, "peak_lr": peak_lr, "effective_batch": effective_batch,
        "epochs": t.epochs, "steps": done, "encoder": cfg.encoder.checkpoint, "key_report": report.to_dict(),
        "train_images": len(data.train), "val_images": len(data.val), "num_classes": data.num_classes,
        "wall_clock_s": round(wall_clock_s, 2), "machine": machine_description(device),
        "nonfinite_steps": nonfinite_steps, "mimkit_version": __version__, **knn,
    }  # fmt: skip


def probe_batches(pd: ProbeData, epoch: int, in_epoch: int):
    """The epoch's batches from its `in_epoch`-th step: images through the loader, or the sampler's (index, seed)
    pairs that index the cached features."""
    pd.sampler.set_epoch(epoch, in_epoch)
    return iter(pd.loader) if pd.loader is not None else iter(pd.sampler)


def probe_features(batch, pd: ProbeData, encoder, indices: list[int], pool: str, device: torch.device,
                   precision: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(features, labels) of one micro-batch on `device`: cached ones indexed, or the frozen encoder's (no gradient,
    under autocast) of the augmented images."""
    if pd.loader is None:  # cached features: the sampler's (index, seed) pairs index them directly
        idx = torch.tensor([i for i, _ in batch])
        assert pd.f_train is not None and pd.y_train is not None  # cached mode: the train features are extracted
        return pd.f_train[idx].to(device, non_blocking=True), pd.y_train[idx].to(device, non_blocking=True)
    imgs, y = batch
    imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with torch.no_grad(), autocast_context(device, precision):
        return encoder_features(encoder, imgs, indices, pool), y
