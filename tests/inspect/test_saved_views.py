"""sskd.inspect.views on the crafted run: mask AP equals sskd's, views hold the crafted errors.

(Named test_saved_views.py, not test_views.py: tests/data/test_views.py exists and pytest's
default import mode needs unique test module basenames.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sskd.data.records import iter_records_jsonl

FIELDS = ("pl_teacher_zero_shot", "pl_teacher_adapted", "pred_teacher_adapted",
          "pred_student_refined")


@pytest.fixture(scope="module")
def views(mongod):
    import sskd.inspect.views as views

    return views


@pytest.mark.parametrize("field", FIELDS)
def test_mask_ap_equals_sskd_coco_eval(exported, smoke_run, field):
    from sskd.evaluation.coco_eval import evaluate_masks

    gt = smoke_run.unlabeled if field.startswith("pl_") else smoke_run.val
    preds = list(iter_records_jsonl(smoke_run.fields[field]))
    ref = evaluate_masks(gt, preds)
    ours = exported.info["sskd"]["evaluations"][field]
    assert ours["eval_key"] == f"eval_{field}" and ours["samples"] == 4
    assert ours["AP"] == pytest.approx(ref["AP"], abs=0.01)
    assert ours["AP50"] == pytest.approx(ref["AP50"], abs=0.01)
    assert set(ours["per_class"]) == {k for k, v in ref["per_class"].items() if not math.isnan(v)}
    for name, ap in ours["per_class"].items():
        assert ap == pytest.approx(ref["per_class"][name], abs=0.01)
    assert 0 < ours["AP"] <= 100
    assert f"eval_{field}" in exported.list_evaluations()


def test_known_false_positive_and_misses_show_up(exported, smoke_run, kit):
    fp = exported.load_saved_view("fp_pl_teacher_zero_shot")
    assert len(fp) == 2 and set(fp.values("type")) == {"fp"}
    first = fp.first()  # most confident false positive first: the crafted 0.95 square
    det = first.pl_teacher_zero_shot.detections[0]
    assert first.filepath == smoke_run.path("unlabeled", 3)
    assert det.label == "square" and det.confidence == pytest.approx(0.95)
    x, y, s = kit.KNOWN_FP_BOX
    assert np.allclose(np.array(det.bounding_box) * kit.SIZE, [x, y, s, s])
    # the other one is the class error on train 4 (square called circle)
    assert fp.values("filepath")[1] == smoke_run.path("unlabeled", 4)

    fn = exported.load_saved_view("fn_pl_teacher_zero_shot")
    assert sorted(fn.values("filepath")) == sorted([smoke_run.path("unlabeled", 4),
                                                   smoke_run.path("unlabeled", 5)])
    assert len(exported.load_saved_view("fp_pl_teacher_adapted")) == 0
    assert len(exported.load_saved_view("fn_pred_teacher_adapted")) == 1  # val 4's square


def test_per_class_and_confidence_tables(exported, views):
    rows = {r["class"]: r for r in views.per_class_table(exported, "pl_teacher_zero_shot")}
    assert rows["circle"] == {"class": "circle", "count": 3, "tp": 2, "fp": 1,
                              "precision": pytest.approx(2 / 3), "gt": 3, "fn": 1,
                              "recall": pytest.approx(2 / 3),
                              "mean_confidence": pytest.approx((0.9 + 0.6 + 0.7) / 3)}
    assert (rows["square"]["tp"], rows["square"]["fp"], rows["square"]["fn"]) == (2, 1, 1)
    bins = views.confidence_table(exported, "pl_teacher_zero_shot", bins=(0.0, 0.75, 1.0))
    # below 0.75: 0.6 (fp), 0.7 (tp), 0.5 (tp at IoU 0.62); above: 0.9 tp, 0.8 tp, 0.95 fp
    assert [(b["count"], b["tp"], b["fp"]) for b in bins] == [(3, 2, 1), (3, 2, 1)]
    with pytest.raises(ValueError, match="evaluate_field"):
        views.per_class_table(exported, "ground_truth")


def test_confidence_split_views(exported):
    low = exported.load_saved_view("lowconf_pl_teacher_zero_shot")
    high = exported.load_saved_view("highconf_pl_teacher_zero_shot")
    lc = low.values("pl_teacher_zero_shot.detections.confidence", unwind=True)
    hc = high.values("pl_teacher_zero_shot.detections.confidence", unwind=True)
    assert sorted(lc) == pytest.approx([0.5, 0.6, 0.7])
    assert sorted(hc) == pytest.approx([0.8, 0.9, 0.95])
    info = exported.info["sskd"]["views"]["lowconf_pl_teacher_zero_shot"]
    assert "< 0.750" in info["question"] and info["count"] == 3


def test_disagreement_view_ranks_the_crafted_image_first(exported, smoke_run):
    name = "disagree_pred_teacher_adapted_vs_pred_student_refined"
    view = exported.load_saved_view(name)
    paths, scores = view.values(["filepath", name])
    assert paths[0] == smoke_run.path("val", 3) and scores[0] == pytest.approx(1.0)
    assert paths[1] == smoke_run.path("val", 4) and scores[1] == pytest.approx(1 / 3)
    assert scores[2:] == [0.0, 0.0]


def test_mistakenness_of_pseudo_labels(exported, smoke_run):
    view = exported.load_saved_view("mistaken_pl_teacher_zero_shot")
    m = "mistakenness_pl_teacher_zero_shot"
    assert view.first().filepath == smoke_run.path("unlabeled", 4)   # the class error
    assert view.first()[m] == pytest.approx((0.9 + 1) / 2)          # judged by conf-0.9 adapted
    s3 = exported[smoke_run.path("unlabeled", 3)]
    s5 = exported[smoke_run.path("unlabeled", 5)]
    assert s3["possible_spurious_pl_teacher_zero_shot"] == 1        # the crafted FP
    assert s5["possible_missing_pl_teacher_zero_shot"] == 1         # the missed small circle
    assert "judged by pl_teacher_adapted" in exported.get_saved_view_info(
        "mistaken_pl_teacher_zero_shot")["description"]


def test_rebuilding_views_is_idempotent(exported, views):
    before = {k: v["count"] for k, v in exported.info["sskd"]["views"].items()}
    evals = sorted(exported.list_evaluations())
    again = views.build_views(exported)
    assert {k: v["count"] for k, v in again.items()} == before
    assert sorted(exported.list_evaluations()) == evals
    assert sorted(exported.list_saved_views()) == sorted(before)
    assert len(before) == 15
