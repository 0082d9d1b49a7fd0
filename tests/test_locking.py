"""The run-dir lock: one process per run dir, inherited by the processes it starts."""

import json
import os
import subprocess
import sys
import time

import pytest

from sskd.locking import HELD_ENV, RunDirLocked, holder, run_dir_lock

HOLD = ("import sys, time\nfrom sskd.locking import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1], 'test holder'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")


@pytest.fixture
def held(tmp_path):
    """A second process holding the lock of ``tmp_path / 'r'``."""
    root = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "held"
    yield root, p
    p.kill()
    p.wait()


def test_a_held_lock_stops_a_second_process_at_once(held):
    root, p = held
    t0 = time.time()
    with pytest.raises(RunDirLocked, match=f"in use by PID {p.pid} \\(test holder, since "):
        with run_dir_lock(root):
            pass
    assert time.time() - t0 < 1
    assert holder(root)["pid"] == p.pid


def test_stage_functions_hold_the_lock(held):
    from sskd.config import load_config, save_config
    from sskd.stages import prepare_data
    root, p = held
    save_config(load_config("smoke"), root / "config.yaml")
    with pytest.raises(RunDirLocked, match=f"PID {p.pid}"):
        prepare_data(root)


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(held, caplog):
    root, p = held
    p.kill()
    p.wait()
    lines = []
    with run_dir_lock(root, "me", echo=lines.append):
        assert holder(root)["pid"] == os.getpid() and holder(root)["command"] == "me"
    assert f"PID {p.pid} (test holder) is no longer running" in lines[0]
    assert holder(root) == {}  # a clean release leaves a free lock, not a stale one


def test_nested_and_inherited_holders(tmp_path):
    root = tmp_path / "r"
    with run_dir_lock(root, "outer"):
        with run_dir_lock(root, "inner"):  # the same process: re-entrant
            assert holder(root)["command"] == "outer"
        assert str(root.resolve()) in os.environ[HELD_ENV]
        # a process started while the lock is held (a papermill kernel) may use the run dir
        code = ("import sys\nfrom sskd.locking import run_dir_lock\n"
                "with run_dir_lock(sys.argv[1]):\n    print('ok')")
        out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert out.stdout.strip() == "ok", out.stderr
    assert HELD_ENV not in os.environ and json.loads((root / ".lock").read_text() or "{}") == {}
