"""A run -> one persistent FiftyOne dataset: every image, ground truth, pseudo-labels, predictions.

One sample per image (val, labeled and unlabeled), keyed by its absolute file path, with:

* ``ground_truth``: instance masks where ground truth exists (val, labeled, and the held-out
  truth of unlabeled images when the data has it: never trained on, used to measure bias);
* ``pl_<tag>``: a teacher's pseudo-labels (``pseudo_labels/<tag>.jsonl``);
* ``pred_<tag>``: a model's predictions (``predictions/<tag>.jsonl``);
* ``image_id``, ``split`` and sample tags: the split name (``val``/``labeled``/``unlabeled``)
  and ``stage:<stage>`` for every stage that wrote a field on the image.

A field holds a ``Detections`` (possibly empty) on every image its jsonl covers and ``None``
elsewhere, so ``dataset.exists(field)`` is the set of images that model saw. Re-exporting
updates samples in place (no duplicates); user tags other than split/stage tags survive.
Import this module only after :func:`sskd.inspect.database.ensure_database` (it imports
``fiftyone``, which connects to the database configured at import time).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from sskd.data.records import Dataset, ImageRecord, Instance, iter_records_jsonl
from sskd.inspect.database import ensure_database
from sskd import graph
from sskd.rundir import RunDir

ensure_database()
import fiftyone as fo  # noqa: E402  (after the fast database check, by design)

log = logging.getLogger("sskd.inspect")

GT_FIELD = "ground_truth"
PREFIXES = {"pseudo_labels": "pl_", "predictions": "pred_"}
# Stage that produces each model tag (from sskd.graph), used for "stage:<x>" tags.
STAGE_OF_TAG = {m.tag: m.fiftyone_stage for m in graph.MODELS}
STAGE_TAG_PREFIX = "stage:"


def dataset_name_for(run_dir: str | Path) -> str:
    """The FiftyOne dataset name of a run: ``sskd-<run name>-<8 hex digits>``.

    The digits hash the run dir's resolved absolute path: two run roots that each hold a run
    called ``demo`` get two datasets (FiftyOne names are global to the database). Everything
    that finds a run's dataset (``sskd app``, the notebooks, :mod:`sskd.inspect.run`) calls this.
    """
    root = Path(RunDir(run_dir).root).expanduser().resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return f"sskd-{root.name}-{digest}"


def field_for(kind: str, tag: str) -> str:
    """``("pseudo_labels", "teacher_adapted")`` -> ``"pl_teacher_adapted"``."""
    if kind not in PREFIXES:
        raise ValueError(f"field kind must be one of {sorted(PREFIXES)}, got {kind!r}")
    return PREFIXES[kind] + tag


def describe_field(name: str) -> dict:
    """Kind, model tag and stage of a label field name (``pl_<tag>`` / ``pred_<tag>`` / GT)."""
    if name == GT_FIELD:
        return {"kind": "ground_truth", "tag": None, "stage": None}
    for kind, prefix in PREFIXES.items():
        if name.startswith(prefix):
            tag = name[len(prefix):]
            return {"kind": kind, "tag": tag, "stage": STAGE_OF_TAG.get(tag, "other")}
    return {"kind": "other", "tag": name, "stage": "other"}


# --------------------------------------------------------------------------- records -> labels


def _resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((width, height), Image.NEAREST)) > 127


def instance_to_detection(inst: Instance, classes: Sequence[str], height: int,
                          width: int) -> fo.Detection | None:
    """One instance -> a Detection with a mask cropped to its tight integer box (None if empty).

    Boxes are whole pixels, so FiftyOne's mask IoU (which rebuilds the full-image mask from the
    relative box and the crop) reproduces the RLE mask exactly. Masks stored at a different
    resolution than the image are resized (nearest) to the image first.
    """
    mask = inst.mask().astype(bool)
    if mask.shape != (height, width):
        mask = _resize_nearest(mask, height, width)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    box = [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]  # relative x, y, w, h
    det = fo.Detection(label=classes[inst.class_id], bounding_box=box, mask=mask[y0:y1, x0:x1],
                       class_id=int(inst.class_id))
    if inst.score is not None:
        det.confidence = float(inst.score)
    if inst.iscrowd:
        det.iscrowd = 1
    return det


def record_to_detections(rec: ImageRecord, classes: Sequence[str], height: int, width: int,
                         skips: Counter, where: str) -> fo.Detections:
    """An ImageRecord's instances -> Detections; bad instances are counted in ``skips``."""
    dets = []
    for inst in rec.instances:
        if not 0 <= inst.class_id < len(classes):
            skips[f"{where}: class_id outside 0..{len(classes) - 1}"] += 1
            continue
        det = instance_to_detection(inst, classes, height, width)
        if det is None:
            skips[f"{where}: empty mask"] += 1
            continue
        dets.append(det)
    return fo.Detections(detections=dets)


