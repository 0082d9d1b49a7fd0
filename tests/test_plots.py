import json
import logging
import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from sskd import plots
from sskd.data.records import Dataset, ImageRecord, Instance


def box_mask(y0, y1, x0, x1, size=20):
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def inst(mask, class_id, score=None):
    return Instance.from_mask(mask, class_id, score)


# --------------------------------------------------------------------------- logs


def test_read_log_drops_torn_line_and_missing_file(tmp_path):
    p = tmp_path / "logs" / "teacher_1a.jsonl"
    p.parent.mkdir()
    p.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert plots.read_log(p) == [{"step": 1, "loss": 2.0}]
    assert plots.read_log(tmp_path / "nope.jsonl") == []


def test_load_logs_orders_by_pipeline_and_skips_empty(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    for name in ("student_refined", "zzz_custom", "teacher_1a", "student_transfer"):
        (d / f"{name}.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (d / "teacher_adapted.jsonl").write_text("")
    assert list(plots.load_logs(tmp_path)) == ["teacher_1a", "student_transfer", "student_refined",
                                              "zzz_custom"]
    assert list(plots.load_logs(tmp_path, ["student_transfer", "teacher_adapted"])) == ["student_transfer"]


def test_loss_curves_one_panel_per_stage_one_line_per_term():
    logs = {
        "teacher_1a": [{"step": s, "loss": 3.0 - s, "loss_sup": 2.0, "loss_pxl": 1.0 / s}
                       for s in (1, 2, 3)],
        "student_refined": [{"step": s, "loss": 1.0, "loss_sup": 1.0} for s in (1, 2)],
    }
    fig = plots.loss_curves(logs)
    assert isinstance(fig, Figure)
    a, b = fig.axes
    assert [ln.get_label() for ln in a.lines] == ["loss", "loss_sup", "loss_pxl"]
    assert [ln.get_label() for ln in b.lines] == ["loss", "loss_sup"]
    assert list(a.lines[0].get_ydata()) == [2.0, 1.0, 0.0]
    assert a.get_title() == "teacher_1a"


def test_loss_curves_without_logs_is_an_empty_message():
    fig = plots.loss_curves({})
    assert len(fig.axes) == 1 and not fig.axes[0].lines
    assert "no training logs" in fig.axes[0].texts[0].get_text()


def test_margin_fnr_curves_lines_per_stage_with_diagnostics():
    logs = {"teacher_1a": [{"step": 1, "margin": 0.5, "fnr": 0.1}, {"step": 2, "margin": 0.6, "fnr": 0.05}],
            "student_refined": [{"step": 1, "loss": 1.0}]}
    fig = plots.margin_fnr_curves(logs)
    ax_m, ax_f = fig.axes
    assert [ln.get_label() for ln in ax_m.lines] == ["teacher_1a"]
    assert list(ax_m.lines[0].get_ydata()) == [0.5, 0.6]
    # one stage line + the p = 0.5 reference line
    assert [ln.get_label() for ln in ax_f.lines] == ["teacher_1a", "p = 0.5 bound"]
    assert list(ax_f.lines[0].get_ydata()) == [0.1, 0.05]


# --------------------------------------------------------------------------- pseudo-label bias


@pytest.fixture
def gt_and_preds():
    classes = ["circle", "square"]
    g1 = box_mask(0, 10, 0, 10)       # class 0
    g2 = box_mask(10, 20, 10, 20)     # class 1
    g3 = box_mask(0, 10, 10, 20)      # class 0, image 2
    gt = Dataset([ImageRecord("a.png", 20, 20, 1, [inst(g1, 0), inst(g2, 1)]),
                  ImageRecord("b.png", 20, 20, 2, [inst(g3, 0)])], classes, "unlabeled")
    preds = [
        ImageRecord("a.png", 20, 20, 1, [
            inst(g1, 0, 0.95),                      # TP
            inst(g1, 0, 0.85),                      # duplicate of the same object: FP
            inst(g2, 0, 0.25),                      # right mask, wrong class: FP for class 0
            inst(box_mask(10, 20, 10, 15), 1, 0.55),  # IoU 0.5 with g2: TP at iou=0.5
        ]),
        ImageRecord("b.png", 20, 20, 2, [inst(box_mask(0, 10, 10, 14), 0, 0.65)]),  # IoU 0.4: FP
        ImageRecord("c.png", 20, 20, 99, [inst(g1, 0, 0.9)]),  # not in gt: skipped
    ]
    return gt, preds


def test_pseudo_label_precision_exact_table(gt_and_preds, caplog):
    gt, preds = gt_and_preds
    with caplog.at_level(logging.WARNING, logger="sskd"):
        table = plots.pseudo_label_precision(preds, gt, iou=0.5, bins=4)
    assert "skipped 1 prediction record" in caplog.text
    rows = {(r["class"], r["bin"]): r for r in table}
    assert len(table) == 2 * 4 + 2
    # class 0: scores 0.95 (TP), 0.85 (FP), 0.25 (FP), 0.65 (FP)
    assert (rows["circle", 3]["count"], rows["circle", 3]["tp"], rows["circle", 3]["precision"]) == (2, 1, 0.5)
    assert rows["circle", 3]["mean_score"] == pytest.approx(0.9)
    assert (rows["circle", 2]["count"], rows["circle", 2]["tp"]) == (1, 0)
    assert (rows["circle", 1]["count"], rows["circle", 1]["tp"], rows["circle", 1]["precision"]) == (1, 0, 0.0)
    assert rows["circle", 0]["count"] == 0 and math.isnan(rows["circle", 0]["precision"])
    assert (rows["circle", 2]["lo"], rows["circle", 2]["hi"]) == (0.5, 0.75)
    allc = rows["circle", "all"]
    assert (allc["count"], allc["tp"], allc["num_gt"]) == (4, 1, 2)
    assert allc["precision"] == 0.25 and allc["recall"] == 0.5
    assert allc["gap"] == pytest.approx((0.95 + 0.85 + 0.25 + 0.65) / 4 - 0.25)
    alls = rows["square", "all"]
    assert (alls["count"], alls["tp"], alls["num_gt"], alls["precision"]) == (1, 1, 1, 1.0)
    assert rows["square", 2]["tp"] == 1


def test_pseudo_label_precision_iou_threshold(gt_and_preds):
    gt, preds = gt_and_preds
    strict = {(r["class"], r["bin"]): r for r in plots.pseudo_label_precision(preds, gt, iou=0.6, bins=4)}
    assert strict["square", "all"]["tp"] == 0  # IoU exactly 0.5 no longer matches
    assert strict["circle", "all"]["tp"] == 1


def test_pseudo_label_precision_custom_edges_and_bad_bins(gt_and_preds):
    gt, preds = gt_and_preds
    table = plots.pseudo_label_precision(preds, gt, bins=[0.0, 0.9, 1.0])
    rows = {(r["class"], r["bin"]): r for r in table}
    assert rows["circle", 1]["count"] == 1 and rows["circle", 0]["count"] == 3
    with pytest.raises(ValueError, match="bins"):
        plots.pseudo_label_precision(preds, gt, bins=[0.5, 0.2])


def test_confidence_precision_plot(gt_and_preds):
    gt, preds = gt_and_preds
    fig = plots.confidence_precision(plots.pseudo_label_precision(preds, gt, bins=4))
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.lines] == ["calibrated", "circle", "square"]
    circle = ax.lines[1]
    assert list(circle.get_ydata()) == [0.0, 0.0, 0.5]  # non-empty bins only, low to high
    # no ground truth at all (real unlabeled data): a message instead of a misleading curve
    empty = Dataset([r.without_instances() for r in gt.records], gt.classes)
    fig = plots.confidence_precision(plots.pseudo_label_precision(preds, empty))
    assert not fig.axes[0].lines and "ground truth" in fig.axes[0].texts[0].get_text()


# --------------------------------------------------------------------------- results


def test_ap_per_stage_bars_in_table_order():
    models = {"student_refined": {"AP": 33.9, "AP50": 58.7}, "teacher_zero_shot": {"AP": 22.0, "AP50": 42.3},
              "teacher_adapted": {"AP": 30.5, "AP50": 56.6}, "unrelated": {"AP": 1.0, "AP50": 2.0}}
    fig = plots.ap_per_stage(models)
    ax = fig.axes[0]
    heights = [round(p.get_height(), 2) for p in ax.patches]
    assert heights == [22.0, 30.5, 33.9, 42.3, 56.6, 58.7]  # AP bars, then AP50 bars
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "zero-shot teacher"
    sub = plots.ap_per_stage(models, tags=["teacher_adapted", "teacher_zero_shot"]).axes[0]
    assert [round(p.get_height(), 2) for p in sub.patches] == [30.5, 22.0, 56.6, 42.3]


def test_efficiency_bars_panel_per_metric():
    eff = [{"model": "teacher", "params_M": 5.0, "gflops": 2.0, "latency_ms": 10.0,
            "throughput_img_s": 100.0, "peak_mem_MB": 50.0},
           {"model": "student", "params_M": 0.5, "gflops": 0.3, "latency_ms": 4.0,
            "throughput_img_s": 250.0, "peak_mem_MB": 20.0}]
    fig = plots.efficiency_bars(eff)
    assert len(fig.axes) == 5
    assert [p.get_height() for p in fig.axes[0].patches] == [5.0, 0.5]
    assert [p.get_height() for p in fig.axes[3].patches] == [100.0, 250.0]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["teacher", "student"]
    partial = plots.efficiency_bars([{"name": "teacher", "params_M": 5.0}, {"name": "student", "params_M": 1.0},
                                     {"name": "teacher / student", "is_ratio": True, "params_M": 5.0}])
    assert len(partial.axes) == 1 and len(partial.axes[0].patches) == 2
    assert [t.get_text() for t in partial.axes[0].get_xticklabels()] == ["teacher", "student"]


# --------------------------------------------------------------------------- images


def test_draw_instances_threshold_and_overlay():
    img = np.zeros((20, 20, 3), np.uint8)
    a, b = box_mask(0, 10, 0, 10), box_mask(10, 20, 10, 20)
    fig = Figure()
    ax = fig.add_subplot()
    n = plots.draw_instances(ax, img, [inst(a, 0, 0.9), inst(b, 1, 0.2)], ["x", "y"], score_threshold=0.5)
    assert n == 1
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == 1
    assert ax.texts[0].get_text() == "x 0.90"
    over = plots.overlay_masks(img, [inst(a, 0)])
    assert over[:10, :10].sum() > 0 and over[10:, :].sum() == 0 and over[:, 10:].sum() == 0


def test_image_grid_reads_files(tmp_path):
    recs = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(p)
        recs.append(ImageRecord(str(p), 20, 20, i, [inst(box_mask(0, 5, 0, 5), 0)]))
    fig = plots.image_grid(recs, ["x"], n=8, cols=2, title="grid")
    assert len(fig.axes) == 4
    assert sum(len(ax.images) for ax in fig.axes) == 3
    assert fig.axes[1].get_title() == "#1 (1)"
    assert fig._suptitle.get_text() == "grid"
