"""Runner mechanics on tiny notebooks executed by real papermill kernels (a few seconds each)."""

import json

import nbformat
import pytest
import yaml

from sskd import runner
from sskd.runner import NotebookFailed, RunnerError, run_notebooks

PARAMS = 'preset = "demo"\nrun_name = "demo"\nruns_root = "runs"\noverrides = {}'
# every test notebook appends its name and the parameters it received to <run dir>/calls.jsonl
RECORD = ('import json, pathlib\n'
          'p = pathlib.Path(runs_root) / run_name / "calls.jsonl"\n'
          'with open(p, "a") as f:\n'
          '    f.write(json.dumps({"nb": NB, "preset": preset, "overrides": overrides}) + "\\n")')


def write_nb(path, body_cells):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# test"), params,
                nbformat.v4.new_code_cell(f"NB = {path.stem!r}")]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in body_cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def calls(root, name):
    p = root / name / "calls.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    for name in ("00_first", "01_second", "02_third"):
        write_nb(d / f"{name}.ipynb", [RECORD])
    (d / "scratch.ipynb").write_text("{}")  # not NN_name: ignored
    return d


def test_discover_and_resolve_stage(nbdir):
    nbs = runner.discover_notebooks(nbdir)
    assert [p.name for p in nbs] == ["00_first.ipynb", "01_second.ipynb", "02_third.ipynb"]
    for key in ("01", "1", "01_second", "second", "01_second.ipynb"):
        assert runner.resolve_stage(key, nbs) == 1
    with pytest.raises(RunnerError, match="unknown stage 'nope'.*00_first, 01_second"):
        runner.resolve_stage("nope", nbs)
    with pytest.raises(RunnerError, match="--notebooks-dir"):
        runner.discover_notebooks(nbdir / "missing")


def test_stage_aliases_match_the_shipped_notebooks():
    nbs = runner.discover_notebooks(runner.default_notebooks_dir())
    assert nbs[runner.resolve_stage("adapt_teacher", nbs)].name == "02_teacher_adaptation.ipynb"
    assert nbs[runner.resolve_stage("refine", nbs)].name == "04_student_refinement.ipynb"
    assert nbs[runner.resolve_stage("report", nbs)].name == "05_report.ipynb"


def test_nest_overrides_keeps_values_typed():
    assert runner.nest_overrides({"a.b": "123", "a.c": 1, "d": {"e.f": True}, "ablations": {"x.y": 1}}) == \
        {"a": {"b": "123", "c": 1}, "d": {"e": {"f": True}}, "ablations": {"x.y": 1}}
    assert runner.flatten_overrides({"a": {"b": 1, "c": {}}, "ablations": {"u": {"k": 1}}}) == \
        {"a.b": 1, "a.c": {}, "ablations": {"u": {"k": 1}}}


def test_resolve_config_precedence(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"seed": 5, "data": {"labeled_fraction": 0.3}, "device": "cpu"}))
    cfg, nested = runner.resolve_config("r", "", "R", f, {"seed": 7, "data.root": "123"})
    assert (cfg.seed, cfg.data.labeled_fraction, cfg.device, cfg.data.root) == (7, 0.3, "cpu", "123")
    assert (cfg.run_name, cfg.runs_root) == ("r", "R")
    assert nested == {"seed": 7, "device": "cpu", "data": {"labeled_fraction": 0.3, "root": "123"}}
    with pytest.raises(RunnerError, match="does not exist"):
        runner.resolve_config("r", "", "R", tmp_path / "nope.yaml")


