"""The FiftyOne App for a run (``sskd app RUN``), inline views for notebooks, headless snapshots.

The App serves on localhost only, with do-not-track on (set by :mod:`sskd.inspect.database`),
so it works offline. ``launch_app`` checks the database first (fast, clear error) and
exports the run when its dataset does not exist yet.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

from sskd.inspect.database import ensure_database, free_port

log = logging.getLogger("sskd.inspect")

_SESSION = None  # the App session this process serves (reused by later launch_app calls)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags for a private, offline, headless browser (no sync, updates, QUIC or background fetches).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")


def _dataset_for(run: str | Path, export: bool):
    """A run dir (with config.yaml) or a dataset name -> the FiftyOne dataset."""
    from sskd.inspect.fiftyone_export import dataset_name_for, fo

    path = Path(run)
    is_run = (path / "config.yaml").is_file()
    name = dataset_name_for(path) if is_run else str(run)
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    if not is_run:
        raise ValueError(f"{run!r} is neither a run dir (no config.yaml) nor a FiftyOne dataset; "
                         f"datasets: {fo.list_datasets()}")
    if not export:
        raise ValueError(f"run {path} has no FiftyOne dataset {name!r} yet: export it with "
                         "sskd.inspect.run.export_run_dir(run_dir)")
    from sskd.inspect.run import export_run_dir

    log.info("run %s has no FiftyOne dataset yet: exporting it (once)", path)
    return export_run_dir(path)


def app_url(session, dataset_name: str) -> str:
    """The App URL that opens ``dataset_name`` directly (robust for a fresh browser tab)."""
    return f"{session.url.rstrip('/')}/datasets/{quote(dataset_name)}"


def launch_app(run: str | Path, port: int | None = None, address: str = "localhost",
               view: str | None = None, wait: bool | None = None, export: bool = True,
               auto: bool = False, height: int | None = None):
    """Serve the FiftyOne App for a run on ``address:port`` and return the session.

    ``run``: run dir or dataset name. ``view``: a saved view name to open (see
    :func:`sskd.inspect.views.build_views`). ``wait``: block until Ctrl-C (default: block
    unless in a notebook, which is what ``sskd app RUN`` needs). ``auto``: show the App inline
    in a notebook cell (``height`` pixels). ``port=None`` picks a free port, or reuses the
    server of this process's previous call (then only the dataset/view change).
    """
    global _SESSION
    ensure_database()
    import fiftyone as fo
    from fiftyone.core import context as focx

    dataset = _dataset_for(run, export)
    target = open_view(dataset, view) if view else None
    in_notebook = focx.is_notebook_context()
    reuse = _SESSION is not None and port in (None, _SESSION.server_port) \
        and address == _SESSION.server_address
    if reuse:
        # One App server per process: later calls (a notebook's next stage) retarget it.
        session = _SESSION
        session.dataset = dataset
        session.view = target
    else:
        if _SESSION is not None:
            _SESSION.close()
        # FiftyOne refuses remote sessions inside a kernel; there the App is shown inline,
        # by show_when_connected (never by launch_app's auto: see there)
        session = fo.launch_app(dataset, view=target, port=port or free_port(), address=address,
                                remote=not in_notebook, auto=False)
        _SESSION = session
    url = app_url(session, dataset.name)
    if auto and in_notebook:
        show_when_connected(session, height, url)
    log.info("FiftyOne App for %s at %s", dataset.name, url)
    if wait is None:
        wait = not focx.is_notebook_context()
    if wait:
        # SIGTERM (kill, a service manager) ends the wait like Ctrl-C, so the cleanup runs
        main = threading.current_thread() is threading.main_thread()  # signals: main only
        previous = signal.signal(signal.SIGTERM, interrupt) if main else None
        # Ctrl-C must stop it even when the parent left SIGINT ignored (ignored signals are
        # inherited: a script's background job, some test runners)
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
        try:
            print(f"FiftyOne App: {url}  (view: {view or 'whole dataset'}; Ctrl-C to stop)",
                  flush=True)
            session.wait(-1)
        except KeyboardInterrupt:
            pass
        finally:
            shutdown_app()
            if main:
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
    return session


def show_when_connected(session, height: int | None, url: str, timeout: float = 90.0) -> None:
    """``session.show(height)`` (the App inline in this notebook cell) once it can be shown.

    FiftyOne's session client connects to its App server from a background thread; when its
    first ping comes before the server is up (the server takes ~15 s to start on a 2-core
    machine, longer while other jobs run) it waits 10 s before the next, and a ``show()`` in
    between raises "Client is not connected". ``fo.launch_app(auto=True)`` shows inside its
    constructor, so a slow start failed notebook 04 of a fresh ``make demo``; here the show is
    retried until the client is connected, for at most ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            session.show(height=height)
            return
        except RuntimeError as e:
            if "not connected" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"the FiftyOne App at {url} did not accept this notebook's "
                                   f"session within {timeout:.0f} s; run the cell again, or open "
                                   f"the App outside the notebook: sskd app RUN_DIR") from e
        time.sleep(0.5)


def interrupt(signum, frame) -> None:
    """Signal handler: turn SIGTERM into the KeyboardInterrupt that Ctrl-C raises."""
    raise KeyboardInterrupt(f"signal {signum}")


