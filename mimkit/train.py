"""Pretraining, top to bottom: setup, resume, then epochs of (accumulated) steps through mimkit.loop.

Launch with `mimkit pretrain CONFIG key=value ...`, under torchrun / srun for several processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

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

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

from mimkit import distributed as mdist
from mimkit.checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_out_dir,
    checkpoint_path,
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
from mimkit.engine import StepEngine, adamw_kernel, seed_everything
from mimkit.errors import MimkitError
from mimkit.eval import knn_monitor, open_labelled_split
from mimkit.interop.init_weights import InitReport, initial_state
from mimkit.logs import ensure_logging
from mimkit.loop import Hook, TrainLoop, claim_run_folder, prepare_run_folder
from mimkit.methods import MIMMethod, build_model, no_weight_decay_names
from mimkit.metrics import MetricsLog
from mimkit.models import compile_blocks, resolve_attention, resolve_compile, set_attention_kernel, transformer_blocks
from mimkit.pipeline import PretrainData
from mimkit.registry import encoder_family, method_pool, method_spec
from mimkit.runs import GracefulStop, check_drift, config_changes
from mimkit.schedules import lr_at, schedule_length
from mimkit.version import __version__
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
            raise CheckpointError(
                f"{path}: has no '{key}': it was written by another model (check model.* / the method)"
            )
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
    mask = data.get("mask")
    mask = mask if isinstance(mask, dict) else {}
    # saved as auto before it was written out, when auto meant BEiT's generator for BootMAE's hybrid blocks too
    # (absent, as in 0.1.0, it was the exact-count generator, which auto means now)
    if mask.get("block_generator") == "auto":
        hybrid = mask.get("type") == "hybrid"
        out["mask"]["block_generator"] = (
            "beit" if encoder_family(str(data.get("method"))) == "beit" or hybrid else "exact"
        )
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


@dataclass
class Setup:
    """What pretraining builds before its first step: processes, model, data, optimizer and engine."""

    dist: mdist.DistInfo
    precision: str
    out_dir: Path
    model: MIMMethod
    data: PretrainData
    fsdp: bool
    attention: str
    compiled: bool
    steps_per_epoch: int
    total_steps: int
    last_step: int
    effective_batch: int
    peak_lr: float
    optimizer: torch.optim.Optimizer
    engine: StepEngine
    knn_sources: tuple | None  # labelled train / val splits of the k-NN trend monitor


@dataclass
class Resumed:
    """Where a run starts: its step and skipped images so far, the checkpoint it resumes from and the config changes
    since (`finished`: the folder holds a finished run, returned as is); then the run's counts as it goes."""

    step: int = 0
    skipped: int = 0
    checkpoint: Path | None = None
    changes: dict = field(default_factory=dict)
    allowed: dict = field(default_factory=dict)
    finished: RunResult | None = None
    loss: float = float("nan")  # the last step's
    init: InitReport | None = None  # a new run's train.init_from: what was taken
    clock_s: float = 0.0  # training seconds before this start (train.budget_minutes counts them)


