"""MAE pretraining-step throughput, mimkit side by side with Hugging Face ViTMAE: img/s, achieved TFLOP/s
(analytic count), MFU, peak memory; and, with --data-only, the input pipeline alone.

    python benchmarks/throughput.py                      # tiny + small + base, bf16 + fp32, mimkit + HF sdpa/eager
    python benchmarks/throughput.py --models base --precisions fp32 --impls mimkit,hf-sdpa --steps 5 --json out.json
    python benchmarks/throughput.py --models tiny --precisions fp32 --steps 1 --warmup 0 --batch 16   # smoke run
    python benchmarks/throughput.py --data-only [--data cifar10.npz] [--step-json out.json]
    python benchmarks/throughput.py --device cuda --models tiny,base,large --precisions bf16 \
        --impls mimkit,mimkit-compiled,hf-sdpa,hf-sdpa-compiled --steps 10 --warmup 3   # one GPU (gpu_check.sh)

Step: forward (under autocast for bf16) + backward + AdamW(lr 1.5e-4, betas (0.9, 0.95), wd 0.05) step +
zero_grad on random images (mimkit: the fused AdamW kernel its training loop uses; HF: torch's default); masks are fresh every step. Every implementation (--impls) runs in the same
process at the same sizes, batch, mask ratio 0.75, norm-pix loss and precision:
  mimkit     mimkit's MAE (timm ViT encoder);
  hf-sdpa    transformers' ViTMAEForPreTraining, attn_implementation="sdpa";
  hf-eager   the same with attn_implementation="eager";
  hf-sdpa-compiled  hf-sdpa with every ViTMAELayer torch.compile'd in place, as mimkit-compiled does its blocks;
  mimkit-crossmae  mimkit's MAE with CrossMAE's decoder (mae.decoder=crossmae) at the same decoder width / depth,
             decoding --reconstruct-ratio of the masked patches (another network: its FLOPs are its own, its
             MFU is against the MAE step's GEMM ceiling, and its parameters are left out of the equality check).
HF's (a test-only dependency) is configured with qkv bias, LayerNorm eps 1e-6, exact GELU, no dropout and
MLPs 4x wide, so both have the same parameters (their counts are printed). "× fastest baseline" is
mimkit's img/s over the best HF row of the same model and precision.

FLOPs are counted analytically (matmuls only, training = 3x forward). The MFU column divides by a matmul
ceiling measured in the same run at the step's own GEMM shapes: every distinct nn.Linear of the step
(encoder qkv/proj/fc1/fc2 and decoder_embed on batch*(visible+1) rows; decoder qkv/proj/fc1/fc2 and
decoder_pred on batch*(patches+1) rows), each in the forward layout (x @ W^T) and both backward layouts
(grad_x = g @ W, grad_W = g^T @ x). Rates are cached per shape and layout, and combined time-weighted:
total FLOPs / sum(FLOPs / rate). The ceiling leaves out attention's batched small matmuls (QK^T, AV) and
the patch-embedding convolution, so a step whose attention runs faster than its linears can exceed 100%.
On CUDA two more references are printed: "MFU (peak)" against the GPU's dense bf16 datasheet peak
(GPU_BF16_PEAK_TFLOPS, H100 / H200 / A100) and "square matmul" TFLOP/s, one large square bf16 product
(--square, 8192 on CUDA) measured in the same run.

--data-only times the input pipeline alone: mimkit's PretrainData as `mimkit pretrain` builds it (file
decode + RandomResizedCrop/flip/normalise + per-sample mask noise, data.num_workers DataLoader workers),
iterated with epoch_batches(), for (a) a CIFAR-10 .npz at ViT-T/4@32 and (b) a generated JPEG
ImageFolder at ViT-B/16@224 (and the same JPEGs as WebDataset shards, where webdataset is installed), each
JPEG source with data.decode=cpu (PIL in the workers) and data.decode=device (nvJPEG in batches + crops on
--decode-device, CUDA by default when present; cpu runs the same code on the CPU). Device batches are
synchronised before the clock stops. The first batch of each worker (its start-up) is never timed. The JPEGs
were just written, so they are read from the page cache: disk reads are not part of the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import gc
import importlib.util
import itertools
import json
import os
import platform
import re
import resource
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from mimkit.config import load_config
from mimkit.engine import adamw_kernel, autocast_context
from mimkit.machine import cpu_flags, cpu_model
from mimkit.masking import num_visible
from mimkit.methods import build_model
from mimkit.models import compile_blocks, resolve_attention, set_attention_kernel
from mimkit.pipeline import PretrainData
from mimkit.presets import get_preset

MASK_RATIO = 0.75
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10.npz"
IMPLS = ("mimkit", "hf-sdpa", "hf-eager")
# dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), TFLOP/s; matched on the device name,
# most specific first. The H200 SXM has the H100 SXM's arithmetic (its memory differs).
GPU_BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4),
                        ("H200", 989.4), ("A100", 312.0))  # fmt: skip
# ablations: train.compile=true (every block torch.compile'd; the warmup steps include compiling), each
# attention kernel forced (the mimkit row uses train.attention=auto, as `mimkit pretrain` does), and torch's
# default AdamW (foreach) in place of the fused kernel the training loop picks, and mae.decode_visible=true (the
# last decoder block and the pixel head also at the cls token and the visible patches, as the official code)
OPTIONAL_IMPLS = (
    "mimkit-compiled",
    "mimkit-sdpa",
    "mimkit-eager",
    "mimkit-default-adamw",
    "mimkit-decode-visible",
    "hf-sdpa-compiled",
)
OTHER_DECODER_IMPLS = ("mimkit-crossmae",)  # a different network at the same sizes (not one of the ablations above)


@dataclass(frozen=True)
class ModelSpec:
    label: str
    arch: str
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    batch: int
    reference_gflop_per_image: float | None  # fwd+bwd, quoted in the issue, for the sanity check
    gpu_batch: int = 256  # per-GPU batch on CUDA (fills an H100 / H200 without running out of memory)
    reconstruct_ratio: float = 0.25  # mimkit-crossmae: fraction of the masked patches decoded (--reconstruct-ratio)


MODELS = {
    "tiny": ModelSpec("ViT-T/4@32", "vit_tiny_patch4_32", 128, 4, 4, 256, 0.89, gpu_batch=1024),
    "small": ModelSpec("ViT-S/16@224", "vit_small_patch16_224", 512, 8, 16, 16, None),
    "base": ModelSpec("ViT-B/16@224", "vit_base_patch16_224", 512, 8, 16, 16, 58.7),
    "large": ModelSpec("ViT-L/16@224", "vit_large_patch16_224", 512, 8, 16, 4, None),
}


# ---------------------------------------------------------------- analytic FLOP count


def transformer_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of `depth` pre-norm ViT blocks on one sequence (2*M*N*K per matmul)."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)  # qkv, proj, fc1, fc2
    attention = 2 * (2 * tokens * tokens * dim)  # QK^T and AV, summed over heads
    return depth * (linear + attention)


def mae_flops_per_image(spec: ModelSpec) -> dict[str, float]:
    """Forward matmul FLOPs per image by part, plus the training-step total (3x forward)."""
    p = get_preset(spec.arch)
    num_patches = p.grid**2
    encoder_tokens = num_visible(num_patches, MASK_RATIO) + 1  # visible patches + cls
    pixels_per_patch = p.patch_size**2 * 3
    parts = {
        "patch_embed": 2 * num_patches * pixels_per_patch * p.embed_dim,  # applied to all patches
        "encoder": transformer_forward_flops(encoder_tokens, p.embed_dim, p.depth),
        "decoder_embed": 2 * encoder_tokens * p.embed_dim * spec.decoder_dim,
        "decoder": transformer_forward_flops(num_patches + 1, spec.decoder_dim, spec.decoder_depth),
        "decoder_pred": 2 * (num_patches + 1) * spec.decoder_dim * pixels_per_patch,
    }
    parts["forward"] = sum(parts.values())
    parts["train_step"] = 3 * parts["forward"]
    return parts


def crossmae_flops_per_image(spec: ModelSpec) -> dict[str, float]:
    """mae_flops_per_image for CrossMAE's decoder: N = round(ratio * masked) queries, each block projecting the
    queries (q, out: N rows; MLP: N rows) and the context (k, v: the encoder's visible tokens + cls)."""
    p = get_preset(spec.arch)
    num_patches, dim = p.grid**2, spec.decoder_dim
    context = num_visible(num_patches, MASK_RATIO) + 1
    queries = round(spec.reconstruct_ratio * (num_patches - context + 1))
    block = 2 * queries * dim * (2 * dim + 8 * dim) + 2 * context * dim * 2 * dim + 2 * 2 * queries * context * dim
    parts = {**mae_flops_per_image(spec), "decoder": spec.decoder_depth * block,
             "decoder_pred": 2 * queries * dim * p.patch_size**2 * 3}  # fmt: skip
    parts["forward"] = sum(v for k, v in parts.items() if k not in ("forward", "train_step"))
    parts["train_step"] = 3 * parts["forward"]
    return parts


def flops_per_image(spec: ModelSpec, impl: str) -> dict[str, float]:
    return crossmae_flops_per_image(spec) if impl in OTHER_DECODER_IMPLS else mae_flops_per_image(spec)


@dataclass(frozen=True)
class LinearLayer:
    name: str
    rows: int  # batch * tokens it is applied to
    in_features: int
    out_features: int
    count: int  # how many such layers the step runs (block depth)


def step_linear_layers(spec: ModelSpec, batch: int) -> list[LinearLayer]:
    """Every nn.Linear of an MAE step with the rows it sees: the GEMMs behind the analytic count."""
    p = get_preset(spec.arch)
    num_patches = p.grid**2
    encoder_rows = batch * (num_visible(num_patches, MASK_RATIO) + 1)
    decoder_rows = batch * (num_patches + 1)

    def block(prefix: str, rows: int, dim: int, depth: int) -> list[LinearLayer]:
        return [
            LinearLayer(f"{prefix} qkv", rows, dim, 3 * dim, depth),
            LinearLayer(f"{prefix} proj", rows, dim, dim, depth),
            LinearLayer(f"{prefix} fc1", rows, dim, 4 * dim, depth),
            LinearLayer(f"{prefix} fc2", rows, 4 * dim, dim, depth),
        ]

    return [
        *block("encoder", encoder_rows, p.embed_dim, p.depth),
        LinearLayer("decoder_embed", encoder_rows, p.embed_dim, spec.decoder_dim, 1),
        *block("decoder", decoder_rows, spec.decoder_dim, spec.decoder_depth),
        LinearLayer("decoder_pred", decoder_rows, spec.decoder_dim, p.patch_size**2 * 3, 1),
    ]


def linear_gemms(layer: LinearLayer) -> list[tuple[int, int, int, str]]:
    """(m, k, n, layout) of the three GEMMs of one nn.Linear: forward and the two backward products."""
    rows, fan_in, fan_out = layer.rows, layer.in_features, layer.out_features
    return [
        (rows, fan_in, fan_out, "x@W^T"),  # y = x @ W^T
        (rows, fan_out, fan_in, "g@W"),  # grad_x = g @ W
        (fan_out, rows, fan_in, "g^T@x"),  # grad_W = g^T @ x
    ]


# ---------------------------------------------------------------- measurement helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of the enclosed block, in MiB. CUDA: max_memory_allocated. CPU: the process's
    peak RSS minus its RSS at entry; the peak (VmHWM) is reset through /proc/self/clear_refs so each
    row is measured on its own. Without that (non-Linux) ru_maxrss is used, which never goes down:
    a row that stays under an earlier row's peak then reads as ~0."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS at entry is honest
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.use_proc = _proc_status_kib("VmRSS") is not None
        except OSError:
            self.use_proc = False
        self.start = _proc_status_kib("VmRSS") if self.use_proc else self._ru_maxrss_kib()
        return self

    @staticmethod
    def _ru_maxrss_kib() -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if platform.system() == "Darwin" else rss  # bytes on macOS, KiB on Linux

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        else:
            peak = _proc_status_kib("VmHWM") if self.use_proc else self._ru_maxrss_kib()
            self.mib = (peak - self.start) / 1024


@functools.cache
def gemm_gflops(m: int, k: int, n: int, layout: str, dtype: torch.dtype, device: torch.device,
                min_seconds: float = 0.3, trials: int = 3) -> float:  # fmt: skip
    """torch.matmul rate of an (m, k) @ (k, n) product in `dtype`, its operands laid out as in `layout`
    (see linear_gemms). Best of `trials` runs of >= min_seconds each, so a busy shared CPU affects it
    less. Cached: a shape and layout shared by several layers or rows is measured once."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    if layout == "x@W^T":  # activations times a weight (n, k) transposed, as nn.Linear's forward
        a, b = randn(m, k), randn(n, k).t()
    elif layout == "g@W":  # row-major times row-major
        a, b = randn(m, k), randn(k, n)
    elif layout == "g^T@x":  # a transposed (k, m) gradient times row-major activations
        a, b = randn(k, m).t(), randn(k, n)
    else:
        raise ValueError(f"unknown GEMM layout {layout}")
    sync_every = 4 if device.type == "cuda" else 1  # GPU: keep launches queued between the clock checks
    for _ in range(2):
        torch.matmul(a, b)
    best = 0.0
    for _ in range(trials):
        synchronize(device)
        calls, start = 0, time.perf_counter()
        while calls % sync_every or time.perf_counter() - start < min_seconds:
            torch.matmul(a, b)
            calls += 1
            if calls % sync_every == 0:
                synchronize(device)
        best = max(best, 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9)
    return best


def gpu_bf16_peak_tflops(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak of a known GPU (GPU_BF16_PEAK_TFLOPS), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK_TFLOPS if key in name), None)


def square_matmul_tflops(size: int, precision: str, device: torch.device, min_seconds: float) -> float:
    """One large square product (size^3, row-major operands): the matrix units' practical ceiling."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return gemm_gflops(size, size, size, "g@W", dtype, device, min_seconds) / 1e3


def gemm_ceiling_gflops(spec: ModelSpec, batch: int, precision: str, device: torch.device,
                        min_seconds: float) -> float:  # fmt: skip
    """Matmul rate at every linear-layer GEMM of the step (forward and both backward layouts), combined
    time-weighted: total FLOPs / total time at the measured rates."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    total_flops = total_seconds = 0.0
    for layer in step_linear_layers(spec, batch):
        for m, k, n, layout in linear_gemms(layer):
            flops = 2 * m * k * n * layer.count
            total_flops += flops
            total_seconds += flops / (gemm_gflops(m, k, n, layout, dtype, device, min_seconds) * 1e9)
    return total_flops / total_seconds / 1e9


# ---------------------------------------------------------------- the models


def hf_vit_mae():
    """transformers' ViTMAE classes, imported only when an hf-* implementation is asked for."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError as e:
        raise SystemExit(
            f"the hf-* baselines need Hugging Face transformers >= 5 (a test-only dependency: "
            f"pip install -e '.[dev]'), or leave them out with --impls mimkit ({e})"
        ) from e
    return ViTMAEConfig, ViTMAEForPreTraining


def hf_mae_config(spec: ModelSpec, attn_implementation: str):
    """An HF ViTMAE config with mimkit's sizes and MAE settings for `spec`."""
    ViTMAEConfig, _ = hf_vit_mae()
    p = get_preset(spec.arch)
    return ViTMAEConfig(
        hidden_size=p.embed_dim,
        num_hidden_layers=p.depth,
        num_attention_heads=p.num_heads,
        intermediate_size=4 * p.embed_dim,
        decoder_hidden_size=spec.decoder_dim,
        decoder_num_hidden_layers=spec.decoder_depth,
        decoder_num_attention_heads=spec.decoder_heads,
        decoder_intermediate_size=4 * spec.decoder_dim,
        image_size=p.img_size,
        patch_size=p.patch_size,
        num_channels=3,
        qkv_bias=True,
        layer_norm_eps=1e-6,  # HF's default is 1e-12; MAE / timm use 1e-6
        hidden_act="gelu",  # exact (erf) GELU, as timm's nn.GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        mask_ratio=MASK_RATIO,
        norm_pix_loss=True,
        attn_implementation=attn_implementation,
    )


def build_mae(
    impl: str, spec: ModelSpec, precision: str = "fp32", device: torch.device | None = None
) -> torch.nn.Module:
    """The MAE of `impl` at `spec`'s sizes. For both kinds `model(imgs).loss` is the training loss,
    with masking noise drawn inside the forward on the images' device."""
    device = torch.device("cpu") if device is None else device
    if impl.startswith("mimkit"):
        crossmae = ["mae.decoder=crossmae", f"mae.reconstruct_ratio={spec.reconstruct_ratio}"]
        cfg = load_config(None, [
            f"model.arch={spec.arch}", f"mae.decoder_dim={spec.decoder_dim}",
            f"mae.decoder_depth={spec.decoder_depth}", f"mae.decoder_heads={spec.decoder_heads}",
            "mae.norm_pix_loss=true", f"mask.ratio={MASK_RATIO}", *(crossmae if impl == "mimkit-crossmae" else []),
            *(["mae.decode_visible=true"] if impl == "mimkit-decode-visible" else []),
        ])  # fmt: skip
        model = build_model(cfg)
        forced = impl.removeprefix("mimkit-") if impl in ("mimkit-sdpa", "mimkit-eager") else "auto"
        set_attention_kernel(model, resolve_attention(forced, device, precision))
        if impl == "mimkit-compiled":
            compile_blocks(model, device)
        return model
    _, ViTMAEForPreTraining = hf_vit_mae()
    attn = impl.removeprefix("hf-").removesuffix("-compiled")
    model = ViTMAEForPreTraining(hf_mae_config(spec, attn_implementation=attn))
    if impl.endswith("-compiled"):
        for layer in hf_layers(model):
            layer.compile()
    return model


def hf_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """HF ViTMAE's transformer layers (encoder and decoder), the counterpart of mimkit's transformer_blocks."""
    return [m for m in model.modules() if type(m).__name__ == "ViTMAELayer"]


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def training_step(spec: ModelSpec, impl: str, precision: str, device: torch.device, batch: int):
    """(model, step): one full MAE training step of `impl` on fixed random images."""
    model = build_mae(impl, spec, precision, device).to(device).train()
    # mimkit's row uses the kernel `mimkit pretrain` picks (fused); the baselines torch's default AdamW
    kernel = adamw_kernel("auto", sharded=False) if impl.startswith("mimkit") and impl != "mimkit-default-adamw" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, **kernel)
    img_size = get_preset(spec.arch).img_size
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)

    def step() -> None:
        with autocast_context(device, precision):
            loss = model(imgs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def timed(step, steps: int, device: torch.device) -> float:
    """Seconds per step of `steps` calls of `step`."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def time_training_steps(spec: ModelSpec, impl: str, precision: str, device: torch.device, batch: int,
                        steps: int, warmup: int) -> dict:  # fmt: skip
    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        model, step = training_step(spec, impl, precision, device, batch)
        params = parameter_counts(model)
        for _ in range(warmup):
            step()
        seconds_per_step = timed(step, steps, device)
        del model, step
    return {"seconds_per_step": seconds_per_step, "peak_memory_mib": memory.mib, "parameters": params}


def time_interleaved(spec: ModelSpec, impls: list[str], precision: str, device: torch.device, batch: int,
                     steps: int, warmup: int, rounds: int) -> dict[str, dict]:  # fmt: skip
    """Every impl built and warmed up once, then `rounds` rounds of `steps` timed steps of each, the order rotated
    every round: a slow spell of a shared machine falls on every impl alike instead of on whichever row it hits.
    seconds_per_step is the median over rounds; per_round keeps each round's figure (ratios are taken per round).
    Peak memory is each impl's build + warmup (at least one step, so that it covers a step), measured while the impls
    built before it are alive (RSS deltas)."""
    built, out = {}, {}
    for impl in impls:
        torch.manual_seed(0)
        with PeakMemory(device) as memory:
            model, step = training_step(spec, impl, precision, device, batch)
            for _ in range(max(1, warmup)):
                step()
            synchronize(device)
        built[impl] = step
        out[impl] = {"peak_memory_mib": memory.mib, "parameters": parameter_counts(model), "per_round": []}
        del model
    for r in range(rounds):
        for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:
            out[impl]["per_round"].append(timed(built[impl], steps, device))
    for timing in out.values():
        timing["seconds_per_step"] = float(np.median(timing["per_round"]))
    return out


def profile_training_step(spec: ModelSpec, impl: str, precision: str, device: torch.device, batch: int,
                          warmup: int, rows: int = 15, by_shape: bool = False) -> None:  # fmt: skip
    """torch.profiler over one step after `warmup` steps: the ops that take the time, by self time (with `by_shape`,
    each op split by its input shapes, which tells e.g. the attention layout's copies from the MLP's)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    _, step = training_step(spec, impl, precision, device, batch)
    for _ in range(max(1, warmup)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=by_shape) as prof:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall = time.perf_counter() - start
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"\n# torch.profiler, one training step of {impl} {spec.label} {precision} batch {batch}, top {rows} by self time"
    )
    averages = prof.key_averages(group_by_input_shape=by_shape)
    print(averages.table(sort_by=sort, row_limit=rows, max_name_column_width=40))
    if device.type == "cpu":  # what no op accounts for: Python, the autograd engine, freeing memory between ops
        in_ops = averages.self_cpu_time_total / 1e6
        print(
            f"# the profiled step took {wall:.3f} s wall-clock; its ops' self time sums to {in_ops:.3f} s "
            f"({1 - in_ops / wall:.1%} outside any op)"
        )