def close_app() -> None:
    """Close this process's App session and stop its server."""
    global _SESSION
    if _SESSION is not None:
        _SESSION.close()
        _SESSION = None
    # FiftyOne keeps each port's server service alive until interpreter shutdown; stopping it
    # closes the service's stdin, upon which it terminates the server process
    services = getattr(sys.modules.get("fiftyone.core.session.session"), "_server_services", {})
    for port in list(services):
        try:
            services.pop(port).stop()
        except Exception as e:  # noqa: BLE001 - a dead service has nothing left to stop
            log.debug("App server service on port %s: %s", port, e)


def shutdown_app(timeout: float = 15.0) -> None:
    """End of ``sskd app``: stop every process that FiftyOne started for this process's App.

    Those are FiftyOne's service processes (``service/main.py --51-service server|db``, this
    process's children) and what they run. Closes the session and its server service, and
    FiftyOne's database service when this process started it (the service then stops its
    mongod unless another process still uses it). A server process still alive after
    ``timeout`` s is terminated, then killed. A database service still serving other processes
    is left up (it stops once its last client has gone); no other child process is touched.
    """
    import psutil

    server, database = _service_trees(psutil.Process())
    close_app()
    fodb = sys.modules.get("fiftyone.core.odm.database")
    if fodb is not None and getattr(fodb, "_db_service", None) is not None:
        fodb._disconnect()
        fodb._db_service.stop()   # "this process left"; the service exits when it was the last
        fodb._db_service = None
    psutil.wait_procs(database, timeout=3)
    _, leftover = psutil.wait_procs(server, timeout=timeout)
    for p in leftover:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(leftover, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if leftover:
        log.info("stopped %d App server process(es) that outlived the session: %s",
                 len(leftover), [p.pid for p in leftover])


def _service_trees(me) -> tuple[list, list]:
    """(server, database): FiftyOne service children of ``me`` with all their descendants."""
    import psutil

    trees: dict[str, list] = {"server": [], "db": []}
    for child in me.children():
        try:
            cmd = child.cmdline()
            if "--51-service" not in cmd:
                continue
            kind = cmd[cmd.index("--51-service") + 1]
            trees.setdefault(kind, []).extend([child, *child.children(recursive=True)])
        except (psutil.Error, IndexError):
            continue
    return trees["server"], trees["db"]


def open_view(dataset, name: str):
    """Saved view ``name`` with only the label fields it is about (see ``view_label_fields``)."""
    from sskd.inspect.fiftyone_export import describe_field
    from sskd.inspect.views import view_label_fields

    if not dataset.has_saved_view(name):
        raise ValueError(f"dataset {dataset.name!r} has no saved view {name!r}; saved views: "
                         f"{dataset.list_saved_views()} (`sskd app RUN --list-views`)")
    view = dataset.load_saved_view(name)
    keep = view_label_fields(name)
    if not keep:
        return view
    # drop the other models' label fields only: a patches view needs its own fields (type, iou)
    others = [f for f in view.get_field_schema()
              if describe_field(f)["kind"] in ("pseudo_labels", "predictions") and f not in keep]
    return view.exclude_fields(others) if others else view


def default_view(run: str | Path, export: bool = True) -> str | None:
    """The saved view ``sskd app RUN`` opens by default (``views.main_view``), or None."""
    from sskd.inspect.views import main_view

    return main_view(_dataset_for(run, export).list_saved_views())


def show(run: str | Path, view: str | None = None, height: int = 700):
    """Notebook cell helper: the run's App inline, opened on saved view ``view``."""
    return launch_app(run, view=view, wait=False, auto=True, height=height)


def saved_views(run: str | Path, export: bool = False) -> list[dict]:
    """``[{"view", "question", "count"}]`` of a run's saved views (a table for batch notebooks)."""
    ensure_database()
    dataset = _dataset_for(run, export=export)
    stored = dataset.info.get("sskd", {}).get("views", {})
    return [{"view": name, "question": meta.get("question", ""), "count": meta.get("count")}
            for name, meta in stored.items()]


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_snapshot(url: str, screenshot: str | Path | None = None, budget_ms: int = 20000,
                      window: tuple[int, int] = (1400, 900), timeout: float = 180.0) -> str:
    """Render ``url`` in headless Chromium: returns the page's visible text, saves a PNG.

    ``budget_ms`` is Chromium's virtual-time budget: how long the page's scripts may run
    before the DOM is dumped (the App renders client-side). Raises FileNotFoundError naming
    ``scripts/install_chromium.sh`` when no browser is installed.
    """
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH: run scripts/install_chromium.sh "
                                "(apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="sskd-chromium-") as profile:
        base = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={budget_ms}"]
        dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True,
                             timeout=timeout, check=True).stdout
        if screenshot is not None:
            subprocess.run(base + [f"--screenshot={Path(screenshot).resolve()}", url],
                           capture_output=True, timeout=timeout, check=True)
    return visible_text(dom)


def visible_text(html: str) -> str:
    """Strip styles, scripts and tags from an HTML dump; collapse whitespace."""
    html = re.sub(r"<(style|script)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()