def pretrain(cfg: Config) -> RunResult:
    """Pretrain per `cfg`, resuming from train.out_dir per train.resume. Raises RunStopped (after writing a
    checkpoint) when SIGTERM, SIGINT or train.stop_signal arrives, and RunFolderBusy when another process
    writes the folder."""
    ensure_logging()
    check_pretrainable(cfg)
    t = cfg.train
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(GracefulStop(t.stop_signal))
        s = setup(cfg)  # processes, model, data (checked before any compute), optimizer
        model, data, engine, dist = s.model, s.data, s.engine, s.dist
        claim_run_folder(cleanup, s.out_dir, dist.is_main)
        r = resume(cfg, s)  # model, optimizer, scaler, step (which fixes epoch, data position and lr), RNG
        if r.finished is not None:
            return r.finished
        train_model = engine.distribute(dist.enabled)  # DDP (not under FSDP) once the weights are in place
        if dist.is_main:
            prepare_run_folder(s.out_dir, dump_yaml(resolved(cfg)), (r.step, r.changes, r.allowed, r.checkpoint))
            announce(cfg, s, r)
        # records past the starting step belong to an attempt that left no checkpoint after them: they are run again
        metrics = MetricsLog(
            s.out_dir, dist.is_main, active_loggers(t), resumed_step=r.step, config=to_dict(resolved(cfg))
        )  # the hyperparameters of a W&B / MLflow run
        record_start(metrics, s, r)
        engine.last_checkpoint = r.checkpoint
        save = checkpoint_writer(cfg, s, r, clock=lambda: loop.clock_s)
        loop = TrainLoop("pretrain", t, engine=engine, metrics=metrics, save=save, out_dir=s.out_dir,
                         is_main=dist.is_main, step=r.step, last_step=s.last_step, steps_per_epoch=s.steps_per_epoch,
                         effective_batch=s.effective_batch, hooks=monitors(cfg, s, metrics), step_lines=True,
                         clock_s=r.clock_s)  # fmt: skip

        # ---- the loop: epochs of (accumulated) steps
        spec = method_spec(cfg.method)  # the output fields logged beside the loss: its loss terms, then other values
        logged = (*spec.loss_terms, *spec.logged)
        model.train()
        for step, batches in loop.steps(data.epoch_batches):
            at = loop.schedule_step(step, s.total_steps)  # the step, or the share of train.budget_minutes spent
            lr = set_schedules(cfg, s, at)
            skipped = 0

            def forward(micro: int):
                nonlocal skipped
                batch = next(batches)
                imgs = batch.pop("image").to(s.dist.device, non_blocking=True)
                skipped += int(batch.pop("skipped").sum())
                out = train_model(imgs, **{k: v.to(s.dist.device, non_blocking=True) for k, v in batch.items()})
                return out.loss, {name: getattr(out, name) for name in logged if hasattr(out, name)}

            result = loop.step(step, forward, lambda: {"skipped": float(skipped)},
                               on_update=lambda: model.after_step(at))  # fmt: skip
            r.skipped, r.loss = r.skipped + int(result.extras["skipped"]), result.loss
            tail = {"grad_norm": result.grad_norm} if result.grad_norm is not None else {}
            loop.after_step(result, lr, {"nonfinite_steps": engine.nonfinite_total, "skipped_images": r.skipped},
                            {**tail, **result.terms})  # the loss terms of this process's last step  # fmt: skip
        loop.close()
        mdist.barrier()
        return RunResult(s.out_dir, engine.last_checkpoint, s.out_dir / "config.yaml", metrics.path, loop.done,
                         loop.loss, engine.nonfinite_total, r.skipped)  # fmt: skip


def record_start(metrics: MetricsLog, s: Setup, r: Resumed) -> None:
    """The run's opening events in its metrics log: where a new run's weights came from (train.init_from, also
    written to init_from.json), or the checkpoint a resume starts from and the config changes it allowed."""
    if r.init is not None and s.dist.is_main:  # the key report, kept with the run
        log.info("%s", r.init.summary())
        atomic_write_text(s.out_dir / "init_from.json", json.dumps(r.init.to_dict(), indent=1) + "\n")
        taken = len(r.init.matched) + len(r.init.fitted)
        metrics.write({"event": "init_from", "source": r.init.source, "kind": r.init.kind, "taken": taken,
                       "initialised": len(r.init.missing)})  # fmt: skip
    if r.checkpoint is not None:
        changes = {"config_changes": {k: [a, b] for k, (a, b) in r.allowed.items()}} if r.allowed else {}
        metrics.write({"event": "resume", "from": str(r.checkpoint), "resumed_step": r.step, **changes})


def set_schedules(cfg: Config, s: Setup, at: int) -> float:
    """The schedules at schedule step `at`: the lr (returned), a method's own weight decay (I-JEPA's, on the decayed
    group) and its step-dependent terms (BootMAE's ramps, EMA momenta)."""
    lr = lr_at(at, s.steps_per_epoch, cfg, s.peak_lr)
    s.engine.set_lr(lr)
    weight_decay_at = getattr(s.model, "weight_decay_at", None)
    if weight_decay_at is not None:
        for group in s.optimizer.param_groups:
            if group["weight_decay"] > 0:
                group["weight_decay"] = weight_decay_at(at, s.total_steps)
    s.model.set_progress(at, s.steps_per_epoch, s.total_steps)
    return lr


