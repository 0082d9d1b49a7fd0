import subprocess
import sys
import types

import nbformat
import pytest
import yaml

from sskd import cli, config


@pytest.fixture
def presets(tmp_path, monkeypatch):
    d = tmp_path / "presets"
    d.mkdir()
    (d / "base.yaml").write_text("# base: a test preset\nseed: 1\ndevice: cpu\n"
                                 "data: {labeled_fraction: 0.5, max_val: 4}\n")
    monkeypatch.setattr(config, "PRESET_DIR", d)
    return d


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell('preset = "demo"\nrun_name = "demo"\nruns_root = "runs"\noverrides = {}')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("assert overrides['seed'] == 3, overrides")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, d / "00_only.ipynb")
    return d


def test_parse_value():
    assert cli.parse_value("1e-3") == 0.001 and isinstance(cli.parse_value("2E5"), float)
    assert cli.parse_value("false") is False and cli.parse_value("[1, 2]") == [1, 2]
    assert cli.parse_value("0.1") == 0.1 and cli.parse_value("uniform") == "uniform"
    assert cli.parse_value("'123'") == "123" and cli.parse_value("") == ""


def test_run_precedence_preset_file_p_and_saved_config(presets, nbdir, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 2, "data": {"labeled_fraction": 0.2},
                                      "stages.transfer.l_pxl": 0.5}))
    rc = cli.main(["run", "--preset", "base", "--name", "exp", "-f", str(params),
                   "-p", "seed", "3", "-p", "stages.transfer.train.lr", "1e-4",
                   "-p", "stages.refine.enabled", "false", "--runs-root", str(tmp_path / "runs"),
                   "--notebooks-dir", str(nbdir), "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "would run 00_only.ipynb" in out and "0 notebook(s) executed" in out
    saved = yaml.safe_load((tmp_path / "runs" / "exp" / "config.yaml").read_text())
    assert saved["seed"] == 3                                # -p beats the file and the preset
    assert saved["data"]["labeled_fraction"] == 0.2          # file beats the preset
    assert saved["data"]["max_val"] == 4 and saved["device"] == "cpu"  # preset beats defaults
    assert saved["stages"]["transfer"]["l_pxl"] == 0.5       # dotted key in the file
    assert saved["stages"]["transfer"]["train"]["lr"] == 1e-4
    assert saved["stages"]["refine"]["enabled"] is False
    assert (saved["preset"], saved["run_name"], saved["runs_root"]) == ("base", "exp", str(tmp_path / "runs"))

    # a dry run leaves an existing run dir alone: saving a config there would either leave
    # results it no longer describes or drop them, and a dry run must not do either
    assert cli.main(["run", "--name", "exp", "-p", "data.max_val", "2", "--dry-run",
                     "--runs-root", str(tmp_path / "runs"), "--notebooks-dir", str(nbdir)]) == 0
    assert yaml.safe_load((tmp_path / "runs" / "exp" / "config.yaml").read_text()) == saved

    # resume without --preset: the saved config is kept, -p applies on top of it
    plain = tmp_path / "plain"   # a notebook that runs under any config
    plain.mkdir()
    nb = nbformat.read(nbdir / "00_only.ipynb", as_version=4)
    nb.cells = nb.cells[:1] + [nbformat.v4.new_code_cell("print(run_name)")]
    nbformat.write(nb, plain / "00_only.ipynb")
    assert cli.main(["run", "--name", "exp", "-p", "data.max_val", "2",
                     "--runs-root", str(tmp_path / "runs"), "--notebooks-dir", str(plain)]) == 0
    again = yaml.safe_load((tmp_path / "runs" / "exp" / "config.yaml").read_text())
    assert again["data"]["max_val"] == 2
    assert {k: v for k, v in again.items() if k != "data"} == {k: v for k, v in saved.items() if k != "data"}
    # an explicit --preset re-resolves from the preset
    assert cli.main(["run", "--preset", "base", "--name", "exp",
                     "--runs-root", str(tmp_path / "runs"), "--notebooks-dir", str(plain)]) == 0
    fresh = yaml.safe_load((tmp_path / "runs" / "exp" / "config.yaml").read_text())
    assert (fresh["seed"], fresh["data"]["max_val"], fresh["stages"]["refine"]["enabled"]) == (1, 4, True)


def test_run_executes_and_passes_overrides(presets, nbdir, tmp_path, capsys):
    args = ["run", "--preset", "base", "--name", "x", "--runs-root", str(tmp_path / "runs"),
            "--notebooks-dir", str(nbdir)]
    assert cli.main(args + ["-p", "seed", "3"]) == 0
    assert "1 notebook(s) executed, 0 skipped" in capsys.readouterr().out
    # a failing notebook: exit 1, the message names notebook, cell and error
    assert cli.main(args + ["-p", "seed", "4", "--force"]) == 1
    err = capsys.readouterr().err
    assert "notebook 00_only.ipynb failed in cell 1" in err
    assert "AssertionError" in err and "`assert overrides['seed'] == 3, overrides`" in err


def test_run_bad_settings_exit_2(presets, nbdir, tmp_path, capsys):
    base = ["run", "--preset", "base", "--runs-root", str(tmp_path / "runs"), "--notebooks-dir", str(nbdir)]
    assert cli.main(base + ["-p", "stages.nope", "1"]) == 2
    assert "unknown config key 'stages.nope'" in capsys.readouterr().err
    assert cli.main(base + ["--from", "07"]) == 2
    assert "unknown stage '07'" in capsys.readouterr().err
    assert cli.main(["run", "--preset", "missing", "--notebooks-dir", str(nbdir),
                     "--runs-root", str(tmp_path / "runs")]) == 2
    assert "unknown preset 'missing'" in capsys.readouterr().err
    assert cli.main(base + ["-f", str(tmp_path / "none.yaml")]) == 2
    assert "parameter file" in capsys.readouterr().err


def test_presets_lists_names_and_descriptions(presets, capsys):
    assert cli.main(["presets"]) == 0
    assert capsys.readouterr().out.split() == ["base", "base:", "a", "test", "preset"]


def test_app_launches_the_run_dir_lazily(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    assert cli.main(["app", "r", "--runs-root", str(tmp_path / "runs")]) == 2
    assert "no run dir" in capsys.readouterr().err
    (run_dir / "config.yaml").write_text("run_name: r\n")
    seen, stopped = [], []
    monkeypatch.setitem(sys.modules, "sskd.inspect.app", types.SimpleNamespace(
        launch_app=lambda d, view, port, wait: seen.append((d, view, port, wait)),
        default_view=lambda d: "fp_pl_teacher_adapted", interrupt=lambda *a: None,
        shutdown_app=lambda: stopped.append(1)))
    assert cli.main(["app", "r", "--runs-root", str(tmp_path / "runs")]) == 0
    assert cli.main(["app", str(run_dir), "--view", "fn_x", "--port", "5151"]) == 0
    assert seen == [(run_dir, "fp_pl_teacher_adapted", None, True), (run_dir, "fn_x", 5151, True)]
    assert stopped == [1, 1]   # every exit path stops the App's processes
    monkeypatch.setitem(sys.modules, "sskd.inspect.app", None)  # import fails
    assert cli.main(["app", str(run_dir)]) == 2
    assert "FiftyOne app is unavailable" in capsys.readouterr().err


def test_python_dash_m_sskd():
    out = subprocess.run([sys.executable, "-m", "sskd", "presets"], capture_output=True, text=True)
    assert out.returncode == 0 and "smoke" in out.stdout and "demo" in out.stdout


def test_app_with_an_unreachable_database_names_the_fix(tmp_path):
    """No traceback and no 30 s wait: a clear message and exit code 2."""
    import os
    import time
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("run_name: r\n")
    env = {**os.environ, "FIFTYONE_DATABASE_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
           "FIFTYONE_DO_NOT_TRACK": "true"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "sskd", "app", str(tmp_path / "r")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "FIFTYONE_DATABASE_URI" in res.stderr or "mongod" in res.stderr
    assert time.perf_counter() - t0 < 30
