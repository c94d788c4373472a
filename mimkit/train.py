"""The pretraining loop, top to bottom: setup, resume, epochs of (accumulated) steps, checkpoints.

Launch with `mimkit pretrain CONFIG key=value ...`, under torchrun / srun for several processes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    atomic_write_bytes,
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
from mimkit.config import Config, config_from_dict, dump_yaml, to_dict
from mimkit.data import PretrainData
from mimkit.errors import MimkitError
from mimkit.methods import build_model
from mimkit.models import compile_blocks, resolve_attention, resolve_compile, set_attention_kernel
from mimkit.visualize import log_reconstruction_grid, preview_images

log = logging.getLogger("mimkit")


LOSS_TERMS = {"reconstruction", "consistency", "feature", "feature_weight", "momentum", "mlm_acc"}  # scalar output fields logged beside the loss


class TrainingDiverged(MimkitError, RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclass
class RunResult:
    out_dir: Path
    checkpoint: Path | None
    config: Path
    metrics: Path
    step: int
    loss: float
    nonfinite_steps: int
    skipped_images: int


def lr_at(step: int, steps_per_epoch: int, cfg: Config, peak_lr: float) -> float:
    """Per-iteration linear warmup then half-cosine to min_lr, in fractional epochs (MAE's rule)."""
    epoch = step / steps_per_epoch
    o = cfg.optim
    if epoch < o.warmup_epochs:
        return peak_lr * epoch / o.warmup_epochs
    span = max(schedule_length(cfg.train, steps_per_epoch) / steps_per_epoch - o.warmup_epochs, 1e-12)
    progress = min((epoch - o.warmup_epochs) / span, 1.0)
    return o.min_lr + (peak_lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_length(t, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole schedule: train.schedule_steps when set (pretraining), else epochs' worth."""
    return getattr(t, "schedule_steps", None) or t.epochs * steps_per_epoch


def adamw_kernel(implementation: str, sharded: bool) -> dict:
    """torch.optim.AdamW keyword for the chosen kernel. The fused kernel updates every tensor in one pass
    (CPU and CUDA); parameters sharded by FSDP2 (DTensors) take the foreach path."""
    if implementation == "auto":
        implementation = "foreach" if sharded else "fused"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def find_resume(cfg) -> tuple[Path | None, dict | None]:
    """(checkpoint, what was read of it) to resume from per train.resume, or (None, None)."""
    return resume_point(cfg.train.out_dir, cfg.train.resume)


def check_resumable(path: Path, state: dict, model: torch.nn.Module, method: str) -> None:
    """The checkpoint must be this method's and hold tensors of this model's shapes: say which key differs
    instead of failing inside load_state_dict."""
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


def _step_of(line: bytes) -> int:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return 0
    return step if isinstance(step, int) else 0


class MetricsLog:
    """JSONL on rank 0 (always), TensorBoard alongside when enabled."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, prefix: str = "pretrain",
                 resumed_step: int | None = None):  # fmt: skip
        self.path = out_dir / "metrics.jsonl"
        self.enabled, self.tb, self.prefix = enabled, None, prefix
        if enabled and self.path.exists():
            self._keep_until(resumed_step)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

    def _keep_until(self, resumed_step: int | None) -> None:
        """Drop a torn last line (a kill mid-write) and, on resume, every record past the step resumed from: those
        steps are about to run again, and the log keeps one record per step."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        kept = lines[:-1]  # the last element is b"" or a torn line
        if resumed_step is not None:
            kept = [x for x in kept if _step_of(x) <= resumed_step]
        new = b"".join(x + b"\n" for x in kept)
        if new != data:
            atomic_write_bytes(self.path, lambda f: f.write(new))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{self.prefix}/{k}", v, record["step"])
                elif isinstance(v, dict):  # e.g. per-block accuracies: one curve per entry
                    for name, x in v.items():
                        if isinstance(x, (int, float)) and not isinstance(x, bool):
                            self.tb.add_scalar(f"{self.prefix}/{k}/{name}", x, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def questionable_settings(cfg: Config, peak_lr: float, steps_per_epoch: int) -> list[str]:
    """Settings that are allowed but almost certainly not meant: said as warnings, the run goes on."""
    o, notes = cfg.optim, []
    if peak_lr > 0.01:  # AdamW on ViTs: the papers' peaks are 1e-4 .. 3e-3
        source = f"optim.lr {o.lr:g}" if o.lr is not None else f"optim.blr {o.blr:g} x effective batch / 256"
        notes.append(f"peak lr {peak_lr:.3g} ({source}) is implausibly high for AdamW on a ViT (MAE: blr 1.5e-4, "
                     "lr 2.4e-3 at batch 4096); expect divergence")  # fmt: skip
    epochs = schedule_length(cfg.train, steps_per_epoch) / steps_per_epoch
    if o.warmup_epochs >= epochs:
        notes.append(f"optim.warmup_epochs {o.warmup_epochs:g} >= the run's {epochs:g} epochs: the lr never reaches "
                     f"its peak {peak_lr:.3g} (it ends at {peak_lr * epochs / o.warmup_epochs:.3g})")  # fmt: skip
    return notes


def pretrain(cfg: Config) -> RunResult:
    from mimkit.logs import ensure_logging

    ensure_logging()
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
                        second_view=getattr(model, "second_view", None))  # fmt: skip
    knn_sources = None  # labelled train / val splits for the k-NN trend monitor
    if t.knn_every_epochs:
        from mimkit.eval import open_labelled_split

        knn_path = t.knn_data or cfg.data.path
        knn_sources = (open_labelled_split(knn_path, "train", root=cfg.data.root, download=cfg.data.download),
                       open_labelled_split(knn_path, t.knn_val_split, root=cfg.data.root, download=cfg.data.download))
    model.to(device)
    if cfg.distributed.activation_checkpointing:
        model.set_grad_checkpointing(True)
    fsdp = cfg.distributed.strategy == "fsdp" and dist.enabled
    if fsdp:
        mdist.shard_model(model, precision)  # before the optimizer: it must see the sharded parameters
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
    from mimkit.methods import no_weight_decay_names

    no_decay = no_weight_decay_names(model, cfg)
    param_groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  **adamw_kernel(cfg.optim.implementation, fsdp))  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- resume: model, optimizer, scaler, step (which fixes epoch, data position and lr), RNG
    step, nonfinite_total, skipped_total = 0, 0, 0
    resume_from, state = find_resume(cfg)
    if resume_from is not None:
        check_resumable(resume_from, state, model, cfg.method)
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
        scaler.load_state_dict(state["scaler"])
        step, nonfinite_total, skipped_total = state["step"], state["nonfinite_steps"], state["skipped_images"]
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

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".checkpoint-*.tmp"):  # left by a kill during a checkpoint write
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
        log.info(
            "mimkit %s | %s %s | %d processes on %s | effective batch %d (%d x %d x accum %d) | peak lr %.3g | "
            "%d steps/epoch, %d steps total | precision %s, %s attention%s",
            mimkit.__version__, cfg.method, cfg.model.arch, dist.world_size, device, effective_batch, t.batch_size,
            dist.world_size, t.accum_steps, peak_lr, steps_per_epoch, total_steps, precision, attention,
            " | compiled blocks" if compiled else "",
        )  # fmt: skip
        if resume_from is not None:
            log.info("resumed from %s at step %d", resume_from, step)
        for note in questionable_settings(cfg, peak_lr, steps_per_epoch):
            log.warning("%s", note)
    metrics = MetricsLog(out_dir, dist.is_main, t.tensorboard, resumed_step=step if resume_from is not None else None)
    vis_images = None  # fixed images for TensorBoard reconstruction grids (rank 0, indexable sources only)
    if metrics.tb is not None and t.vis_every_epochs and getattr(data, "dataset", None) is not None and hasattr(model, "patch_size"):
        vis_images = preview_images(data.dataset.source, model.encoder.patch_embed.img_size[0], t.vis_images)
    if resume_from is not None:
        metrics.write({"event": "resume", "from": str(resume_from), "resumed_step": step})

    def save(step: int) -> Path | None:
        rng = mdist.all_gather_objects(rng_state())
        meta = {
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": step / steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "nonfinite_steps": nonfinite_total,
            "skipped_images": skipped_total,
            "rng": rng,
            "config": to_dict(cfg),
            "mimkit_version": mimkit.__version__,
            "method": cfg.method,
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
                                  f"checkpoint, {last_ckpt or 'none yet'}, is intact: free space and rerun to resume "
                                  "from it") from None  # fmt: skip
        if dist.is_main:
            prune_checkpoints(out_dir, t.keep_last)
        return path if dist.is_main else None

    # ---- the loop
    progress = None
    if dist.is_main and t.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=last_step, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    last_ckpt = resume_from if resume_from is not None else None
    consecutive_nonfinite, loss_value = 0, float("nan")
    window_start, window_steps = time.perf_counter(), 0
    run_start = window_start
    model.train()
    while step < last_step:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = data.epoch_batches(epoch, in_epoch)
        for step in range(step, min((epoch + 1) * steps_per_epoch, last_step)):
            lr = lr_at(step, steps_per_epoch, cfg, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if hasattr(model, "set_progress"):  # step-dependent method terms (BootMAE: loss-weight ramp, EMA momentum)
                model.set_progress(step, steps_per_epoch, total_steps)
            loss_sum = torch.zeros((), device=device)
            skipped, terms = 0, {}
            for micro in range(t.accum_steps):
                batch = next(batches)
                imgs = batch.pop("image").to(device, non_blocking=True)
                skipped += int(batch.pop("skipped").sum())
                mask_inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = micro == t.accum_steps - 1  # all-reduce gradients on the last micro-step only
                if fsdp:
                    model.set_requires_gradient_sync(sync)
                with (ddp.no_sync() if ddp is not None and not sync else nullcontext()), autocast_context(device, precision):
                    out = train_model(imgs, **mask_inputs)
                scaler.scale(out.loss / t.accum_steps).backward()
                loss_sum += out.loss.detach().float()
                for name in LOSS_TERMS.intersection(out._fields):  # a method's loss components, for the logs
                    terms[name] = terms.get(name, 0.0) + float(getattr(out, name)) / t.accum_steps

            # one all-reduce per step: loss, non-finite flag, skipped images, summed over processes
            out_of_time = t.max_minutes is not None and time.perf_counter() - run_start > 60 * t.max_minutes
            stats = torch.stack([loss_sum / t.accum_steps, (~torch.isfinite(loss_sum)).float(),
                                 torch.tensor(float(skipped), device=device),
                                 torch.tensor(float(out_of_time), device=device)])  # fmt: skip
            stats = mdist.all_reduce_sum(stats)
            loss_value = float(stats[0]) / dist.world_size
            skipped_total += int(stats[2])
            grad_norm = None
            finite = float(stats[1]) == 0
            if finite and cfg.optim.clip_grad is not None:
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under fsdp
                # fp16: the scaler skips overflowing gradients itself and lowers its scale
                finite = math.isfinite(grad_norm) or precision == "fp16"
            if finite:
                scaler.step(optimizer)
                scaler.update()
                if hasattr(model, "after_step"):  # e.g. BootMAE's momentum-encoder (EMA) update
                    model.after_step(step)
                consecutive_nonfinite = 0
            else:
                nonfinite_total += 1
                consecutive_nonfinite += 1
                log.warning("step %d: non-finite loss/gradient, update skipped (%d in a row)", step, consecutive_nonfinite)
            optimizer.zero_grad(set_to_none=True)
            window_steps += 1

            if consecutive_nonfinite >= t.max_nonfinite_steps:
                if progress is not None:
                    progress.close()
                metrics.write({"event": "diverged", "step": step + 1, "nonfinite_steps": nonfinite_total})
                metrics.close()
                raise TrainingDiverged(
                    f"loss or gradients were non-finite for {consecutive_nonfinite} consecutive steps (last at step "
                    f"{step}); stopped. Last good checkpoint: {last_ckpt or 'none yet'} (left intact). Try a lower "
                    "optim.blr, optim.clip_grad, or train.precision=bf16/fp32."
                )

            done = step + 1
            if float(stats[3]) > 0 and done < last_step:  # train.max_minutes reached (on any rank): stop here
                last_step = done
                if progress is not None:
                    progress.total = done
            if done % t.log_every == 0 or done == last_step:
                elapsed = time.perf_counter() - window_start
                img_s = window_steps * effective_batch / max(elapsed, 1e-9)
                record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": loss_value, "lr": lr,
                          "img_per_s": round(img_s, 2), "nonfinite_steps": nonfinite_total,
                          "skipped_images": skipped_total, "time": time.time()}  # fmt: skip
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                record.update(terms)  # loss components of this process's last step
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
            if (periodic and consecutive_nonfinite == 0) or done == last_step:
                last_ckpt = save(done) or last_ckpt
            if knn_sources is not None and end_of_epoch and (done // steps_per_epoch) % t.knn_every_epochs == 0:
                from mimkit.eval import knn_monitor

                if fsdp:
                    model.unshard()  # the root's own parameters (embeddings, norm) are sharded
                # on every rank: the images are split across processes and the features gathered
                knn_stats = knn_monitor(model.encoder, *knn_sources, mean=cfg.data.mean, std=cfg.data.std, device=device,
                                    precision=precision, max_train=t.knn_samples[0], max_val=t.knn_samples[1],
                                    seed=t.seed)  # fmt: skip
                if fsdp:
                    model.reshard()
                metrics.write({"step": done, "epoch": done // steps_per_epoch, **knn_stats})
                window_start = time.perf_counter()
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
    return RunResult(out_dir, last_ckpt, out_dir / "config.yaml", metrics.path, step, loss_value,
                     nonfinite_total, skipped_total)  # fmt: skip


def run(config_path: str | None = None, overrides: list[str] | None = None, **sections) -> RunResult:
    """Python entry point: `mimkit.run("configs/quickstart.yaml", ["train.epochs=1"])`, the same as
    `mimkit.pretrain(mimkit.load_config("configs/quickstart.yaml", ["train.epochs=1"]))`."""
    from mimkit.config import load_config

    return pretrain(load_config(config_path, overrides, **sections))


def config_of_checkpoint(path: str | Path) -> Config:
    return config_from_dict(load_checkpoint(path)["config"])


if __name__ == "__main__":  # pragma: no cover
    from mimkit.cli import main

    sys.exit(main(["pretrain", *sys.argv[1:]]))