def resolution_stages(cfg: Config, model: MIMMethod) -> tuple:
    """train.resolution_stages as the data pipeline's (from_epoch, img_size, mask_inputs) stages; the patch embedding
    then takes inputs smaller than model.img_size (its size check is timm's strict_img_size)."""
    if not cfg.train.resolution_stages:
        return ()
    model.encoder.patch_embed.strict_img_size = False
    return tuple((epoch, size, model.mask_inputs_at(size)) for epoch, size in cfg.train.resolution_stages)


def setup(cfg: Config) -> Setup:
    """Processes, the model (sharded, compiled, its attention kernel set), the data and the k-NN monitor's (their
    problems surface here, before any compute), the schedule's lengths and the optimizer: AdamW, no weight decay on 1-D params, biases
    and optim.no_weight_decay (default: the official set)."""
    t = cfg.train
    dist = mdist.init_distributed(t.device, cfg.distributed.timeout_minutes)
    device = dist.device
    precision = mdist.resolve_precision(t.precision, device)
    out_dir = check_out_dir(t.out_dir)
    seed_everything(t.seed)  # the same initial weights on every rank (FSDP shards them without a broadcast)
    model = build_model(cfg)
    seed_everything(t.seed + dist.rank)
    data = PretrainData(cfg, model.encoder.patch_embed.img_size[0], model.mask_inputs, t.batch_size, t.accum_steps,
                        dist.rank, dist.world_size, t.seed, pin_memory=device.type == "cuda",
                        second_view=model.second_view, device=device, stages=resolution_stages(cfg, model))  # fmt: skip
    knn_sources = None  # labelled train / val splits for the k-NN trend monitor
    if t.knn_every_epochs:
        knn_path = t.knn_data or cfg.data.path
        d, chans = cfg.data, cfg.model.in_chans
        knn_sources = (
            open_labelled_split(knn_path, "train", root=d.root, download=d.download, in_chans=chans),
            open_labelled_split(knn_path, t.knn_val_split, root=d.root, download=d.download, in_chans=chans,
                                split_key="train.knn_val_split"),
        )  # fmt: skip
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
    effective_batch = data.global_step_size
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * effective_batch / 256
    no_decay = no_weight_decay_names(model, cfg)
    param_groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=no_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  **adamw_kernel(cfg.optim.implementation, fsdp))  # fmt: skip
    engine = StepEngine(
        model,
        optimizer,
        device=device,
        precision=precision,
        accum_steps=t.accum_steps,
        clip_grad=cfg.optim.clip_grad,
        fsdp=fsdp,
        max_nonfinite_steps=t.max_nonfinite_steps,
        name="pretrain",
        hint="Try a lower optim.blr, optim.clip_grad, or train.precision=bf16/fp32.",
    )
    return Setup(dist, precision, out_dir, model, data, fsdp, attention, compiled, steps_per_epoch, total_steps,
                 min(total_steps, t.max_steps or total_steps), effective_batch, peak_lr, optimizer, engine,
                 knn_sources)  # fmt: skip


def resume(cfg: Config, s: Setup) -> Resumed:
    """The checkpoint train.resume names, checked (this method's, this model's shapes, no refused config drift),
    loaded into the model, optimizer and scaler with the RNG states; a finished run's result."""
    resume_from, state = resume_point(cfg.train.out_dir, cfg.train.resume)
    if resume_from is None:  # a new run: its first weights from train.init_from, if set
        return Resumed(init=initialize(cfg, s) if cfg.train.init_from else None)
    assert state is not None  # resume_point reads a checkpoint's state whenever it names one
    check_resumable(resume_from, state, s.model, cfg.method)
    # the folder is the truth: a change that alters the trajectory is refused unless named
    changes = config_changes(saved_config(state.get("config")), to_dict(resolved(cfg)))
    free = set(TRAJECTORY_FREE)
    if (
        state.get("effective_batch", s.effective_batch) == s.effective_batch
        and state.get("steps_per_epoch") == s.steps_per_epoch
    ):
        free = free | {"train.batch_size", "train.accum_steps"}  # the same global batch on another number of processes
    allowed = check_drift(changes, free, set(cfg.train.resume_allow), resume_from)
    budget = cfg.train.budget_minutes
    spent = budget is not None and state.get("clock_s", 0.0) >= 60 * budget
    if state["step"] >= s.last_step or spent:
        loss = finished_loss(s.out_dir, state, state["step"])
        if s.dist.is_main:
            more = ("its train.budget_minutes are spent" if spent else "raise train.max_steps or, with "
                    "train.resume_allow=train.epochs, train.epochs to train on")  # fmt: skip
            log.info("%s is a finished run: step %d of %d, final loss %.4f, checkpoint %s (nothing to do; %s)",
                     s.out_dir, state["step"], s.last_step, loss, resume_from, more)  # fmt: skip
        out = s.out_dir
        return Resumed(finished=RunResult(out, resume_from, out / "config.yaml", out / "metrics.jsonl", state["step"],
                                          loss, state["nonfinite_steps"], state["skipped_images"], already_finished=True))  # fmt: skip
    load_training_state(resume_from, state, s)
    step = state["step"]
    s.engine.nonfinite_total = state["nonfinite_steps"]
    rngs = state["rng"]
    if len(rngs) == s.dist.world_size:
        set_rng_state(rngs[s.dist.rank])
    else:
        log.warning(
            "resuming with %d processes from a %d-process run: RNG streams re-seeded", s.dist.world_size, len(rngs)
        )
        seed_everything(cfg.train.seed + s.dist.rank + step)
    return Resumed(step, state["skipped_images"], resume_from, changes, allowed, clock_s=state.get("clock_s", 0.0))


