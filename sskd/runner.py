"""Batch execution of the ordered stage notebooks with papermill (``sskd run``).

The runner resolves the config (preset -> parameter file -> ``-p`` overrides), saves it as the
run dir's ``config.yaml`` before the first notebook, then executes ``notebooks/NN_*.ipynb`` in
order with the parameters ``{preset, run_name, runs_root, overrides}``. Executed copies go to
``runs/<name>/notebooks/``.

Re-execution follows the inputs. A completed notebook leaves a marker
``runs/<name>/notebooks/.done/<stem>.json`` holding what its results depend on: the config
values the stage graph (:mod:`sskd.graph`) says it reads (its own stages, every earlier stage's
and the shared keys such as ``data``, ``teacher``, ``pixel_contrast``, ``seed``) and its code
cells. The next ``sskd run`` re-executes exactly the notebooks whose inputs changed, and every
notebook after the first of them; the others are skipped. So ``-p stages.refine.train.steps 20``
on a finished run re-runs 04 and 05, a stage-1 setting 02-05, nothing changed nothing (each
stage's own fingerprint then skips the trainings whose inputs did not change). ``force`` re-runs
everything, ``from_stage`` that notebook and all later ones, ``only`` one notebook. Re-executing
a notebook drops the markers of it and every later notebook, since their results depend on it.

The runner holds the run dir's lock (:mod:`sskd.locking`) while it works: a second ``sskd run``
on the same run dir stops at once, naming the first one's PID.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from sskd import config as config_mod
from sskd import graph
from sskd.config import (Config, config_hash, from_dict, load_config, read_config,
                         save_config, to_dict, validate)
from sskd.locking import run_dir_lock
from sskd.metrics import drop_stale_results
from sskd.rundir import RunDir

KERNEL_NAME = "python3"  # the venv's ipykernel (``python -m ipykernel install --sys-prefix``)
NOTEBOOK_PATTERN = re.compile(r"^(\d+)_(.+)\.ipynb$")
SOURCE_KEY = "<notebook code>"  # the inputs entry of a notebook's own code cells

#: extra names accepted by --from/--only for the standard notebooks (the graph's step names)
STAGE_ALIASES = graph.step_aliases()


class RunnerError(RuntimeError):
    """A runner setting is wrong (unknown stage, missing notebooks dir); the message says the fix."""


class NotebookFailed(RuntimeError):
    """A notebook raised. ``cell`` is the 0-based index of the failing cell in the *source*
    notebook (markdown cells counted, papermill's injected-parameters cell not)."""

    def __init__(self, notebook: str, cell: int, exec_count: int | None, source_line: str,
                 ename: str, evalue: str, output_path: Path, resume_hint: str = "") -> None:
        self.notebook, self.cell, self.exec_count = notebook, cell, exec_count
        self.source_line, self.ename, self.evalue = source_line, ename, evalue
        self.output_path = Path(output_path)
        where = f"cell {cell}" + (f" (In [{exec_count}])" if exec_count else "")
        msg = (f"notebook {notebook} failed in {where}: `{source_line}`\n"
               f"{ename}: {evalue}\n"
               f"executed copy with the full traceback: {self.output_path}")
        if resume_hint:
            msg += f"\n{resume_hint}"
        super().__init__(msg)


@dataclass
class NotebookResult:
    """What happened to one notebook: ``status`` is "ran", "skipped" or "planned" (dry run)."""

    name: str
    status: str
    seconds: float
    output_path: Path


# --------------------------------------------------------------------------- notebooks


def default_notebooks_dir() -> Path:
    """``./notebooks`` when it exists (a checkout), else the one next to the installed package."""
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def discover_notebooks(notebooks_dir: str | Path) -> list[Path]:
    """The ``NN_name.ipynb`` files of ``notebooks_dir``, ordered by their number."""
    d = Path(notebooks_dir)
    if not d.is_dir():
        raise RunnerError(f"notebooks dir {d} does not exist; pass --notebooks-dir DIR "
                          "(the folder holding 00_data.ipynb ...)")
    found = [p for p in d.iterdir() if NOTEBOOK_PATTERN.match(p.name)]
    if not found:
        raise RunnerError(f"no NN_name.ipynb notebooks in {d}; pass --notebooks-dir DIR")
    return sorted(found, key=lambda p: (int(NOTEBOOK_PATTERN.match(p.name).group(1)), p.name))


def resolve_stage(stage: str, notebooks: list[Path]) -> int:
    """Index in ``notebooks`` of a stage given as ``02``, ``2``, ``02_teacher_adaptation``,
    ``teacher_adaptation``, ``02_teacher_adaptation.ipynb`` or a stage alias (``adapt_teacher``)."""
    key = STAGE_ALIASES.get(stage, stage).removesuffix(".ipynb")
    for i, nb in enumerate(notebooks):
        num, rest = NOTEBOOK_PATTERN.match(nb.name).groups()
        if key in (nb.stem, rest) or (key.isdigit() and int(key) == int(num)):
            return i
    names = ", ".join(nb.stem for nb in notebooks)
    raise RunnerError(f"unknown stage {stage!r}; use a notebook number or name ({names}) "
                      f"or one of {sorted(STAGE_ALIASES)}")


def enter_project_root() -> Path:
    """Make relative paths (``runs/``, ``data/``) mean the same interactively and in batch.

    JupyterLab started on ``notebooks/`` runs kernels there, while ``sskd run`` runs them in the
    project root. Called first in every notebook: when the working dir is a ``notebooks`` folder
    whose parent is an sskd checkout, change to the parent. Returns the working dir.
    """
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "sskd").is_dir():
        os.chdir(cwd.parent)
    return Path.cwd()


