"""Mask evaluations and saved views that answer the pseudo-label bias questions of a run.

Evaluations: every label field against ``ground_truth`` with COCO-style mask matching
(``evaluate_detections(..., use_masks=True, compute_mAP=True)``), eval key ``eval_<field>``,
on the images that have both. Each instance then carries ``eval_<field>`` = tp / fp / fn.

Saved views (``dataset.load_saved_view(name)``; :func:`build_views` returns them with a
one-line question each):

* ``fp_<field>`` / ``fn_<field>``: evaluation patches of false positives (most confident
  first) and of misses: what does the teacher hallucinate, what does it never find?
* ``lowconf_<field>`` / ``highconf_<field>``: the pseudo-labels below / at-or-above a confidence
  split (median by default): are low-confidence pseudo-labels the wrong ones?
* ``disagree_<a>_vs_<b>``: images sorted by how much two models disagree (unmatched share of
  instances at mask IoU 0.5): where does the student part from the adapted teacher?
* ``mistaken_<field>``: images sorted by FiftyOne brain mistakenness of the pseudo-labels,
  judged by an independent model's labels on the same images.

Tables (plain dicts, for notebooks): :func:`per_class_table` (per-class counts, precision,
recall vs ground truth) and :func:`confidence_table` (precision per confidence bin).
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from sskd.inspect.fiftyone_export import GT_FIELD, describe_field, fo

from fiftyone import ViewField as F  # noqa: E402

log = logging.getLogger("sskd.inspect")

IOU = 0.5  # IoU threshold of the tp/fp/fn labels (mAP itself averages 0.50:0.95)
CONFIDENCE_BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)  # edges of confidence_table's bins
# Preference order of the "other model" that judges a pseudo-label field's mistakenness.
REFERENCE_ORDER = ("student_refined", "student_transfer", "teacher_adapted", "teacher_1a",
                   "teacher_supervised", "student_supervised", "teacher_zero_shot")
TEACHERS = ("teacher_adapted", "teacher_1a", "teacher_zero_shot")   # disagreement side a
STUDENTS = ("student_refined", "student_transfer")                  # disagreement side b


def eval_key_for(field: str) -> str:
    return f"eval_{field}"


def label_fields(dataset: fo.Dataset) -> list[str]:
    """Model label fields (``pl_*`` / ``pred_*``) on the dataset, in schema order."""
    return [f for f in dataset.get_field_schema(embedded_doc_type=fo.Detections)
            if describe_field(f)["kind"] in ("pseudo_labels", "predictions")]


def _replace_eval(dataset: fo.Dataset, key: str) -> None:
    if key in dataset.list_evaluations():
        dataset.delete_evaluation(key)


# --------------------------------------------------------------------------- evaluations


def _ap50(results) -> float:
    """AP at IoU 0.5 from a COCO results object (mean over classes with ground truth)."""
    p = np.asarray(results.precision)[0]          # classes x 101 recall points at IoU 0.50
    valid = p[(p > -1).all(axis=1)]
    return float(valid.mean()) if valid.size else -1.0


def evaluate_field(dataset: fo.Dataset, field: str, gt_field: str = GT_FIELD,
                   iou: float = IOU) -> dict | None:
    """Mask-evaluate ``field`` vs ``gt_field`` on the images that have both; None if none.

    Returns ``{"eval_key", "samples", "AP", "AP50", "per_class": {class: AP}}`` with AP in
    percent (as ``metrics.json``), also stored in ``dataset.info["sskd"]["evaluations"]``.
    """
    key = eval_key_for(field)
    _replace_eval(dataset, key)
    view = dataset.exists(field).exists(gt_field)
    if len(view) == 0:
        log.info("evaluation of %s skipped: no image has both %s and %s", field, field, gt_field)
        return None
    res = view.evaluate_detections(field, gt_field=gt_field, eval_key=key, use_masks=True,
                                   compute_mAP=True, iou=iou, classwise=True, progress=False)
    per_class = {str(c): 100 * float(res.mAP([c])) for c in res.classes if res.mAP([c]) > -1}
    out = {"eval_key": key, "samples": len(view), "AP": 100 * float(res.mAP()),
           "AP50": 100 * _ap50(res), "per_class": per_class}
    info = dict(dataset.info.get("sskd", {}))
    info.setdefault("evaluations", {})[field] = out
    dataset.info["sskd"] = info
    dataset.save()
    return out


def evaluate_fields(dataset: fo.Dataset, fields: Iterable[str] | None = None,
                    gt_field: str = GT_FIELD) -> dict[str, dict]:
    """:func:`evaluate_field` for every model field (default: all ``pl_*``/``pred_*``)."""
    out = {}
    for f in (label_fields(dataset) if fields is None else fields):
        res = evaluate_field(dataset, f, gt_field)
        if res is not None:
            out[f] = res
    return out


# --------------------------------------------------------------------------- tables


def per_class_table(dataset: fo.Dataset, field: str, gt_field: str = GT_FIELD) -> list[dict]:
    """Per class: instances, tp, fp, precision; ground truth, fn, recall (evaluated images).

    Needs :func:`evaluate_field` first. ``precision = tp / (tp + fp)``, ``recall = tp / gt``
    at mask IoU 0.5; ``None`` where undefined.
    """
    key = eval_key_for(field)
    if key not in dataset.list_evaluations():
        raise ValueError(f"no evaluation {key!r} on dataset {dataset.name!r}: run "
                         f"evaluate_field(dataset, {field!r}) first")
    view = dataset.load_evaluation_view(key)
    plab, pout, pconf = view.values([f"{field}.detections.label", f"{field}.detections.{key}",
                                     f"{field}.detections.confidence"], unwind=True)
    glab, gout = view.values([f"{gt_field}.detections.label", f"{gt_field}.detections.{key}"],
                             unwind=True)
    rows = []
    for c in sorted(set(plab) | set(glab)):
        tp = sum(1 for lab, o in zip(plab, pout) if lab == c and o == "tp")
        fp = sum(1 for lab, o in zip(plab, pout) if lab == c and o == "fp")
        n_gt = sum(1 for lab in glab if lab == c)
        fn = sum(1 for lab, o in zip(glab, gout) if lab == c and o == "fn")
        confs = [x for lab, x in zip(plab, pconf) if lab == c and x is not None]
        rows.append({"class": c, "count": tp + fp, "tp": tp, "fp": fp,
                     "precision": tp / (tp + fp) if tp + fp else None,
                     "gt": n_gt, "fn": fn, "recall": (n_gt - fn) / n_gt if n_gt else None,
                     "mean_confidence": float(np.mean(confs)) if confs else None})
    return rows


def confidence_table(dataset: fo.Dataset, field: str,
                     bins: Sequence[float] = CONFIDENCE_BINS) -> list[dict]:
    """Precision of ``field``'s instances per confidence bin ``[lo, hi)`` (last bin closed)."""
    key = eval_key_for(field)
    view = dataset.load_evaluation_view(key)
    conf, out = view.values([f"{field}.detections.confidence", f"{field}.detections.{key}"],
                            unwind=True)
    rows = []
    for i, (lo, hi) in enumerate(zip(bins[:-1], bins[1:])):
        last = i == len(bins) - 2
        sel = [o for c, o in zip(conf, out)
               if c is not None and lo <= c and (c < hi or (last and c <= hi))]
        tp = sum(1 for o in sel if o == "tp")
        rows.append({"bin": f"[{lo:.2f}, {hi:.2f}{']' if last else ')'}", "count": len(sel),
                     "tp": tp, "fp": len(sel) - tp,
                     "precision": tp / len(sel) if sel else None})
    return rows


