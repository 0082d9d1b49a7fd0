"""Oracle pseudo-labels: a teacher's pseudo-labels with one kind of error removed by hidden truth.

Which error of the teacher limits the student? Retraining stage 2 on pseudo-labels with one
error fixed answers it (``benchmarks/pseudo_label_oracle.py``; docs/method.md, "What limits
the student"). Only possible where D_u keeps hidden ground truth (the synthetic benchmark);
nothing here is used by a stage.

Each pseudo-label that trains (score >= ``score_threshold``) is matched one-to-one to a
ground-truth object by mask IoU (:func:`sskd.evaluation.instance_matching.match_pairs`).
Kinds (:data:`ORACLES`):

* ``classes``: matched pseudo-labels take their object's true class (masks, scores and which
  instances exist stay the teacher's);
* ``masks``: matched pseudo-labels take their object's true mask (and box), keeping the
  teacher's class and score;
* ``recall``: the teacher's pseudo-labels plus every object no trained pseudo-label matched
  (true mask and class, score 1);
* ``truth``: the ground truth itself (score 1): the student's ceiling on these images.

Instances under the threshold are kept unchanged (they never train, but stay visible). Class
distributions (``class_probs``) of renamed instances become one-hot, so soft-class and
class-prior settings see the oracle's class.
"""

from __future__ import annotations

import copy
from typing import Sequence

from sskd.data.records import Dataset, ImageRecord, Instance
from sskd.evaluation.instance_matching import match_pairs

ORACLES = ("classes", "masks", "recall", "truth")


def _one_hot(k: int, c: int) -> list[float]:
    return [1.0 if i == c else 0.0 for i in range(k)]


def _true_instance(g: Instance, k: int, with_probs: bool) -> Instance:
    return Instance(g.class_id, copy.deepcopy(g.segmentation), list(g.bbox), score=1.0,
                    class_probs=_one_hot(k, g.class_id) if with_probs else None)


def oracle_pseudo_labels(gt: Dataset, pseudo: Sequence[ImageRecord], kind: str, *,
                         score_threshold: float, iou_threshold: float = 0.5
                         ) -> tuple[list[ImageRecord], dict]:
    """``pseudo`` (records of D_u, paired with ``gt`` by ``image_id``) with the ``kind`` error
    removed; returns ``(records, counts)``, counts of what changed: ``renamed`` (classes),
    ``remasked`` (masks), ``added`` (recall, truth), ``matched`` and ``trained`` (pseudo-labels
    at or above the threshold)."""
    if kind not in ORACLES:
        raise ValueError(f"oracle kind {kind!r}: must be one of {' | '.join(ORACLES)}")
    truth = {r.image_id: r for r in gt.records}
    missing = [r.image_id for r in pseudo if r.image_id not in truth]
    if missing:
        raise ValueError(f"{len(missing)} pseudo-labelled image ids are not in '{gt.name}' "
                         f"(e.g. {missing[:3]}): pass the dataset the pseudo-labels were made on")
    if not any(r.instances for r in gt.records):
        raise ValueError(f"'{gt.name}' has no ground-truth instances: oracles need D_u's hidden "
                         "ground truth (the synthetic benchmark keeps it)")
    k = len(gt.classes)
    counts = dict(trained=0, matched=0, renamed=0, remasked=0, added=0)
    out = []
    for rec in pseudo:
        g = truth[rec.image_id]
        with_probs = any(i.class_probs is not None for i in rec.instances)
        if kind == "truth":
            insts = [_true_instance(t, k, with_probs) for t in g.instances if not t.iscrowd]
            counts["added"] += len(insts)
            out.append(ImageRecord(rec.file_name, rec.height, rec.width, rec.image_id, insts))
            continue
        trained = [i for i, p in enumerate(rec.instances)
                   if p.score is None or p.score >= score_threshold]
        counts["trained"] += len(trained)
        sub = ImageRecord(rec.file_name, rec.height, rec.width, rec.image_id,
                          [rec.instances[i] for i in trained])
        pairs = [(trained[i], j) for i, j in match_pairs(g, sub, iou_threshold)]
        counts["matched"] += len(pairs)
        insts = [copy.deepcopy(p) for p in rec.instances]
        for i, j in pairs:
            t = g.instances[j]
            if kind == "classes" and insts[i].class_id != t.class_id:
                insts[i].class_id = t.class_id
                if insts[i].class_probs is not None:
                    insts[i].class_probs = _one_hot(k, t.class_id)
                counts["renamed"] += 1
            elif kind == "masks":
                insts[i].segmentation = copy.deepcopy(t.segmentation)
                insts[i].bbox = list(t.bbox)
                counts["remasked"] += 1
        if kind == "recall":
            hit = {j for _, j in pairs}
            extra = [_true_instance(t, k, with_probs) for j, t in enumerate(g.instances)
                     if not t.iscrowd and j not in hit]
            insts += extra
            counts["added"] += len(extra)
        out.append(ImageRecord(rec.file_name, rec.height, rec.width, rec.image_id, insts))
    return out, counts
