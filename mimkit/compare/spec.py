"""Run specs (METHOD[+PART...][:section.key=value,...]), sweeps, --set and --cpus / --cpu-scale: what a study is
asked for, refused in one line (SpecError) before any compute."""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass

from mimkit.errors import MimkitError
from mimkit.methods import method_names  # importing mimkit.methods registers the built-in methods
from mimkit.registry import encoder_family

SET_TARGETS = ("pretrain", "knn", "linprobe", "finetune", "tokenizer")

METHODS = method_names()  # the registered methods (mimkit.registry)
# What a spec's `+part` adds to its method's recipe: pretraining overrides. A new part is one more entry.
PARTS: dict[str, list[str]] = {
    "random": ["mask.type=random"],
    "block": ["mask.type=block"],  # BEiT-style blocks
    "hybrid": ["mask.type=hybrid"],  # BootMAE's blocks topped up at random
    "parallel": ["mask.type=parallel"],  # EMAE's K disjoint parts and consistency loss
    # CrossMAE's decoder as configs/mae_crossmae_vit_tiny_cifar10.yaml sets it; another ratio: ':mae.reconstruct_ratio=R'
    "crossmae": ["mae.decoder=crossmae", "mae.reconstruct_ratio=0.25", "mae.decoder_context_blocks=all"],
}
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
SPEC_HELP = (f"a run spec is METHOD[+PART...][:section.key=value,...]; methods: {', '.join(METHODS)}; parts: "
             f"{', '.join(PARTS)}; e.g. 'mae', 'bootmae+parallel', "
             "'mae+block:optim.blr=3e-4,train.batch_size=64'")  # fmt: skip


class SpecError(MimkitError, ValueError):
    """An option or run spec that cannot be used; the message is one line saying what is allowed."""


def split_top(text: str) -> list[str]:
    """'a=1,b=[1,2]' -> ['a=1', 'b=[1,2]']: commas inside brackets belong to a value."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[({") - (ch in "])}")
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*out, current] if p.strip()]


@dataclass
class RunSpec:
    text: str
    method: str
    parts: list[str]
    overrides: list[str]

    @property
    def name(self) -> str:  # its folder under runs/ and evals/
        return re.sub(r"[^\w.+=-]", "_", self.text)

    @property
    def family(self) -> str:
        return encoder_family(self.method)  # timm Beit (BEiT, mc-BEiT) or VisionTransformer

    def part_overrides(self) -> list[str]:
        return [o for p in self.parts for o in PARTS[p]]


def parse_spec(text: str) -> RunSpec:
    head, _, tail = text.partition(":")
    method, *parts = head.strip().split("+")
    if method not in METHODS:
        raise SpecError(f"run spec {text!r}: unknown method {method!r}; {SPEC_HELP}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SpecError(f"run spec {text!r}: unknown part {unknown[0]!r}; {SPEC_HELP}")
    overrides = split_top(tail)
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    if bad or (tail and not overrides):
        raise SpecError(f"run spec {text!r}: {bad[0] if bad else tail!r} is not section.key=value; {SPEC_HELP}")
    return RunSpec(text.strip(), method, parts, overrides)


def parse_specs(text: str) -> list[RunSpec]:
    """'mae,mae:optim.blr=3e-4,train.batch_size=64,emae' -> three specs (a key=value item joins the spec before it)."""
    items: list[str] = []
    for piece in split_top(text):
        if items and OVERRIDE.match(piece):
            items[-1] += "," + piece
        else:
            items.append(piece)
    if not items:
        raise SpecError(f"--methods: no run spec given; {SPEC_HELP}")
    specs = [parse_spec(i) for i in items]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(f"--methods: {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return specs


def sweep_specs(specs: list[RunSpec], text: str) -> list[RunSpec]:
    """Every spec at every point of the grid 'optim.blr=1e-4,3e-4;train.batch_size=64,128'."""
    axes = []
    for axis in filter(None, (a.strip() for a in text.split(";"))):
        key, _, values = axis.partition("=")
        if not OVERRIDE.match(axis) or not split_top(values):
            raise SpecError(f"--sweep: {axis!r} is not section.key=v1,v2,...; e.g. "
                            "'optim.blr=1.5e-4,3e-4;train.batch_size=64,128'")  # fmt: skip
        axes.append([f"{key}={v}" for v in split_top(values)])
    if not axes:
        raise SpecError("--sweep: no axis given; e.g. 'optim.blr=1.5e-4,3e-4;train.batch_size=64,128'")
    return [parse_spec(s.text + (":" if not s.overrides else ",") + ",".join(point))
            for s in specs for point in itertools.product(*axes)]  # fmt: skip


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in SET_TARGETS}
    for item in items:
        target, sep, override = item.partition(":")
        if not sep or target not in SET_TARGETS:
            target, override = "pretrain", item
        if not re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=", override):
            raise SpecError(f"--set {item!r}: expected [COMMAND:]section.key=value, COMMAND one of "
                            f"{', '.join(SET_TARGETS)}")  # fmt: skip
        out[target].append(override)
    return out


def parse_cpus(text: str) -> set[int]:
    """'1' / '0,2' / '0-3' (taskset -c) -> CPU numbers."""
    try:
        cpus = {c for part in text.split(",") for c in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    except ValueError:
        raise SpecError(f"--cpus {text!r}: expected a CPU list like 1, 0,2 or 0-3") from None
    if not cpus <= os.sched_getaffinity(0):
        raise SpecError(f"--cpus {text!r}: this process may use CPUs {sorted(os.sched_getaffinity(0))} only")
    return cpus


def parse_cpu_scale(items: list[str]) -> dict[str, float]:
    """['Intel(R) Xeon(R) Processor=1.289'] -> {cpu name: factor}."""
    scale = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not name.strip() or not factor > 0 or math.isinf(factor):
            raise SpecError(f"--cpu-scale {item!r}: expected CPU=FACTOR, the CPU as compare.json's `machines` name it "
                            "and a positive factor, e.g. 'Intel(R) Xeon(R) Processor=1.289'")  # fmt: skip
        scale[name.strip()] = factor
    return scale


def run_cpu_scale(name: str, machines: list[str], cpu_scale: dict[str, float]) -> float:
    """The factor that turns a run's core-minutes into the reference CPU's: 1 unless --cpu-scale names its CPU."""
    factors = {cpu_scale.get(cpu, 1.0) for cpu in machines}
    if len(factors) > 1:  # its clock does not say which steps ran where
        raise SpecError(
            f"--cpu-scale: run {name} was pretrained on several CPUs ({', '.join(machines)}) with "
            "different factors; its core-minutes cannot be converted (drop --cpu-scale for it)"
        )
    return factors.pop() if factors else 1.0