# --------------------------------------------------------------------------- disagreement


def disagreement_field(field_a: str, field_b: str) -> str:
    return f"disagree_{field_a}_vs_{field_b}"


def compute_disagreement(dataset: fo.Dataset, field_a: str, field_b: str,
                         iou: float = IOU) -> str | None:
    """Per image: share of instances of ``a`` and ``b`` left unmatched at mask IoU ``iou``.

    ``(fp + fn) / (2 tp + fp + fn)``: 0 when the two models agree on every instance and
    class, 1 when nothing matches (0 for two empty sets). Stored in the sample field
    :func:`disagreement_field` (returned); None when no image has both fields.
    """
    key = f"dis_{field_a}_vs_{field_b}"
    _replace_eval(dataset, key)
    out = disagreement_field(field_a, field_b)
    if dataset.has_sample_field(out):
        dataset.clear_sample_field(out)
    view = dataset.exists(field_a).exists(field_b)
    if len(view) == 0:
        log.info("disagreement %s vs %s skipped: no image has both", field_a, field_b)
        return None
    view.evaluate_detections(field_b, gt_field=field_a, eval_key=key, use_masks=True, iou=iou,
                             classwise=True, progress=False)
    tp, fp, fn = view.values([f"{key}_tp", f"{key}_fp", f"{key}_fn"])
    scores = [float((b + c) / (2 * a + b + c)) if a + b + c else 0.0 for a, b, c in zip(tp, fp, fn)]
    view.set_values(out, scores)
    return out


