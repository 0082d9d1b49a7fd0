import json

import pytest

from sskd import report
from sskd.config import Config, load_config, save_config
from sskd.rundir import RunDir


def model(ap, ap50, params, per_class=None):
    return {"AP": ap, "AP50": ap50, "AP75": ap / 2, "params": params, "num_images": 100,
            "per_class": per_class or {"car": ap + 1, "person": ap - 1}}


@pytest.fixture
def run_dir(tmp_path):
    rd = RunDir(tmp_path / "runs" / "paper")
    cfg = Config(run_name="paper", preset="demo",
                 ablations={"uniform_negatives": {"pixel_contrast": {"sampler": "uniform"}}})
    save_config(cfg, rd.config)
    metrics = {
        "models": {
            "teacher_zero_shot": model(22.0, 42.3, 568_000_000),
            "teacher_supervised": model(28.7, 53.4, 568_000_000),
            "teacher_1a": model(29.1, 54.0, 568_000_000),
            "teacher_adapted": model(30.5, 56.6, 568_000_000),
            "student_supervised": model(21.1, 38.7, 52_000_000),
            "student_transfer": model(32.2, 56.5, 52_000_000),
            "student_refined": model(33.9, 58.7, 52_000_000),
        },
        "stages": {"zero_shot": {"seconds": 12.5, "done": True},
                   "teacher_pretrain": {"seconds": 0.0, "done": True, "cached": True}},
        "ablations": {"uniform_negatives": {"models": {"student_transfer": model(29.4, 50.0, 52_000_000)}}},
        "pseudo_labels": {"teacher_zero_shot": {"AP": 20.0, "AP50": 40.0}},
        "efficiency": [
            {"model": "teacher", "params_M": 568.0, "gflops": 880.0, "latency_ms": 350.9,
             "throughput_img_s": 2.85, "peak_mem_MB": 5600.0},
            {"model": "student", "params_M": 52.0, "gflops": 200.0, "latency_ms": 76.9,
             "throughput_img_s": 13.0, "peak_mem_MB": 800.0}],
    }
    rd.metrics.write_text(json.dumps(metrics))
    rd.log("teacher_1a").parent.mkdir(parents=True)
    rd.log("teacher_1a").write_text("".join(json.dumps(
        {"step": s, "loss": 2.0 / s, "loss_sup": 1.0, "loss_pxl": 1.0 / s, "margin": 0.5 + s / 10,
         "fnr": 0.05}) + "\n" for s in (1, 2, 3)))
    return rd