# ---------------------------------------------------------------- input pipeline (--data-only)


def random_npz(directory: Path, count: int, size: int = 32) -> Path:
    """A CIFAR-10-layout .npz (x_train uint8 NHWC) of random pixels: stands in when no CIFAR file is here
    (an array source does no decoding, so content does not change the cost)."""
    path = directory / "random_cifar.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
    return path


def random_jpeg_folder(directory: Path, count: int, size: tuple[int, int] = (500, 375)) -> Path:
    """An ImageFolder of `count` ImageNet-sized JPEGs in 4 classes: smooth colour fields plus grain, so
    files are photo-sized (tens of KB) rather than the ~1 KB of flat images or ~400 KB of white noise."""
    root = directory / "jpeg_folder"
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def time_input_pipeline(data_path: Path | str, spec: ModelSpec, batch: int, batches: int, warmup: int,
                        device: torch.device, decode: str = "auto", workers: int | None = None,
                        num_samples: int | None = None) -> dict:  # fmt: skip
    """img/s of mimkit's pretraining input pipeline alone, built and iterated as `mimkit pretrain` does; `decode`
    is data.decode (device: batches decoded and augmented on `device`)."""
    overrides = [
        f"model.arch={spec.arch}",
        f"data.path={data_path}",
        f"mask.ratio={MASK_RATIO}",
        f"data.decode={decode}",
    ]
    overrides += [f"data.num_workers={workers}"] if workers is not None else []
    overrides += [f"data.num_samples={num_samples}"] if num_samples is not None else []
    cfg = load_config(None, overrides)
    with torch.device("meta"):  # the model is needed only for its mask_inputs, which touch no weights
        model = build_model(cfg)
    img_size = get_preset(spec.arch).img_size
    data = PretrainData(cfg, img_size, model.mask_inputs, batch, accum_steps=1, rank=0, world_size=1, seed=0,
                        pin_memory=device.type == "cuda", device=device)  # fmt: skip

    def all_batches(data: PretrainData):  # epochs back to back, as the training loop runs them
        for epoch in itertools.count():
            yield from data.epoch_batches(epoch)

    stream = all_batches(data)
    # each worker's first batch includes its start-up, and the workers deliver their first batches together
    untimed = max(warmup, data.num_workers, 1)
    for _ in range(untimed):
        next(stream)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        last = next(stream)
    synchronize(device)  # device-decoded batches are produced asynchronously
    seconds = time.perf_counter() - start
    result = {"images_per_second": batches * batch / seconds, "seconds_per_batch": seconds / batches,
              "num_workers": data.num_workers, "steps_per_epoch": data.steps_per_epoch, "decode": data.decode,
              "output_device": str(last["image"].device)}  # fmt: skip
    del stream, data  # shuts the persistent workers down
    gc.collect()
    return result


