"""The pretraining loop, top to bottom: setup, resume, epochs of (accumulated) steps, checkpoints.

Launch with `mimkit pretrain CONFIG key=value ...`, under torchrun / srun for several processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

import mimkit
from mimkit import distributed as mdist
from mimkit.checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_out_dir,
    checkpoint_path,
    load_checkpoint,
    load_sharded_into,
    prune_checkpoints,
    read_dcp_metadata,
    resume_point,
    rng_state,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from mimkit.config import (
    BEIT_METHODS,
    TRAJECTORY_FREE,
    Config,
    active_loggers,
    check_pretrainable,
    config_from_dict,
    dump_yaml,
    load_config,
    resolved,
    to_dict,
)
from mimkit.engine import StepEngine, TrainingDiverged, adamw_kernel, seed_everything
from mimkit.errors import MimkitError
from mimkit.eval import knn_monitor, open_labelled_split
from mimkit.logs import EpochSummary, ensure_logging, progress_bar
from mimkit.methods import build_model, no_weight_decay_names
from mimkit.metrics import MetricsLog
from mimkit.models import compile_blocks, resolve_attention, resolve_compile, set_attention_kernel, transformer_blocks
from mimkit.pipeline import PretrainData
from mimkit.runs import (
    GracefulStop,
    RunFolderBusy,
    RunLock,
    announce_stop,
    check_drift,
    config_changes,
    record_segment,
    stop_flag,
)
from mimkit.schedules import lr_at, schedule_length
from mimkit.visualize import log_reconstruction_grid, preview_images

log = logging.getLogger("mimkit")


@dataclass
class RunResult:
    """What `mimkit.run` / `mimkit.pretrain` return: where the run went and how it ended.

    Fields: `out_dir` (the run folder), `checkpoint` (the last one written; None if none), `config` (the resolved
    config.yaml), `metrics` (metrics.jsonl), `step` (optimizer steps done), `loss` (the last step's), `nonfinite_steps`
    and `skipped_images` (counted over the run), `already_finished` (the folder held a finished run: nothing was
    trained, its result is returned).
    """
    out_dir: Path
    checkpoint: Path | None
    config: Path
    metrics: Path
    step: int
    loss: float
    nonfinite_steps: int
    skipped_images: int
    already_finished: bool = False  # the folder held a finished run: nothing was trained, its result is returned


def find_resume(cfg) -> tuple[Path | None, dict | None]:
    """(checkpoint, what was read of it) to resume from per train.resume, or (None, None)."""
    return resume_point(cfg.train.out_dir, cfg.train.resume)


def check_resumable(path: Path, state: dict, model: torch.nn.Module, method: str) -> None:
    """The checkpoint must be this method's and hold tensors of this model's shapes: say which key differs
    instead of failing inside load_state_dict."""
    if isinstance(state, dict) and "imported_from" in state:
        raise CheckpointError(f"{path}: written by `mimkit import`: weights without a training state (no "
                              "optimizer, step or RNG state), so no run resumes from it; evaluate, fine-tune or "
                              "export it")  # fmt: skip
    if not isinstance(state, dict) or not {"step", "steps_per_epoch", "rng", "scaler"} <= state.keys():
        raise CheckpointError(f"{path}: not a mimkit pretraining checkpoint (no step / RNG state); to start from its "
                              "weights, convert it with `mimkit import` and evaluate or fine-tune it instead")  # fmt: skip
    if state.get("method", method) != method:
        raise CheckpointError(f"{path}: a '{state['method']}' checkpoint cannot resume a '{method}' run (method: "
                              f"{method}); resume it with its own config ({path.parent / 'config.yaml'})")  # fmt: skip
    if path.is_dir():  # shapes from DCP's metadata, without reading the shards
        saved = {k[len("model."):]: tuple(v.size) for k, v in read_dcp_metadata(path).state_dict_metadata.items()
                 if k.startswith("model.") and hasattr(v, "size")}  # fmt: skip
    else:
        saved = {k: tuple(v.shape) for k, v in state.get("model", {}).items()}
    for key, value in model.state_dict().items():
        if key not in saved:
            raise CheckpointError(f"{path}: has no '{key}': it was written by another model (check model.* / the method)")
        if saved[key] != tuple(value.shape):
            raise CheckpointError(f"{path}: '{key}' has shape {list(saved[key])}, this model's is {list(value.shape)} "
                                  "(another model size: check model.* against the checkpoint's config.yaml)")  # fmt: skip
    extra = sorted(saved.keys() - model.state_dict().keys())
    if extra:
        raise CheckpointError(f"{path}: holds '{extra[0]}', which this model does not have (another model or method)")


def questionable_settings(cfg: Config, peak_lr: float, steps_per_epoch: int) -> list[str]:
    """Settings that are allowed but almost certainly not meant: said as warnings, the run goes on."""
    o, notes = cfg.optim, []
    if peak_lr > 0.01:  # AdamW on ViTs: the papers' peaks are 1e-4 .. 3e-3
        source = f"optim.lr {o.lr:g}" if o.lr is not None else f"optim.blr {o.blr:g} x effective batch / 256"
        notes.append(f"peak lr {peak_lr:.3g} ({source}) is implausibly high for AdamW on a ViT (MAE: blr 1.5e-4, "
                     "lr 2.4e-3 at batch 4096); expect divergence")  # fmt: skip
    total = schedule_length(cfg.train, steps_per_epoch)
    epochs = total / steps_per_epoch
    highest = lr_at(total - 1, steps_per_epoch, cfg, peak_lr)  # in warmup to the end: the last step's lr is the highest
    if o.warmup_epochs >= epochs and highest < 0.99 * peak_lr:
        notes.append(f"optim.warmup_epochs {o.warmup_epochs:g} >= the run's {epochs:g} epochs: the lr never reaches "
                     f"its peak {peak_lr:.3g} (the highest it gets is {highest:.3g}, at the last step)")  # fmt: skip
    return notes


def saved_config(data: dict | None) -> dict:
    """A checkpoint's config, resolved as this version resolves it (earlier versions saved null for the values
    taken from the model.arch preset); as written when it no longer validates."""
    if not isinstance(data, dict):
        return {}
    try:
        out = to_dict(resolved(config_from_dict(data)))
    except MimkitError:
        return data
    mask = data.get("mask") if isinstance(data.get("mask"), dict) else {}
    # saved as auto before it was written out, when auto meant BEiT's generator for BootMAE's hybrid blocks too
    # (absent, as in 0.1.0, it was the exact-count generator, which auto means now)
    if mask.get("block_generator") == "auto":
        hybrid = mask.get("type") == "hybrid"
        out["mask"]["block_generator"] = "beit" if data.get("method") in BEIT_METHODS or hybrid else "exact"
    return out


def finished_loss(out_dir: Path, state: dict, step: int) -> float:
    """The final loss of a finished run: from its checkpoint (mimkit >= 0.5) or its metrics log."""
    if isinstance(state.get("loss"), float):
        return state["loss"]
    try:
        for line in reversed((out_dir / "metrics.jsonl").read_text().splitlines()):
            record = json.loads(line)
            if record.get("step") == step and isinstance(record.get("loss"), (int, float)):
                return float(record["loss"])
    except (OSError, ValueError):
        pass
    return float("nan")


def pretrain(cfg: Config) -> RunResult:
    """Pretrain per `cfg`, resuming from train.out_dir per train.resume. Raises RunStopped (after writing a
    checkpoint) when SIGTERM, SIGINT or train.stop_signal arrives, and RunFolderBusy when another process
    writes the folder."""
    ensure_logging()
    check_pretrainable(cfg)
    with contextlib.ExitStack() as cleanup:
        return _pretrain(cfg, cleanup)


def _pretrain(cfg: Config, cleanup: contextlib.ExitStack) -> RunResult:
    cleanup.enter_context(GracefulStop(cfg.train.stop_signal))
    # ---- setup: processes, model, data (checked before any compute)
    dist = mdist.init_distributed(cfg.train.device, cfg.distributed.timeout_minutes)
    device, t = dist.device, cfg.train
    precision = mdist.resolve_precision(t.precision, device)
    out_dir = check_out_dir(t.out_dir)
    seed_everything(t.seed)  # the same initial weights on every rank (FSDP shards them without a broadcast)
    model = build_model(cfg)
    seed_everything(t.seed + dist.rank)
    # data problems surface here, before any compute
    data = PretrainData(cfg, model.encoder.patch_embed.img_size[0], model.mask_inputs, t.batch_size, t.accum_steps,
                        dist.rank, dist.world_size, t.seed, pin_memory=device.type == "cuda",
                        second_view=model.second_view, device=device)  # fmt: skip
    knn_sources = None  # labelled train / val splits for the k-NN trend monitor
    if t.knn_every_epochs:
        knn_path = t.knn_data or cfg.data.path
        knn_sources = (open_labelled_split(knn_path, "train", root=cfg.data.root, download=cfg.data.download),
                       open_labelled_split(knn_path, t.knn_val_split, root=cfg.data.root, download=cfg.data.download,
                                           split_key="train.knn_val_split"))
    model.to(device)
    if cfg.distributed.activation_checkpointing:
        model.set_grad_checkpointing(True)
    fsdp = cfg.distributed.strategy == "fsdp" and dist.enabled
    if fsdp:
        mdist.shard_model(model, transformer_blocks(model), precision)  # before the optimizer sees the parameters
    attention = resolve_attention(t.attention, device, precision)
    set_attention_kernel(model, attention)
    compiled = resolve_compile(t.compile, device)
    if compiled:
        compile_blocks(model, device)  # in place: same parameters and state-dict keys
    steps_per_epoch = data.steps_per_epoch
    total_steps = schedule_length(t, steps_per_epoch)
    last_step = min(total_steps, t.max_steps or total_steps)
    effective_batch = data.global_step_size
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * effective_batch / 256

    # ---- optimizer: AdamW, no weight decay on 1-D params, biases and optim.no_weight_decay (default: the official set)

    no_decay = no_weight_decay_names(model, cfg)
    param_groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  **adamw_kernel(cfg.optim.implementation, fsdp))  # fmt: skip
    engine = StepEngine(model, optimizer, device=device, precision=precision, accum_steps=t.accum_steps,
                        clip_grad=cfg.optim.clip_grad, fsdp=fsdp, max_nonfinite_steps=t.max_nonfinite_steps,
                        name="pretrain", hint="Try a lower optim.blr, optim.clip_grad, or train.precision=bf16/fp32.")

    # ---- one writer per run folder (rank 0 holds the lock; every rank learns whether it got it)
    busy = None
    if dist.is_main:
        try:
            cleanup.enter_context(RunLock(out_dir))
        except RunFolderBusy as e:
            busy = str(e)
    busy = next((b for b in mdist.all_gather_objects(busy) if b), None)
    if busy:
        raise RunFolderBusy(busy)

    # ---- resume: model, optimizer, scaler, step (which fixes epoch, data position and lr), RNG
    step, skipped_total = 0, 0
    resume_from, state = find_resume(cfg)
    changes, allowed = {}, {}
    if resume_from is not None:
        check_resumable(resume_from, state, model, cfg.method)
        # the folder is the truth: a change that alters the trajectory is refused unless named
        changes = config_changes(saved_config(state.get("config")), to_dict(resolved(cfg)))
        free = TRAJECTORY_FREE
        if state.get("effective_batch", effective_batch) == effective_batch and state.get("steps_per_epoch") == steps_per_epoch:
            free = free | {"train.batch_size", "train.accum_steps"}  # the same global batch on another number of processes
        allowed = check_drift(changes, free, set(t.resume_allow), resume_from)
        if state["step"] >= last_step:
            loss = finished_loss(out_dir, state, state["step"])
            if dist.is_main:
                log.info("%s is a finished run: step %d of %d, final loss %.4f, checkpoint %s (nothing to do; raise "
                         "train.max_steps or, with train.resume_allow=train.epochs, train.epochs to train on)",
                         out_dir, state["step"], last_step, loss, resume_from)  # fmt: skip
            return RunResult(out_dir, resume_from, out_dir / "config.yaml", out_dir / "metrics.jsonl", state["step"],
                             loss, state["nonfinite_steps"], state["skipped_images"], already_finished=True)  # fmt: skip
        if resume_from.is_dir():  # sharded (fsdp) checkpoint: every rank reads its part, resharded to this world
            model_state, optim_state = get_state_dict(model, optimizer)
            load_sharded_into(resume_from, model_state, optim_state)
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        else:  # one file with full tensors (fsdp shards them on load)
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=full)
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
        if state["steps_per_epoch"] != steps_per_epoch:
            raise CheckpointError(
                f"cannot resume {resume_from} exactly: it ran {state['steps_per_epoch']} steps per epoch, this config "
                f"gives {steps_per_epoch} (data, batch size, processes or accum_steps changed)"
            )
        engine.scaler.load_state_dict(state["scaler"])
        step, engine.nonfinite_total, skipped_total = state["step"], state["nonfinite_steps"], state["skipped_images"]
        rngs = state["rng"]
        if len(rngs) == dist.world_size:
            set_rng_state(rngs[dist.rank])
        else:
            log.warning("resuming with %d processes from a %d-process run: RNG streams re-seeded", dist.world_size, len(rngs))
            seed_everything(t.seed + dist.rank + step)

    ddp = None
    if dist.enabled and not fsdp:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = ddp or model
    engine.ddp = ddp

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".checkpoint-*.tmp"):  # left by a kill during a checkpoint write
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(resolved(cfg)))
        record_segment(out_dir, step, changes, allowed, resume_from)
        log.info("writing %s", out_dir.resolve())
        log.info(
            "mimkit %s | %s %s | %d processes on %s | effective batch %d (%d x %d x accum %d) | peak lr %.3g | "
            "%d steps/epoch, %d steps total | precision %s, %s attention%s%s",
            mimkit.__version__, cfg.method, cfg.model.arch, dist.world_size, device, effective_batch, t.batch_size,
            dist.world_size, t.accum_steps, peak_lr, steps_per_epoch, total_steps, precision, attention,
            " | compiled blocks" if compiled else "", " | FSDP2" if fsdp else " | DDP" if ddp is not None else "",
        )  # fmt: skip
        if resume_from is not None:
            log.info("resumed from %s at step %d", resume_from, step)
            for key, (old, new) in changes.items():
                log.info("config change at step %d%s: %s %s -> %s", step, " (train.resume_allow)" if key in allowed
                         else "", key, old, new)  # fmt: skip
        for note in questionable_settings(cfg, peak_lr, steps_per_epoch):
            log.warning("%s", note)
    # records past the starting step belong to an attempt that left no checkpoint after them: they are run again
    metrics = MetricsLog(out_dir, dist.is_main, active_loggers(t), resumed_step=step)
    vis_images = None  # fixed images for TensorBoard reconstruction grids (rank 0, indexable sources only)
    if metrics.tb is not None and t.vis_every_epochs and getattr(data, "dataset", None) is not None and model.PREDICTS_PIXELS:
        vis_images = preview_images(data.dataset.source, model.encoder.patch_embed.img_size[0], t.vis_images)
    if resume_from is not None:
        metrics.write({"event": "resume", "from": str(resume_from), "resumed_step": step,
                       **({"config_changes": {k: [a, b] for k, (a, b) in allowed.items()}} if allowed else {})})

    def save(step: int) -> Path | None:
        rng = mdist.all_gather_objects(rng_state())
        meta = {
            "scaler": engine.scaler.state_dict(),
            "step": step,
            "epoch": step / steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "effective_batch": effective_batch,
            "nonfinite_steps": engine.nonfinite_total,
            "skipped_images": skipped_total,
            "rng": rng,
            "config": to_dict(resolved(cfg)),
            "mimkit_version": mimkit.__version__,
            "method": cfg.method,
            "loss": loss_value,  # the last step's: what a finished run, started again, reports
        }
        path = checkpoint_path(out_dir, step, sharded=fsdp)
        try:
            if fsdp:  # every rank writes its shards; the folder appears once all are done
                save_sharded(path, get_model_state_dict(model), get_optimizer_state_dict(model, optimizer), meta,
                             dist.is_main)  # fmt: skip
            else:
                optim_state = get_optimizer_state_dict(model, optimizer)  # keyed by parameter name: portable
                if not dist.is_main:
                    return None
                save_checkpoint(path, {"model": model.state_dict(), "optimizer": optim_state, **meta})
        except OSError as e:  # e.g. a full disk: the write was atomic, so the previous checkpoint is untouched
            raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); the last complete "
                                  f"checkpoint, {engine.last_checkpoint or 'none yet'}, is intact: free space and rerun to resume "
                                  "from it") from None  # fmt: skip
        if dist.is_main:
            prune_checkpoints(out_dir, t.keep_last)
        return path if dist.is_main else None

    # ---- the loop
    progress = None
    if dist.is_main and t.progress:
        progress = progress_bar(total=last_step, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    engine.last_checkpoint = resume_from
    loss_value = float("nan")
    window_start, window_steps = time.perf_counter(), 0
    run_start = window_start
    epoch_line = EpochSummary(steps_per_epoch, effective_batch, enabled=dist.is_main)
    model.train()
    while step < last_step:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = data.epoch_batches(epoch, in_epoch)
        for step in range(step, min((epoch + 1) * steps_per_epoch, last_step)):
            lr = lr_at(step, steps_per_epoch, cfg, peak_lr)
            engine.set_lr(lr)
            model.set_progress(step, steps_per_epoch, total_steps)  # step-dependent terms (BootMAE's ramps, EMA momentum)
            skipped = 0

            def forward(micro: int):
                nonlocal skipped
                batch = next(batches)
                imgs = batch.pop("image").to(device, non_blocking=True)
                skipped += int(batch.pop("skipped").sum())
                out = train_model(imgs, **{k: v.to(device, non_blocking=True) for k, v in batch.items()})
                return out.loss, {name: getattr(out, name) for name in model.LOSS_TERMS}

            def out_of_time_and_skipped() -> list[float]:
                out_of_time = t.max_minutes is not None and time.perf_counter() - run_start > 60 * t.max_minutes
                return [float(skipped), float(out_of_time), stop_flag()]

            try:
                result = engine.step(step, forward, out_of_time_and_skipped, on_update=lambda: model.after_step(step))
            except TrainingDiverged:
                if progress is not None:
                    progress.close()
                metrics.write({"event": "diverged", "step": step + 1, "nonfinite_steps": engine.nonfinite_total})
                metrics.close()
                raise
            loss_value, skipped_total = result.loss, skipped_total + int(result.extras[0])
            window_steps += 1
            epoch_line.add(loss_value)

            done = step + 1
            stopping = result.extras[2] > 0 and done < last_step  # a stop signal reached some rank: all stop here
            if result.extras[1] > 0 and done < last_step:  # train.max_minutes reached (on any rank): stop here
                last_step = done
                if progress is not None:
                    progress.total = done
            if done % t.log_every == 0 or done == last_step:
                elapsed = time.perf_counter() - window_start
                img_s = window_steps * effective_batch / max(elapsed, 1e-9)
                record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": loss_value, "lr": lr,
                          "img_per_s": round(img_s, 2), "nonfinite_steps": engine.nonfinite_total,
                          "skipped_images": skipped_total, "time": time.time()}  # fmt: skip
                if result.grad_norm is not None:
                    record["grad_norm"] = result.grad_norm
                record.update(result.terms)  # loss components of this process's last step
                metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}", refresh=False)
                elif dist.is_main:
                    log.info("step %d/%d loss %.4f lr %.3g %.1f img/s", done, last_step, loss_value, lr, img_s)
                window_start, window_steps = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)

            # no periodic save inside a streak of non-finite steps: the last one before it is the one to go back to
            end_of_epoch = done % steps_per_epoch == 0
            periodic = (t.save_every_steps and done % t.save_every_steps == 0) or (
                end_of_epoch and (done // steps_per_epoch) % t.save_every_epochs == 0
            )
            if (periodic and engine.consecutive_nonfinite == 0) or done == last_step or stopping:
                engine.last_checkpoint = save(done) or engine.last_checkpoint
            if stopping:
                if progress is not None:
                    progress.close()
                raise announce_stop(done, engine.last_checkpoint, out_dir, metrics, metrics.close)
            if end_of_epoch:
                epoch_line.end_epoch(done, lr, last_step)
            if knn_sources is not None and end_of_epoch and (done // steps_per_epoch) % t.knn_every_epochs == 0:
                if fsdp:
                    model.unshard()  # the root's own parameters (embeddings, norm) are sharded
                # on every rank: the images are split across processes and the features gathered
                knn_stats = knn_monitor(model.encoder, *knn_sources, mean=cfg.data.mean, std=cfg.data.std, device=device,
                                    precision=precision, max_train=t.knn_samples[0], max_val=t.knn_samples[1],
                                    seed=t.seed)  # fmt: skip
                if fsdp:
                    model.reshard()
                metrics.write({"step": done, "epoch": done // steps_per_epoch, **knn_stats})
                if dist.is_main:
                    log.info("epoch %d k-NN monitor: top-1 %.2f%% (k=%d, %d train / %d val images; a trend, not a "
                             "quality measure)", done // steps_per_epoch, knn_stats["knn_top1"],
                             knn_stats.get("knn_k", 20), knn_stats["knn_train_images"], knn_stats["knn_val_images"])  # fmt: skip
                window_start = time.perf_counter()
            if end_of_epoch:
                epoch_line.restart_clock()  # the next epoch's training time starts after the monitor
            if vis_images is not None and end_of_epoch and (done // steps_per_epoch) % t.vis_every_epochs == 0:
                log_reconstruction_grid(metrics.tb, model, vis_images, done, seed=t.seed, mean=cfg.data.mean,
                                        std=cfg.data.std)  # fmt: skip
            if done >= last_step:  # max_steps / max_minutes reached mid-epoch
                break
        step = done
    if progress is not None:
        progress.close()
    metrics.close()
    mdist.barrier()
    return RunResult(out_dir, engine.last_checkpoint, out_dir / "config.yaml", metrics.path, step, loss_value,
                     engine.nonfinite_total, skipped_total)  # fmt: skip


def run(config_path: str | None = None, overrides: list[str] | None = None, **sections) -> RunResult:
    """Python entry point: `mimkit.run("configs/quickstart.yaml", ["train.epochs=1"])`, the same as
    `mimkit.pretrain(mimkit.load_config("configs/quickstart.yaml", ["train.epochs=1"]))`. It writes into the
    recipe's train.out_dir (the quickstart's: runs/quickstart, the folder the CLI uses too) unless you pass
    `train.out_dir=...`; a folder that holds a run of another config is refused, a finished one returned."""
    return pretrain(load_config(config_path, overrides, **sections))


def config_of_checkpoint(path: str | Path) -> Config:
    return config_from_dict(load_checkpoint(path)["config"])