# --------------------------------------------------------------------------- export


def _split_maps(splits: Mapping[str, Dataset | Iterable[int]]) -> tuple[dict, dict]:
    """(resolved path -> split) from Dataset-valued splits, (image id -> split) from id lists."""
    by_path: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for name, members in splits.items():
        if isinstance(members, Dataset):
            for r in members.records:
                by_path[_resolve(r.file_name)] = name
            continue
        for i in members:
            if int(i) in by_id and by_id[int(i)] != name:
                raise ValueError(
                    f"image id {i} is in split {by_id[int(i)]!r} and in {name!r}: ids are not "
                    "unique across the run's datasets (val and train both start at 1), so pass "
                    "each split as its Dataset (membership by file path) instead of an id list")
            by_id[int(i)] = name
    return by_path, by_id


def _resolve(file_name: str) -> str:
    return str(Path(file_name).expanduser().resolve())


def _image_table(gt: Dataset, unlabeled: Dataset | None,
                 splits: Mapping[str, Dataset | Iterable[int]], skips: Counter) -> dict[str, dict]:
    """filepath -> {record, split, has_gt} for every image of ``gt`` and ``unlabeled``."""
    split_by_path, split_by_id = _split_maps(splits)
    table: dict[str, dict] = {}
    sources = [(r, True) for r in gt.records]
    sources += [(r, False) for r in (unlabeled.records if unlabeled is not None else [])]
    for rec, is_gt in sources:
        path = _resolve(rec.file_name)
        if path in table:
            continue  # an image in gt and in unlabeled keeps its ground truth
        if not Path(path).is_file():
            skips["image file missing (sample skipped)"] += 1
            continue
        split = split_by_path.get(path) or split_by_id.get(rec.image_id, "unassigned")
        table[path] = {"record": rec, "has_gt": is_gt, "split": split}
    n_unassigned = sum(1 for v in table.values() if v["split"] == "unassigned")
    if n_unassigned:
        log.warning("%d images are in no split; tagged 'unassigned'", n_unassigned)
    return table


def _read_field(path: Path, table: dict[str, dict], by_id: dict[int, str],
                classes: Sequence[str], skips: Counter, field: str) -> dict[str, fo.Detections]:
    """A jsonl of ImageRecords -> filepath -> Detections (by path; by unique id if it moved)."""
    out: dict[str, fo.Detections] = {}
    for rec in iter_records_jsonl(path):
        key = _resolve(rec.file_name)
        if key not in table:
            # Same image id but an existing other file is another image (val and train ids
            # overlap); only a path that no longer exists (moved data) may match by id.
            key = None if Path(key).is_file() else by_id.get(rec.image_id)
            if key is not None:
                skips[f"{field}: matched by image_id (file_name not found)"] += 1
        if key is None:
            skips[f"{field}: record for an image not in the run (skipped)"] += 1
            continue
        r = table[key]["record"]
        out[key] = record_to_detections(rec, classes, r.height, r.width, skips, field)
    return out


def _load_or_create(name: str, overwrite: bool) -> fo.Dataset:
    if fo.dataset_exists(name):
        if not overwrite:
            return fo.load_dataset(name)
        fo.delete_dataset(name)
    ds = fo.Dataset(name)
    ds.persistent = True
    return ds


def _clear_derived(ds: fo.Dataset, info: dict) -> None:
    """Drop results tied to the old labels (their ids change on rewrite): evaluations, brain
    runs (visualizations, mistakenness) and the views sskd saved. Rebuild them with
    :func:`sskd.inspect.views.build_views` and :mod:`sskd.inspect.embeddings`."""
    if ds.list_evaluations() or ds.list_brain_runs() or info.get("views"):
        log.info("re-export of %s: clearing evaluations, brain runs and sskd views", ds.name)
    ds.delete_evaluations()
    ds.delete_brain_runs()
    for name in info.pop("views", {}):
        if ds.has_saved_view(name):
            ds.delete_saved_view(name)
    info.pop("evaluations", None)