def best_step_rate(step_json: str | None, label: str) -> tuple[float, str] | None:
    """The fastest mimkit row for model `label` in an earlier --json output: (img/s, precision)."""
    if not step_json:
        return None
    with open(step_json) as f:
        rows = [r for r in json.load(f).get("rows", []) if r["model"] == label and r.get("impl", "mimkit") == "mimkit"]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["images_per_second"])
    return best["images_per_second"], best["precision"]


def webdataset_shards(folder: Path, directory: Path, per_shard: int = 256) -> str:
    """The JPEGs of `folder` as WebDataset tar shards (key.jpg members, written with the standard library);
    returns the brace pattern."""
    import tarfile

    files = sorted(folder.rglob("*.jpg"))
    root = directory / "shards"
    root.mkdir(exist_ok=True)
    count = (len(files) + per_shard - 1) // per_shard
    for s in range(count):
        with tarfile.open(root / f"train-{s:04d}.tar", "w") as tar:
            for i, f in enumerate(files[s * per_shard : (s + 1) * per_shard]):
                tar.add(f, arcname=f"{s * per_shard + i:08d}.jpg")
    return f"{root}/train-{{0000..{count - 1:04d}}}.tar"


def default_batch(spec: ModelSpec, device: torch.device) -> int:
    return spec.gpu_batch if device.type == "cuda" else spec.batch


