"""The machine a number was measured on, described once for every report, evaluation and benchmark: the CPU model
and the flags that set its matmul speed (lscpu, else /proc/cpuinfo), the GPUs, the library versions."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from mimkit.version import __version__

# what sets a CPU's matmul speed (fp32 / bf16): compare speeds only between machines with the same ones
MATMUL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                "asimd", "sve")  # fmt: skip


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def cpu_model() -> str:
    """'AMD EPYC', 'Intel(R) Xeon(R) Platinum ...': lscpu's model name, else /proc/cpuinfo's, else the platform's."""
    name = _lscpu().get("Model name")
    if not name:
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        except OSError:
            name = None
    return name or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's flags among MATMUL_FLAGS, in that order."""
    flags = set(_lscpu().get("Flags", "").split())
    return [f for f in MATMUL_FLAGS if f in flags]


def machine_info() -> dict:
    """Everything above as a dict (the study's records keep it): platform, python, torch, timm, mimkit, cpus,
    affinity, torch_threads, cpu, cpu_flags, and gpu when one is visible."""
    import timm

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "mimkit": __version__, "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags())}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
