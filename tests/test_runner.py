"""Runner mechanics on tiny notebooks executed by real papermill kernels (a few seconds each)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    for name in ("00_first", "01_second"):  # markers of an older sskd: no inputs recorded
        (done / f"{name}.json").write_text("{}")
        (root / "r2" / "notebooks" / f"{name}.ipynb").write_text("{}")
    assert [r.status for r in run_notebooks("r2", **kw)] == ["skipped", "skipped", "planned"]
    assert [(r.name, r.status) for r in run_notebooks("r2", only="01", **kw)] == [("01_second.ipynb", "planned")]
    assert [r.status for r in run_notebooks("r2", force=True, **kw)] == ["planned"] * 3
    # a changed config re-runs (no warn-and-skip): these notebooks are not in the stage graph,
    # so they depend on the whole config
    lines.clear()
    res = run_notebooks("r2", overrides={"seed": 3}, echo=lines.append, **kw)
    assert [r.status for r in res] == ["planned"] * 3
    assert "inputs changed: seed 0 -> 3" in lines[0]
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


# --------------------------------------------------------------------------- re-execution

GRAPH_NBS = ("00_data", "01_zero_shot_teacher", "02_teacher_adaptation", "03_knowledge_transfer",
             "04_student_refinement", "05_report")


@pytest.fixture
def graph_nbdir(tmp_path):
    """Tiny notebooks named like the shipped ones, so the stage graph's dependencies apply."""
    d = tmp_path / "graph_notebooks"
    d.mkdir()
    for name in GRAPH_NBS:
        write_nb(d / f"{name}.ipynb", [RECORD])
    return d


def _ran(root, name, since):
    return [c["nb"] for c in calls(root, name)[since:]]


def test_a_changed_config_drops_the_results_it_no_longer_describes(graph_nbdir, tmp_path):
    from sskd.metrics import read_metrics, update_metrics
    from sskd.rundir import RunDir
    root = tmp_path / "runs"
    kw = dict(runs_root=root, notebooks_dir=graph_nbdir, cwd=tmp_path, progress_bar=False)
    run_notebooks("s", preset="smoke", **kw)
    rd = RunDir(root / "s")
    for tag in ("teacher_adapted", "student_transfer", "student_refined"):
        update_metrics(rd.metrics, "models", tag, {"AP": 1.0})
    before = rd.config.read_text()
    res = run_notebooks("s", overrides={"stages.refine.train.steps": 20}, dry_run=True, **kw)
    assert [r.status for r in res] == ["skipped"] * 4 + ["planned"] * 2
    assert rd.config.read_text() == before           # a dry run leaves the run dir as it is
    assert "student_refined" in read_metrics(rd.metrics)["models"]
    run_notebooks("s", overrides={"stages.refine.train.steps": 20}, **kw)
    assert set(read_metrics(rd.metrics)["models"]) == {"teacher_adapted", "student_transfer"}
    assert "steps: 20" in rd.config.read_text()


def test_rerun_follows_the_stage_graph(graph_nbdir, tmp_path):
    root = tmp_path / "runs"
    kw = dict(runs_root=root, notebooks_dir=graph_nbdir, cwd=tmp_path, progress_bar=False)
    assert [r.status for r in run_notebooks("g", preset="smoke", **kw)] == ["ran"] * 6
    n = len(calls(root, "g"))

    # nothing changed, or only how the run executes: nothing re-runs
    lines = []
    res = run_notebooks("g", echo=lines.append, overrides={"workers": 1, "device": "cpu"}, **kw)
    assert [r.status for r in res] == ["skipped"] * 6 and _ran(root, "g", n) == []
    assert "completed, its inputs are unchanged" in lines[0]

    # a refine setting: 04 (owner) and 05 (after it)
    lines.clear()
    res = run_notebooks("g", overrides={"stages.refine.train.steps": 20}, echo=lines.append, **kw)
    assert [r.status for r in res] == ["skipped"] * 4 + ["ran"] * 2
    assert _ran(root, "g", n) == ["04_student_refinement", "05_report"]
    assert sum("inputs changed: stages.refine.train.steps 2 -> 20" in ln for ln in lines) == 2
    n = len(calls(root, "g"))

    # a stage-1 setting: 02-05; an ablation: 05 only; the notebook's own code: it and later ones
    res = run_notebooks("g", overrides={"stages.adapt_1a.train.steps": 3}, **kw)
    assert [r.status for r in res] == ["skipped"] * 2 + ["ran"] * 4
    res = run_notebooks("g", overrides={"ablations": {}}, **kw)
    assert [r.status for r in res] == ["skipped"] * 5 + ["ran"]
    write_nb(graph_nbdir / "03_knowledge_transfer.ipynb", [RECORD, "x = 1"])
    assert [r.status for r in run_notebooks("g", **kw)] == ["skipped"] * 3 + ["ran"] * 3
    # a shared key (the seed) reaches every notebook but the data's
    assert [r.status for r in run_notebooks("g", overrides={"seed": 1}, **kw)] == \
        ["skipped"] + ["ran"] * 5
    # a deleted executed copy is not a completed notebook
    (root / "g" / "notebooks" / "05_report.ipynb").unlink()
    assert [r.status for r in run_notebooks("g", **kw)] == ["skipped"] * 5 + ["ran"]
    assert [r.status for r in run_notebooks("g", **kw)] == ["skipped"] * 6


