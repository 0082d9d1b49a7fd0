"""benchmarks/baseline_budget.py: a baseline's AP per step budget, and when a gain stands out of noise."""

import json

import pytest

from sskd.config import read_config
from sskd.metrics import read_metrics


@pytest.fixture(scope="module")
def baseline_budget(load_benchmark):
    return load_benchmark("baseline_budget")


def test_gains_are_against_the_smallest_budget_and_graded_against_both_spreads(baseline_budget):
    ap = {4100: {0: 29.3, 1: 28.0, 2: 30.5}, 2100: {0: 22.1, 1: 19.2, 2: 30.1}, 3000: {0: 25.0, 1: 20.0}}
    t1, t2, data = baseline_budget.tables(ap)
    assert "| 2100 | 22.1 | 19.2 | 30.1 | 23.8 | 10.9 |" in t1
    assert "| 3000 | 25.0 | 20.0 | — | 22.5 | 5.0 |" in t1
    g = data["gains"][4100]
    assert g["per_seed"] == pytest.approx({0: 7.2, 1: 8.8, 2: 0.4})
    # the 2100 row's spread (10.9) is the noise: a +7.2 minimum does not stand out of it
    assert g["noise"] == pytest.approx(10.9) and g["verdict"] == "within noise"
    assert set(data["gains"][3000]["per_seed"]) == {0, 1}          # seed 2 has no 3000 run
    assert "| 2100 -> 4100 | +7.2 | +8.8 | +0.4 | 10.9 | within noise |" in t2


@pytest.mark.parametrize("later, verdict", [
    ({0: 30.0, 1: 31.0}, "still rising"),
    ({0: 10.0, 1: 9.0}, "falling"),
    ({0: 20.5, 1: 21.5}, "within noise"),
])
def test_verdicts(baseline_budget, later, verdict):
    _, _, data = baseline_budget.tables({100: {0: 20.0, 1: 21.0}, 200: later})
    assert data["gains"][200]["verdict"].startswith(verdict)


def test_one_seed_is_not_graded(baseline_budget):
    _, t2, data = baseline_budget.tables({100: {0: 20.0}, 200: {0: 30.0}})
    assert data["gains"][200]["verdict"] == "n/a (one seed)" and "n/a (one seed)" in t2


def test_smoke_runs_one_run_per_budget_with_that_budget(baseline_budget, tmp_path, capsys):
    out = tmp_path / "bb.json"
    ov = ["-p", f"cache_dir={tmp_path / 'cache'}", "-p", f"data.root={tmp_path / 'data'}"]
    assert baseline_budget.main(["--preset", "smoke", "--steps", "3", "2", "--seeds", "0",
                                 "--runs-root", str(tmp_path / "runs"), *ov, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for steps in (2, 3):
        rd = tmp_path / "runs" / f"smoke_student_seed0_steps{steps}"
        assert read_config(rd / "config.yaml").stages.student_supervised.train.steps == steps
        ap = read_metrics(rd / "metrics.json")["models"]["student_supervised"]["AP"]
        assert data["ap"][str(steps)]["0"] == pytest.approx(ap)
        assert set(read_metrics(rd / "metrics.json")["models"]) == {"student_supervised"}
    assert "student_supervised by step budget: preset smoke" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        baseline_budget.main(["--steps", "2", "2"])