def initialize(cfg: Config, s: Setup) -> InitReport:
    """train.init_from at step 0: the source's tensors in the model on every rank (full tensors: FSDP shards them
    on load); the optimizer and the schedules start fresh."""
    full = StateDictOptions(full_state_dict=True)
    assert cfg.train.init_from  # pretrain calls this only when it is set
    current = cast(dict[str, torch.Tensor], get_model_state_dict(s.model, options=full))  # full tensors, no DTensor
    new, report = initial_state(s.model, current, cfg.train.init_from, method_spec(cfg.method).teachers)
    set_model_state_dict(s.model, dict(new), options=full)
    return report


def load_training_state(path: Path, state: dict, s: Setup) -> None:
    """Model, optimizer and grad scaler from a checkpoint of the same steps per epoch."""
    model, optimizer = s.model, s.optimizer
    if path.is_dir():  # sharded (fsdp) checkpoint: every rank reads its part, resharded to this world
        model_state, optim_state = get_state_dict(model, optimizer)
        load_sharded_into(path, model_state, optim_state)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    else:  # one file with full tensors (fsdp shards them on load)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=full)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    if state["steps_per_epoch"] != s.steps_per_epoch:
        raise CheckpointError(
            f"cannot resume {path} exactly: it ran {state['steps_per_epoch']} steps per epoch, this config "
            f"gives {s.steps_per_epoch} (data, batch size, processes or accum_steps changed)"
        )
    s.engine.scaler.load_state_dict(state["scaler"])


def announce(cfg: Config, s: Setup, r: Resumed) -> None:
    """Rank 0's opening lines: the folder, the run's shape, a resume and its config changes, questionable settings."""
    t, dist = cfg.train, s.dist
    log.info("writing %s", s.out_dir.resolve())
    log.info(
        "mimkit %s | %s %s | %d processes on %s | effective batch %d (%d x %d x accum %d) | peak lr %.3g | "
        "%d steps/epoch, %d steps total | precision %s, %s attention%s%s",
        __version__, cfg.method, cfg.model.arch, dist.world_size, dist.device, s.effective_batch, t.batch_size,
        dist.world_size, t.accum_steps, s.peak_lr, s.steps_per_epoch, s.total_steps, s.precision, s.attention,
        " | compiled blocks" if s.compiled else "", " | FSDP2" if s.fsdp else " | DDP" if s.engine.ddp is not None else "",
    )  # fmt: skip
    if r.checkpoint is not None:
        log.info("resumed from %s at step %d", r.checkpoint, r.step)
        for key, (old, new) in r.changes.items():
            log.info("config change at step %d%s: %s %s -> %s", r.step, " (train.resume_allow)" if key in r.allowed
                     else "", key, old, new)  # fmt: skip
    for note in questionable_settings(cfg, s.peak_lr, s.steps_per_epoch):
        log.warning("%s", note)


