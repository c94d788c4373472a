"""`mimkit finetune`: end-to-end fine-tuning of a pretrained encoder, the MAE / BEiT recipe on timm's parts.

* model: the checkpoint's stock timm VisionTransformer with a classifier: global average pool of the patch
  tokens -> fc_norm LayerNorm -> Linear (timm's `global_pool="avg"`; the encoder's final norm is then unused,
  as in MAE's fine-tuning), head trunc_normal(2e-5); drop path; optionally only the last k blocks train.
* optimizer: AdamW on timm's layer-wise lr decay groups (`timm.optim.param_groups_layer_decay`): block i
  gets decay^(depth - i), patch_embed / cls_token / pos_embed decay^(depth + 1), the head 1; no weight decay
  on 1-D tensors, pos_embed and cls_token. The per-layer lr table is logged at start.
* data: timm's RandAugment + RandomResizedCrop + flip + random erasing (`timm.data.create_transform`),
  `timm.data.Mixup` (Mixup / CutMix with label smoothing) and `timm.loss.SoftTargetCrossEntropy`.
* optional model EMA (`timm.utils.ModelEmaV3`), evaluated beside the model.

Resume is exact: model, optimizer, grad scaler, EMA and step are checkpointed; batches come from
mimkit.data.ResumableBatchSampler with per-sample augmentation seeds, and the step's own randomness
(drop path, Mixup / CutMix) is drawn from RNGs seeded by (seed, step, rank) at the start of every step.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import posterize as timm_posterize
from timm.layers import trunc_normal_
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mimkit import distributed as mdist
from mimkit.checkpoint import CheckpointError
from mimkit.config import ConfigError, active_loggers, to_dict
from mimkit.data import ResumableBatchSampler, stable_seed
from mimkit.engine import StepEngine, adamw_kernel, autocast_context, seed_everything
from mimkit.eval.common import (
    EvalLog,
    EvalResult,
    LabelledDataset,
    eval_loader,
    eval_transform,
    evaluation_hook,
    finish_eval,
    guarded,
    machine_description,
    resume_eval_run,
    save_eval_checkpoint,
    start_eval_run,
    too_few_images_remedy,
    topk_correct,
)
from mimkit.eval.config import FinetuneConfig, dump_eval_yaml
from mimkit.eval.encoders import KeyReport, build_encoder, encoder_source, load_pretrained, summarize_keys
from mimkit.loop import TrainLoop, prepare_run_folder
from mimkit.models import Encoder, resolve_attention, set_attention_kernel
from mimkit.schedules import lr_at
from mimkit.version import __version__

log = logging.getLogger("mimkit")


# ---------------------------------------------------------------- the model


def to_classifier(encoder: Encoder, num_classes: int, global_pool: str = "avg",
                  head_init_std: float = 2e-5) -> Encoder:  # fmt: skip
    """Give a mimkit encoder (cls-token pooling, no head) a classifier, as timm would build it:
    avg -> final norm removed, fc_norm LayerNorm on the pooled patch tokens; token -> final norm on the cls."""
    if global_pool == "avg":
        encoder.norm = nn.Identity()
        encoder.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
    encoder.reset_classifier(num_classes, global_pool)
    head = encoder.head
    assert isinstance(head, nn.Linear)  # timm's head for num_classes > 0
    trunc_normal_(head.weight, std=head_init_std)
    nn.init.zeros_(head.bias)
    return encoder


def build_finetune_model(cfg: FinetuneConfig, num_classes: int) -> tuple[Encoder, KeyReport]:
    """The classifier with the checkpoint's encoder weights loaded (key report logged), all tensors
    trainable unless model.trainable_blocks restricts them."""
    m = cfg.model
    src = encoder_source(cfg.encoder)
    if m.global_pool == "token" and src.timm_args.get("class_token") is False:
        raise ConfigError("model.global_pool token: the checkpoint's encoder has no cls token (I-JEPA); use avg")
    model = to_classifier(build_encoder(src, m.drop_path_rate, cfg.train.seed), num_classes, m.global_pool,
                          m.head_init_std)  # fmt: skip
    report = load_pretrained(model, src)
    if m.global_pool == "avg" and src.state is not None:
        report.notes.append("global average pooling: the encoder's final norm is replaced by fc_norm (MAE fine-tuning)")
    model.requires_grad_(True)  # pos_embed too (fixed during MAE pretraining, learnt when fine-tuning)
    if m.trainable_blocks is not None:
        depth = len(model.blocks)
        if m.trainable_blocks > depth:
            raise ConfigError(f"model.trainable_blocks {m.trainable_blocks} exceeds the encoder's {depth} blocks")
        model.requires_grad_(False)
        for module in [*model.blocks[depth - m.trainable_blocks :], model.norm, model.fc_norm, model.head]:
            module.requires_grad_(True)
    if mdist.world_from_env()[0] == 0:
        log.info("%s", report.text())
    return model, report


def layer_decay_param_groups(model: Encoder, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay groups; each has an `lr_scale` the loop multiplies the scheduled lr by."""
    return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                    no_weight_decay_list=list(model.no_weight_decay()))  # fmt: skip


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_table(model: nn.Module, groups: list[dict], peak_lr: float) -> list[dict]:
    """One row per lr scale (a layer of the decay), lowest first: which tensors, scale, peak lr, weight decay."""
    names = {id(p): n for n, p in model.named_parameters()}
    rows: dict[float, dict] = {}
    for g in groups:
        row = rows.setdefault(g["lr_scale"], {"names": [], "weight_decay": set()})
        row["names"] += [names[id(p)] for p in g["params"]]
        row["weight_decay"].add(g["weight_decay"])
    return [{"layer": i, "params": summarize_keys(r["names"]), "tensors": len(r["names"]), "lr_scale": scale,
             "peak_lr": peak_lr * scale, "weight_decay": sorted(r["weight_decay"])}
            for i, (scale, r) in enumerate(sorted(rows.items()))]  # fmt: skip


