"""metrics.json: concurrent writers (a stage and its side process) lose no update."""

import multiprocessing as mp

from sskd.metrics import read_metrics, update_metrics


def _writer(path: str, prefix: str, n: int) -> None:
    for i in range(n):
        update_metrics(path, "models", f"{prefix}{i}", {"AP": float(i)})


def test_two_processes_updating_the_same_file_keep_every_entry(tmp_path):
    path = tmp_path / "metrics.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), p, 40)) for p in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    models = read_metrics(path)["models"]
    assert len(models) == 80
    assert models["a39"] == {"AP": 39.0} and models["b0"] == {"AP": 0.0}


def test_remove_metrics_drops_only_the_listed_entries(tmp_path):
    from sskd.metrics import remove_metrics
    path = tmp_path / "metrics.json"
    assert remove_metrics(path, {"models": ["x"]})["models"] == {}  # no file: nothing to do
    update_metrics(path, "models", "a", {"AP": 1.0})
    update_metrics(path, "models", "b", {"AP": 2.0})
    update_metrics(path, "pseudo_labels", "a", {"AP": 3.0})
    update_metrics(path, "stages", "refine", {"seconds": 1.0})
    remove_metrics(path, {"models": ["a", "missing"], "pseudo_labels": ["a"], "nope": ["a"]})
    data = read_metrics(path)
    assert data["models"] == {"b": {"AP": 2.0}} and data["pseudo_labels"] == {}
    assert data["stages"] == {"refine": {"seconds": 1.0}}


def test_remove_metrics_drops_a_whole_section_when_given_none(tmp_path):
    from sskd.metrics import remove_metrics
    path = tmp_path / "metrics.json"
    update_metrics(path, "efficiency", None, [{"name": "teacher"}])
    update_metrics(path, "models", "a", {"AP": 1.0})
    data = remove_metrics(path, {"efficiency": None, "nothing_here": None})
    assert "efficiency" not in data and "efficiency" not in read_metrics(path)
    assert read_metrics(path)["models"] == {"a": {"AP": 1.0}}


def _filled_run(tmp_path):
    """A run dir whose metrics.json has an entry for every model, stage and section."""
    from sskd import graph
    from sskd.config import Config, to_dict
    from sskd.rundir import RunDir
    rd = RunDir(tmp_path / "run")
    for tag in graph.MODEL_TAGS:
        update_metrics(rd.metrics, "models", tag, {"AP": 10.0})
    for tag in ("teacher_zero_shot", "teacher_1a", "teacher_adapted"):
        update_metrics(rd.metrics, "pseudo_labels", tag, {"AP": 5.0})
    for stage in graph.stage_order():
        update_metrics(rd.metrics, "stages", stage, {"seconds": 1.0, "done": True})
    update_metrics(rd.metrics, "ablations", "uniform_negatives", {"models": {}})
    update_metrics(rd.metrics, "efficiency", None, [{"name": "teacher"}])
    rd.report.mkdir(parents=True)
    (rd.report / "report.md").write_text("old")
    return rd, to_dict(Config())


def _with(d, **dotted):
    from sskd.config import merge_dicts, parse_overrides
    return merge_dicts(d, parse_overrides(dotted))


def test_a_refine_setting_drops_only_the_refined_student_and_the_report(tmp_path):
    from sskd.metrics import drop_stale_results
    rd, cfg = _filled_run(tmp_path)
    gone = drop_stale_results(rd, cfg, _with(cfg, **{"stages.refine.train.steps": 9}))
    m = read_metrics(rd.metrics)
    assert "student_refined" not in m["models"] and len(m["models"]) == 6
    assert gone["models"] == ["student_refined"] and gone["efficiency"] is None
    assert "refine" not in m["stages"] and m["stages"]["transfer"]["done"]
    assert m["ablations"] == {} and "efficiency" not in m and not rd.report.exists()
    assert set(m["pseudo_labels"]) == {"teacher_zero_shot", "teacher_1a", "teacher_adapted"}


def test_a_student_setting_drops_the_students_and_an_execution_setting_nothing(tmp_path):
    from sskd.metrics import drop_stale_results
    rd, cfg = _filled_run(tmp_path)
    assert drop_stale_results(rd, cfg, _with(cfg, workers=1)) == {}
    assert drop_stale_results(rd, None, cfg) == {}                   # a new run: nothing to drop
    assert len(read_metrics(rd.metrics)["models"]) == 7 and rd.report.is_dir()
    # the student's settings feed the students only: the teachers' AP and pseudo-labels stay
    gone = drop_stale_results(
        rd, cfg, _with(cfg, **{"student.options": {"silhouette_channels": 32}}))
    m = read_metrics(rd.metrics)
    assert set(m["models"]) == {"teacher_zero_shot", "teacher_supervised", "teacher_1a",
                                "teacher_adapted"}
    assert gone["models"] == ["student_supervised", "student_transfer", "student_refined"]
    assert set(m["pseudo_labels"]) == {"teacher_zero_shot", "teacher_1a", "teacher_adapted"}
    # every step's wall time may include a student side job; the teacher's pretraining does not
    assert set(m["stages"]) == {"teacher_pretrain"} and not rd.report.exists()
    # the seed is shared: everything goes
    drop_stale_results(rd, cfg, _with(cfg, seed=5))
    m = read_metrics(rd.metrics)
    assert m["models"] == {} and m["pseudo_labels"] == {} and m["stages"] == {}
