"""The one optimizer step of every training loop (pretraining, fine-tuning, linear probing).

A step is `accum_steps` micro-steps — forward under autocast, backward through the fp16 grad scaler,
gradient synchronisation on the last micro-step only (DDP `no_sync`, FSDP2
`set_requires_gradient_sync`) — then one all-reduce of the loss, a non-finite flag and any named extra
sums the loop asks for (a stop flag, skipped images), optional gradient clipping, and the update, skipped when the loss or the gradients
are not finite. Too many skipped steps in a row stop the run with `TrainingDiverged`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from mimkit import distributed as mdist
from mimkit.errors import MimkitError

log = logging.getLogger("mimkit")

Forward = Callable[[int], "tuple[torch.Tensor, dict[str, float]]"]  # micro index -> (loss, loss terms)


class TrainingDiverged(MimkitError, RuntimeError):
    """Too many consecutive non-finite steps."""


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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


@dataclass
class StepResult:
    loss: float  # mean over micro-steps and processes
    applied: bool  # False: non-finite loss or gradients, the update was skipped
    grad_norm: float | None  # global L2 norm of the gradients (before clipping); None when the step was skipped
    extras: dict[str, float]  # the loop's named extra sums (flags, counts), summed over processes
    terms: dict[str, float] = field(default_factory=dict)  # the method's loss terms, this process, mean of micro-steps


class StepEngine:
    """Owns the optimizer, the grad scaler and the non-finite bookkeeping of one training loop. Under DDP,
    `distribute()` wraps the model once its weights are in place (after a resume) and returns what to call."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 precision: str, accum_steps: int = 1, clip_grad: float | None = None, fsdp: bool = False,
                 max_nonfinite_steps: int = 20, name: str = "train", hint: str = "") -> None:  # fmt: skip
        self.model, self.optimizer, self.device, self.precision = model, optimizer, device, precision
        self.accum_steps, self.clip_grad, self.fsdp = accum_steps, clip_grad, fsdp
        self.ddp: DistributedDataParallel | None = None
        self.max_nonfinite_steps, self.name, self.hint = max_nonfinite_steps, name, hint
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.nonfinite_total, self.consecutive_nonfinite = 0, 0
        self.last_checkpoint: Path | None = None  # set by the loop after each save, named when the run diverges

    def distribute(self, enabled: bool) -> torch.nn.Module:
        """The module the loop calls: the model wrapped in DistributedDataParallel when `enabled` (several processes,
        no FSDP), the model itself otherwise. Called once, after the weights are loaded."""
        if enabled and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        return self.ddp or self.model

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, step: int, forward: Forward,
             extras: Callable[[], Mapping[str, float]] | Mapping[str, float] | None = None,
             on_update: Callable[[], None] | None = None) -> StepResult:  # fmt: skip
        """`forward(micro)` runs one micro-step's forward pass and returns (loss, loss terms); `extras` (or a
        function called after the micro-steps) are named sums to add over processes in the step's one all-reduce,
        read back by name from `StepResult.extras`; `on_update` runs after an applied update (e.g. an EMA)."""
        loss_sum = torch.zeros((), device=self.device)
        terms: dict[str, float] = {}
        for micro in range(self.accum_steps):
            sync = micro == self.accum_steps - 1  # all-reduce gradients on the last micro-step only
            if self.fsdp:
                self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]  # fully_shard's method
            no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()
            with no_sync, autocast_context(self.device, self.precision):
                loss, micro_terms = forward(micro)
            self.scaler.scale(loss / self.accum_steps).backward()
            loss_sum += loss.detach().float()
            for name, value in micro_terms.items():
                terms[name] = terms.get(name, 0.0) + float(value) / self.accum_steps

        # one all-reduce per step: loss, non-finite flag and the loop's extra sums, over processes
        extras = dict((extras() if callable(extras) else extras) or {})
        stats = torch.stack([loss_sum / self.accum_steps, (~torch.isfinite(loss_sum)).float(),
                             *[torch.tensor(float(x), device=self.device) for x in extras.values()]])  # fmt: skip
        stats = mdist.all_reduce_sum(stats)
        applied, grad_norm = float(stats[1]) == 0, None
        if applied and self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
            # fp16: the scaler skips overflowing gradients itself and lowers its scale
            applied = math.isfinite(grad_norm) or self.precision == "fp16"
        elif applied:  # the norm only, read from the gradients: the update is exactly the one without it
            grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
            if grads:
                total = torch.nn.utils.get_total_norm(grads)
                value = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
                # fp16: the gradients are still scaled (unscaling them is the scaler's step's business)
                grad_norm = value / float(self.scaler.get_scale()) if self.scaler.is_enabled() else value
        if applied:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if on_update is not None:
                on_update()
            self.consecutive_nonfinite = 0
        else:
            self.nonfinite_total += 1
            self.consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss/gradient, update skipped (%d in a row)", step,
                        self.consecutive_nonfinite)  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        if self.consecutive_nonfinite >= self.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{self.name}: loss or gradients were non-finite for {self.consecutive_nonfinite} consecutive steps "
                f"(last at step {step}); stopped. Last good checkpoint: {self.last_checkpoint or 'none yet'} (left "
                f"intact).{' ' + self.hint if self.hint else ''}"
            )
        world = mdist.world_size()
        summed = {name: float(x) for name, x in zip(extras, stats[2:])}
        return StepResult(float(stats[0]) / world, applied, grad_norm, summed, terms)