def format_lr_table(rows: list[dict]) -> str:
    lines = [
        "layer-wise lr decay (peak lr per layer):",
        f"  {'layer':>5}  {'lr scale':>10}  {'peak lr':>10}  {'wd':>10}  params",
    ]
    for r in rows:
        wd = "/".join(f"{w:g}" for w in r["weight_decay"])
        lines.append(f"  {r['layer']:>5}  {r['lr_scale']:>10.4g}  {r['peak_lr']:>10.4g}  {wd:>10}  {r['params']}")
    return "\n".join(lines)


def finetune_train_transform(img_size: int, cfg: FinetuneConfig):
    """timm's training transform: RandomResizedCrop (bicubic) + flip + RandAugment + normalise + random erasing."""
    d, a = cfg.data, cfg.aug
    scale = (d.crop_scale[0], d.crop_scale[1])  # a pair, also when read from YAML as a list
    timm_tf = create_transform(
        input_size=img_size, is_training=True, scale=scale, hflip=0.5 if d.hflip else 0.0, auto_augment=a.rand_augment,
        interpolation="bicubic", re_prob=a.re_prob, re_mode="pixel", re_count=1, mean=tuple(d.mean), std=tuple(d.std),
        color_jitter=None,  # type: ignore[arg-type]  # timm reads None as no jitter; its annotation leaves None out
    )  # fmt: skip
    _posterize_zero_bits_as_black(timm_tf)
    return v2.Compose([v2.ToPILImage(), timm_tf])  # timm's ops work on PIL images; PIL input passes through


def _posterize_to_black(img, bits_to_keep, **kwargs):
    if bits_to_keep < 1:  # what Pillow < 11 returned for 0 bits (a mask of 0); Pillow >= 11 raises instead
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep, **kwargs)