def mistakenness_field(field: str) -> str:
    return f"mistakenness_{field}"


def compute_mistakenness(dataset: fo.Dataset, field: str, reference: str) -> str | None:
    """FiftyOne brain mistakenness of ``field``'s labels judged by ``reference``'s confidences.

    Sets per instance ``mistakenness_<field>`` (and ``..._loc``) and per sample
    ``mistakenness_<field>`` (max over instances), ``possible_missing_<field>`` and
    ``possible_spurious_<field>`` on the images with both fields. Returns the field name.
    """
    import fiftyone.brain as fob

    name = mistakenness_field(field)
    if name in dataset.list_brain_runs():
        dataset.delete_brain_run(name)
    for f in (name, f"possible_missing_{field}", f"possible_spurious_{field}"):
        if dataset.has_sample_field(f):
            dataset.clear_sample_field(f)
    view = dataset.exists(field).exists(reference)
    if len(view) == 0:
        log.info("mistakenness of %s skipped: no image also has %s", field, reference)
        return None
    fob.compute_mistakenness(view, reference, label_field=field, mistakenness_field=name,
                             missing_field=f"possible_missing_{field}",
                             spurious_field=f"possible_spurious_{field}", progress=False)
    return name


def pick_reference(dataset: fo.Dataset, field: str) -> str | None:
    """The preferred other model field (REFERENCE_ORDER) that shares images with ``field``."""
    others = [f for f in label_fields(dataset) if f != field]
    ranked = sorted(others, key=lambda f: (REFERENCE_ORDER.index(describe_field(f)["tag"])
                                           if describe_field(f)["tag"] in REFERENCE_ORDER
                                           else len(REFERENCE_ORDER)))
    for f in ranked:
        if len(dataset.exists(field).exists(f).limit(1)):
            return f
    return None


def default_pairs(dataset: fo.Dataset) -> list[tuple[str, str]]:
    """(teacher, student) field pairs to compare: the most adapted teacher vs each student."""
    present = set(label_fields(dataset))
    pairs = []
    for prefix in ("pred_", "pl_"):
        teacher = next((prefix + t for t in TEACHERS if prefix + t in present), None)
        if teacher:
            pairs += [(teacher, prefix + s) for s in STUDENTS if prefix + s in present]
    return pairs


# --------------------------------------------------------------------------- saved views

# Prefixes of the saved views about one label field (``<prefix><field>``).
FIELD_VIEW_PREFIXES = ("fp_", "fn_", "lowconf_", "highconf_", "mistaken_")
# The App's default view (``sskd app RUN``): the first saved one of these, else the first
# ``fp_pl_*`` view: the adapted teacher's confident false pseudo-labels are the bias that
# stage 2 distils into the student.
MAIN_VIEWS = ("fp_pl_teacher_adapted", "mistaken_pl_teacher_adapted", "fp_pl_teacher_1a",
              "fp_pl_teacher_zero_shot")


