"""Oracle pseudo-labels (sskd.evaluation.pseudo_label_oracles) on hand-built masks: each kind
removes exactly its error and leaves everything else as the teacher wrote it."""

from __future__ import annotations

import pytest

from sskd.data.records import Dataset, ImageRecord, Instance, mask_iou
from sskd.evaluation.instance_matching import match_instances
from sskd.evaluation.pseudo_label_oracles import oracle_pseudo_labels

from .hand_masks import CLASSES, H, W, box

A, B, C = box(0, 0, 10, 10), box(20, 20, 10, 10), box(0, 25, 10, 10)
A_SHIFTED = box(0, 2, 10, 10)   # IoU with A = 0.667: matches A
D_NOISE = box(30, 0, 5, 5)      # matches nothing


def truth() -> Dataset:
    # image 1: circle A, rectangle B, triangle C (C is missed by the teacher)
    return Dataset([ImageRecord("1.png", H, W, 1, [Instance.from_mask(A, 0), Instance.from_mask(B, 1),
                                                   Instance.from_mask(C, 2)])], list(CLASSES), "gt")


def teacher(with_probs: bool = False) -> list[ImageRecord]:
    probs = (lambda c: [0.8 if i == c else 0.1 for i in range(3)]) if with_probs else (lambda c: None)
    return [ImageRecord("1.png", H, W, 1, [
        Instance.from_mask(A_SHIFTED, 1, score=0.9, class_probs=probs(1)),  # A, wrong class
        Instance.from_mask(B, 1, score=0.8, class_probs=probs(1)),          # B, right class
        Instance.from_mask(D_NOISE, 2, score=0.7, class_probs=probs(2)),    # a false positive
        Instance.from_mask(C, 0, score=0.1, class_probs=probs(0)),          # C under threshold
    ])]


def _masks(rec):
    return [i.segmentation for i in rec.instances]


def test_classes_oracle_renames_matched_trained_labels_only():
    out, counts = oracle_pseudo_labels(truth(), teacher(with_probs=True), "classes",
                                       score_threshold=0.3)
    got = out[0].instances
    assert [i.class_id for i in got] == [0, 1, 2, 0]          # A renamed; C (0.1) untouched
    assert got[0].class_probs == [1.0, 0.0, 0.0]              # renamed: one-hot
    assert got[1].class_probs == pytest.approx([0.1, 0.8, 0.1])   # kept as the teacher's
    assert _masks(out[0]) == _masks(teacher()[0]) and [i.score for i in got] == [0.9, 0.8, 0.7, 0.1]
    assert counts == dict(trained=3, matched=2, renamed=1, remasked=0, added=0)
    # A and B right now; C's label is under the threshold (never trains) and stays wrong
    assert match_instances(truth(), out)["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_masks_oracle_swaps_outlines_and_keeps_classes():
    out, counts = oracle_pseudo_labels(truth(), teacher(), "masks", score_threshold=0.3)
    got = out[0].instances
    assert [i.class_id for i in got] == [1, 1, 2, 0] and [i.score for i in got] == [0.9, 0.8, 0.7, 0.1]
    assert mask_iou([got[0]], [Instance.from_mask(A, 0)])[0, 0] == 1.0
    assert got[0].bbox == Instance.from_mask(A, 0).bbox
    assert got[2].segmentation == teacher()[0].instances[2].segmentation   # unmatched: as is
    assert counts["remasked"] == 2 and counts["renamed"] == counts["added"] == 0


def test_recall_oracle_adds_what_no_trained_label_found():
    out, counts = oracle_pseudo_labels(truth(), teacher(), "recall", score_threshold=0.3)
    got = out[0].instances
    assert len(got) == 5 and counts["added"] == 1
    assert (got[-1].class_id, got[-1].score) == (2, 1.0)      # C: the 0.1 label did not count
    assert mask_iou([got[-1]], [Instance.from_mask(C, 2)])[0, 0] == 1.0
    assert match_instances(truth(), out)["mask_recall"] == 100.0


def test_truth_oracle_is_the_ground_truth():
    out, counts = oracle_pseudo_labels(truth(), teacher(with_probs=True), "truth",
                                       score_threshold=0.3)
    assert [(i.class_id, i.score) for i in out[0].instances] == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert out[0].instances[2].class_probs == [0.0, 0.0, 1.0]
    assert counts["added"] == 3


def test_bad_inputs_say_what_to_pass():
    with pytest.raises(ValueError, match="must be one of classes"):
        oracle_pseudo_labels(truth(), teacher(), "boxes", score_threshold=0.3)
    other = [ImageRecord("9.png", H, W, 9, [])]
    with pytest.raises(ValueError, match="not in 'gt'"):
        oracle_pseudo_labels(truth(), other, "masks", score_threshold=0.3)
    blind = Dataset([ImageRecord("1.png", H, W, 1, [])], list(CLASSES), "unlabeled")
    with pytest.raises(ValueError, match="hidden ground truth"):
        oracle_pseudo_labels(blind, teacher(), "masks", score_threshold=0.3)