# --------------------------------------------------------------------------- config


def flatten_overrides(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``ablations`` and empty dicts stay whole."""
    flat: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key != "ablations":
            flat.update(flatten_overrides(v, key + "."))
        else:
            flat[key] = v
    return flat


nest_overrides = config_mod.nest_keys  # dotted and/or nested keys -> nested dict


def resolve_config(run_name: str, preset: str = "demo", runs_root: str = "runs",
                   params_file: str | Path | None = None,
                   overrides: Mapping[str, Any] | None = None) -> tuple[Config, dict]:
    """Preset -> parameter file -> ``overrides`` (dotted keys, typed values) -> run name/root.

    Later wins. Returns the config and the nested overrides (parameter file + ``overrides``)
    that the notebooks receive, so a notebook re-run alone rebuilds the same config.
    """
    nested = _params_file(params_file) if params_file else {}
    nested = config_mod.merge_dicts(nested, nest_overrides(dict(overrides or {})))
    # nested, not dotted: parse_overrides YAML-parses only top-level string values again
    cfg = load_config(preset, overrides=nested, run_name=run_name, runs_root=str(runs_root))
    return cfg, nested


def update_config(cfg: Config, run_name: str, runs_root: str,
                  params_file: str | Path | None = None,
                  overrides: Mapping[str, Any] | None = None) -> tuple[Config, dict]:
    """An existing run's config with ``params_file`` then ``overrides`` applied on top."""
    nested = _params_file(params_file) if params_file else {}
    nested = config_mod.merge_dicts(nested, nest_overrides(dict(overrides or {})))
    new = from_dict(config_mod.merge_dicts(to_dict(cfg), {**nested, "run_name": run_name,
                                               "runs_root": runs_root}))
    validate(new)
    return new, nested


def _params_file(path: str | Path) -> dict:
    try:
        return config_mod.read_params_file(path)
    except config_mod.ConfigError as e:
        raise RunnerError(str(e)) from e


# --------------------------------------------------------------------------- execution


def _marker(run_dir: RunDir, nb: Path) -> Path:
    return run_dir.notebooks / ".done" / f"{nb.stem}.json"


def run_notebooks(run_name: str, preset: str | None = None, runs_root: str | Path = "runs",
                  overrides: Mapping[str, Any] | None = None,
                  params_file: str | Path | None = None, from_stage: str | None = None,
                  only: str | None = None, force: bool = False,
                  notebooks_dir: str | Path | None = None, kernel_name: str = KERNEL_NAME,
                  cwd: str | Path | None = None, log_output: bool = False,
                  progress_bar: bool = True, dry_run: bool = False,
                  echo: Callable[[str], None] = print) -> list[NotebookResult]:
    """Execute the stage notebooks of one run in order; see the module docstring.

    Config: with ``preset`` given, or for a new run, it is resolved from the preset (default
    "demo"), ``params_file`` and ``overrides`` (dotted keys, typed values) and replaces the
    run's ``config.yaml``. With ``preset=None`` on an existing run, the saved config is kept
    and ``params_file``/``overrides`` are applied on top (so a plain resume changes nothing).
    ``cwd`` is the kernels' working dir (default: the current one), so relative ``runs_root``
    and data paths resolve as they do for the caller. Raises :class:`NotebookFailed` at the
    first failing notebook (later ones are not run), :class:`RunnerError` on bad settings and
    :class:`sskd.locking.RunDirLocked` when another process works on the run dir.
    """
    if from_stage and only:
        raise RunnerError("give either --from or --only, not both")
    notebooks = discover_notebooks(notebooks_dir or default_notebooks_dir())
    start = resolve_stage(from_stage, notebooks) if from_stage else len(notebooks)
    selected = [resolve_stage(only, notebooks)] if only else range(len(notebooks))

    cwd = Path(cwd) if cwd else Path.cwd()
    run_dir = RunDir(cwd / runs_root / run_name)  # a relative runs_root means the kernels' cwd
    with run_dir_lock(run_dir.root, f"sskd run --name {run_name}", echo):
        old = _read_old_config(run_dir)
        if preset is None and old is not None:
            cfg, nested = update_config(old, run_name, str(runs_root), params_file, overrides)
            preset = cfg.preset
        else:
            preset = "demo" if preset is None else preset
            cfg, nested = resolve_config(run_name, preset, str(runs_root), params_file, overrides)
        if not dry_run or old is None:  # a dry run changes nothing in an existing run dir
            # results the new config no longer describes go first, then the config: the
            # notebooks read it, and metrics.json must never outlive the config that made it
            drop_stale_results(run_dir, to_dict(old) if old is not None else None, to_dict(cfg))
            save_config(cfg, run_dir.config)
        params = {"preset": preset, "run_name": run_name, "runs_root": str(runs_root),
                  "overrides": nested}
        inputs = [notebook_inputs(cfg, nb) for nb in notebooks]
        changed = {i: why for i, nb in enumerate(notebooks)
                   if (why := _changed(run_dir, nb, inputs[i], old, upgrade=not dry_run))}
        first = min([*changed, start])  # every notebook after the first changed one re-runs

        results: list[NotebookResult] = []
        for i in selected:
            nb = notebooks[i]
            out = run_dir.notebooks / nb.name
            why = ("--only" if only else "--force" if force else "--from" if i >= start
                   else changed.get(i) or (f"after {notebooks[first].name}, which re-runs"
                                           if i > first else ""))
            if not why:
                echo(f"[sskd] skip {nb.name} (completed, its inputs are unchanged)")
                results.append(NotebookResult(nb.name, "skipped", 0.0, out))
                continue
            if dry_run:
                echo(f"[sskd] would run {nb.name} -> {out} ({why})")
                results.append(NotebookResult(nb.name, "planned", 0.0, out))
                continue
            for later in notebooks[i:]:  # results downstream of this notebook become stale
                _marker(run_dir, later).unlink(missing_ok=True)
            echo(f"[sskd] run {nb.name} -> {out} ({why})")
            seconds = _execute(nb, out, params, kernel_name, cwd, log_output, progress_bar,
                               resume_hint=f"fix it, then resume with: sskd run --name {run_name} "
                                           f"--runs-root {runs_root} (notebooks that completed "
                                           "with unchanged inputs are skipped)")
            _write_marker(run_dir, nb, inputs[i], cfg, seconds)
            echo(f"[sskd] done {nb.name} in {seconds:.1f} s")
            results.append(NotebookResult(nb.name, "ran", seconds, out))
        return results


# --------------------------------------------------------------------------- inputs


def notebook_inputs(cfg: Config, nb: Path) -> dict[str, Any]:
    """What an executed notebook's results depend on: the config values the stage graph says it
    reads (dotted keys, :func:`sskd.graph.notebook_inputs`) and a hash of its code cells. A key
    added later, at the value that does what the code did before it, is left out (as in stage
    fingerprints, :func:`sskd.config.fingerprint_dict`), so upgrading re-executes nothing."""
    inputs = graph.notebook_inputs(config_mod.fingerprint_dict(cfg), nb.stem)
    inputs[SOURCE_KEY] = _source_hash(nb)
    return inputs


def _source_hash(nb: Path) -> str:
    """Hash of a notebook's code cells, its parameters cell excluded (papermill replaces that)."""
    cells = json.loads(nb.read_text()).get("cells", [])
    code = ["".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code"
            and "parameters" not in c.get("metadata", {}).get("tags", [])]
    return graph.inputs_hash({"code": code})


def _read_old_config(run_dir: RunDir) -> Config | None:
    if not run_dir.config.is_file():
        return None
    try:
        return read_config(run_dir.config)
    except Exception:  # noqa: BLE001 - a broken old config is simply replaced
        return None


def _changed(run_dir: RunDir, nb: Path, inputs: dict[str, Any], old: Config | None,
             upgrade: bool) -> str:
    """Why ``nb`` must run again ("" when its completed results still hold)."""
    marker = _marker(run_dir, nb)
    if not marker.is_file():
        return "not completed yet"
    if not (run_dir.notebooks / nb.name).is_file():
        return "its executed copy is missing"
    try:
        done = json.loads(marker.read_text())
    except (json.JSONDecodeError, OSError):
        return f"its marker {marker} is unreadable"
    if "inputs" not in done:  # a marker of an older sskd: the config it ran with is config.yaml
        if old is None:
            return "the config it ran with is unknown"
        before = {**notebook_inputs(old, nb), SOURCE_KEY: inputs[SOURCE_KEY]}
        if upgrade and graph.inputs_hash(before) == graph.inputs_hash(inputs):
            _write_marker(run_dir, nb, inputs, old, done.get("seconds", 0.0), done.get("finished"))
    else:
        before = done.get("config", {})
        if done["inputs"] == graph.inputs_hash(inputs):
            return ""
    diff = [k for k in sorted(set(before) | set(inputs)) if before.get(k) != inputs.get(k)]
    if not diff:
        return ""
    shown = [f"{k} {before.get(k)!r} -> {inputs.get(k)!r}" if k != SOURCE_KEY
             else "its code cells" for k in diff[:3]]
    more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
    return "inputs changed: " + ", ".join(shown) + more


def _write_marker(run_dir: RunDir, nb: Path, inputs: dict[str, Any], cfg: Config,
                  seconds: float, finished: str | None = None) -> None:
    from sskd.data.records import write_json_atomic
    marker = _marker(run_dir, nb)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"seconds": round(seconds, 2), "config_hash": _results_hash(cfg),
                       "finished": finished or time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "inputs": graph.inputs_hash(inputs), "config": inputs}, marker,
                      indent=1, sort_keys=True, default=str)


