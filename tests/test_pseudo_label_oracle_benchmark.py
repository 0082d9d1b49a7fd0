"""benchmarks/pseudo_label_oracle.py on a finished smoke run: the copy trains on the oracle,
the source run stays as it was."""

import pytest

from sskd.data.records import iter_records_jsonl
from sskd.metrics import read_metrics
from sskd.stages import adapt_teacher, load_datasets, open_run, prepare_data, refine, transfer, zero_shot


@pytest.mark.slow
def test_truth_oracle_retrains_the_students_of_a_copy(tmp_path, capsys, load_benchmark):
    bench = load_benchmark("pseudo_label_oracle")
    run = open_run("r", preset="smoke", runs_root=str(tmp_path / "runs"),
                   overrides={"cache_dir": str(tmp_path / "cache"), "data.root": str(tmp_path / "data"),
                              "ablations": {}, "stages.teacher_supervised.enabled": False})
    prepare_data(run)
    with pytest.raises(SystemExit):   # not finished: no refined student to compare with
        bench.main([str(run.dir.root)])
    for stage in (zero_shot, adapt_teacher, transfer, refine):
        stage(run, progress=False)
    src_pl = run.dir.pseudo_labels("teacher_adapted").read_text()
    src_student = (run.dir.model_dir("student_refined") / "model.pt").read_bytes()

    assert bench.main([str(run.dir.root), "--oracles", "truth", "--out", str(tmp_path / "or")]) == 0
    copy = tmp_path / "or" / "r_oracle_truth"
    unl = load_datasets(run)["unlabeled"]
    pl = list(iter_records_jsonl(copy / "pseudo_labels" / "teacher_adapted.jsonl"))
    assert [len(r.instances) for r in pl] == [len(r.instances) for r in unl.records]
    m = read_metrics(copy / "metrics.json")
    entry = m["pseudo_labels"]["teacher_adapted"]
    assert entry["AP"] == pytest.approx(100.0) and entry["matching"]["mask_recall"] == 100.0
    assert entry["oracle"]["kind"] == "truth"
    assert {"student_transfer", "student_refined", "teacher_adapted"} <= set(m["models"])
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| truth | 100.0 | 100.0 | 100.0 |" in out
    # the source run is untouched
    assert run.dir.pseudo_labels("teacher_adapted").read_text() == src_pl
    assert (run.dir.model_dir("student_refined") / "model.pt").read_bytes() == src_student
