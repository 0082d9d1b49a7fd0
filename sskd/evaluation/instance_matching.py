"""Where pseudo-labels go wrong: masks or classes.

Mask AP mixes two errors. A pseudo-label can miss its object's outline, or outline it well
under the wrong class. COCO AP cannot tell them apart, and for a model's own evaluation it
hides wrong top-1 classes: every (query, class) pair is ranked, so a query whose *second* class
is right still scores. A hard pseudo-label keeps only its top class, so that is what trains the
next model. This module matches pseudo-labels to hidden ground truth one-to-one by mask IoU,
ignoring classes, and then counts which class each matched pseudo-label carries.

``match_instances`` (numpy-level, records in, plain numbers out):

* ``mask_precision`` / ``mask_recall``: matched instances / pseudo-labels, / ground-truth
  instances (IoU >= ``iou_threshold``; one-to-one, highest IoU first; crowd regions skipped);
* ``class_accuracy``: share of matched pairs whose classes agree;
* ``majority_rate``: the class accuracy of always naming the most frequent true class of the
  matched pairs, the level below which class accuracy says nothing;
* ``confusion``: ``K x K`` counts over matched pairs, rows the true class, columns the
  pseudo-label's class (``classes`` gives the order).

Percentages are 0-100 like AP; a rate with nothing to count is ``None`` (JSON ``null``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sskd.data.records import Dataset, ImageRecord, mask_iou


def match_pairs(gt: ImageRecord, pred: ImageRecord, iou_threshold: float = 0.5
                ) -> list[tuple[int, int]]:
    """One image's one-to-one class-agnostic matches, highest IoU first: ``(i, j)`` pairs, ``i``
    indexing ``pred.instances`` and ``j`` ``gt.instances`` (crowd regions never match)."""
    gts = [j for j, g in enumerate(gt.instances) if not g.iscrowd]
    if not gts or not pred.instances:
        return []
    if (gt.height, gt.width) != (pred.height, pred.width):
        raise ValueError(f"image {gt.image_id}: pseudo-labels are {pred.height}x{pred.width} but "
                         f"the ground truth is {gt.height}x{gt.width}; write pseudo-labels at "
                         "each record's original size (sskd.engine.inference does)")
    iou = mask_iou(pred.instances, [gt.instances[j] for j in gts])
    pairs, used_pred, used_gt = [], set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), len(gts))
        if iou[i, j] < iou_threshold:
            break
        if i in used_pred or j in used_gt:
            continue
        pairs.append((i, gts[j]))
        used_pred.add(i)
        used_gt.add(j)
    return pairs


def _match_image(gt: ImageRecord, pred: ImageRecord, iou_threshold: float) -> list[tuple[int, int]]:
    """``(gt class, pred class)`` of each one-to-one match of one image, highest IoU first."""
    return [(gt.instances[j].class_id, pred.instances[i].class_id)
            for i, j in match_pairs(gt, pred, iou_threshold)]


def match_instances(gt: Dataset, pred: Sequence[ImageRecord], *,
                    iou_threshold: float = 0.5) -> dict:
    """Class-agnostic one-to-one matching of ``pred`` to ``gt`` (the module docstring defines
    every returned number). Images are paired by ``image_id``; an image without predictions
    counts its ground truth as missed."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    by_id = {r.image_id: r for r in pred}
    unknown = set(by_id) - {r.image_id for r in gt.records}
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image ids are not in the ground truth "
                         f"'{gt.name}' (e.g. {sorted(unknown)[:3]}): pass the dataset the "
                         "predictions were made on")
    k = len(gt.classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    n_gt = n_pred = 0
    for rec in gt.records:
        p = by_id.get(rec.image_id)
        n_gt += sum(1 for g in rec.instances if not g.iscrowd)
        if p is None:
            continue
        n_pred += len(p.instances)
        for g_cls, p_cls in _match_image(rec, p, iou_threshold):
            confusion[g_cls, p_cls] += 1
    matched = int(confusion.sum())
    return {
        "iou_threshold": iou_threshold,
        "n_gt": n_gt, "n_pred": n_pred, "n_matched": matched,
        "mask_precision": 100.0 * matched / n_pred if n_pred else None,
        "mask_recall": 100.0 * matched / n_gt if n_gt else None,
        "class_accuracy": 100.0 * np.trace(confusion) / matched if matched else None,
        "majority_rate": 100.0 * confusion.sum(1).max() / matched if matched else None,
        "classes": list(gt.classes),
        "confusion": confusion.tolist(),
    }


def top_confusions(result: dict, n: int = 3) -> list[tuple[str, str, int]]:
    """The ``n`` largest off-diagonal cells of ``result["confusion"]``:
    ``(true class, pseudo-label class, count)``, largest first, zeros left out."""
    c = np.asarray(result["confusion"])
    cells = [(int(c[i, j]), i, j) for i in range(len(c)) for j in range(len(c)) if i != j and c[i, j]]
    cells.sort(key=lambda t: (-t[0], t[1], t[2]))
    names = result["classes"]
    return [(names[i], names[j], v) for v, i, j in cells[:n]]
