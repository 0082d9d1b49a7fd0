"""Distribution alignment of pseudo-label classes (sskd.engine.class_alignment)."""

import json

import numpy as np
import pytest

from sskd.data.records import Dataset, ImageRecord, Instance
from sskd.engine.class_alignment import align_classes, class_prior


def _mask(i: int) -> np.ndarray:
    m = np.zeros((8, 8), np.uint8)
    m[i % 4: i % 4 + 3, 1:5] = 1
    return m


def _pseudo(probs, classes=("circle", "rectangle")) -> Dataset:
    recs = [ImageRecord(f"{k}.png", 8, 8, k, [Instance.from_mask(_mask(k), int(np.argmax(p)),
                                                                  0.5 + 0.01 * k, class_probs=list(p))])
            for k, p in enumerate(probs)]
    return Dataset(recs, list(classes), "pseudo_teacher_adapted")


def test_class_prior_values():
    lab = Dataset([ImageRecord("a.png", 8, 8, 1, [Instance.from_mask(_mask(0), 0),
                                                   Instance.from_mask(_mask(1), 0),
                                                   Instance.from_mask(_mask(2), 0),
                                                   Instance.from_mask(_mask(3), 1, iscrowd=1)])],
                  ["a", "b", "c"])
    assert class_prior(lab, "none") is None
    np.testing.assert_allclose(class_prior(lab, "uniform"), [1 / 3] * 3)
    # three a's counted, the crowd b not; add-one smoothing keeps b and c possible
    np.testing.assert_allclose(class_prior(lab, "labeled"), [4 / 6, 1 / 6, 1 / 6])
    with pytest.raises(ValueError, match="pseudo_label.class_prior must be one of none, labeled, "
                                         "uniform, got 'balanced'"):
        class_prior(lab, "balanced")


def test_a_teacher_biased_towards_one_class_is_renamed_towards_the_prior():
    # two ambiguous circles named "rectangle" (0.45 / 0.55), two clear rectangles, one clear circle
    probs = [[0.45, 0.55], [0.45, 0.55], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]
    pl = _pseudo(probs)
    aligned, s = align_classes(pl, np.array([0.5, 0.5]))
    # mean p = [0.4, 0.6]: weights [1.25, 0.833]; 0.45 * 1.25 = 0.5625 > 0.55 * 0.833 = 0.458
    np.testing.assert_allclose(s["mean_probs"], [0.4, 0.6])
    np.testing.assert_allclose(s["weights"], [1.25, 0.5 / 0.6])
    assert [i.class_id for r in aligned.records for i in r.instances] == [0, 0, 1, 1, 0]
    assert s["renamed"] == 2 and s["counts_before"] == [1, 4] and s["counts_after"] == [3, 2]
    for before, after in zip(pl.records, aligned.records):
        a, b = after.instances[0], before.instances[0]
        # renames only: same mask, box, score; the distribution is the aligned one
        assert (a.segmentation, a.bbox, a.score) == (b.segmentation, b.bbox, b.score)
        assert abs(sum(a.class_probs) - 1) < 1e-4
        q = np.array(b.class_probs) * s["weights"]
        np.testing.assert_allclose(a.class_probs, q / q.sum(), atol=1e-5)
    assert aligned.name == pl.name and pl.records[0].instances[0].class_id == 1  # input untouched
    # a plain list is a prior too, and the summary is JSON-ready
    again, s2 = align_classes(pl, [0.5, 0.5])
    assert again == aligned and s2 == s and type(s2["renamed"]) is int
    json.dumps(s2)


def test_a_prior_equal_to_the_teachers_mean_renames_nothing():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=40)
    pl = _pseudo(probs, ("a", "b", "c"))
    aligned, s = align_classes(pl, probs.mean(0))
    assert s["renamed"] == 0
    assert [i.class_id for r in aligned.records for i in r.instances] == list(probs.argmax(1))
    assert align_classes(pl, None) == (pl, {})


def test_pseudo_labels_without_class_distributions_are_a_clear_error():
    pl = _pseudo([[0.3, 0.7]])
    pl.records[0].instances[0].class_probs = None
    with pytest.raises(ValueError, match=r"pseudo_label.class_prior needs the teacher's class "
                                         r"distributions, but 1 of 1 .*sskd run --from adapt_teacher"):
        align_classes(pl, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="a prior of length 3 for 2 classes"):
        align_classes(_pseudo([[0.3, 0.7]]), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match=r"class_probs of length 2, expected one per class \(3\)"):
        align_classes(_pseudo([[0.3, 0.7]], ("a", "b", "c")), np.full(3, 1 / 3))