def test_build_report_writes_all_files_with_exact_tables(run_dir):
    path = report.build_report(run_dir.root)
    out = run_dir.report
    assert path == out / "report.md"
    for name in ("report.md", "report.html", "metrics.json", "ap_per_stage.png", "efficiency.png",
                 "losses.png", "margin_fnr.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(run_dir.metrics.read_text())
    md = path.read_text()
    for row in [
        "| zero-shot teacher | `teacher_zero_shot` | 22.0 | 42.3 | 568M |",
        "| teacher, supervised fine-tuning | `teacher_supervised` | 28.7 | 53.4 | 568M |",
        "| teacher, adapted (stage 1) | `teacher_adapted` | 30.5 | 56.6 | 568M |",
        "| student, supervised only | `student_supervised` | 21.1 | 38.7 | 52M |",
        "| student after stage 2 | `student_transfer` | 32.2 | 56.5 | 52M |",
        "| student after stage 3 | `student_refined` | 33.9 | 58.7 | 52M |",
        "| `student_transfer` | 29.4 | 50.0 | 32.2 | -2.8 |",        # ablation vs main run
        "| teacher | 568 | 880 | 350.9 | 2.85 | 5600 |",
        "| teacher / student | 10.9x | 4.4x | 4.6x | 0.2x | 7.0x |",
        "| `teacher_zero_shot` | 23.0 | 21.0 |",                    # per-class AP
        "| `teacher_zero_shot` | 20.0 | 40.0 |",                    # pseudo-label AP on D_u
        "| stage | seconds | note |\n|---|---|---|\n| teacher_pretrain | 0.0 | cached |\n"
        "| zero_shot | 12.5 |  |",                                 # pipeline order
    ]:
        assert row in md, row
    assert "overrides: `pixel_contrast.sampler=uniform`" in md
    assert "Teacher after stage 1a (`teacher_1a`): AP 29.1, AP50 54.0." in md
    assert "![mask AP per stage](ap_per_stage.png)" in md
    # claims, with the measured numbers (one seed: against evaluation.seed_noise_ap = 3.5)
    assert "| **PASS** | teacher_adapted 30.5 vs teacher_zero_shot 22.0 (+8.5 AP); 1 seed" in md
    assert "| **WITHIN NOISE** | teacher_adapted 30.5 vs teacher_supervised 28.7 (+1.8 AP); 1 seed" in md
    assert ("| **PASS** | student_refined 33.9 vs teacher_adapted 30.5 (+3.4 AP); 1 seed (noise "
            "threshold `evaluation.seed_noise_ap` = 3.5 AP); params 52M vs 568M (10.9x fewer) |") in md
    assert ("| **PASS** | `student_transfer`: fused (main run) 32.2 vs uniform (ablation "
            "uniform_negatives) 29.4 (+2.8 AP); 1 seed") in md
    assert "| **PASS** | student_refined 33.9 vs student_supervised 21.1 (+12.8 AP); 1 seed" in md
    assert "teacher has no pretrained weights" not in md
    html = (out / "report.html").read_text()
    assert html.count("<table>") == sum(ln.startswith("|---") for ln in md.splitlines()) and "<img alt=\"mask AP per stage\"" in html



def test_every_table_1_comparison_is_graded(run_dir):
    m = json.loads(run_dir.metrics.read_text())
    cfg = Config(ablations={"uniform_negatives": {"pixel_contrast": {"sampler": "uniform"}}})
    names = [c.name for c in report.check_claims(m, cfg)]
    assert len(names) == 7 and names[-1] == "fused negative sampling >= uniform"
    pairs = [(c.better, c.base) for c in report.COMPARISONS]
    assert pairs == [("teacher_adapted", "teacher_zero_shot"), ("teacher_adapted", "teacher_supervised"),
                     ("teacher_adapted", "teacher_1a"), ("student_transfer", "student_supervised"),
                     ("student_refined", "student_supervised"), ("student_refined", "teacher_adapted")]
    assert [c.status for c in report.check_claims(m, cfg)] == [
        "PASS", "WITHIN NOISE", "WITHIN NOISE", "PASS", "PASS", "PASS", "PASS"]


def test_claims_fail_and_skip_on_measured_numbers(run_dir):
    m = json.loads(run_dir.metrics.read_text())
    m["models"]["teacher_adapted"]["AP"] = 21.0        # adaptation hurt, within noise
    m["models"]["student_refined"]["params"] = 100_000_000  # only 5.7x smaller
    m["ablations"] = {}
    claims = report.check_claims(m, Config())
    assert [c.status for c in claims] == ["WITHIN NOISE", "FAIL", "FAIL", "PASS", "PASS", "FAIL", "SKIPPED"]
    assert claims[0].detail == ("teacher_adapted 21.0 vs teacher_zero_shot 22.0 (-1.0 AP); 1 seed "
                                "(noise threshold `evaluation.seed_noise_ap` = 3.5 AP)")
    assert "5.7x fewer" in claims[5].detail
    m["models"]["teacher_adapted"]["AP"] = 17.0        # hurt by more than the noise
    assert report.check_claims(m, Config())[0].status == "FAIL"
    del m["models"]["student_refined"]
    assert [c.status for c in report.check_claims(m)][4:6] == ["SKIPPED", "SKIPPED"]


def test_the_noise_threshold_comes_from_the_run_config():
    m = {"models": {"teacher_zero_shot": {"AP": 10.0}, "teacher_adapted": {"AP": 12.0},
                    "student_supervised": {"AP": 11.0}, "student_refined": {"AP": 9.0,
                                                                            "params": 1e6}}}
    m["models"]["teacher_adapted"]["params"] = 2e7
    cfg = Config()
    c = report.check_claims(m, cfg)
    assert (c[0].status, c[4].status, c[5].status) == ("WITHIN NOISE", "WITHIN NOISE", "WITHIN NOISE")
    cfg.evaluation.seed_noise_ap = 1.0
    c = report.check_claims(m, cfg)
    assert (c[0].status, c[4].status, c[5].status) == ("PASS", "FAIL", "FAIL")
    assert c[4].detail.startswith("student_refined 9.0 vs student_supervised 11.0 (-2.0 AP); 1 seed")
    cfg.evaluation.seed_noise_ap = 2.0                # |-2.0| is not below 2.0
    assert report.check_claims(m, cfg)[4].status == "FAIL"


def test_claims_use_the_measured_seed_spread(run_dir):
    m = json.loads(run_dir.metrics.read_text())
    seeds = {0: {"teacher_zero_shot": 22.0, "teacher_adapted": 30.5, "teacher_supervised": 28.7},
             1: {"teacher_zero_shot": 21.0, "teacher_adapted": 27.0, "teacher_supervised": 29.0},
             2: {"teacher_zero_shot": 23.0, "teacher_adapted": 29.0, "teacher_supervised": 28.0}}
    c = report.check_claims(m, Config(), seeds)
    # adapted - zero-shot: +8.5, +6.0, +6.0; spreads 3.5 and 2.0 -> every seed > 3.5: PASS
    assert c[0].status == "PASS"
    assert "3 seeds: +8.5, +6.0, +6.0 (mean +6.8), largest seed spread of the two rows 3.5 AP" in c[0].detail
    # adapted - supervised teacher: +1.8, -2.0, +1.0: within the 3.5 spread
    assert c[1].status == "WITHIN NOISE" and "3 seeds" in c[1].detail
    # rows the seed-noise result lacks fall back to one seed
    assert "1 seed" in c[3].detail
    # written by benchmarks/seed_noise.py into the run dir, read by the report
    (run_dir.root / "seed_noise.json").write_text(json.dumps({"ap": {str(k): v for k, v in seeds.items()}}))
    assert report.read_seed_noise(run_dir) == seeds
    md = report.build_report(run_dir, figures=False).read_text()
    assert "Graded against the seed-to-seed spread measured over 3 seeds" in md
    (run_dir.root / "seed_noise.json").write_text("{not json")
    assert report.read_seed_noise(run_dir) == {}


def test_teacher_claims_not_graded_without_pretrained_teacher(run_dir):
    m = json.loads(run_dir.metrics.read_text())
    cfg = Config(ablations={"uniform_negatives": {"pixel_contrast": {"sampler": "uniform"}}})
    cfg.data.kind = "coco"                             # no stand-in, no teacher.weights
    assert not report.teacher_is_pretrained(cfg)
    c = report.check_claims(m, cfg)
    assert [x.status for x in c] == ["NOT GRADED"] * 3 + ["PASS", "PASS", "NOT GRADED", "PASS"]
    save_config(cfg, run_dir.config)
    md = report.build_report(run_dir, figures=False).read_text()
    assert "**The teacher has no pretrained weights**" in md
    cfg.teacher.weights = "weights/teacher"
    assert report.teacher_is_pretrained(cfg)
    assert report.check_claims(m, cfg)[0].status == "PASS"
    cfg.teacher.name, cfg.teacher.weights = "grounded_sam", ""      # weights live in its options
    assert not report.teacher_is_pretrained(cfg)
    cfg.teacher.options = {"detector_weights": "w/gdino", "sam_weights": "w/sam2"}
    assert report.teacher_is_pretrained(cfg)


def test_fused_claim_when_main_run_is_uniform_and_params_from_efficiency():
    cfg = Config()
    cfg.pixel_contrast.sampler = "uniform"
    cfg.ablations = {"neg": {"pixel_contrast.sampler": "fused"}}
    m = {"models": {"teacher_zero_shot": {"AP": 1.0}, "teacher_adapted": {"AP": 2.0},
                    "student_refined": {"AP": 2.5}, "student_transfer": {"AP": 3.0}},
         "efficiency": [{"model": "teacher", "params_M": 20.0}, {"model": "student", "params_M": 1.0}],
         "ablations": {"neg": {"overrides": {"pixel_contrast.sampler": "fused"},
                               "models": {"student_transfer": {"AP": 2.0}}}}}
    c = report.check_claims(m, cfg)
    assert c[5].status == "PASS" and "20.0x fewer" in c[5].detail
    m["efficiency"] = [{"name": "teacher", "params_M": 30.0}, {"name": "student", "params_M": 1.0}]
    assert "30.0x fewer" in report.check_claims(m, cfg)[5].detail
    assert c[6].status == "WITHIN NOISE"
    assert c[6].detail.startswith("`student_transfer`: fused (ablation neg) 2.0 vs uniform "
                                  "(main run) 3.0 (-1.0 AP); 1 seed")
    # an ablation the config no longer has (or has with other overrides) is not evidence
    for ablations in ({}, {"neg": {"pixel_contrast.sampler": "mask_only"}}):
        cfg.ablations = ablations
        assert report.check_claims(m, cfg)[6].status == "SKIPPED"
    # the sampler comes from what the child run recorded, never from the ablation's name
    cfg.ablations = {"uniform_x": {"pixel_contrast.temperature": 0.1}}
    m["ablations"] = {"uniform_x": {"overrides": cfg.ablations["uniform_x"], "sampler": "fused",
                                    "models": {"student_transfer": {"AP": 2.0}}}}
    assert "fused (ablation uniform_x) 2.0" in report.check_claims(m, cfg)[6].detail


def test_report_of_a_fresh_run_marks_missing_rows(tmp_path):
    rd = RunDir(tmp_path / "empty")
    rd.root.mkdir()
    md = report.build_report(rd).read_text()
    assert "| zero-shot teacher | `teacher_zero_shot` | — | — | — |" in md
    assert "No ablations were run" in md and "Efficiency\n\nNot measured." in md
    assert md.count("SKIPPED") == 7
    with pytest.raises(FileNotFoundError, match="sskd run"):
        report.build_report(tmp_path / "missing")


def test_build_report_accepts_a_run_object(run_dir):
    class Run:  # the shape of sskd.stages.Run: .dir and .cfg
        dir = run_dir
        cfg = Config(preset="smoke")

    md = report.build_report(Run(), figures=False).read_text()
    assert "preset `smoke`" in md and "## Figures" not in md


def test_markdown_to_html_subset():
    md = ("# Title\n\nSome **bold** and `a<b>` text\nwrapped [link](x.json).\n\n- one\n- two\n\n"
          "| a | b |\n|---|---|\n| 1 | `c` |\n\n![fig](f.png)\n")
    html = report.markdown_to_html(md, title="t")
    assert "<h1>Title</h1>" in html
    assert "<p>Some <strong>bold</strong> and <code>a&lt;b&gt;</code> text wrapped " \
           '<a href="x.json">link</a>.</p>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert ("<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td>"
            "<td><code>c</code></td></tr></tbody></table>") in html
    assert '<p><img alt="fig" src="f.png"></p>' in html


