"""Side processes of a stage: failures surface, interruptions kill the child, results match."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sskd.metrics import read_metrics
from sskd.models.base import load_model
from sskd.stages import open_run, prepare_data, zero_shot
from sskd.stages.parallel import side_jobs


def _open(tmp_path, name="r", **extra):
    ov = {"cache_dir": str(tmp_path / f"cache_{name}"), "data.root": str(tmp_path / "data"), **extra}
    return open_run(name, preset="smoke", runs_root=str(tmp_path / "runs"), overrides=ov)


def test_workers_1_and_unknown_jobs(tmp_path):
    run = _open(tmp_path, workers=1)
    with side_jobs(run, ["student_supervised"]) as proc:
        assert proc is None                      # in order, in this process
    with pytest.raises(KeyError, match="unknown side job"):
        with side_jobs(run, ["no_such_job"]):
            pass


def test_a_failing_side_job_raises_with_the_childs_error(tmp_path):
    run = _open(tmp_path)                        # no prepare_data: the split files are missing
    with pytest.raises(RuntimeError) as e:
        with side_jobs(run, ["student_supervised"]) as proc:
            assert proc is not None and proc.pid != os.getpid()
    msg = str(e.value)
    assert "student_supervised" in msg and str(run.dir.root) in msg
    assert "labeled.json" in msg                 # the child's own error, not a generic one


def test_an_interrupted_stage_terminates_its_side_process(tmp_path):
    run = _open(tmp_path, **{"stages.student_pretrain.steps": 10**6})
    prepare_data(run)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        with side_jobs(run, ["student_pretrain"]) as proc:
            pid = proc.pid
            raise KeyboardInterrupt
    assert not proc.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert torch.get_num_threads() == threads        # the stage's own threads are restored


_STAGE_SCRIPT = textwrap.dedent("""
    import sys, time
    from sskd.stages import open_run, prepare_data
    from sskd.stages.parallel import side_jobs

    if __name__ == "__main__":           # the spawned child re-imports this file as __mp_main__
        root = sys.argv[1]
        run = open_run("r", preset="smoke", runs_root=root + "/runs", overrides={
            "cache_dir": root + "/cache", "data.root": root + "/data",
            "stages.student_pretrain.steps": 10**6})
        prepare_data(run)
        with side_jobs(run, ["student_pretrain"]) as proc:
            print(proc.pid, flush=True)
            time.sleep(600)
""")


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited orphan waits for init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_stage_process_does_not_leave_its_side_process_running(tmp_path, sig):
    # SIGTERM/SIGKILL end the stage process without its ``finally``; the child must notice
    script = tmp_path / "stage.py"
    script.write_text(_STAGE_SCRIPT)
    stage = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    child = None
    try:
        child = int(stage.stdout.readline())
        assert child != stage.pid and not _gone(child, 1.0)   # the side job is training
        stage.send_signal(sig)
        stage.wait(30)
        assert _gone(child, 30.0), f"side process {child} still runs after its stage got {sig!r}"
    finally:
        stage.kill()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_stages_reuse_side_process_results_and_side_processes_are_deterministic(tmp_path):
    from sskd.stages.pipeline import student_supervised
    runs = {n: _open(tmp_path, n, workers=w) for n, w in (("a", 2), ("b", 2), ("seq", 1))}
    for run in runs.values():
        prepare_data(run)
        zero_shot(run, progress=False)           # side process (workers 2) or nothing (1)
    # workers 1 trained nothing beside the teacher; stage 2 trains its baseline on demand
    assert not runs["seq"].dir.model_dir("student_supervised").is_dir()
    done = runs["a"].dir.model_dir("student_supervised") / "model.pt"
    before = done.stat().st_mtime_ns
    student_supervised(runs["a"], progress=False)     # the stage finds the side job's result
    assert done.stat().st_mtime_ns == before
    a, b = (load_model(runs[n].dir.model_dir("student_supervised")).state_dict() for n in "ab")
    for k in a:                                       # same seed, same workers: same weights
        assert torch.equal(a[k], b[k]), k
    aps = [read_metrics(runs[n].dir.metrics)["models"]["student_supervised"]["AP"] for n in "ab"]
    assert aps[0] == aps[1]
    student_supervised(runs["seq"], progress=False)
    assert 0 <= read_metrics(runs["seq"].dir.metrics)["models"]["student_supervised"]["AP"] <= 100
