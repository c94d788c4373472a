"""A shim: the study's helpers moved into the package (mimkit.compare: spec, dataset, budget, readout, tokenizer).
Kept for the scripts that import it from benchmarks/ (benchmarks/study_step_times.py,
benchmarks/tokenizer_denormals.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without an install

from mimkit.compare.budget import is_scored_step, step_clock
from mimkit.compare.dataset import DataInfo, choose_patch, data_info, inspect_data
from mimkit.compare.readout import checkpoint_table, markdown, plots, readouts, std_error
from mimkit.compare.spec import (
    PARTS,
    RunSpec,
    SpecError,
    parse_cpu_scale,
    parse_spec,
    parse_specs,
    run_cpu_scale,
    sweep_specs,
)
from mimkit.compare.tokenizer import tokenizer_stats
from mimkit.machine import machine_info as machine

__all__ = ["PARTS", "DataInfo", "RunSpec", "SpecError", "checkpoint_table", "choose_patch", "data_info",
           "inspect_data", "is_scored_step", "machine", "markdown", "parse_cpu_scale", "parse_spec", "parse_specs",
           "plots", "readouts", "run_cpu_scale", "std_error", "step_clock", "sweep_specs", "tokenizer_stats"]  # fmt: skip