def test_legacy_markers_compare_with_the_saved_config(graph_nbdir, tmp_path):
    """Markers written before inputs were recorded: the run's config.yaml is what they ran with."""
    root = tmp_path / "runs"
    kw = dict(runs_root=root, notebooks_dir=graph_nbdir, cwd=tmp_path, progress_bar=False)
    run_notebooks("l", preset="smoke", **kw)
    done = root / "l" / "notebooks" / ".done"
    for m in done.iterdir():
        m.write_text(json.dumps({"seconds": 1.0}))
    res = run_notebooks("l", overrides={"stages.transfer.l_pxl": 0.5}, dry_run=True, **kw)
    assert [r.status for r in res] == ["skipped"] * 3 + ["planned"] * 3
    # the dry run left the legacy markers alone; a real run upgrades the unchanged ones
    assert "inputs" not in json.loads((done / "00_data.json").read_text())
    run_notebooks("l", **kw)
    assert "inputs" in json.loads((done / "00_data.json").read_text())


# --------------------------------------------------------------------------- run-dir lock


def _wait_nb(flag):
    """A notebook cell that blocks until ``flag`` exists (at most 120 s)."""
    return (f"import pathlib, time\nt0 = time.time()\n"
            f"while not pathlib.Path({str(flag)!r}).exists() and time.time() - t0 < 120:\n"
            f"    time.sleep(0.1)")


def test_a_second_sskd_run_on_a_run_dir_stops_at_once_naming_the_holder(tmp_path, capsys):
    from sskd.cli import main
    from sskd.locking import holder

    d = tmp_path / "notebooks"
    d.mkdir()
    flag = tmp_path / "go"
    write_nb(d / "00_wait.ipynb", [RECORD, _wait_nb(flag)])
    root = tmp_path / "runs"
    args = ["run", "--preset", "smoke", "--name", "x", "--runs-root", str(root),
            "--notebooks-dir", str(d)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent)] + sys.path)}
    first = subprocess.Popen([sys.executable, "-m", "sskd", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not calls(root, "x") and time.time() - t0 < 120:  # the notebook is running
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.2)
        assert holder(root / "x")["pid"] == first.pid
        t1 = time.time()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert time.time() - t1 < 10  # stops at once, does not wait for the first run
        assert f"is in use by PID {first.pid} (sskd run --name x" in err and f"kill {first.pid}" in err
    finally:
        flag.touch()
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 0, out
    assert holder(root / "x") == {}  # released: the next run takes it without a stale warning


def test_a_stale_lock_is_taken_over_with_a_log_line(nbdir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "command": "sskd run --name s"}))
    lines = []
    res = run_notebooks("s", preset="", runs_root=tmp_path / "runs", notebooks_dir=nbdir,
                        cwd=tmp_path, dry_run=True, echo=lines.append)
    assert [r.status for r in res] == ["planned"] * 3
    assert f"taking over the stale lock of {run.resolve()}: PID {dead.pid} (sskd run --name s) " \
           "is no longer running" in lines[0]


# --------------------------------------------------------------------------- the stage notebooks


@pytest.fixture
def stage_nbdir(tmp_path):
    """The shipped notebooks, less notebook 04's FiftyOne cells (they need a mongod and the App;
    tests/test_notebooks.py executes them)."""
    d = tmp_path / "stage_notebooks"
    d.mkdir()
    for src in runner.discover_notebooks(runner.default_notebooks_dir()):
        nb = nbformat.read(src, as_version=4)
        nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and (
            "sskd.inspect" in c.source or "show(run" in c.source))]
        nbformat.write(nb, d / src.name)
    return d


@pytest.mark.slow
def test_changed_settings_re_execute_exactly_the_dependent_stage_notebooks(stage_nbdir, tmp_path):
    root = tmp_path / "runs"
    kw = dict(runs_root=root, notebooks_dir=stage_nbdir, cwd=tmp_path, progress_bar=False)
    ov = {"data.root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
          "workers": 1, "ablations": {}}
    assert [r.status for r in run_notebooks("nb", preset="smoke", overrides=ov, **kw)] == ["ran"] * 6
    run = root / "nb"

    def steps(tag):
        return max(json.loads(ln)["step"] for ln in (run / "logs" / f"{tag}.jsonl").read_text().splitlines())

    def status(res):
        return "".join("R" if r.status == "ran" else "." for r in res)

    assert steps("student_refined") == 2
    # a refine setting: only 04 and 05 re-run; the run's logs, metrics and report follow
    res = run_notebooks("nb", overrides={"stages.refine.train.steps": 5}, **kw)
    assert status(res) == "....RR"
    assert steps("student_refined") == 5
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "report" / "metrics.json").read_text()) == metrics
    assert "student_refined" in metrics["models"]
    assert (run / "report" / "report.md").stat().st_mtime >= \
        (run / "checkpoints" / "student_refined" / "model" / "model.pt").stat().st_mtime
    # a stage-1 setting: 02-05 re-run (each stage then retrains only what its inputs changed)
    res = run_notebooks("nb", overrides={"stages.adapt_1a.train.steps": 3}, **kw)
    assert status(res) == "..RRRR"
    assert steps("teacher_1a") == 3 and steps("student_refined") == 5
    # nothing changed: nothing re-runs
    assert status(run_notebooks("nb", **kw)) == "......"


def test_a_key_added_at_its_old_behaviour_does_not_re_execute_notebooks():
    """Run dirs executed before ``stages.*.soft_classes`` existed record no such input; at
    its default it stays out of every notebook's inputs, set it is one of 03's."""
    from pathlib import Path

    from sskd.config import load_config
    from sskd.runner import notebook_inputs
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "03_knowledge_transfer.ipynb"
    plain = notebook_inputs(load_config("smoke"), nb)
    assert plain and not any("soft_classes" in k for k in plain)
    soft = notebook_inputs(load_config("smoke", {"stages.transfer.soft_classes": True}), nb)
    assert soft["stages.transfer.soft_classes"] is True
    assert {k: v for k, v in soft.items() if k != "stages.transfer.soft_classes"} == plain
