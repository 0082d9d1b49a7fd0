"""Tests of COCO mask AP (sskd.evaluation.coco_eval) on hand-computed cases.

COCO facts the expected values rely on: 10 IoU thresholds 0.50:0.05:0.95 (a match needs
IoU >= threshold), 101 recall points 0:0.01:1, precision made monotone from the right, and
precision 0 at recall points beyond the highest recall reached.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sskd.data.records import Dataset, ImageRecord, Instance, to_coco
from sskd.evaluation.coco_eval import evaluate_masks

from .hand_masks import CLASSES, H, W, box


def gt_dataset(*images) -> Dataset:
    """``images``: per image a list of (class_id, mask); image ids 1..n."""
    recs = [ImageRecord(f"{i}.png", H, W, i, [Instance.from_mask(m, c) for c, m in insts])
            for i, insts in enumerate(images, 1)]
    return Dataset(recs, list(CLASSES), "gt")


def preds(*images) -> list[ImageRecord]:
    """``images``: per image a list of (class_id, mask, score); image ids 1..n."""
    return [ImageRecord(f"{i}.png", H, W, i, [Instance.from_mask(m, c, score=s) for c, m, s in insts])
            for i, insts in enumerate(images, 1)]


A, B = box(2, 2, 10, 10), box(20, 20, 10, 10)


def test_perfect_prediction_is_100():
    gt = gt_dataset([(0, A), (1, B)], [(2, box(5, 5, 12, 8))])
    r = evaluate_masks(gt, preds([(0, A, 0.9), (1, B, 0.8)], [(2, box(5, 5, 12, 8), 0.7)]))
    assert r["AP"] == pytest.approx(100) and r["AP50"] == pytest.approx(100)
    assert r["AP75"] == pytest.approx(100) and r["APs"] == pytest.approx(100)
    assert math.isnan(r["APm"]) and math.isnan(r["APl"])  # no object above 32^2 px
    assert r["per_class"] == pytest.approx({"circle": 100, "rectangle": 100, "triangle": 100})
    assert r["num_images"] == 2 and r["num_predictions"] == 3 and r["iou_type"] == "segm"


def test_empty_prediction_is_zero():
    gt = gt_dataset([(0, A), (1, B)])
    for p in ([], preds([])):
        r = evaluate_masks(gt, p)
        assert (r["AP"], r["AP50"], r["AP75"]) == (0.0, 0.0, 0.0)
        assert r["per_class"]["circle"] == 0.0 and r["per_class"]["rectangle"] == 0.0


def test_iou_exactly_half_matches_at_ap50_only():
    # GT 10x10 (100 px), prediction its left half (50 px): IoU = 50 / 100 = 0.5 exactly.
    # Matched at the 0.50 threshold only -> AP50 = 100, AP75 = 0, AP = 1 of 10 thresholds = 10.
    r = evaluate_masks(gt_dataset([(0, A)]), preds([(0, box(2, 2, 10, 5), 0.9)]))
    assert r["AP50"] == pytest.approx(100, abs=1e-9)
    assert r["AP75"] == 0.0
    assert r["AP"] == pytest.approx(10, abs=1e-9)
    assert r["per_class_AP50"]["circle"] == pytest.approx(100)
    # a hair below 0.5 (49 / 100) misses everywhere
    m = box(2, 2, 10, 5)
    m[2, 2] = False
    assert evaluate_masks(gt_dataset([(0, A)]), preds([(0, m, 0.9)]))["AP50"] == 0.0


def test_right_mask_wrong_class_scores_zero_for_both_classes():
    gt = gt_dataset([(0, A), (1, B)])
    r = evaluate_masks(gt, preds([(1, A, 0.9), (0, B, 0.8)]))
    assert r["per_class"]["circle"] == 0.0 and r["per_class"]["rectangle"] == 0.0
    assert r["AP"] == 0.0 and r["AP50"] == 0.0
    assert math.isnan(r["per_class"]["triangle"])  # no ground truth for this class


def test_images_without_predictions_count_as_misses():
    # two images with one circle each, only the first predicted (perfectly): recall 0.5 with
    # precision 1 -> recall points 0.00..0.50 (51 of 101) have precision 1, the rest 0.
    gt = gt_dataset([(0, A)], [(0, B)])
    r = evaluate_masks(gt, preds([(0, A, 0.9)]))
    expected = 51 / 101 * 100
    for k in ("AP", "AP50", "AP75"):
        assert r[k] == pytest.approx(expected, abs=1e-9)
    assert r["num_images"] == 2


def test_score_order_matters():
    # one circle; a perfect prediction and a false positive elsewhere. TP ranked first ->
    # precision 1 at recall 1 -> 100. FP ranked first -> precision 1/2 at the only recall
    # level reached (1.0), interpolated back to recall 0 -> 50.
    gt = gt_dataset([(0, A)])
    fp = box(25, 25, 8, 8)
    assert evaluate_masks(gt, preds([(0, A, 0.9), (0, fp, 0.5)]))["AP"] == pytest.approx(100)
    assert evaluate_masks(gt, preds([(0, A, 0.5), (0, fp, 0.9)]))["AP"] == pytest.approx(50)


def test_false_positives_of_a_class_without_gt_are_not_counted():
    gt = gt_dataset([(0, A)])
    r = evaluate_masks(gt, preds([(0, A, 0.9), (2, B, 0.95)]))
    assert r["AP"] == pytest.approx(100)
    assert math.isnan(r["per_class"]["rectangle"]) and math.isnan(r["per_class"]["triangle"])


def test_bbox_iou_type():
    gt = gt_dataset([(0, A)])
    r = evaluate_masks(gt, preds([(0, box(2, 2, 10, 5), 0.9)]), iou_type="bbox")
    assert r["AP50"] == pytest.approx(100) and r["AP75"] == 0.0 and r["iou_type"] == "bbox"
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_masks(gt, [], iou_type="keypoints")


def test_bad_predictions_get_clear_errors():
    gt = gt_dataset([(0, A)])
    with pytest.raises(ValueError, match=r"image ids \[7\].*not in the ground truth"):
        evaluate_masks(gt, [ImageRecord("x.png", H, W, 7, [Instance.from_mask(A, 0, 0.5)])])
    with pytest.raises(ValueError, match="no score"):
        evaluate_masks(gt, [ImageRecord("1.png", H, W, 1, [Instance.from_mask(A, 0)])])
    with pytest.raises(ValueError, match="class_id 3"):
        evaluate_masks(gt, preds([(3, A, 0.5)]))
    small = np.zeros((20, 20), dtype=bool)
    small[:5, :5] = True
    with pytest.raises(ValueError, match=r"mask size \[20, 20\].*resize"):
        evaluate_masks(gt, [ImageRecord("1.png", H, W, 1, [Instance.from_mask(small, 0, 0.5)])])
    with pytest.raises(ValueError, match="differ from ground-truth classes"):
        evaluate_masks(gt, Dataset(preds([(0, A, 0.5)]), ["x", "y", "z"]))
    with pytest.raises(ValueError, match="twice"):
        evaluate_masks(gt, preds([(0, A, 0.5)]) * 2)
    with pytest.raises(ValueError, match="no images"):
        evaluate_masks(Dataset([], CLASSES, "empty"), [])


def test_pycocotools_output_is_silenced_but_available(capsys, caplog):
    gt = gt_dataset([(0, A)])
    with caplog.at_level(logging.DEBUG, logger="sskd.evaluation.coco_eval"):
        evaluate_masks(gt, preds([(0, A, 0.9)]))
    assert capsys.readouterr().out == ""
    assert "Average Precision" in caplog.text
    evaluate_masks(gt, preds([(0, A, 0.9)]), verbose=True)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in capsys.readouterr().out


def test_matches_the_standard_file_based_pycocotools_route(tmp_path):
    # Messy but deterministic case: jittered, dropped, mislabeled and spurious predictions.
    rng = np.random.default_rng(0)
    gts, dts = [], []
    for _ in range(6):
        g, d = [], []
        for _ in range(int(rng.integers(1, 4))):
            y, x, h, w = rng.integers(0, 25, 2).tolist() + rng.integers(4, 15, 2).tolist()
            c = int(rng.integers(3))
            g.append((c, box(y, x, h, w)))
            if rng.random() < 0.8:
                dy, dx = rng.integers(-2, 3, 2).tolist()
                cd = c if rng.random() < 0.8 else (c + 1) % 3
                d.append((cd, box(max(y + dy, 0), max(x + dx, 0), h, w), float(rng.random())))
        if rng.random() < 0.5:
            d.append((int(rng.integers(3)), box(*rng.integers(0, 30, 2).tolist(), 6, 6), float(rng.random())))
        gts.append(g)
        dts.append(d)
    gt, pr = gt_dataset(*gts), preds(*dts)
    ours = evaluate_masks(gt, pr)

    (tmp_path / "gt.json").write_text(json.dumps(to_coco(gt)))
    results = [{"image_id": r.image_id, "category_id": i.class_id + 1, "segmentation": i.segmentation,
                "score": i.score} for r in pr for i in r.instances]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for k, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6]):
        assert (math.isnan(ours[k]) and v == -1) or ours[k] == pytest.approx(v * 100), k
    assert 0 < ours["AP"] < 100