def run_data_only(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    decode_device = torch.device(args.decode_device or device.type)
    print(
        "| input pipeline | decode | model | batch | workers | timed batches | s/batch | img/s | "
        "mimkit step img/s | pipeline / step |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="mimkit-throughput-") as tmp:
        cases = []
        if Path(args.data).exists():
            cases.append((MODELS["tiny"], Path(args.data), f"npz {Path(args.data).name}", "cpu", None))
        else:
            cases.append(
                (MODELS["tiny"], random_npz(Path(tmp), 4096), "npz of random pixels (no CIFAR file)", "cpu", None)
            )
        root = random_jpeg_folder(Path(tmp), args.jpeg_images)
        kib = sum(f.stat().st_size for f in root.rglob("*.jpg")) / args.jpeg_images / 1024
        label = f"JPEG folder, {args.jpeg_images} x 500x375 ({kib:.0f} KiB avg)"
        cases += [(MODELS["base"], root, label, "cpu", None), (MODELS["base"], root, label, "device", None)]
        if importlib.util.find_spec("webdataset") is not None and importlib.util.find_spec("braceexpand") is not None:
            shards = webdataset_shards(root, Path(tmp))
            label = f"WebDataset shards of the same {args.jpeg_images} JPEGs"
            cases += [(MODELS["base"], shards, label, "cpu", args.jpeg_images),
                      (MODELS["base"], shards, label, "device", args.jpeg_images)]  # fmt: skip
        else:
            print("# WebDataset rows skipped: webdataset / braceexpand are not installed here", flush=True)
        for spec, path, label, decode, num_samples in cases:
            batch = args.batch or default_batch(spec, device)
            run_on = decode_device if decode == "device" else device
            timing = time_input_pipeline(path, spec, batch, args.data_batches, args.warmup, run_on, decode=decode,
                                         workers=args.workers, num_samples=num_samples)  # fmt: skip
            step = best_step_rate(args.step_json, spec.label)
            where = f"device ({run_on.type})" if decode == "device" else "cpu (workers)"
            rows.append({"pipeline": label, "model": spec.label, "batch": batch, **timing, "decode_on": where,
                         "step_images_per_second": step[0] if step else None,
                         "step_precision": step[1] if step else None})  # fmt: skip
            step_cell = f"{step[0]:.1f} ({step[1]})" if step else ""
            ratio_cell = f"{timing['images_per_second'] / step[0]:.2f}×" if step else ""
            print(f"| {label} | {where} | {spec.label} | {batch} | {timing['num_workers']} | {args.data_batches} | "
                  f"{timing['seconds_per_batch']:.3f} | {timing['images_per_second']:.0f} | {step_cell} | "
                  f"{ratio_cell} |", flush=True)  # fmt: skip
    return rows


# ---------------------------------------------------------------- CLI


def load_average(when: str = "") -> str:
    """1-min load average; above the thread count, other processes shared the CPU with this run."""
    if not hasattr(os, "getloadavg"):
        return ""
    return f" | load avg{' ' + when if when else ''} {os.getloadavg()[0]:.1f}"


def machine_info(device: torch.device) -> str:
    hardware = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()} ({' '.join(cpu_flags())})"
    )
    versions = f"torch {torch.__version__} | timm {timm.__version__}"
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        versions += f" | transformers {transformers.__version__}"
    return (
        f"# {hardware} | device {device} | {torch.get_num_threads()} threads | {os.cpu_count()} CPUs{load_average()} | "
        f"{versions} | {datetime.datetime.now().isoformat(timespec='seconds')}"
    )


