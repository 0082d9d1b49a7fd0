"""The FiftyOne App for a run, rendered by headless Chromium (offline, localhost only)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sskd.inspect import app
from sskd.inspect.database import free_port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_app_renders_the_run_dataset_in_headless_chromium(exported, smoke_run, tmp_path):
    if app.find_chromium() is None:
        pytest.skip("chromium is not installed: run scripts/install_chromium.sh")
    session = app.launch_app(smoke_run.root, wait=False)   # the run dir, as `sskd app RUN` does
    port = session.server_port
    try:
        assert session.server_address == "localhost" and _listening(port)
        url = app.app_url(session, exported.name)
        assert url == f"http://localhost:{port}/datasets/{exported.name}"
        shot = tmp_path / "app.png"
        text = app.chromium_snapshot(url, screenshot=shot)
        assert exported.name in text
        assert f"{len(exported)} samples" in text           # the grid's sample count
        for field in ("ground_truth", "pl_teacher_zero_shot", "pred_student_refined"):
            assert field in text                             # the sidebar lists the label fields
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        # A second call (e.g. the next notebook cell) retargets the same session and server.
        again = app.launch_app(exported.name, view="fp_pl_teacher_zero_shot", wait=False)
        assert again is session and again.server_port == port
        assert len(again.view) == 2 and set(again.view.values("type")) == {"fp"}
    finally:
        app.close_app()
    deadline = time.monotonic() + 10
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listening(port), "the App server kept running after session.close()"


def test_unknown_run_or_unexported_run_is_a_clear_error(mongod, smoke_run, tmp_path):
    with pytest.raises(ValueError, match="neither a run dir"):
        app.launch_app(tmp_path / "no-such-run", wait=False)
    other = tmp_path / "fresh"
    other.mkdir()
    (other / "config.yaml").write_text((smoke_run.root / "config.yaml").read_text())
    with pytest.raises(ValueError, match="export_run_dir"):
        app.launch_app(other, wait=False, export=False)


def test_visible_text_strips_markup():
    html = "<html><style>.a{b:c}</style><body><p>10 <b>samples</b></p><script>x()</script></body>"
    assert app.visible_text(html) == "10 samples"


# --------------------------------------------------------------------------- views and `sskd app`


class _SlowClientSession:
    """A FiftyOne session whose client connects to its server after ``fails`` show() calls."""

    def __init__(self, fails: int, error: str = "Client is not connected") -> None:
        self.fails, self.error, self.shown = fails, error, []

    def show(self, height=None):
        if self.fails:
            self.fails -= 1
            raise RuntimeError(self.error)
        self.shown.append(height)


def test_inline_app_waits_for_its_client_to_connect(monkeypatch):
    """A notebook's App cell must not fail while the App server is still starting (a fresh
    `make demo` failed notebook 04 so: FiftyOne's client retries only every 10 s)."""
    monkeypatch.setattr(app.time, "sleep", lambda s: None)
    slow = _SlowClientSession(fails=3)
    app.show_when_connected(slow, 500, "http://localhost:1/")
    assert slow.shown == [500] and slow.fails == 0
    with pytest.raises(RuntimeError, match=r"did not accept this notebook's session within 0 s.*"
                                           r"sskd app RUN_DIR"):
        app.show_when_connected(_SlowClientSession(fails=10 ** 6), 500, "http://localhost:1/",
                                timeout=0)
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not retried
        app.show_when_connected(_SlowClientSession(1, "something else"), 500, "http://x/")


def test_views_know_their_label_fields_and_the_main_view(mongod):
    from sskd.inspect.views import main_view, view_label_fields

    assert view_label_fields("fp_pl_teacher_adapted") == ["pl_teacher_adapted", "ground_truth"]
    assert view_label_fields("mistaken_pl_teacher_1a") == ["pl_teacher_1a", "ground_truth"]
    assert view_label_fields("disagree_pred_teacher_adapted_vs_pred_student_refined") == [
        "pred_teacher_adapted", "pred_student_refined", "ground_truth"]
    assert view_label_fields("my_own_view") == []
    assert main_view(["fn_pl_x", "fp_pl_teacher_zero_shot", "fp_pl_teacher_adapted"]) == \
        "fp_pl_teacher_adapted"
    assert main_view(["fn_pl_x", "fp_pl_other"]) == "fp_pl_other"
    assert main_view(["fn_pl_x"]) == "fn_pl_x" and main_view([]) is None


def test_open_view_shows_only_the_fields_it_is_about(exported, smoke_run):
    view = app.open_view(exported, "fp_pl_teacher_zero_shot")
    labels = {f for f in view.get_field_schema() if f.startswith(("pl_", "pred_", "ground"))}
    assert labels == {"pl_teacher_zero_shot", "ground_truth"}   # not all of the run's fields
    assert len(view) == 2 and set(view.values("type")) == {"fp"}
    assert app.default_view(smoke_run.root) == "fp_pl_teacher_adapted"
    with pytest.raises(ValueError, match=r"no saved view 'fp_nope'.*--list-views"):
        app.open_view(exported, "fp_nope")


def test_sskd_app_list_views_and_unknown_view(exported, smoke_run, capsys):
    from sskd.cli import main

    assert main(["app", str(smoke_run.root), "--list-views"]) == 0
    out = capsys.readouterr().out.splitlines()
    default = [ln for ln in out if ln.startswith("*")]
    assert len(default) == 1 and "fp_pl_teacher_adapted" in default[0]
    assert "Which pl_teacher_adapted instances match no ground truth" in default[0]
    names = {ln[2:].split()[0] for ln in out if ln[:1] in ("*", " ") and ln.strip()}
    assert names == set(exported.list_saved_views())
    assert main(["app", str(smoke_run.root), "--view", "fp_nope"]) == 2
    assert "no saved view 'fp_nope'" in capsys.readouterr().err


def _read_until(proc, text: str, timeout: float) -> list[str]:
    """Lines of ``proc``'s stdout up to the first holding ``text`` (fails after ``timeout``)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            assert proc.poll() is None, f"sskd app exited early: {''.join(seen)}"
            continue
        if text in seen[-1]:
            return seen
    raise AssertionError(f"no {text!r} from sskd app within {timeout} s: {''.join(seen)}")


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("sig,parent_ignores_sigint",
                         [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["ctrl-c", "sigterm", "ctrl-c-inherited-ignore"])
def test_sskd_app_stops_every_process_it_started(exported, smoke_run, sig, parent_ignores_sigint):
    # an ignored SIGINT is inherited (a script's background job): Ctrl-C must still stop the App
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for attempt in range(3):   # FiftyOne gives its server 60 s to start: a busy CPU can miss it
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "sskd", "app", str(smoke_run.root),
                                 "--port", str(port)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                                if parent_ignores_sigint else None)
        try:
            lines = _read_until(proc, "FiftyOne App:", timeout=240)
            break
        except AssertionError as e:
            if "did not start in time" not in str(e) or attempt == 2:
                raise
    try:
        assert "view: fp_pl_teacher_adapted" in lines[-1]   # the main bias view by default
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children and _listening(port)   # the App server runs in a child process
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(_gone(c) for c in children):
            time.sleep(0.2)
        assert [c.pid for c in children if not _gone(c)] == [], "App processes outlived sskd app"
        assert not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