def test_efficiency_table_uses_given_ratio_rows_and_names():
    rows = [{"name": "teacher", "params_M": 0.1759, "gflops": 0.007904768},
            {"name": "student", "params_M": 0.02, "gflops": 0.001},
            {"name": "teacher / student", "is_ratio": True, "params_M": 8.795, "gflops": 7.9}]
    md = report.efficiency_table(rows)
    assert "| teacher | 0.1759 | 0.007905 | — | — | — |" in md
    assert "| teacher / student | 8.8x | 7.9x | — | — | — |" in md
    assert md.count("teacher / student") == 1
    assert report.efficiency_table([]) == ""


def test_without_figures_and_precision_summary():
    md = "# R\n\n## Figures\n\n![a](a.png)\n\n![b](b.png)\n\nRaw numbers: x\n"
    assert report.without_figures(md) == "# R\n\nRaw numbers: x\n"
    table = [{"bin": 0, "class": "c"},
             {"bin": "all", "class": "c", "count": 4, "tp": 1, "precision": 0.25, "mean_score": 0.675,
              "gap": 0.425, "num_gt": 2, "recall": 0.5}]
    assert "| c | 4 | 1 | 0.250 | 0.675 | 0.425 | 2 | 0.500 |" in report.precision_summary(table)
    table[1]["num_gt"] = 0
    assert "No ground truth" in report.precision_summary(table)


