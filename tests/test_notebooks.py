"""The committed stage notebooks: clean, thin, one parameters cell; and (slow) all of them
executed on the ``smoke`` preset through the same papermill path as ``sskd run``."""

import ast
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from sskd.runner import discover_notebooks, run_notebooks

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["00_data", "01_zero_shot_teacher", "02_teacher_adaptation", "03_knowledge_transfer",
            "04_student_refinement", "05_report"]
#: stages that record their wall time in metrics.json (sskd.stages.*)
STAGES = ["zero_shot", "adapt_teacher", "transfer", "refine"]


def notebooks():
    return [(p.stem, nbformat.read(p, as_version=4)) for p in discover_notebooks(NB_DIR)]


def test_the_ordered_notebooks_exist():
    assert [name for name, _ in notebooks()] == EXPECTED


@pytest.mark.parametrize("name,nb", notebooks(), ids=EXPECTED)
def test_notebook_is_clean_with_one_parameters_cell(name, nb):
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs committed"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name}: exactly one cell tagged 'parameters'"
    tree = ast.parse(params[0].source)
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body}
    assert values == {"preset": "demo", "run_name": "demo", "runs_root": "runs", "overrides": {}}


@pytest.mark.parametrize("name,nb", notebooks(), ids=EXPECTED)
def test_notebook_cells_hold_no_logic(name, nb):
    """Thin notebooks: code cells call sskd functions; no functions, classes or loops."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        src = "\n".join(ln for ln in cell.source.splitlines() if not ln.startswith("%"))
        for node in ast.walk(ast.parse(src)):
            assert not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.For, ast.While,
                                         ast.If, ast.Lambda)), f"{name}: logic in a cell:\n{src}"
    setup = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "enter_project_root()" in setup and "open_run(run_name, preset=preset" in setup


@pytest.mark.slow
def test_all_notebooks_execute_on_smoke(tmp_path, mongod):
    """Kernels inherit FIFTYONE_DATABASE_URI (the private mongod) for notebook 04's export."""
    root = tmp_path / "runs"
    results = run_notebooks("smoke", preset="smoke", runs_root=root, notebooks_dir=NB_DIR,
                            cwd=tmp_path, progress_bar=False,
                            overrides={"data.root": str(tmp_path / "data"),
                                       "cache_dir": str(tmp_path / "cache")})
    assert [r.status for r in results] == ["ran"] * len(EXPECTED)
    run = root / "smoke"
    for name in EXPECTED:
        executed = nbformat.read(run / "notebooks" / f"{name}.ipynb", as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "error"]
        assert not errors, f"{name}: {errors}"
        assert (run / "notebooks" / ".done" / f"{name}.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for stage in STAGES:
        assert metrics["stages"][stage]["done"] is True, stage
    assert {"teacher_zero_shot", "teacher_adapted", "student_transfer", "student_refined"} <= set(metrics["models"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert set(metrics["ablations"]) == set(cfg["ablations"])  # 05 ran every configured ablation
    assert [e.get("name", e.get("model")) for e in metrics["efficiency"]
            if not e.get("is_ratio")] == ["teacher", "student"]
    import fiftyone as fo
    from sskd.inspect.fiftyone_export import dataset_name_for
    exported = fo.load_dataset(dataset_name_for(run))
    assert len(exported) == 6 + 16  # val + labeled + unlabeled
    assert "pred_student_refined" in exported.get_field_schema()
    report = (run / "report" / "report.md").read_text()
    assert "## Claims" in report and (run / "report" / "report.html").is_file()
    # resume: nothing left to do
    again = run_notebooks("smoke", preset="smoke", runs_root=root, notebooks_dir=NB_DIR,
                          cwd=tmp_path, progress_bar=False,
                          overrides={"data.root": str(tmp_path / "data"),
                                     "cache_dir": str(tmp_path / "cache")})
    assert [r.status for r in again] == ["skipped"] * len(EXPECTED)
