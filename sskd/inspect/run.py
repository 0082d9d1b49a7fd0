"""One call from a run dir to its complete FiftyOne dataset: export, evaluations, views, embeddings.

:func:`export_run_dir` reads, from ``runs/<name>/`` (layout in :mod:`sskd.rundir`):

* ``config.yaml``: ``data.input_size`` (embedding input side) and, through
  ``sskd.stages.data.load_datasets``, the data config that rebuilds the images and ground truth;
* ``splits/{labeled,unlabeled,val}.json`` (via ``load_datasets``): which image is in which split;
* ``pseudo_labels/*.jsonl`` -> fields ``pl_<tag>``; ``predictions/*.jsonl`` -> ``pred_<tag>``;
* ``metrics.json`` (optional) -> ``dataset.info["sskd"]["metrics"]``;
* ``checkpoints/<tag>/model/`` of the embedding models: teacher = first of ``teacher_adapted``,
  ``teacher_1a``; student = first of ``student_refined``, ``student_transfer``.

Missing files are skipped with a logged note. Ground truth on unlabeled images (the synthetic
benchmark keeps it hidden from training) is exported so pseudo-labels can be scored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping

from sskd.config import read_config
from sskd.data.records import Dataset
from sskd.inspect.embeddings import compute_embeddings, compute_visualizations
from sskd.inspect.fiftyone_export import GT_FIELD, PREFIXES, export_run, fo
from sskd.inspect.views import build_views, default_pairs, label_fields
from sskd import graph
from sskd.rundir import RunDir

log = logging.getLogger("sskd.inspect")

# Model key -> checkpoint tags tried in order (first existing checkpoints/<tag>/model wins).
EMBEDDING_MODELS = {role: graph.final_models(role) for role in ("teacher", "student")}


def run_fields(run_dir: str | Path) -> dict[str, Path]:
    """Present jsonl fields: ``{"pl_<tag>": pseudo_labels/<tag>.jsonl, "pred_<tag>": ...}``."""
    root = RunDir(run_dir).root
    fields = {}
    for kind, prefix in PREFIXES.items():
        for path in sorted((root / kind).glob("*.jsonl")):
            fields[prefix + path.stem] = path
    return fields


def _default_datasets(run_dir: Path) -> dict[str, Dataset]:
    try:
        from sskd.stages.data import load_datasets
    except ImportError as e:
        raise ImportError("export_run_dir needs sskd.stages.data.load_datasets to rebuild the "
                          "run's images; pass datasets={'labeled':..., 'unlabeled':..., "
                          "'val':...} instead") from e
    return load_datasets(run_dir)


def export_run_dir(run_dir: str | Path, datasets: Mapping[str, Dataset] | None = None,
                   views: bool = True, embeddings: bool = True, method: str = "auto",
                   load_datasets: Callable[[Path], Mapping[str, Dataset]] | None = None,
                   device: str = "cpu") -> fo.Dataset:
    """Export a run dir to its FiftyOne dataset (see module docstring for the files read).

    ``datasets``: ``{"labeled", "unlabeled", "val"}`` Datasets (default: rebuilt with
    ``load_datasets(run_dir)``); unlabeled records may carry held-out ground truth.
    ``views``: evaluate the fields named by the run's ``inspect.view_fields`` (all when empty)
    and save their bias views. ``embeddings``: embed images, and the instances of the same
    fields plus the ground truth, with the teacher and student checkpoints and compute 2-D
    visualizations (``method``: auto | pca | umap | tsne).
    """
    from sskd.models.base import load_model

    rd = RunDir(run_dir)
    cfg = read_config(rd.config)
    if datasets is None:
        datasets = (load_datasets or _default_datasets)(rd.root)
    missing = [k for k in ("labeled", "unlabeled", "val") if k not in datasets]
    if missing:
        raise ValueError(f"datasets lacks {missing}: pass labeled, unlabeled and val Datasets")
    lab, unl, val = datasets["labeled"], datasets["unlabeled"], datasets["val"]
    gt_records = val.records + lab.records + [r for r in unl.records if r.instances]
    gt = Dataset(gt_records, list(val.classes), "ground_truth")
    splits = {"val": val, "labeled": lab, "unlabeled": unl}
    ds = export_run(rd.root, gt, unl, splits, run_fields(rd.root), classes=val.classes,
                    metrics=rd.metrics if rd.metrics.is_file() else None)
    # inspect.view_fields narrows the costly parts (evaluations, mistakenness, instance
    # embeddings) to the fields a researcher looks at; every field is still exported
    fields = list(cfg.inspect.view_fields) or None
    if fields is not None:
        present = label_fields(ds)
        absent = [f for f in fields if f not in present]
        if absent:
            log.warning("inspect.view_fields: %d field(s) not in this run, skipped: %s "
                        "(present: %s)", len(absent), absent, present)
        fields = [f for f in fields if f in present]
    if views:
        pairs = None if fields is None else [
            (a, b) for a, b in default_pairs(ds) if a in fields and b in fields]
        build_views(ds, fields=fields, pairs=pairs, mistakenness=cfg.inspect.mistakenness)
    if embeddings:
        embed_fields = None if fields is None else [GT_FIELD, *fields]
        for key, tags in EMBEDDING_MODELS.items():
            model_dir = next((rd.model_dir(t) for t in tags if rd.model_dir(t).is_dir()), None)
            if model_dir is None:
                log.info("embeddings %s skipped: none of %s exists", key,
                         [str(rd.model_dir(t)) for t in tags])
                continue
            model = load_model(model_dir, map_location=device)
            compute_embeddings(ds, model, key, label_fields=embed_fields,
                               input_size=cfg.data.input_size, device=device)
            compute_visualizations(ds, key, label_fields=embed_fields, method=method,
                                   seed=cfg.seed)
    return ds