def export_run(run_dir: str | Path, gt: Dataset, unlabeled: Dataset | None,
               splits: Mapping[str, Dataset | Iterable[int]], fields: Mapping[str, str | Path],
               classes: Sequence[str] | None = None, dataset_name: str | None = None,
               metrics: str | Path | Mapping | None = None, overwrite: bool = False) -> fo.Dataset:
    """Create or update the run's persistent FiftyOne dataset; returns it.

    * ``gt``: records with ground-truth instances and image paths (val + labeled, plus the
      held-out truth of unlabeled images when available).
    * ``unlabeled``: records of the unlabeled images (paths; their instances are ignored).
    * ``splits``: split name -> image ids (``{"val": [...], "labeled": [...], ...}``), or ->
      the split's Dataset (membership by file path; needed when ids repeat across datasets).
    * ``fields``: label field name -> jsonl of ImageRecords (``pl_<tag>`` / ``pred_<tag>``);
      a missing file is skipped with a logged note. Records match samples by absolute
      ``file_name``, else by ``image_id``.
    * ``metrics``: ``metrics.json`` path or dict, copied into ``dataset.info["sskd"]``.

    Re-exporting updates samples in place: same file path -> same sample; images no longer in
    the run are deleted; label fields are rewritten, and results derived from the old labels
    (evaluations, brain runs, sskd's saved views) are cleared for the caller to rebuild.
    """
    classes = list(classes if classes is not None else gt.classes)
    splits = {k: v if isinstance(v, Dataset) else [int(i) for i in v] for k, v in splits.items()}
    name = dataset_name or dataset_name_for(run_dir)
    skips: Counter = Counter()
    table = _image_table(gt, unlabeled, splits, skips)
    ids = Counter(v["record"].image_id for v in table.values())
    # id fallback for jsonl records only where the id names one image (val and train overlap)
    by_id = {v["record"].image_id: k for k, v in table.items() if ids[v["record"].image_id] == 1}

    labels: dict[str, dict[str, fo.Detections]] = {GT_FIELD: {
        k: record_to_detections(v["record"], classes, v["record"].height, v["record"].width,
                                skips, GT_FIELD)
        for k, v in table.items() if v["has_gt"]}}
    sources = {GT_FIELD: "gt argument"}
    for field, path in fields.items():
        path = Path(path)
        if not path.is_file():
            log.info("field %s skipped: %s does not exist (stage not run yet?)", field, path)
            continue
        labels[field] = _read_field(path, table, by_id, classes, skips, field)
        sources[field] = str(path)

    ds = _load_or_create(name, overwrite)
    existing = dict(zip(*ds.values(["filepath", "tags"]))) if len(ds) else {}
    stale = [p for p in existing if p not in table]
    if stale:
        ds.delete_samples(ds.select_by("filepath", stale))
        log.info("removed %d samples whose images are no longer in the run", len(stale))
    ds.add_samples([fo.Sample(filepath=p) for p in table if p not in existing], progress=False)

    managed = set(splits) | {"unassigned"}
    tags = {}
    for p, v in table.items():
        keep = [t for t in existing.get(p, []) if t not in managed
                and not t.startswith(STAGE_TAG_PREFIX)]
        stages = sorted({describe_field(f)["stage"] for f, per in labels.items()
                         if p in per and describe_field(f)["stage"]})
        tags[p] = keep + [v["split"]] + [STAGE_TAG_PREFIX + s for s in stages]
    ds.set_values("tags", tags, key_field="filepath")
    ds.set_values("split", {p: v["split"] for p, v in table.items()}, key_field="filepath")
    ds.set_values("image_id", {p: v["record"].image_id for p, v in table.items()},
                  key_field="filepath")
    ds.set_values("metadata", {p: fo.ImageMetadata(width=v["record"].width,
                                                   height=v["record"].height)
                               for p, v in table.items()}, key_field="filepath")
    info = dict(ds.info.get("sskd", {}))
    _clear_derived(ds, info)
    for field, per_path in labels.items():
        if ds.has_sample_field(field):
            ds.clear_sample_field(field)
        if per_path:
            ds.set_values(field, per_path, key_field="filepath")

    if isinstance(metrics, (str, Path)):
        from sskd.metrics import read_metrics
        metrics = read_metrics(metrics) if Path(metrics).is_file() else None
    info.update({"run_dir": str(Path(run_dir).resolve()), "classes": classes,
                 "splits": {k: len(v) for k, v in splits.items()},
                 "fields": {f: {**describe_field(f), "source": sources[f],
                                "samples": len(labels[f])} for f in labels},
                 "notes": dict(skips)})  # counted skips and id-matched records
    if metrics is not None:
        info["metrics"] = metrics
    ds.info["sskd"] = info
    ds.default_classes = classes
    ds.save()
    for reason, n in skips.items():
        log.warning("export %s: %d x %s", name, n, reason)
    log.info("exported run %s -> FiftyOne dataset %r: %d samples, fields %s", run_dir, name,
             len(ds), {f: len(v) for f, v in labels.items()})
    return ds


def field_counts(dataset: fo.Dataset | fo.DatasetView) -> dict[str, dict[str, int]]:
    """``{field: {"samples": n images with the field, "instances": n detections}}``."""
    out = {}
    for field in dataset.get_field_schema(embedded_doc_type=fo.Detections):
        out[field] = {"samples": dataset.count(field),
                      "instances": dataset.count(f"{field}.detections")}
    return out


def split_counts(dataset: fo.Dataset | fo.DatasetView) -> dict[str, int]:
    """Samples per split."""
    return dict(dataset.count_values("split"))