def _posterize_zero_bits_as_black(transform) -> None:
    """timm's RandAugment 'PosterizeIncreasing' keeps 4 - int(4 * m / 10) bits, i.e. 0 at magnitude 10 (reached
    with mstd > 0); Pillow >= 11 refuses 0 bits and the DataLoader worker dies. Keep timm's intended op."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is timm_posterize:
                op.aug_fn = _posterize_to_black


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device, precision: str) -> dict:
    """Top-1 / top-5 (%) over the val split, summed over processes."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for imgs, y in loader:
        with autocast_context(device, precision):
            logits = model(imgs.to(device, non_blocking=True))
        c1, c5 = topk_correct(logits.float().cpu(), y)
        counts += torch.tensor([c1, c5, len(y)], dtype=torch.float64)
    counts = mdist.all_reduce_sum(counts.to(device)).cpu()
    model.train(was_training)
    n = max(float(counts[2]), 1.0)
    return {"top1": 100.0 * float(counts[0]) / n, "top5": 100.0 * float(counts[1]) / n}


# ---------------------------------------------------------------- mimkit finetune


@dataclass
class FinetuneParts:
    """What a fine-tuning step uses besides the model: the loss, Mixup / CutMix (None: off), the model EMA (None:
    off), and the per-layer lr table."""

    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    table: list[dict]


def finetune_parts(cfg: FinetuneConfig, model: nn.Module, num_classes: int, peak_lr: float, groups: list[dict],
                   ) -> FinetuneParts:  # fmt: skip
    a = cfg.aug
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                      mode="batch", label_smoothing=a.label_smoothing, num_classes=num_classes)  # fmt: skip
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    ema = ModelEmaV3(model, decay=cfg.ema.decay) if cfg.ema.enabled else None
    return FinetuneParts(criterion, mixup, ema, lr_table(model, groups, peak_lr))


def announce_finetune(cfg: FinetuneConfig, model: nn.Module, data, parts: FinetuneParts, dist, precision: str,
                      sampler: ResumableBatchSampler, peak_lr: float) -> None:  # fmt: skip
    """Rank 0's opening lines: the run's shape and the per-layer lr table."""
    t, o, a = cfg.train, cfg.optim, cfg.aug
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "mimkit %s | finetune | %s | %s pool, drop path %g, %s trainable params%s | %d train / %d val images, %d "
        "classes | effective batch %d (%d x %d x accum %d), peak lr %.3g, layer decay %g | %d steps/epoch, %d steps "
        "| mixup %g, cutmix %g, smoothing %g, %s, ema %s | %s, %s",
        __version__, cfg.encoder.checkpoint, cfg.model.global_pool, cfg.model.drop_path_rate, f"{trainable:,}",
        "" if cfg.model.trainable_blocks is None else f" (last {cfg.model.trainable_blocks} blocks)",
        len(data.train), len(data.val), data.num_classes, sampler.global_step_size, t.batch_size, dist.world_size,
        t.accum_steps, peak_lr, o.layer_decay, sampler.steps_per_epoch, t.epochs * sampler.steps_per_epoch, a.mixup,
        a.cutmix, a.label_smoothing, a.rand_augment or "no RandAugment", cfg.ema.decay if parts.ema else "off",
        dist.device, precision,
    )  # fmt: skip
    log.info("%s", format_lr_table(parts.table))


def finetune_loaders(cfg: FinetuneConfig, data, img_size: int, dist) -> tuple[ResumableBatchSampler, DataLoader,
                                                                            DataLoader]:  # fmt: skip
    """The train batches (resumable sampler, timm's augmentation with per-sample seeds) and this rank's val share."""
    t, device = cfg.train, dist.device
    train_set = LabelledDataset(data.train, finetune_train_transform(img_size, cfg))
    sampler = ResumableBatchSampler(
        len(train_set),
        t.batch_size,
        t.accum_steps,
        dist.rank,
        dist.world_size,
        t.seed,
        remedy=too_few_images_remedy(cfg.data),
    )
    workers, pin = cfg.data.num_workers, device.type == "cuda"
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                        persistent_workers=workers > 0, generator=torch.Generator())  # fmt: skip
    val_set = LabelledDataset(data.val, eval_transform(img_size, cfg.data.mean, cfg.data.std, cfg.data.crop_pct))
    return sampler, loader, eval_loader(val_set, t.batch_size, workers, dist.rank, dist.world_size, pin)


def loader_epoch(sampler: ResumableBatchSampler, loader: DataLoader, epoch: int, in_epoch: int):
    """The loader's batches of `epoch` from its `in_epoch`-th step on."""
    sampler.set_epoch(epoch, in_epoch)
    return iter(loader)