def checkpoint_writer(cfg: Config, s: Setup, r: Resumed, clock: Callable[[], float]) -> Callable[[int], Path | None]:
    """save(step): the training state at `step` (sharded under FSDP, one file otherwise), the oldest pruned past
    train.keep_last; the path on rank 0, None elsewhere. `r` holds the skipped images and the last step's loss,
    `clock()` the run's training seconds so far (train.budget_minutes continues from them)."""
    model, optimizer, engine, out_dir, dist = s.model, s.optimizer, s.engine, s.out_dir, s.dist

    def save(step: int) -> Path | None:
        rng = mdist.all_gather_objects(rng_state())
        meta = {"scaler": engine.scaler.state_dict(), "step": step, "epoch": step / s.steps_per_epoch,
                "steps_per_epoch": s.steps_per_epoch, "effective_batch": s.effective_batch,
                "nonfinite_steps": engine.nonfinite_total, "skipped_images": r.skipped, "rng": rng,
                "config": to_dict(resolved(cfg)), "mimkit_version": __version__, "method": cfg.method,
                "loss": r.loss,  # the last step's: what a finished run, started again, reports
                "clock_s": clock()}  # fmt: skip
        path = checkpoint_path(out_dir, step, sharded=s.fsdp)
        try:
            if s.fsdp:  # every rank writes its shards; the folder appears once all are done
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
            prune_checkpoints(out_dir, cfg.train.keep_last)
        return path if dist.is_main else None

    return save


def monitors(cfg: Config, s: Setup, metrics: MetricsLog) -> tuple[Hook, ...]:
    """The end-of-epoch monitors: the k-NN trend (train.knn_every_epochs, on every rank: the images are split across
    processes and the features gathered) and TensorBoard reconstruction grids of fixed images (rank 0, indexable
    sources only)."""
    t, model, dist = cfg.train, s.model, s.dist
    hooks = []
    if s.knn_sources is not None:
        knn_sources = s.knn_sources

        def knn(done: int) -> None:
            if s.fsdp:
                cast("FSDPModule", model).unshard()  # the root's own parameters (embeddings, norm) are sharded
            mean, std = cfg.data.mean, cfg.data.std
            assert mean != "auto" and std != "auto"  # measured by PretrainData (pipeline.resolve_auto_stats)
            stats = knn_monitor(model.encoder, *knn_sources, mean=mean, std=std, device=dist.device,
                                pool=method_pool(cfg.method),  # the method's (I-JEPA's encoder has no cls token)
                                precision=s.precision, max_train=t.knn_samples[0], max_val=t.knn_samples[1],
                                seed=t.seed)  # fmt: skip
            if s.fsdp:
                cast("FSDPModule", model).reshard()
            epoch = done // s.steps_per_epoch
            metrics.write({"step": done, "epoch": epoch, **stats})
            if dist.is_main:
                log.info("epoch %d k-NN monitor: top-1 %.2f%% (k=%d, %d train / %d val images; a trend, not a quality "
                         "measure)", epoch, stats["knn_top1"], stats.get("knn_k", 20), stats["knn_train_images"],
                         stats["knn_val_images"])  # fmt: skip

        hooks.append(Hook(t.knn_every_epochs, knn))
    if (
        metrics.tb is not None
        and t.vis_every_epochs
        and getattr(s.data, "dataset", None) is not None
        and method_spec(cfg.method).pixels(cfg)
    ):
        vis_images = preview_images(s.data.dataset.source, model.encoder.patch_embed.img_size[0], t.vis_images)
        hooks.append(Hook(t.vis_every_epochs, lambda done: log_reconstruction_grid(
            metrics.tb, model, vis_images, done, seed=t.seed, mean=cfg.data.mean, std=cfg.data.std)))  # fmt: skip
    return tuple(hooks)


def run(config_path: str | None = None, overrides: list[str] | None = None, **sections) -> RunResult:
    """Python entry point: `mimkit.run("configs/quickstart.yaml", ["train.epochs=1"])`, the same as
    `mimkit.pretrain(mimkit.load_config("configs/quickstart.yaml", ["train.epochs=1"]))`. It writes into the
    recipe's train.out_dir (the quickstart's: runs/quickstart, the folder the CLI uses too) unless you pass
    `train.out_dir=...`; a folder that holds a run of another config is refused, a finished one returned."""
    return pretrain(load_config(config_path, overrides, **sections))
