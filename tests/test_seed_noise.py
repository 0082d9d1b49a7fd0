"""benchmarks/seed_noise.py: per-seed tables and when a difference stands out of the noise."""

import pytest


@pytest.fixture(scope="module")
def seed_noise(load_benchmark):
    return load_benchmark("seed_noise")


def test_tables_spread_and_differences(seed_noise):
    per_seed = {
        0: {"teacher_zero_shot": 1.0, "teacher_adapted": 8.0, "student_refined": 9.0,
            "student_supervised": 8.5, "student_transfer": 9.5,
            "uniform_negatives/student_transfer": 9.0},
        1: {"teacher_zero_shot": 2.0, "teacher_adapted": 7.0, "student_refined": 10.0,
            "student_supervised": 10.0, "student_transfer": 9.0,
            "uniform_negatives/student_transfer": 10.0},
    }
    t1, t2, data = seed_noise.tables(per_seed)
    assert data["spread"]["teacher_adapted"] == pytest.approx(1.0)
    assert "| teacher_adapted | 8.0 | 7.0 | 1.0 |" in t1
    d = data["differences"]
    a = d["adapted teacher - zero-shot teacher"]
    assert a["per_seed"] == [7.0, 5.0] and a["min"] == 5.0 and a["noise"] == 1.0 and a["stands_out"]
    r = d["refined student - adapted teacher"]           # +1.0, +3.0; noise max(1.0, 1.0)
    assert r["min"] == 1.0 and r["noise"] == 1.0 and not r["stands_out"]
    f = d["stage-2 student: fused - uniform negatives"]  # +0.5, -1.0
    assert f["per_seed"] == [0.5, -1.0] and not f["stands_out"]
    assert "| adapted teacher - zero-shot teacher | +7.0 | +5.0 | +5.0 | 1.0 | yes |" in t2


def test_one_seed_never_stands_out_and_missing_rows_are_skipped(seed_noise):
    _, t2, data = seed_noise.tables({0: {"teacher_zero_shot": 0.0, "teacher_adapted": 30.0}})
    assert list(data["differences"]) == ["adapted teacher - zero-shot teacher"]
    assert not data["differences"]["adapted teacher - zero-shot teacher"]["stands_out"]
    assert "n/a (one seed)" in t2
