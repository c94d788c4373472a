"""`mimkit compare`: which method, for this data, at this budget. An equal-compute study of run specs (methods
and compositions), pretrained by mimkit's own loop, scored by its evaluations as checkpoints appear, read out at
equal epochs and equal core-minutes beside random-init encoders, with a page (`mimkit report STUDY_DIR`).

Pieces: spec (run specs), dataset (the data), budget (epochs / the run's own clock), plan, pretraining, scoring,
study (the three together and the read-out), readout (tables, plots, summary), page (the HTML page), command."""

from mimkit.compare.command import compare, main
from mimkit.compare.page import build_study_page, is_study, read_study

__all__ = ["build_study_page", "compare", "is_study", "main", "read_study"]