def resume_finetune(t, engine: StepEngine, ema: ModelEmaV3 | None, steps_per_epoch: int, clock,
                    ) -> tuple[Path | None, int, list]:  # fmt: skip
    """(checkpoint, step, evaluations so far) of the run resumed per train.resume, its model, optimizer, scaler and
    EMA loaded (the step fixes epoch, data position and lr); (None, 0, []) for a new run."""
    resume_from, state = resume_eval_run(t, "finetune", {"steps_per_epoch": steps_per_epoch})
    if resume_from is None:
        return None, 0, []
    assert state is not None  # read with the checkpoint
    engine.model.load_state_dict(state["model"])
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if "ema" not in state:
            raise CheckpointError(f"cannot resume {resume_from} with ema.enabled: it has no EMA weights")
        ema.module.load_state_dict(state["ema"])
    clock.already, engine.nonfinite_total = state["elapsed_s"], state["nonfinite_steps"]
    return resume_from, state["step"], state["evals"]


def evaluate_finetune(model: nn.Module, ema, val_loader, device: torch.device, precision: str, steps_per_epoch: int,
                      done: int) -> dict:  # fmt: skip
    """The evaluation record at step `done`: top-1 / top-5 of the model (and of its EMA, when kept)."""
    record = {"step": done, "epoch": round(done / steps_per_epoch, 4)}
    record.update(evaluate_classifier(model, val_loader, device, precision))
    if ema is not None:
        acc = evaluate_classifier(ema.module, val_loader, device, precision)
        record.update({"ema_top1": acc["top1"], "ema_top5": acc["top5"]})
    return record