def _execute(nb: Path, out: Path, params: dict, kernel_name: str, cwd: Path,
             log_output: bool, progress_bar: bool, resume_hint: str) -> float:
    import papermill as pm  # imported lazily: `sskd presets` need not pay for it

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel_name,
                            cwd=str(cwd), log_output=log_output,
                            progress_bar=progress_bar)
    except pm.PapermillExecutionError as e:
        cell = _source_cell_index(out, e.cell_index)
        first = next((ln for ln in str(e.source).splitlines() if ln.strip()), "").strip()
        raise NotebookFailed(nb.name, cell, e.exec_count, first, e.ename, e.evalue, out,
                             resume_hint) from None
    return time.perf_counter() - t0


def _source_cell_index(executed: Path, cell_index: int) -> int:
    """Map papermill's cell index (executed copy) to the source notebook's index by not
    counting the injected-parameters cell (papermill's error banner is added after it fails)."""
    try:
        import nbformat

        cells = nbformat.read(str(executed), as_version=4).cells
    except Exception:  # noqa: BLE001 - unreadable copy: fall back to papermill's index
        return cell_index
    cells = [c for c in cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    injected = sum(1 for c in cells[:cell_index]
                   if "injected-parameters" in c.metadata.get("tags", []))
    return cell_index - injected


def _results_hash(cfg: Config) -> str:
    """Hash of what determines results: where the run dir lives (a moved runs root) does not."""
    return config_hash(dataclasses.replace(cfg, run_name="", runs_root=""))
