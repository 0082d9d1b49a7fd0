"""The FiftyOne App for a run, rendered by headless Chromium (offline, localhost only)."""

from __future__ import annotations

import socket
import time

import pytest

from sskd.inspect import app


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