def view_label_fields(view_name: str, gt_field: str = GT_FIELD) -> list[str]:
    """The label fields a saved view is about: ``fp_<f>`` -> ``[f, ground_truth]``,
    ``disagree_<a>_vs_<b>`` -> ``[a, b, ground_truth]``; ``[]`` for an unknown name."""
    if view_name.startswith("disagree_") and "_vs_" in view_name:
        a, b = view_name[len("disagree_"):].split("_vs_", 1)
        return [a, b, gt_field]
    for prefix in FIELD_VIEW_PREFIXES:
        if view_name.startswith(prefix):
            return [view_name[len(prefix):], gt_field]
    return []


def main_view(names: Iterable[str]) -> str | None:
    """The default bias view among saved view ``names`` (see :data:`MAIN_VIEWS`), or None."""
    names = list(names)
    return next((v for v in MAIN_VIEWS if v in names), None) or \
        next((v for v in names if v.startswith("fp_pl_")), None) or (names[0] if names else None)


def _save(dataset: fo.Dataset, name: str, view: fo.DatasetView, question: str,
          out: dict) -> None:
    dataset.save_view(name, view, description=question, overwrite=True)
    out[name] = {"question": question, "count": len(view)}


def build_views(dataset: fo.Dataset, fields: Iterable[str] | None = None,
                gt_field: str = GT_FIELD, confidence_split: float | None = None,
                pairs: Sequence[tuple[str, str]] | None = None,
                mistakenness: bool = True) -> dict[str, dict]:
    """Evaluate every model field and save the bias views; returns ``{view: {question, count}}``.

    ``confidence_split``: threshold between low and high confidence (default: the median
    confidence of the field). ``pairs``: fields to compare for disagreement (default:
    :func:`default_pairs`). Re-running replaces evaluations, views and fields in place.
    """
    fields = label_fields(dataset) if fields is None else list(fields)
    evals = evaluate_fields(dataset, fields, gt_field)
    views: dict[str, dict] = {}
    for f in fields:
        if f in evals:
            key = eval_key_for(f)
            patches = dataset.to_evaluation_patches(key)
            conf = F(f"{f}.detections").map(F("confidence")).max()
            _save(dataset, f"fp_{f}", patches.match(F("type") == "fp").sort_by(conf, reverse=True),
                  f"Which {f} instances match no ground truth (false positives, most confident "
                  "first)?", views)
            _save(dataset, f"fn_{f}", patches.match(F("type") == "fn"),
                  f"Which ground-truth instances does {f} miss?", views)
        if describe_field(f)["kind"] == "pseudo_labels":
            confs = [c for c in dataset.values(f"{f}.detections.confidence", unwind=True)
                     if c is not None]
            if confs:
                thr = float(np.median(confs)) if confidence_split is None else confidence_split
                low = F("confidence") < thr
                _save(dataset, f"lowconf_{f}", dataset.filter_labels(f, low),
                      f"Which {f} pseudo-labels have confidence < {thr:.3f}?", views)
                _save(dataset, f"highconf_{f}", dataset.filter_labels(f, ~low),
                      f"Which {f} pseudo-labels have confidence >= {thr:.3f}?", views)
            judge = mistakenness and dataset.count(f"{f}.detections") > 0
            ref = pick_reference(dataset, f) if judge else None
            if ref is not None and compute_mistakenness(dataset, f, ref):
                m = mistakenness_field(f)
                _save(dataset, f"mistaken_{f}", dataset.exists(m).sort_by(m, reverse=True),
                      f"Which images' {f} pseudo-labels are most likely wrong, judged by {ref}?",
                      views)
    for a, b in (default_pairs(dataset) if pairs is None else pairs):
        score = compute_disagreement(dataset, a, b)
        if score:
            _save(dataset, f"disagree_{a}_vs_{b}",
                  dataset.exists(score).sort_by(score, reverse=True),
                  f"On which images do {a} and {b} disagree most?", views)
    info = dict(dataset.info.get("sskd", {}))
    info["views"] = views
    dataset.info["sskd"] = info
    dataset.save()
    log.info("saved views: %s", {k: v["count"] for k, v in views.items()})
    return views
