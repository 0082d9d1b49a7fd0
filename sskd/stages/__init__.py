"""Stages as functions of a run (dir + config); notebooks call these and only these."""

from sskd.stages.ablations import measure_efficiency, run_ablations
from sskd.stages.data import load_datasets, prepare_data
from sskd.stages.pipeline import adapt_teacher, refine, transfer, zero_shot
from sskd.stages.run import Run, as_run, open_run

__all__ = ["Run", "adapt_teacher", "as_run", "load_datasets", "measure_efficiency", "open_run", "prepare_data",
           "refine", "run_ablations", "transfer", "zero_shot"]
