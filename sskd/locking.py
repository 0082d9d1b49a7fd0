"""Exclusive locks on run dirs: one ``sskd run`` (or interactive stage call) per run dir at a time.

The lock is an ``flock`` on ``<run dir>/.lock``, whose content names the holder (PID, host,
command, start time). The kernel drops an ``flock`` when its process dies, so a crashed or
killed holder never blocks the next run: its PID is still written in the file, and the next
holder takes over with a log line naming it. A second process that finds the lock held stops at
once with :class:`RunDirLocked`, whose message names the holder's PID.

Nested holders do not deadlock: a process that holds a run dir's lock may take it again, and
processes it starts (papermill kernels, side processes) inherit the list of held run dirs
through ``SSKD_LOCKS_HELD``, so the stage functions a notebook calls under ``sskd run`` run
inside the runner's lock instead of waiting for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("sskd")

LOCK_NAME = ".lock"
HELD_ENV = "SSKD_LOCKS_HELD"  # os.pathsep-separated run dirs whose lock an ancestor holds

_held: dict[str, int] = {}  # run dir -> nesting depth, in this process


class RunDirLocked(RuntimeError):
    """Another process holds the run dir's lock; the message names it and the fix."""

    def __init__(self, root: Path, holder: dict) -> None:
        self.root, self.holder = root, holder
        pid = holder.get("pid", "?")
        what = holder.get("command", "another sskd process")
        since = holder.get("since", "?")
        host = holder.get("host", "")
        super().__init__(
            f"run dir {root} is in use by PID {pid} ({what}, since {since}"
            + (f", on {host}" if host and host != socket.gethostname() else "")
            + f"); wait for it to finish, or stop it (kill {pid}) and run again")


def lock_path(root: str | Path) -> Path:
    return Path(root) / LOCK_NAME


def _inherited() -> set[str]:
    return {p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p}


def _read(f) -> dict:
    f.seek(0)
    try:
        data = json.loads(f.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder(root: str | Path) -> dict:
    """What the lock file of a run dir says (``{}`` when free or never locked)."""
    p = lock_path(root)
    if not p.is_file():
        return {}
    with open(p) as f:
        return _read(f)


@contextlib.contextmanager
def run_dir_lock(root: str | Path, command: str = "",
                 echo: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of run dir ``root`` for the body (see the module docstring).

    ``command`` describes the holder in the lock file (shown to whoever finds it held);
    ``echo`` receives the stale-lock take-over line (default: the ``sskd`` logger).
    Raises :class:`RunDirLocked` at once when another live process holds it.
    """
    root = Path(root).resolve()
    key = str(root)
    if _held.get(key) or key in _inherited():
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    f = open(lock_path(root), "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(root, _read(f)) from None
        old = _read(f)
        if old.get("pid") and old.get("pid") != os.getpid():
            state = "no longer running" if not _alive(int(old["pid"])) else "no longer holding it"
            (echo or log.warning)(f"[sskd] taking over the stale lock of {root}: PID "
                                  f"{old['pid']} ({old.get('command', '?')}) is {state}")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": command or " ".join(Path(sys.argv[0]).name.split()
                                                           + sys.argv[1:])[:200],
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        f.flush()
        _held[key] = 1
        before = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = os.pathsep.join(sorted(_inherited() | {key}))
        try:
            yield
        finally:
            _held.pop(key, None)
            if before is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = before
            f.seek(0)
            f.truncate()  # released cleanly: an empty file is a free lock, not a stale one
            f.flush()
    finally:
        f.close()  # closing drops the flock
