"""The FiftyOne App for a run (``sskd app RUN``), inline views for notebooks, headless snapshots.

The App serves on localhost only, with do-not-track on (set by :mod:`sskd.inspect.database`),
so it works offline. ``launch_app`` checks the database first (fast, clear error) and
exports the run when its dataset does not exist yet.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
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
    target = dataset.load_saved_view(view) if view else None
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
        # FiftyOne refuses remote sessions inside a kernel; there the App is shown inline
        in_notebook = focx.is_notebook_context()
        session = fo.launch_app(dataset, view=target, port=port or free_port(), address=address,
                                remote=not in_notebook, auto=auto and in_notebook, height=height)
        _SESSION = session
    url = app_url(session, dataset.name)
    log.info("FiftyOne App for %s at %s", dataset.name, url)
    if wait is None:
        wait = not focx.is_notebook_context()
    if wait:
        print(f"FiftyOne App: {url}  (Ctrl-C to stop)", flush=True)
        try:
            session.wait(-1)
        except KeyboardInterrupt:
            pass
    return session


def close_app() -> None:
    """Close this process's App session and stop its server."""
    global _SESSION
    if _SESSION is not None:
        _SESSION.close()
        _SESSION = None


def show(run: str | Path, view: str | None = None, height: int = 700):
    """Notebook cell helper: the run's App inline, opened on saved view ``view``."""
    return launch_app(run, view=view, wait=False, auto=True, height=height)


def saved_views(run: str | Path) -> list[dict]:
    """``[{"view", "question", "count"}]`` of a run's saved views (a table for batch notebooks)."""
    ensure_database()
    dataset = _dataset_for(run, export=False)
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
