"""Command line: ``sskd run`` (papermill over the stage notebooks), ``sskd app``, ``sskd presets``.

    sskd run [--preset P] [--name N] [-f params.yaml] [-p key value]... [--from STAGE]
             [--only STAGE] [--force] [--runs-root DIR] [--notebooks-dir DIR] [--dry-run]
    sskd app RUN [--view NAME | --list-views] [--port N]
                            open a run in the FiftyOne app (RUN: run name or run dir), on its
                            main pseudo-label bias view unless --view names another
    sskd presets            list the shipped presets
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from sskd import config as config_mod
from sskd.config import ConfigError, list_presets

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_value(text: str) -> Any:
    """A ``-p`` value: YAML (``false``, ``[1, 2]``, ``0.1``), plus ``1e-3`` as a float (YAML 1.1
    reads exponent notation without a dot as a string, which the config would reject)."""
    if _FLOAT.match(text.strip()):
        return float(text)
    return yaml.safe_load(text) if text.strip() else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sskd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the stage notebooks of a run with papermill")
    run.add_argument("--preset", default=None,
                     help="config preset (see `sskd presets`); default: an existing run keeps its "
                          "saved config (-f/-p apply on top), a new run uses demo")
    run.add_argument("--name", default=None, help="run name (default: the preset name, or demo)")
    run.add_argument("-f", "--params", dest="params_file", default=None,
                     help="YAML file of config keys (nested or dotted), applied after the preset")
    run.add_argument("-p", "--param", dest="params", nargs=2, action="append", default=[],
                     metavar=("KEY", "VALUE"),
                     help="dotted config key and YAML value, e.g. -p stages.refine.enabled false")
    run.add_argument("--from", dest="from_stage", default=None,
                     help="re-run this notebook and all later ones (e.g. 02 or adapt_teacher); "
                          "without it, notebooks whose inputs changed re-run with all later ones")
    run.add_argument("--only", default=None, help="run only this notebook")
    run.add_argument("--force", action="store_true",
                     help="re-run every notebook, also those whose inputs are unchanged")
    run.add_argument("--runs-root", default="runs", help="parent dir of run dirs")
    run.add_argument("--notebooks-dir", default=None, help="dir of the NN_*.ipynb notebooks")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    run.add_argument("--log-output", action="store_true", help="stream notebook output here")
    run.add_argument("--dry-run", action="store_true",
                     help="resolve the config, print the plan, execute nothing (a new run's "
                          "config.yaml is saved; an existing run dir is left as it is)")

    app = sub.add_parser("app", help="open a run in the FiftyOne app")
    app.add_argument("run", help="run name (under --runs-root) or path of a run dir")
    app.add_argument("--runs-root", default="runs", help="parent dir of run dirs")
    app.add_argument("--view", default=None,
                     help="saved view to open, with only the label fields it is about "
                          "(default: the run's main bias view; see --list-views)")
    app.add_argument("--list-views", action="store_true",
                     help="print the run's saved views (name, size, question) and exit")
    app.add_argument("--port", type=int, default=None, help="App port (default: a free one)")

    sub.add_parser("presets", help="list the shipped config presets")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from sskd.locking import RunDirLocked
    from sskd.runner import NotebookFailed, RunnerError, run_notebooks

    overrides: dict[str, Any] = {}
    for key, value in args.params:
        overrides[key] = parse_value(value)
    name = args.name or args.preset or "demo"
    try:
        results = run_notebooks(
            name, preset=args.preset, runs_root=args.runs_root, overrides=overrides,
            params_file=args.params_file, from_stage=args.from_stage, only=args.only,
            force=args.force, notebooks_dir=args.notebooks_dir, kernel_name=args.kernel,
            log_output=args.log_output, dry_run=args.dry_run)
    except NotebookFailed as e:
        print(f"sskd run: {e}", file=sys.stderr)
        return 1
    except (RunnerError, ConfigError, RunDirLocked) as e:
        print(f"sskd run: {e}", file=sys.stderr)
        return 2
    ran = sum(r.status == "ran" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"[sskd] run {name!r}: {ran} notebook(s) executed, {skipped} skipped; "
          f"outputs in {Path(args.runs_root) / name}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        run_dir = Path(args.runs_root) / args.run
    if not (run_dir / "config.yaml").is_file():
        print(f"sskd app: no run dir at {args.run} or {run_dir} (no config.yaml); "
              "run `sskd run --name NAME` first", file=sys.stderr)
        return 2
    from sskd.inspect.database import DatabaseError
    try:
        app_mod = importlib.import_module("sskd.inspect.app")
        if args.list_views:
            _print_views(app_mod.saved_views(run_dir, export=True))
            return 0
        view = args.view or app_mod.default_view(run_dir)
        # SIGTERM ends `sskd app` like Ctrl-C: launch_app's wait then stops the App's processes
        previous = signal.signal(signal.SIGTERM, app_mod.interrupt)
        try:
            app_mod.launch_app(run_dir, view=view, port=args.port, wait=True)
        except KeyboardInterrupt:   # stopped while the App server was still starting
            return 130
        except Exception as e:
            if type(e).__name__ != "ServiceListenTimeout":
                raise
            print(f"sskd app: the FiftyOne App server did not start in time ({e}); the "
                  "machine may be busy: try again", file=sys.stderr)
            return 2
        finally:
            app_mod.shutdown_app()   # also after a failed start (no-op after a clean stop)
            signal.signal(signal.SIGTERM, previous)
    except ValueError as e:  # unknown view, or a run that cannot be exported
        print(f"sskd app: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # fiftyone not installed
        print(f"sskd app: the FiftyOne app is unavailable ({e}); install the pinned fiftyone "
              "(`make install`)", file=sys.stderr)
        return 2
    except DatabaseError as e:  # mongod missing/unreachable: the message names the fix
        print(f"sskd app: {e}", file=sys.stderr)
        return 2
    return 0


def _print_views(views: list[dict]) -> None:
    """One line per saved view; ``*`` marks the one ``sskd app RUN`` opens by default."""
    from sskd.inspect.views import main_view

    if not views:
        print("no saved views: the run's dataset was exported without views "
              "(sskd.inspect.run.export_run_dir(run_dir, views=True))")
        return
    default = main_view([v["view"] for v in views])
    width = max(len(v["view"]) for v in views)
    for v in views:
        mark = "*" if v["view"] == default else " "
        print(f"{mark} {v['view']:{width}s} {v['count'] if v['count'] is not None else '?':>6}  "
              f"{v['question']}")
    print("(* = opened by default; open another with --view NAME)")


def cmd_presets(_: argparse.Namespace) -> int:
    names = list_presets()
    if not names:
        print(f"no presets found in {config_mod.PRESET_DIR}", file=sys.stderr)
        return 1
    for name in names:
        print(f"{name:20s} {_describe(config_mod.PRESET_DIR / f'{name}.yaml')}")
    return 0


def _describe(path: Path) -> str:
    """First comment line of a preset file (its one-line description), if any."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"run": cmd_run, "app": cmd_app, "presets": cmd_presets}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
