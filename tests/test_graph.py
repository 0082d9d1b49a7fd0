"""The stage graph: one description from which the runner, run dir, report, plots, widgets and
FiftyOne export take their stage tables."""

import dataclasses

import pytest

from sskd import graph
from sskd.config import Config, StageConfig, StagesConfig, from_dict, to_dict
from sskd.runner import default_notebooks_dir, discover_notebooks


def test_every_step_has_its_shipped_notebook_and_every_key_exists():
    stems = [p.stem for p in discover_notebooks(default_notebooks_dir())]
    assert [s.notebook for s in graph.STEPS] == stems
    flat = graph.flatten(to_dict(Config()))
    stage_fields = {f.name for f in dataclasses.fields(StagesConfig)}
    for m in graph.MODELS:
        assert m.config_key is None or isinstance(getattr(Config().stages, m.config_key), StageConfig)
        assert set(m.requires) <= stage_fields
        assert m.step in [s.name for s in graph.STEPS]
        assert m.starts_from in (graph.TEACHER_INIT, graph.STUDENT_INIT, *graph.MODEL_TAGS)
    for s in graph.STEPS:
        for key in graph.step_config_keys(s.name):
            assert any(k == key or k.startswith(key + ".") for k in flat), key
    assert {s.name for s in graph.STANDINS} <= stage_fields


def test_derived_tables():
    from sskd import plots, report, rundir, runner, widgets
    from sskd.stages.ablations import TEACHER_KEYS
    assert rundir.MODEL_TAGS == graph.MODEL_TAGS == (
        "teacher_zero_shot", "teacher_supervised", "teacher_1a", "teacher_adapted",
        "student_supervised", "student_transfer", "student_refined")
    assert runner.STAGE_ALIASES["adapt_teacher"] == "02" and runner.STAGE_ALIASES["report"] == "05"
    assert [t for t, _ in plots.TABLE1_ROWS] == [t for t in graph.MODEL_TAGS if t != "teacher_1a"]
    assert plots.TAG_LABELS["teacher_1a"] == "teacher after stage 1a"
    assert report.STAGE_ORDER == ("teacher_pretrain", "student_pretrain", "zero_shot",
                                  "adapt_teacher", "transfer", "refine")
    assert [k for k, _ in widgets.WEIGHTED_STAGES] == ["adapt_1a", "adapt_1b", "transfer", "refine"]
    assert [k for k, _ in widgets.BASELINE_STAGES] == ["teacher_supervised", "student_supervised"]
    assert TEACHER_KEYS == ("teacher", "stages.teacher_pretrain", "stages.adapt_1a", "stages.adapt_1b")
    assert {m.tag: m.fiftyone_stage for m in graph.MODELS} == {
        "teacher_zero_shot": "zero_shot", "teacher_supervised": "baseline", "teacher_1a": "stage1a",
        "teacher_adapted": "stage1b", "student_supervised": "baseline", "student_transfer": "stage2",
        "student_refined": "stage3"}
    assert graph.final_models("student") == ("student_refined", "student_transfer")
    with pytest.raises(KeyError, match="unknown model tag 'nope'"):
        graph.model("nope")


def test_what_a_config_produces_and_distils():
    cfg = Config()
    assert graph.pseudo_label_source(cfg, "student_transfer") == "teacher_adapted"
    assert graph.downstream("teacher_1a") == ("teacher_adapted", "student_transfer", "student_refined")
    assert graph.downstream("student_supervised") == ()
    one_a = from_dict({"stages": {"adapt_1b": {"enabled": False}}})
    assert graph.produces(one_a, "teacher_adapted") and not graph.trains(one_a, "teacher_adapted")
    assert graph.pseudo_label_source(one_a, "student_transfer") == "teacher_adapted"
    off = from_dict({"stages": {"adapt_1a": {"enabled": False}}})
    assert not graph.produces(off, "teacher_adapted") and not graph.produces(off, "teacher_1a")
    assert graph.pseudo_label_source(off, "student_transfer") == "teacher_zero_shot"


