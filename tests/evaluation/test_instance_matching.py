"""Tests of class-agnostic pseudo-label matching (sskd.evaluation.instance_matching) on
hand-built masks whose IoUs are known."""

from __future__ import annotations

import numpy as np
import pytest

from sskd.data.records import Dataset, ImageRecord, Instance
from sskd.evaluation.instance_matching import match_instances, top_confusions

from .hand_masks import CLASSES, H, W, box

CIRCLE, RECT, TRI = 0, 1, 2


def records(*images, score=None) -> list[ImageRecord]:
    """``images``: per image a list of (class_id, mask); image ids 1..n."""
    return [ImageRecord(f"{i}.png", H, W, i, [Instance.from_mask(m, c, score=score) for c, m in insts])
            for i, insts in enumerate(images, 1)]


def gt(*images) -> Dataset:
    return Dataset(records(*images), list(CLASSES), "gt")


A, B, C = box(0, 0, 10, 10), box(20, 20, 10, 10), box(0, 25, 10, 10)
A_SHIFTED = box(0, 2, 10, 10)   # IoU with A = 80 / 120 = 0.667
A_HALF = box(0, 5, 10, 10)      # IoU with A = 50 / 150 = 0.333


def test_right_masks_wrong_classes_are_told_apart_from_wrong_masks():
    truth = gt([(CIRCLE, A), (RECT, B)], [(TRI, C)])
    pred = records([(RECT, A_SHIFTED), (RECT, B)], [(TRI, box(30, 0, 5, 5))], score=0.9)
    r = match_instances(truth, pred)
    assert (r["n_gt"], r["n_pred"], r["n_matched"]) == (3, 3, 2)
    assert r["mask_recall"] == pytest.approx(200 / 3)      # A and B found, C missed
    assert r["mask_precision"] == pytest.approx(200 / 3)   # the stray box matches nothing
    assert r["class_accuracy"] == pytest.approx(50.0)      # B right, A called a rectangle
    assert r["majority_rate"] == pytest.approx(50.0)       # one circle, one rectangle matched
    assert r["confusion"] == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert top_confusions(r) == [("circle", "rectangle", 1)]


def test_iou_threshold_decides_a_match():
    truth = gt([(CIRCLE, A)])
    assert match_instances(truth, records([(CIRCLE, A_HALF)]))["n_matched"] == 0
    r = match_instances(truth, records([(CIRCLE, A_HALF)]), iou_threshold=0.3)
    assert r["n_matched"] == 1 and r["class_accuracy"] == 100.0
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(truth, records([(CIRCLE, A)]), iou_threshold=0.0)


def test_matching_is_one_to_one_best_iou_first():
    # two pseudo-labels on one object: the better one takes it, the other counts as unmatched
    truth = gt([(CIRCLE, A)])
    r = match_instances(truth, records([(RECT, A_SHIFTED), (CIRCLE, A)]))
    assert r["n_matched"] == 1 and r["mask_precision"] == 50.0
    assert r["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_crowd_regions_and_images_without_pseudo_labels():
    crowd = Instance.from_mask(B, RECT, iscrowd=1)
    truth = Dataset([ImageRecord("1.png", H, W, 1, [Instance.from_mask(A, CIRCLE), crowd]),
                     ImageRecord("2.png", H, W, 2, [Instance.from_mask(C, TRI)])],
                    list(CLASSES), "gt")
    # a pseudo-label on the crowd region is not a match; image 2 has no pseudo-labels at all
    pred = [ImageRecord("1.png", H, W, 1, [Instance.from_mask(A, CIRCLE), Instance.from_mask(B, RECT)])]
    r = match_instances(truth, pred)
    assert (r["n_gt"], r["n_pred"], r["n_matched"]) == (2, 2, 1)
    assert r["mask_recall"] == 50.0 and r["mask_precision"] == 50.0


def test_nothing_to_count_gives_none_not_nan():
    r = match_instances(gt([]), records([]))
    assert r["mask_recall"] is None and r["mask_precision"] is None
    assert r["class_accuracy"] is None and r["majority_rate"] is None
    assert top_confusions(r) == []


def test_predictions_of_another_dataset_are_refused():
    with pytest.raises(ValueError, match="not in the ground truth"):
        match_instances(gt([(CIRCLE, A)]), records([(CIRCLE, A)], [(CIRCLE, A)]))


def test_pseudo_labels_at_another_resolution_are_refused():
    small = [ImageRecord("1.png", 20, 20, 1, [Instance.from_mask(np.ones((20, 20), bool), CIRCLE)])]
    with pytest.raises(ValueError, match="original size"):
        match_instances(gt([(CIRCLE, A)]), small)
