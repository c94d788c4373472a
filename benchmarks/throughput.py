"""MAE pretraining-step throughput: img/s, achieved TFLOP/s (analytic count), MFU, peak memory.

    python benchmarks/throughput.py                      # tiny + base, bf16 + fp32, auto device
    python benchmarks/throughput.py --models base --precisions fp32 --steps 5 --json out.json

A step is forward (under autocast for bf16) + backward + AdamW step + zero_grad on random images;
masks are fresh every step. FLOPs are counted analytically (matmuls only, training = 3x forward),
and the MFU column divides by a matmul ceiling measured in the same run at the model's MLP shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import time
from dataclasses import dataclass

import timm
import torch

from mimkit.config import load_config
from mimkit.masking import num_visible
from mimkit.methods import build_model
from mimkit.models import get_preset

MASK_RATIO = 0.75


@dataclass(frozen=True)
class ModelSpec:
    label: str
    arch: str
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    batch: int
    reference_gflop_per_image: float  # fwd+bwd, quoted in the issue, for the sanity check


MODELS = {
    "tiny": ModelSpec("ViT-T/4@32", "vit_tiny_patch4_32", 128, 4, 4, 256, 0.89),
    "base": ModelSpec("ViT-B/16@224", "vit_base_patch16_224", 512, 8, 16, 16, 58.7),
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


# ---------------------------------------------------------------- measurement helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, trials: int = 3) -> float:
    """torch.matmul rate for activations (m, k) times a weight (n, k) transposed, the layout nn.Linear
    uses, in `dtype`. Best of `trials` runs of >= 0.3 s each, so a busy shared CPU affects it less."""
    activations = torch.randn(m, k, device=device).to(dtype)
    weight = torch.randn(n, k, device=device).to(dtype)
    for _ in range(2):
        torch.matmul(activations, weight.t())
    best = 0.0
    for _ in range(trials):
        synchronize(device)
        repeats, start = 0, time.perf_counter()
        while repeats % 4 or time.perf_counter() - start < 0.3:
            torch.matmul(activations, weight.t())
            repeats += 1
            if repeats % 4 == 0:
                synchronize(device)
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9)
    return best


def gemm_ceiling_gflops(spec: ModelSpec, precision: str, device: torch.device) -> float:
    """Matmul rate at the encoder and decoder MLP shapes (batch*tokens x D x 4D), combined by each
    stack's share of the model's FLOPs (time-weighted: total FLOPs / total time at those rates)."""
    p, flops = get_preset(spec.arch), mae_flops_per_image(spec)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    encoder_rows = spec.batch * (num_visible(p.grid**2, MASK_RATIO) + 1)
    decoder_rows = spec.batch * (p.grid**2 + 1)
    encoder_rate = matmul_gflops(encoder_rows, p.embed_dim, 4 * p.embed_dim, dtype, device)
    decoder_rate = matmul_gflops(decoder_rows, spec.decoder_dim, 4 * spec.decoder_dim, dtype, device)
    seconds = flops["encoder"] / encoder_rate + flops["decoder"] / decoder_rate
    return (flops["encoder"] + flops["decoder"]) / seconds


def time_training_steps(spec: ModelSpec, precision: str, device: torch.device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        cfg = load_config(None, [
            f"model.arch={spec.arch}", f"mae.decoder_dim={spec.decoder_dim}",
            f"mae.decoder_depth={spec.decoder_depth}", f"mae.decoder_heads={spec.decoder_heads}",
            "mae.norm_pix_loss=true", f"mask.ratio={MASK_RATIO}",
        ])  # fmt: skip
        model = build_model(cfg).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
        img_size = get_preset(spec.arch).img_size
        imgs = torch.randn(spec.batch, 3, img_size, img_size, device=device)

        def step() -> None:
            with autocast_for(precision, device):
                loss = model(imgs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        seconds_per_step = (time.perf_counter() - start) / steps
        del model, optimizer, imgs
    return {"seconds_per_step": seconds_per_step, "peak_memory_mib": memory.mib}


# ---------------------------------------------------------------- CLI


def load_average(when: str = "") -> str:
    """1-min load average; above the thread count, other processes shared the CPU with this run."""
    if not hasattr(os, "getloadavg"):
        return ""
    return f" | load avg{' ' + when if when else ''} {os.getloadavg()[0]:.1f}"


def machine_info(device: torch.device) -> str:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            hardware = match.group(1).strip() if match else hardware
    return (
        f"# {hardware} | device {device} | {torch.get_num_threads()} threads{load_average()} | "
        f"torch {torch.__version__} | timm {timm.__version__} | {datetime.datetime.now().isoformat(timespec='seconds')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,base", help=f"comma list of {','.join(MODELS)}")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma list of bf16,fp32")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (CPU: ViT-B bf16 is ~1 min/step)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file")
    args = parser.parse_args()

    model_names, precisions = args.models.split(","), args.precisions.split(",")
    if unknown := (set(model_names) - set(MODELS)) | (set(precisions) - {"bf16", "fp32"}):
        parser.error(f"unknown model(s) / precision(s): {', '.join(sorted(unknown))}")
    models = [MODELS[name] for name in model_names]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    started = time.perf_counter()
    print(machine_info(device))
    for spec in models:
        flops = mae_flops_per_image(spec)
        print(f"# analytic MAE step {spec.label} (dec {spec.decoder_dim}x{spec.decoder_depth}): "
              f"{flops['train_step'] / 1e9:.2f} GFLOP/img fwd+bwd (reference ~{spec.reference_gflop_per_image}); "
              f"forward {flops['forward'] / 1e9:.3f} = encoder {flops['encoder'] / 1e9:.3f} + decoder "
              f"{flops['decoder'] / 1e9:.3f} + patch/embed/pred "
              f"{(flops['patch_embed'] + flops['decoder_embed'] + flops['decoder_pred']) / 1e9:.3f}")  # fmt: skip
    print()
    print("| model | precision | batch | s/step | img/s | TFLOP/s | matmul ceiling TFLOP/s | MFU | peak mem MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for spec in models:
        for precision in precisions:
            timing = time_training_steps(spec, precision, device, args.steps, args.warmup)
            ceiling_tflops = gemm_ceiling_gflops(spec, precision, device) / 1e3
            images_per_second = spec.batch / timing["seconds_per_step"]
            achieved_tflops = images_per_second * mae_flops_per_image(spec)["train_step"] / 1e12
            row = {
                "model": spec.label, "precision": precision, "batch": spec.batch, "device": str(device),
                "seconds_per_step": timing["seconds_per_step"], "images_per_second": images_per_second,
                "achieved_tflops": achieved_tflops, "matmul_ceiling_tflops": ceiling_tflops,
                "mfu": achieved_tflops / ceiling_tflops, "peak_memory_mib": timing["peak_memory_mib"],
            }  # fmt: skip
            rows.append(row)
            print(f"| {spec.label} | {precision} | {spec.batch} | {row['seconds_per_step']:.2f} | "
                  f"{images_per_second:.1f} | {achieved_tflops:.3f} | {ceiling_tflops:.3f} | "
                  f"{row['mfu']:.0%} | {row['peak_memory_mib']:.0f} |", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"\n# total {elapsed:.0f} s, {args.warmup} warmup + {args.steps} timed steps per row{load_average('now')}")
    if args.json:
        summary = {"machine": machine_info(device), "steps": args.steps, "warmup": args.warmup, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