def test_run_resume_and_from(nbdir, tmp_path):
    root = tmp_path / "runs"
    kw = dict(preset="", runs_root=root, notebooks_dir=nbdir, cwd=tmp_path, progress_bar=False,
              overrides={"stages.refine.enabled": False})
    res = run_notebooks("r1", **kw)
    assert [r.status for r in res] == ["ran"] * 3
    run = root / "r1"
    # config saved, parameters injected (nested overrides), executed copies written
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"]["refine"]["enabled"] is False
    got = calls(root, "r1")
    assert [c["nb"] for c in got] == ["00_first", "01_second", "02_third"]
    assert got[0]["overrides"] == {"stages": {"refine": {"enabled": False}}} and got[0]["preset"] == ""
    for name in ("00_first", "01_second", "02_third"):
        executed = nbformat.read(run / "notebooks" / f"{name}.ipynb", as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
        assert (run / "notebooks" / ".done" / f"{name}.json").is_file()

    # resume: everything completed is skipped, nothing executes
    res = run_notebooks("r1", **kw)
    assert [r.status for r in res] == ["skipped"] * 3 and len(calls(root, "r1")) == 3

    # --from re-runs that notebook and all later ones
    res = run_notebooks("r1", from_stage="second", **kw)
    assert [r.status for r in res] == ["skipped", "ran", "ran"]
    assert [c["nb"] for c in calls(root, "r1")][3:] == ["01_second", "02_third"]


def test_dry_run_only_and_stale_markers(nbdir, tmp_path):
    root = tmp_path / "runs"
    kw = dict(preset="", runs_root=root, notebooks_dir=nbdir, cwd=tmp_path, dry_run=True)
    lines = []
    res = run_notebooks("r2", echo=lines.append, **kw)
    assert [r.status for r in res] == ["planned"] * 3 and (root / "r2" / "config.yaml").is_file()
    assert calls(root, "r2") == [] and "would run 00_first.ipynb" in lines[0]
    done = root / "r2" / "notebooks" / ".done"
    done.mkdir(parents=True)
    for name in ("00_first", "01_second"):
        (done / f"{name}.json").write_text("{}")
    assert [r.status for r in run_notebooks("r2", **kw)] == ["skipped", "skipped", "planned"]
    assert [(r.name, r.status) for r in run_notebooks("r2", only="01", **kw)] == [("01_second.ipynb", "planned")]
    assert [r.status for r in run_notebooks("r2", force=True, **kw)] == ["planned"] * 3
    # a changed config warns that completed notebooks keep their old results
    lines.clear()
    run_notebooks("r2", overrides={"seed": 3}, echo=lines.append, **kw)
    assert any("config of" in ln and "changed" in ln and "00_first" in ln for ln in lines)
    with pytest.raises(RunnerError, match="either --from or --only"):
        run_notebooks("r2", only="01", from_stage="00", **kw)


def test_failure_names_notebook_cell_and_error_and_stops(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    write_nb(d / "00_ok.ipynb", [RECORD])
    # cells: 0 markdown, 1 parameters, 2 NB = ..., 3 raises
    write_nb(d / "01_bad.ipynb", ["\n# comment line\nraise ValueError(f'bad value {run_name}')"])
    write_nb(d / "02_after.ipynb", [RECORD])
    root = tmp_path / "runs"
    with pytest.raises(NotebookFailed) as info:
        run_notebooks("r3", preset="", runs_root=root, notebooks_dir=d, cwd=tmp_path,
                      progress_bar=False)
    e = info.value
    assert (e.notebook, e.cell, e.ename, e.evalue) == ("01_bad.ipynb", 3, "ValueError", "bad value r3")
    assert e.source_line == "# comment line"
    msg = str(e)
    assert "notebook 01_bad.ipynb failed in cell 3" in msg and "ValueError: bad value r3" in msg
    assert str(root / "r3" / "notebooks" / "01_bad.ipynb") in msg and "resume with" in msg
    done = root / "r3" / "notebooks" / ".done"
    assert (done / "00_ok.json").is_file() and not (done / "01_bad.json").exists()
    assert not (root / "r3" / "notebooks" / "02_after.ipynb").exists()  # stopped at the failure
    assert [c["nb"] for c in calls(root, "r3")] == ["00_ok"]
