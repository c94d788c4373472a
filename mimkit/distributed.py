"""torch.distributed setup from torchrun or srun environment variables (DDP; gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mimkit.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """DDP / FSDP wrap the model: several processes, or one under torchrun (a process group of one)."""
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun (RANK...) or SLURM srun (SLURM_PROCID...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: '{name}' asked for, but CUDA is not available here; use train.device=cpu "
                              "or auto")  # fmt: skip
        torch.cuda.set_device(device)
    return device


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls are only fast on CPUs with AVX512-BF16 or AMX; elsewhere they are slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def init_distributed(device_name: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    rank, world, local_rank = world_from_env()
    device = resolve_device(device_name, local_rank)
    # torchrun --nproc_per_node 1 starts a process group of one, so DDP / FSDP2 run exactly as they do on more
    # (the single-GPU check of benchmarks/gpu_check.sh relies on it); a plain `python` launch starts none
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    if (world > 1 or launched) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError(
                "multi-process run needs MASTER_ADDR and MASTER_PORT (torchrun sets them; with srun export them)"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local_rank, device)


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], precision: str) -> None:
    """FSDP2: shard each of `blocks` (every transformer block of the method: encoder, decoders, momentum
    encoder — mimkit.models.transformer_blocks, the list compile uses too), then the rest at the root.
    bf16 runs keep fp32 master weights and gather parameters in bf16 (reduce in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