def test_dataset_summary_counts_instances_per_class():
    import numpy as np
    from sskd.data.records import Dataset, ImageRecord, Instance

    m = np.zeros((4, 4), np.uint8)
    m[:2, :2] = 1
    ds = Dataset([ImageRecord("a", 4, 4, 1, [Instance.from_mask(m, 0), Instance.from_mask(m, 1)]),
                  ImageRecord("b", 4, 4, 2, [Instance.from_mask(m, 1)])], ["x", "y"])
    md = report.dataset_summary({"labeled": ds, "val": ds.subset([2])})
    assert "| labeled | 2 | 3 | 1 | 2 |" in md and "| val | 1 | 1 | 0 | 1 |" in md


def test_cityscapes_ap_column_and_install_line():
    models = {"teacher_zero_shot": {**model(22.0, 42.3, 568_000_000), "cityscapes_AP": 19.25,
                                    "cityscapes_AP50": 40.5}}
    table = report.results_table(models)
    assert "| AP | AP50 | Cityscapes AP | Cityscapes AP50 | params |" in table
    assert "| 22.0 | 42.3 | 19.2 | 40.5 |" in table  # fmt rounds half to even
    assert "Cityscapes AP" not in report.results_table({"teacher_zero_shot": model(1.0, 2.0, 3)})
    cfg = Config()
    cfg.data.kind = "cityscapes"
    md = report.report_markdown(RunDir("/tmp/x"), cfg, {"models": {"teacher_zero_shot":
                                                                   model(1.0, 2.0, 3)}}, {})
    assert "The official Cityscapes AP was not computed: pip install 'sskd[cityscapes]'" in md


