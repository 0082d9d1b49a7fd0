"""The run directory layout: the single source of truth of a run.

    runs/<name>/
      config.yaml                      resolved config
      splits/{labeled,unlabeled,val}.json
      pseudo_labels/<tag>.jsonl        teacher pseudo-labels of D_u (one ImageRecord per line)
      predictions/<tag>.jsonl          val predictions of a model (one ImageRecord per line; masks
                                       may overlap, evaluation.overlapping_masks)
      checkpoints/<stage>/model/       final weights (model.json + model.pt)
      checkpoints/<stage>/state.pt     latest resumable training state
      logs/<stage>.jsonl               per-step metrics
      metrics.json                     evaluation of every model, keyed by tag
      notebooks/                       executed notebooks (papermill)
      notebooks/.done/<notebook>.json  what an executed notebook's results depend on (sskd.runner)
      report/                          report.md, report.html, figures
      .lock                            held by the process working on the run (sskd.locking)

Tags used for models and their outputs: ``MODEL_TAGS``, in pipeline order, from the stage graph
(:mod:`sskd.graph`): ``teacher_zero_shot``, ``teacher_supervised``, ``teacher_1a``,
``teacher_adapted`` (1b), ``student_supervised``, ``student_transfer`` (stage 2),
``student_refined`` (stage 3).
"""

from __future__ import annotations

from pathlib import Path

from sskd.graph import MODEL_TAGS  # noqa: F401  (re-exported: every module's tag order)


class RunDir:
    """Paths inside one run dir; creating a ``RunDir`` creates nothing on disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def split(self, name: str) -> Path:
        return self.root / "splits" / f"{name}.json"

    def pseudo_labels(self, tag: str) -> Path:
        return self.root / "pseudo_labels" / f"{tag}.jsonl"

    def predictions(self, tag: str) -> Path:
        return self.root / "predictions" / f"{tag}.jsonl"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def model_dir(self, stage: str) -> Path:
        return self.checkpoint_dir(stage) / "model"

    def train_state(self, stage: str) -> Path:
        return self.checkpoint_dir(stage) / "state.pt"

    def log(self, stage: str) -> Path:
        return self.root / "logs" / f"{stage}.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"
