"""benchmarks/efficiency.py builds the models a preset builds (model options included)."""

from __future__ import annotations

import pytest


@pytest.fixture
def efficiency(load_benchmark):
    return load_benchmark("efficiency")


def test_preset_options_reach_the_models(efficiency):
    assert efficiency.preset_options(None, []) == {}
    with pytest.raises(SystemExit, match="-p needs --preset"):
        efficiency.preset_options(None, ["student.options.silhouette_channels=4"])
    opts = efficiency.preset_options("demo", ["student.options.silhouette_channels=4"])
    assert opts["teacher"]["silhouette_channels"] == 32
    assert opts["student"]["silhouette_channels"] == 4
    models, notes = efficiency.build_models("demo", 3, False, opts)
    assert models["student_demo"].silhouette_head is not None
    assert models["student_demo"].cfg["silhouette_channels"] == 4
    assert any(n.startswith("student options") for n in notes)
    plain, notes = efficiency.build_models("demo", 3, False)
    assert plain["teacher_demo"].silhouette_head is None and notes == []
    # an option adds its parameters to the table's count
    assert models["teacher_demo"].num_parameters() > plain["teacher_demo"].num_parameters()