@guarded
def run_finetune(cfg: FinetuneConfig) -> EvalResult:
    # ---- setup: processes, data (checked first), model with the pretrained encoder
    t, o = cfg.train, cfg.optim
    clock, dist, precision, out_dir, data = start_eval_run(cfg, t)
    device = dist.device
    model, report = build_finetune_model(cfg, data.num_classes)
    model.to(device)
    set_attention_kernel(model, resolve_attention(t.attention, device, precision))
    sampler, loader, val_loader = finetune_loaders(cfg, data, model.patch_embed.img_size[0], dist)
    steps_per_epoch, effective_batch = sampler.steps_per_epoch, sampler.global_step_size
    total_steps = t.epochs * steps_per_epoch
    peak_lr = o.lr if o.lr is not None else o.blr * effective_batch / 256

    # ---- optimizer on layer-decay groups, loss, Mixup / CutMix, EMA
    groups = layer_decay_param_groups(model, o.weight_decay, o.layer_decay)
    parts = finetune_parts(cfg, model, data.num_classes, peak_lr, groups)
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=o.betas, eps=o.eps, **adamw_kernel("auto", sharded=False))
    engine = StepEngine(model, optimizer, device=device, precision=precision, accum_steps=t.accum_steps,
                        clip_grad=o.clip_grad, max_nonfinite_steps=t.max_nonfinite_steps, name="finetune",
                        hint="Try a lower optim.blr, optim.clip_grad, or train.precision=fp32.")  # fmt: skip
    ema = parts.ema

    # ---- resume: model, optimizer, scaler, EMA, step (which fixes epoch, data position and lr), evaluations
    resume_from, step, evals = resume_finetune(t, engine, ema, steps_per_epoch, clock)
    train_model = engine.distribute(dist.enabled)
    if dist.is_main:
        prepare_run_folder(out_dir, dump_eval_yaml(cfg))
        announce_finetune(cfg, model, data, parts, dist, precision, sampler, peak_lr)
        if resume_from is not None:
            log.info("resumed from %s at step %d", resume_from, step)
    metrics = EvalLog(out_dir, dist.is_main, active_loggers(t), "finetune", resumed_step=step if resume_from else None,
                      config=to_dict(cfg))  # fmt: skip
    if resume_from is not None:
        metrics.write({"event": "resume", "from": str(resume_from), "resumed_step": step})

    evaluate = functools.partial(evaluate_finetune, model, ema, val_loader, device, precision, steps_per_epoch)

    def save(done: int) -> Path | None:
        if not dist.is_main:
            return None
        state = {"command": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": engine.scaler.state_dict(), "step": done, "epoch": done / steps_per_epoch,
                 "steps_per_epoch": steps_per_epoch, "evals": evals, "elapsed_s": clock.total(),
                 "nonfinite_steps": engine.nonfinite_total, "num_classes": data.num_classes, "config": to_dict(cfg),
                 "key_report": report.to_dict(), "mimkit_version": __version__}  # fmt: skip
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        return save_eval_checkpoint(out_dir, done, t.keep_last, state)

    # ---- the loop
    engine.last_checkpoint = resume_from

    def describe(r: dict) -> str:
        return f"epoch {r['epoch']:.2f}: top-1 {r['top1']:.2f}%" + (f", EMA top-1 {r['ema_top1']:.2f}%" if ema else "")

    loop = TrainLoop("finetune", t, engine=engine, metrics=metrics, save=save, out_dir=out_dir, is_main=dist.is_main,
                     step=step, last_step=min(total_steps, t.max_steps or total_steps), steps_per_epoch=steps_per_epoch,
                     effective_batch=effective_batch,
                     hooks=(evaluation_hook(t.eval_every_epochs, evaluate, evals, metrics, describe, dist.is_main),))  # fmt: skip
    model.train()
    for step, batches in loop.steps(functools.partial(loader_epoch, sampler, loader)):
        seed_everything(stable_seed(t.seed, "finetune-step", step, dist.rank))  # drop path, Mixup / CutMix
        lr = lr_at(step, steps_per_epoch, cfg, peak_lr)
        set_lr(optimizer, lr)

        def forward(micro: int):
            imgs, y = next(batches)
            imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if parts.mixup is not None:
                imgs, y = parts.mixup(imgs, y)
            return parts.criterion(train_model(imgs).float(), y), {}

        result = loop.step(step, forward, on_update=(lambda: ema.update(model)) if ema is not None else None)
        norm = {"grad_norm": result.grad_norm} if result.grad_norm is not None else {}
        loop.after_step(result, lr, {"nonfinite_steps": engine.nonfinite_total, **norm})
    loop.close()
    return finetune_summary(cfg, loop.done, evals, evaluate, parts, data, report, clock, device, engine, peak_lr,
                            effective_batch, out_dir, dist.is_main)  # fmt: skip


def finetune_summary(cfg: FinetuneConfig, done: int, evals: list, evaluate, parts: FinetuneParts, data, report,
                     clock, device, engine: StepEngine, peak_lr: float, effective_batch: int, out_dir: Path,
                     is_main: bool) -> EvalResult:  # fmt: skip
    """The last evaluation (run now unless the loop just ran it), the best one, and metrics.json."""
    t, o, ema = cfg.train, cfg.optim, parts.ema
    final = evals[-1] if evals and evals[-1]["step"] == done else evaluate(done)
    best = max(evals or [final], key=lambda r: r["top1"])
    summary = {
        "command": "finetune", "top1": final["top1"], "top5": final["top5"], "best_top1": best["top1"],
        "best_epoch": best["epoch"], "epochs": t.epochs, "steps": done, "effective_batch": effective_batch,
        "peak_lr": peak_lr, "layer_decay": o.layer_decay, "lr_table": parts.table, "trainable_blocks": cfg.model.trainable_blocks,
        "encoder": cfg.encoder.checkpoint, "key_report": report.to_dict(), "train_images": len(data.train),
        "val_images": len(data.val), "num_classes": data.num_classes, "wall_clock_s": round(clock.total(), 2),
        "machine": machine_description(device), "nonfinite_steps": engine.nonfinite_total, "mimkit_version": __version__,
    }  # fmt: skip
    if ema is not None:
        summary.update({"ema_top1": final["ema_top1"], "ema_top5": final["ema_top5"],
                       "best_ema_top1": max(r["ema_top1"] for r in evals or [final])})  # fmt: skip
    return finish_eval(out_dir, summary, engine.last_checkpoint, is_main)
