"""Distribution alignment of pseudo-label classes (``pseudo_label.class_prior``).

A teacher that confuses two classes rarely confuses them symmetrically: it names the ambiguous
objects of both after one of them. Hard pseudo-labels then over-represent that class, and a
student trained on them learns the skewed prior and amplifies it (it can name the minority
class less often than the teacher did). Distribution alignment (ReMixMatch, Berthelot et al.
2020) rescales every pseudo-label's class distribution by ``prior(c) / mean_p(c)``, where
``mean_p`` is the teacher's mean distribution over all pseudo-labelled instances of D_u, and
renames each instance after the argmax of the result. It renames, nothing else: no
pseudo-label is added or dropped, masks and scores stay the teacher's.

``class_prior(labeled, kind)`` and ``align_classes(unlabeled, prior)`` are numpy-level and
work on :class:`~sskd.data.records.Dataset` records carrying ``Instance.class_probs``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sskd.config_checks import CLASS_PRIORS
from sskd.data.records import Dataset


def class_prior(labeled: Dataset, kind: str) -> np.ndarray | None:
    """The target class distribution (``K``, sums to 1), or None for ``kind == "none"``.

    ``labeled``: D_l's non-crowd instances are counted, add-one smoothed so that a class absent
    from a few labels is not forbidden in the pseudo-labels."""
    if kind not in CLASS_PRIORS:
        raise ValueError(f"pseudo_label.class_prior must be one of {', '.join(CLASS_PRIORS)}, "
                         f"got {kind!r}")
    k = len(labeled.classes)
    if kind == "none":
        return None
    if kind == "uniform":
        return np.full(k, 1.0 / k)
    counts = np.bincount([i.class_id for r in labeled.records for i in r.instances
                          if not i.iscrowd], minlength=k).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + k)


def check_class_probs(unlabeled: Dataset, setting: str, off: str) -> None:
    """Every instance of ``unlabeled`` carries ``K`` class probabilities, else a ValueError that
    names ``setting`` (what needs them) and ``off`` (how to do without)."""
    insts = [i for r in unlabeled.records for i in r.instances]
    missing = sum(i.class_probs is None for i in insts)
    if missing:
        raise ValueError(
            f"{setting} needs the teacher's class distributions, but {missing} of {len(insts)} "
            f"pseudo-labelled instances in {unlabeled.name!r} carry none (a teacher without "
            "class probabilities, e.g. grounded_sam, or pseudo-labels written before the setting "
            "was on): re-run the teacher's pseudo-labelling (`sskd run --from adapt_teacher`), "
            f"or set {off}")
    k = len(unlabeled.classes)
    bad = [i.class_probs for i in insts if len(i.class_probs) != k]
    if bad:
        raise ValueError(f"pseudo-labels {unlabeled.name!r}: class_probs of length {len(bad[0])}, "
                         f"expected one per class ({k}): re-run the teacher's pseudo-labelling "
                         "(`sskd run --from adapt_teacher`)")


def align_classes(unlabeled: Dataset, prior: np.ndarray | None) -> tuple[Dataset, dict]:
    """``unlabeled`` with every instance renamed after ``argmax(p * prior / mean_p)``.

    Each instance must carry ``class_probs`` (``K`` probabilities); they are replaced by the
    aligned, renormalised distribution (what ``soft_classes`` then trains on). Returns the new
    dataset and a summary: ``weights`` (``prior / mean_p``), ``mean_probs``, ``prior``,
    ``renamed`` (instances whose class changed) and ``counts_before`` / ``counts_after``.
    ``prior=None`` or no instances: returned unchanged."""
    insts = [i for r in unlabeled.records for i in r.instances]
    k = len(unlabeled.classes)
    if prior is None or not insts:
        return unlabeled, {}
    check_class_probs(unlabeled, "pseudo_label.class_prior", "pseudo_label.class_prior: none")
    if len(prior) != k:
        raise ValueError(f"align_classes({unlabeled.name!r}): a prior of length {len(prior)} "
                         f"for {k} classes")
    probs = np.asarray([i.class_probs for i in insts], dtype=np.float64)
    mean_p = probs.mean(0)
    prior = np.asarray(prior, dtype=np.float64)
    weights = prior / np.maximum(mean_p, 1e-12)
    it = iter(probs)
    records, before, after, renamed = [], np.zeros(k, int), np.zeros(k, int), 0
    for r in unlabeled.records:
        new = []
        for inst in r.instances:
            q = next(it) * weights
            q /= q.sum()
            c = int(q.argmax())
            before[inst.class_id] += 1
            after[c] += 1
            renamed += c != inst.class_id
            new.append(dataclasses.replace(inst, class_id=c,
                                           class_probs=[round(float(v), 5) for v in q]))
        records.append(dataclasses.replace(r, instances=new))
    summary = {"prior": prior.tolist(), "mean_probs": mean_p.tolist(), "weights": weights.tolist(),
               "renamed": renamed, "instances": len(insts),
               "counts_before": before.tolist(), "counts_after": after.tolist()}
    return dataclasses.replace(unlabeled, records=records), summary