def print_row(row: dict) -> None:
    speedup = f"{row['vs_fastest_baseline']:.2f}×" if row["vs_fastest_baseline"] is not None else ""
    cells = [row["model"], row["impl"], row["precision"], row["batch"], f"{row['seconds_per_step']:.3f}",
             f"{row['images_per_second']:.1f}", speedup, f"{row['achieved_tflops']:.3f}",
             f"{row['matmul_ceiling_tflops']:.3f}", f"{row['mfu']:.0%}", f"{row['peak_memory_mib']:.0f}"]  # fmt: skip
    if row.get("peak_tflops") is not None or row.get("square_matmul_tflops") is not None:  # CUDA columns
        peak = f"{row['mfu_vs_peak']:.1%}" if row.get("mfu_vs_peak") is not None else "n/a"
        cells += [peak, f"{row['square_matmul_tflops']:.1f}"]
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def run_model_steps(args: argparse.Namespace, models: list[ModelSpec], precisions: list[str], impls: list[str],
                    device: torch.device) -> list[dict]:  # fmt: skip
    kinds = [("MAE", "mimkit")] + [("CrossMAE", i) for i in OTHER_DECODER_IMPLS if i in impls]
    for spec, (kind, impl) in itertools.product(models, kinds):
        flops = flops_per_image(spec, impl)
        known = spec.reference_gflop_per_image and impl == "mimkit"  # the reference figures are MAE's
        reference = f"~{spec.reference_gflop_per_image}" if known else "n/a"
        ratio = f", ratio {spec.reconstruct_ratio}" if kind == "CrossMAE" else ""
        print(f"# analytic {kind} step {spec.label} (dec {spec.decoder_dim}x{spec.decoder_depth}{ratio}): "
              f"{flops['train_step'] / 1e9:.2f} GFLOP/img fwd+bwd (reference {reference}); "
              f"forward {flops['forward'] / 1e9:.3f} = encoder {flops['encoder'] / 1e9:.3f} + decoder "
              f"{flops['decoder'] / 1e9:.3f} + patch/embed/pred "
              f"{(flops['patch_embed'] + flops['decoder_embed'] + flops['decoder_pred']) / 1e9:.3f}")  # fmt: skip
    print()
    peak = gpu_bf16_peak_tflops(device)
    extra = device.type == "cuda" or args.square > 0
    if device.type == "cuda":
        print(
            f"# {torch.cuda.get_device_name(device)}: dense bf16 datasheet peak "
            f"{f'{peak:.1f} TFLOP/s' if peak else 'unknown (not in GPU_BF16_PEAK_TFLOPS)'}"
        )
    print(
        "| model | impl | precision | batch | s/step | img/s | × fastest baseline | TFLOP/s | "
        "matmul ceiling TFLOP/s | MFU | peak mem MiB |" + (" MFU (peak) | square matmul TFLOP/s |" if extra else "")
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if extra else ""))
    rows = []
    square = {}  # precision -> TFLOP/s of one large square product
    for spec in models:
        batch = args.batch or default_batch(spec, device)
        for precision in precisions:
            group = []  # one model + precision: printed together, once the baselines are known
            ceiling_tflops = gemm_ceiling_gflops(spec, batch, precision, device, args.gemm_seconds) / 1e3
            if extra and precision not in square:
                size = args.square or (8192 if device.type == "cuda" else 1024)
                square[precision] = square_matmul_tflops(size, precision, device, args.gemm_seconds)
            interleaved = (time_interleaved(spec, impls, precision, device, batch, args.steps, args.warmup,
                                            args.rounds) if args.rounds > 1 else None)  # fmt: skip
            for impl in impls:
                timing = (
                    interleaved[impl]
                    if interleaved
                    else time_training_steps(spec, impl, precision, device, batch, args.steps, args.warmup)
                )
                images_per_second = batch / timing["seconds_per_step"]
                achieved_tflops = images_per_second * flops_per_image(spec, impl)["train_step"] / 1e12
                row = {
                    "model": spec.label, "impl": impl, "precision": precision, "batch": batch,
                    "device": str(device), "seconds_per_step": timing["seconds_per_step"],
                    "images_per_second": images_per_second, "achieved_tflops": achieved_tflops,
                    "peak_memory_mib": timing["peak_memory_mib"], "parameters": timing["parameters"],
                    "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "matmul_ceiling_tflops": ceiling_tflops, "mfu": achieved_tflops / ceiling_tflops,
                }  # fmt: skip
                if interleaved:
                    row["seconds_per_step_per_round"] = timing["per_round"]
                if extra:
                    row["peak_tflops"] = peak if precision == "bf16" else None
                    row["mfu_vs_peak"] = row["achieved_tflops"] / peak if row["peak_tflops"] else None
                    row["square_matmul_tflops"] = square[precision]
                group.append(row)
                if args.json:  # rows so far, in case a time limit stops the run before the end
                    with open(args.json, "w") as f:
                        json.dump({"machine": machine_info(device), "mode": "step", "partial": True,
                                   "rows": rows + group}, f, indent=2)  # fmt: skip
            baselines = [r for r in group if not r["impl"].startswith("mimkit")]
            fastest = max(baselines, key=lambda r: r["images_per_second"], default=None)
            for row in group:
                row["vs_fastest_baseline"] = None
                if row["impl"].startswith("mimkit") and fastest is not None and interleaved:  # ratios per round
                    ratios = np.divide(fastest["seconds_per_step_per_round"], row["seconds_per_step_per_round"])
                    row["vs_fastest_baseline"] = float(np.median(ratios))
                elif row["impl"].startswith("mimkit") and fastest is not None:
                    row["vs_fastest_baseline"] = row["images_per_second"] / fastest["images_per_second"]
                print_row(row)
            if interleaved:
                for row in group:
                    per_round = ", ".join(f"{s:.3f}" for s in row["seconds_per_step_per_round"])
                    print(f"# {row['impl']} s/step per round: {per_round}")
            rows += group
    print()
    for spec in models:  # both sides must build the same network for the comparison to mean anything
        counts = {r["impl"]: r["parameters"] for r in rows if r["model"] == spec.label}
        distinct = {(c["trainable"], c["total"]) for impl, c in counts.items() if impl not in OTHER_DECODER_IMPLS}
        listing = ", ".join(f"{impl} {c['trainable'] / 1e6:.3f}M / {c['total'] / 1e6:.3f}M"
                            + (" (another decoder: not compared)" if impl in OTHER_DECODER_IMPLS else "")
                            for impl, c in counts.items())  # fmt: skip
        verdict = "equal" if len(distinct) == 1 else "MISMATCH"
        print(f"# parameters (trainable / total) {spec.label}: {listing} -> {verdict}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small,base", help=f"comma list of {','.join(MODELS)}")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma list of bf16,fp32")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma list of {','.join(IMPLS + OPTIONAL_IMPLS + OTHER_DECODER_IMPLS)}",
    )
    parser.add_argument(
        "--reconstruct-ratio",
        type=float,
        default=0.25,
        help="mimkit-crossmae: fraction of the masked patches its decoder reconstructs",
    )
    parser.add_argument("--batch", type=int, default=0, help="override every model's batch (0: the model's own)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (CPU: ViT-B bf16 is ~1 min/step)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (batches with --data-only) per row")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="> 1: build every impl of a model / precision, then "
        "time --steps steps of each per round, in rotated order; report medians (ratios per round)",
    )
    parser.add_argument("--gemm-seconds", type=float, default=0.3, help="min seconds per GEMM ceiling trial")
    parser.add_argument(
        "--square",
        type=int,
        default=0,
        help="side of the square matmul ceiling (0: 8192 on CUDA, none on CPU; >0 forces it)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file")
    parser.add_argument(
        "--profile", metavar="IMPL", help="after the table, profile one step of IMPL per model / precision"
    )
    parser.add_argument("--profile-shapes", action="store_true", help="--profile: split each op by its input shapes")
    parser.add_argument("--profile-rows", type=int, default=15, help="--profile: ops listed (the top N by self time)")
    data = parser.add_argument_group("input pipeline (--data-only)")
    data.add_argument("--data-only", action="store_true", help="time the input pipeline alone, no model")
    data.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 .npz (random pixels if missing)")
    data.add_argument("--data-batches", type=int, default=20, help="timed batches per pipeline")
    data.add_argument("--jpeg-images", type=int, default=256, help="JPEGs generated for the ImageFolder case")
    data.add_argument("--step-json", help="a --json file of a model-step run, to compare img/s with")
    data.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's, 2)")
    data.add_argument(
        "--decode-device",
        choices=["cpu", "cuda"],
        default=None,
        help="where data.decode=device rows decode (default: --device)",
    )
    args = parser.parse_args()

    model_names, precisions, impls = args.models.split(","), args.precisions.split(","), args.impls.split(",")
    known_impls = set(IMPLS + OPTIONAL_IMPLS + OTHER_DECODER_IMPLS)
    unknown = ((set(model_names) - set(MODELS)) | (set(precisions) - {"bf16", "fp32"})
               | (set(impls) - known_impls - {""}) | ({args.profile} - known_impls - {None}))  # fmt: skip
    if unknown:
        parser.error(f"unknown model(s) / precision(s) / impl(s): {', '.join(sorted(unknown))}")
    if not args.data_only and any(i.startswith("hf-") for i in impls):
        hf_vit_mae()  # a missing transformers fails here, before any timing
    models = [replace(MODELS[name], reconstruct_ratio=args.reconstruct_ratio) for name in model_names]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    started = time.perf_counter()
    print(machine_info(device))
    if args.data_only:
        rows = run_data_only(args, device)
        unit = f"{args.data_batches} timed batches per pipeline after max(warmup, workers) untimed ones"
    else:
        rows = run_model_steps(args, models, precisions, impls, device) if impls != [""] else []
        unit = f"{args.warmup} warmup + {args.steps} timed steps per row" + (
            f" per round, {args.rounds} interleaved rounds (medians)" if args.rounds > 1 else ""
        )
        if args.profile:
            for spec in models:
                for precision in precisions:
                    profile_training_step(spec, args.profile, precision, device, args.batch or default_batch(spec, device),
                                          args.warmup, rows=args.profile_rows, by_shape=args.profile_shapes)  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"\n# total {elapsed:.0f} s, {unit}{load_average('now')}")
    if args.json:
        counts = {"data_batches": args.data_batches} if args.data_only else {"steps": args.steps}
        summary = {"machine": machine_info(device), "mode": "data" if args.data_only else "step",
                   "warmup": args.warmup, **counts, "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