def test_pseudo_label_section_tells_masks_from_classes():
    matching = {"iou_threshold": 0.5, "n_gt": 400, "n_pred": 350, "n_matched": 320,
                "mask_recall": 80.0, "mask_precision": 91.4, "class_accuracy": 40.0,
                "majority_rate": 36.0, "classes": ["circle", "rectangle", "triangle"],
                "confusion": [[40, 60, 10], [20, 50, 30], [5, 67, 38]]}
    md = report.pseudo_label_table({
        "teacher_adapted": {"AP": 8.5, "AP50": 14.7, "matching": matching},
        "teacher_zero_shot": {"AP": 9.7, "AP50": 18.0}})   # recorded before matching existed
    lines = md.splitlines()
    assert lines[0].startswith("| pseudo-labels of | AP | AP50 | objects found (%) |")
    # model order (zero-shot first), the older entry without matching says n/a
    assert lines[2] == "| `teacher_zero_shot` | 9.7 | 18.0 | n/a | n/a | n/a | n/a | n/a |"
    assert lines[3] == ("| `teacher_adapted` | 8.5 | 14.7 | 80 | 91 | 40 | 36 | triangle as "
                        "rectangle: 67; circle as rectangle: 60; rectangle as triangle: 30 |")
    assert "mask IoU >= 0.5" in md
    # nothing measured (D_u without hidden ground truth): a sentence, not an empty table
    assert report.pseudo_label_table({}) == (
        "D_u has no hidden ground truth here: pseudo-label quality is not measured.")
    # without any matching entry the section keeps its AP-only table
    assert report.pseudo_label_table({"teacher_1a": {"AP": 7.6, "AP50": 14.2}}) == (
        "| pseudo-labels of | AP | AP50 |\n|---|---|---|\n| `teacher_1a` | 7.6 | 14.2 |")


def test_the_report_says_when_pseudo_label_masks_were_refined():
    assert report.mask_refine_note(None) == ""
    assert report.mask_refine_note(load_config("smoke")) == ""
    note = report.mask_refine_note(load_config("demo", ["pseudo_label.refine_radius=2"]))
    assert "`pseudo_label.mask_refine: guided`, radius 2 px, eps 0.001" in note
    assert "scores its own, unrefined masks" in note