def test_notebook_inputs_follow_ownership():
    d = to_dict(Config())
    data = graph.notebook_inputs(d, "00_data")
    assert data and all(k.startswith("data.") for k in data)
    zs = graph.notebook_inputs(d, "01_zero_shot_teacher")
    assert "seed" in zs and "pixel_contrast.sampler" in zs and "stages.teacher_pretrain.steps" in zs
    assert not any(k.startswith(("stages.adapt_1a", "stages.refine", "ablations", "inspect", "workers",
                                 "device", "run_name", "cache_dir")) for k in zs)
    refine = graph.notebook_inputs(d, "04_student_refinement")
    assert "stages.refine.train.steps" in refine and "stages.adapt_1a.train.steps" in refine
    assert "ablations" not in refine and "evaluation.seed_noise_ap" not in refine
    assert "evaluation.score_threshold" in refine
    assert "ablations" in graph.notebook_inputs(d, "05_report")
    assert "stages.refine.train.steps" in graph.notebook_inputs(d, "99_mine")  # unknown: all
    assert graph.config_step("stages.refine.train.steps") == "refine"
    assert graph.config_step("inspect.mistakenness") == "refine"
    assert graph.config_step("seed") is None


def _changed(**dotted):
    from sskd.config import merge_dicts, parse_overrides
    return merge_dicts(to_dict(Config()), parse_overrides(dotted))


def test_stale_results_follow_what_each_model_is_derived_from():
    d = to_dict(Config())
    everything = graph.Stale(graph.MODEL_TAGS, graph.stage_order(), True)
    assert not graph.stale_results(d, d)
    assert not graph.stale_results(d, _changed(workers=1, device="cpu", run_name="x"))
    assert graph.stale_results(d, _changed(**{"stages.refine.train.steps": 7})) == \
        graph.Stale(("student_refined",), ("refine",), True)
    assert graph.stale_results(d, _changed(**{"evaluation.seed_noise_ap": 0.5})) == \
        graph.Stale((), (), True)
    # stage 1a feeds 1b, stage 2 and 3; the supervised baselines come from neither
    s = graph.stale_results(d, _changed(**{"stages.adapt_1a.train.steps": 3}))
    assert s.models == ("teacher_1a", "teacher_adapted", "student_transfer", "student_refined")
    assert s.stages == ("adapt_teacher", "transfer", "refine") and s.report
    # a stand-in feeds every model that starts from it, and its own stage record goes
    s = graph.stale_results(d, _changed(**{"stages.student_pretrain.steps": 3}))
    assert s.models == ("student_supervised", "student_transfer", "student_refined")
    assert s.stages == ("student_pretrain", "transfer", "refine")
    s = graph.stale_results(d, _changed(**{"stages.teacher_pretrain.steps": 3}))
    assert "student_supervised" not in s.models and len(s.models) == 6
    assert s.stages[0] == "teacher_pretrain"
    # the FiftyOne export settings change no model's AP
    assert graph.stale_results(d, _changed(**{"inspect.mistakenness": False})) == \
        graph.Stale((), (), False)
    # a model's own keys feed what starts from it: a new student leaves the teacher's AP
    s = graph.stale_results(d, _changed(**{"student.options": {"x": 1}}))
    steps = ("zero_shot", "adapt_teacher", "transfer", "refine")    # wall times overlap
    assert s == graph.Stale(("student_supervised", "student_transfer", "student_refined"),
                            ("student_pretrain", *steps), True)
    # a new teacher changes the pseudo-labels, hence the distilled students, not the baseline
    s = graph.stale_results(d, _changed(**{"teacher.size": "other"}))
    assert s.models == ("teacher_zero_shot", "teacher_supervised", "teacher_1a",
                        "teacher_adapted", "student_transfer", "student_refined")
    assert s.stages == ("teacher_pretrain", *steps)
    # shared keys feed everything
    assert graph.stale_results(d, _changed(seed=3)) == everything
    assert graph.stale_results(d, _changed(**{"data.labeled_fraction": 0.05})) == everything
