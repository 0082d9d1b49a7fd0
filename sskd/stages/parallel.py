"""Independent work of a run in a second process, beside the stage's own (CPU, >= 2 cores).

On a 2-core CPU a second intra-op thread buys a small model little: measured on the demo pair,
a student step takes 0.20 s with 2 threads alone and 0.18 s with 1 thread while another job
runs; a teacher step 0.43 s vs 0.51 s. Two single-threaded jobs therefore finish in about the
time of the longer one, where running them in turn takes the sum. The stages use this for work
that does not depend on what the stage itself computes: the stand-in student and the supervised
student baseline beside the stand-in teacher's pretraining, the supervised teacher baseline
beside stage 1, and the ablations beside stage 2.

A side job calls the same functions the stages call, so it writes the same files with the same
fingerprints: afterwards the stage "runs" the job again and only loads its results. A run is
reproducible for a given ``workers`` setting; with ``workers: 1`` (everything in order, in this
process, all cores per job) the numbers differ slightly, because 1 and 2 intra-op threads sum
in different orders and AdamW turns tiny differences of near-zero gradients into whole
learning-rate steps. A failing side job raises in the stage, naming the job and the child's
traceback; an interrupted stage terminates the child by its PID. A stage process that dies
without running its ``finally`` (SIGTERM, SIGKILL, a crash) cannot do that, so the child also
watches its parent and exits when the parent is gone, instead of training on as an orphan.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch

from sskd.stages.run import Run, as_run, cpu_cores, log


def _student_pretrain(run: Run) -> None:
    from sskd.stages.common import initial_student
    from sskd.stages.data import load_datasets
    initial_student(run, load_datasets(run, with_source=True), progress=False)


def _student_supervised(run: Run) -> None:
    from sskd.stages.pipeline import student_supervised
    student_supervised(run, progress=False)


def _teacher_supervised(run: Run) -> None:
    from sskd.stages.pipeline import teacher_supervised
    teacher_supervised(run, progress=False)


def _ablations(run: Run) -> None:
    from sskd.stages.ablations import run_ablations, transfer_only_ablations
    run_ablations(run, transfer_only_ablations(run), progress=False)


#: side jobs by name; each takes the run and writes its results into the run dir / caches
JOBS: dict[str, Callable[[Run], None]] = {
    "student_pretrain": _student_pretrain,
    "student_supervised": _student_supervised,
    "teacher_supervised": _teacher_supervised,
    "ablations": _ablations,  # those that re-run stage 2 only
}


#: exit status of a side process that stopped because its stage process died
ORPHANED_EXIT_CODE = 75


def _exit_with_parent() -> None:
    """Exit this process as soon as the process that spawned it is gone.

    The parent's sentinel (a pipe whose write end only the parent holds) becomes readable when
    the parent exits by any means, SIGKILL included, so no signal handler is needed there.
    """
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(ORPHANED_EXIT_CODE)  # no cleanup: the run dir's files are written atomically

    threading.Thread(target=watch, name="sskd-parent-watch", daemon=True).start()


def _child(run_dir: str, jobs: list[str], threads: int, conn) -> None:
    """Entry point of the side process: run ``jobs`` in order, report ok or the traceback."""
    _exit_with_parent()
    try:
        torch.set_num_threads(threads)
        run = as_run(run_dir)
        for name in jobs:
            JOBS[name](run)
        conn.send(("ok", ""))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def parallel_enabled(run: Run) -> bool:
    return run.cfg.workers >= 2 and run.device.type == "cpu" and cpu_cores() >= 2


@contextlib.contextmanager
def side_jobs(run: Run, jobs: list[str]) -> Iterator[mp.process.BaseProcess | None]:
    """Run ``jobs`` (names in :data:`JOBS`, in order) in a second process while the body runs.

    Both processes get half the cores. On exit the body waits for the side process; its
    failure raises ``RuntimeError`` with the child's traceback. With ``workers: 1``, on CUDA,
    on one core or with no jobs, nothing is started (the stage then does the work in order).
    Yields the side process (``None`` when none was started).
    """
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        raise KeyError(f"unknown side job(s) {unknown}; known: {sorted(JOBS)}")
    if not jobs or not parallel_enabled(run):
        yield None
        return
    threads = max(1, cpu_cores() // 2)
    ctx = mp.get_context("spawn")  # fork would copy the parent's torch thread pools and locks
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(Path(run.dir.root).resolve()), jobs, threads,
                                            child_conn), name=f"sskd-{'+'.join(jobs)}", daemon=True)
    before = torch.get_num_threads()
    proc.start()
    child_conn.close()
    log.info("side process %d: %s (%d thread(s) each)", proc.pid, ", ".join(jobs), threads)
    torch.set_num_threads(threads)
    ok = False
    try:
        yield proc
        ok = True
    finally:
        torch.set_num_threads(before)
        if not ok:  # the stage failed or was interrupted: do not leave the child running
            proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    status, detail = "error", ""
    try:
        if parent_conn.poll(None):
            status, detail = parent_conn.recv()
    except EOFError:
        pass
    proc.join()
    if status != "ok":
        detail = detail or f"the side process exited with code {proc.exitcode} before reporting"
        raise RuntimeError(f"side job(s) {jobs} of run {run.dir.root} failed:\n{detail}")
